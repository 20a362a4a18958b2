"""The `napo pairs` job's report: answer-length histograms and `stats.md`, from the counts in `stats.json`."""

from __future__ import annotations

from typing import Any

LENGTH_BINS = (0, 1, 2, 4, 8, 16, 32, 64)  # upper edges, in words, of the answer-length histogram's bins


def length_histogram(answers: list[str | None]) -> list[int]:
    """Counts of answers per word-count bin (`bin_labels`); None answers are not counted."""
    counts = [0] * (len(LENGTH_BINS) + 1)
    for answer in answers:
        if answer is not None:
            words = len(answer.split())
            counts[next((b for b, edge in enumerate(LENGTH_BINS) if words <= edge), len(LENGTH_BINS))] += 1
    return counts


def bin_labels() -> list[str]:
    """The histogram's bin labels: "0", "1", "2", "3-4", ..., ">64"."""
    labels, low = [], 0
    for edge in LENGTH_BINS:
        labels.append(str(edge) if low == edge else f"{low}-{edge}")
        low = edge + 1
    return [*labels, f">{LENGTH_BINS[-1]}"]


def stats_markdown(stats: dict[str, Any], config: Any) -> str:
    """`stats.md`: the counts of `stats` (the job's stats.json) as markdown tables; `config` is the `PairsConfig`."""
    lines = [
        "# napo pairs",
        "",
        f"source `{config.source}`, generator `{config.model}`",
        "",
        f"- source rows: {stats['source_rows']}",
        f"- rows written: {stats['rows_written']}",
        f"- rejected rows (see rejects.jsonl): {stats['rejects']}",
        f"- rows dropped because no negative was left: {stats['dropped_no_negative']}",
        f"- label noise: rate {stats['label_noise']['rate']}, rows swapped {stats['label_noise']['rows_swapped']}",
        "",
        "| negative | spec | written | identical to chosen | empty |",
        "|---|---|---|---|---|",
    ]
    for column, n in stats["negatives"].items():
        fate = "kept" if n["identical_kept"] else "dropped"
        lines.append(
            f"| {column} | `{n['spec']}` | {n['written']} | {n['identical_to_chosen']} ({fate}) | {n['empty']} |"
        )
    lines += [
        "",
        "Answer length (words):",
        "",
        "| answer | " + " | ".join(stats["bins"]) + " |",
        "|---" * (len(stats["bins"]) + 1) + "|",
    ]
    for column, counts in stats["answer_words_histogram"].items():
        lines.append(f"| {column} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines) + "\n"
