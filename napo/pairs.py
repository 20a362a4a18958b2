"""Negative generation: source rows + a generator model + perturbation specs -> a preference dataset.

For every source row (prompt, images / audios, `chosen`) and every negative column, the row is degraded with
`perturb.apply(spec, row)` and the model answers the degraded input; that answer becomes the row's
`rejected_<kind>` value. The written rows keep the ORIGINAL prompt and media (DESIGN.md, "Preference rows"):
negatives are scored with the full input, only their generation saw the degraded one.

The job is resumable. Rows are processed in shards of `shard_size`; each shard is written atomically
(temporary file, then `os.replace`), so after a kill the same call skips the finished shards and no row is
lost or written twice. The job's arguments are kept in `<output_dir>/args.json` and a rerun with different
ones is refused. Output layout:

    <output_dir>/args.json     the job's arguments (checked on resume)
    <output_dir>/shards/       NNNNN/ (save_to_disk) + NNNNN.json: rows and counts of each finished shard
    <output_dir>/dataset/      the preference dataset (`datasets.load_from_disk`)
    <output_dir>/data.parquet  the same rows as one parquet file
    <output_dir>/rejects.jsonl source rows left out, one {"row", "field", "reason"} per line
    <output_dir>/stats.json, stats.md   counts and answer-length histograms
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

import perturb
from napo.data import REJECTED_COLUMNS, DatasetOptions, read_dataset
from napo.inference import generate
from napo.jobs import LOCK_NAME, locks_output
from napo.label_noise import inject_label_noise
from napo.negatives import AUDIO_NEGATIVES, IMAGE_NEGATIVES
from napo.pairs_stats import bin_labels, length_histogram, stats_markdown
from napo.provenance import write_text_atomic

# The default negatives of image and of audio data: column -> perturbation spec (records in `napo.negatives`).
VISION_NEGATIVES = IMAGE_NEGATIVES
# Files and folders a job writes; `overwrite` removes exactly these, never anything else in output_dir.
_OUTPUTS = ("args.json", "shards", "dataset", "data.parquet", "rejects.jsonl", "stats.json", "stats.md")
# Upper edges (inclusive) of the answer-length histogram bins, in words; the last bin is open.


@dataclass
class PairsConfig:
    """The arguments of a `napo pairs` job: every field is recorded in args.json and must match to resume."""

    source: str = field(
        metadata={"help": "prompts (+ images/audios) with `chosen`: a save_to_disk folder, parquet or JSONL"}
    )
    model: str = field(metadata={"help": "generator model: a Hugging Face id or a save_pretrained folder"})
    output_dir: str = field(
        metadata={"help": "folder for the dataset, stats and shards (rerun the same command to resume)"}
    )
    negatives: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "negative column -> perturbation spec; None: "
            f"{VISION_NEGATIVES} for image data, {AUDIO_NEGATIVES} for audio data"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "samples per generate call; lower it if memory runs out"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest negative answer, in tokens"})
    do_sample: bool = field(default=False, metadata={"help": "sample negatives (seeded) instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (only with do_sample)"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, of random perturbations and of label noise"})
    keep_identical: bool = field(
        default=False,
        metadata={
            "help": "keep negatives identical to chosen "
            "(default: set them to None; a row with no negative left is dropped)"
        },
    )
    inject_label_noise: float = field(
        default=0.0,
        metadata={
            "help": "fraction of rows whose chosen and rejected answers are swapped (marked noisy=True); 0 = none"
        },
    )
    shard_size: int = field(
        default=64, metadata={"help": "rows per resumable shard; a kill loses at most one shard of work"}
    )
    dtype: str | None = field(default=None, metadata={"help": "model dtype, e.g. bfloat16 or auto; None: float32"})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "let transformers run the model's own code (read it first)"}
    )
    data: DatasetOptions = field(
        default_factory=DatasetOptions,
        metadata={"help": "how the source is read (split, layout, columns, media limits)"},
    )


@locks_output(lambda arguments: arguments["config"].output_dir)
def build_pairs(
    config: PairsConfig,
    *,
    model: PreTrainedModel | None = None,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a pairs job; return its stats, with the written paths under "outputs".

    Args:
        config: the job; `config.model` is loaded with `napo.models.load_model` unless `model` and
            `processing_class` are given (they must be what `config.model` names: it is what resuming checks).
        overwrite: delete a previous job's outputs in `config.output_dir` and start over.
        progress: show a tqdm bar (rows and rows/s).
        on_shard: called with the shard index after each shard is written (progress hooks, tests).
        allow_pickle: let `load_model` read pickled (.bin) weights (not recorded in args.json: a safety opt-in).

    The output folder is locked for the call (`napo.jobs.output_lock`): a second job on it is refused.

    Raises:
        ValueError: a bad negative column or spec, a source without a `prompt` or `chosen` column, or an
            output folder holding another job (the message says which arguments differ and about --overwrite).
    """
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar for the job, not one per shard write
    try:
        return _run(config, model, processing_class, overwrite, progress, on_shard, allow_pickle)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _run(
    config: PairsConfig,
    model: PreTrainedModel | None,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin | None,
    overwrite: bool,
    progress: bool,
    on_shard: Callable[[int], None] | None,
    allow_pickle: bool,
) -> dict[str, Any]:
    out = Path(config.output_dir)
    _prepare_output(out, overwrite)
    data = config.data if isinstance(config.data, DatasetOptions) else DatasetOptions(**config.data)
    # Every row is converted and checked here (kind="source": a string `chosen`); bad rows become rejects.
    dataset, read_rejects = read_dataset(config.source, data, on_bad_row="collect", kind="source")
    source_rows = len(dataset) + len(read_rejects)
    if len(dataset) == 0 and read_rejects:
        # Nothing to perturb: say so, with every reason on disk, instead of failing later on the empty table's
        # missing columns.
        write_text_atomic(out / "rejects.jsonl", "".join(json.dumps(dict(r)) + "\n" for r in read_rejects))
        first = read_rejects[0]
        raise ValueError(
            f"every row of {config.source} was rejected ({len(read_rejects)} of {source_rows}), e.g. row "
            f"{first['row']} ({first['field']}): {first['reason']}; all reasons are in {out / 'rejects.jsonl'}"
        )
    negatives = _resolve_negatives(config.negatives, dataset)
    # Local paths are recorded absolute: the same command run from another folder still resumes.
    where = {
        name: os.path.abspath(getattr(config, name))
        for name in ("source", "model", "output_dir")
        if os.path.exists(getattr(config, name))
    }
    _check_or_write_args(
        out, {**dataclasses.asdict(config), **where, "negatives": negatives, "source_rows": source_rows}
    )

    # read_dataset leaves bad rows out in order: the k-th kept row is the k-th source index not rejected.
    bad = {reject["row"] for reject in read_rejects}
    source_index = [i for i in range(source_rows) if i not in bad]
    rejects = [dict(reject) for reject in read_rejects]
    valid = list(range(len(dataset)))

    shards = [valid[start : start + config.shard_size] for start in range(0, len(valid), config.shard_size)]
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    for stale in shard_dir.glob("*.tmp-*"):  # half-written by a killed run; its shard is redone below
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    todo = [i for i, _ in enumerate(shards) if not (shard_dir / f"{i:05d}").exists()]
    if todo and model is None:
        from napo.models import load_model  # only a job with work left needs the model

        model, processing_class = load_model(
            config.model, trust_remote_code=config.trust_remote_code, dtype=config.dtype, allow_pickle=allow_pickle
        )
    done_rows = sum(len(shard) for i, shard in enumerate(shards) if i not in todo)
    with tqdm(total=len(valid), initial=done_rows, unit="row", desc="napo pairs", disable=not progress) as bar:
        for shard_id in todo:
            _write_shard(
                shard_dir, shard_id, dataset, shards[shard_id], source_index, negatives, config, model, processing_class
            )
            bar.update(len(shards[shard_id]))
            if on_shard is not None:
                on_shard(shard_id)
    return _finish(out, dataset, len(shards), negatives, config, rejects, source_rows)


def parse_negatives(items: list[str]) -> dict[str, str]:
    """["COLUMN=SPEC", ...] (the CLI's repeated --negative) -> {column: spec}; the spec may contain "=" itself."""
    negatives = {}
    for item in items:
        column, sep, spec = item.partition("=")
        if not sep or not column.strip() or not spec.strip():
            raise ValueError(f"--negative {item!r}: expected COLUMN=SPEC, e.g. rejected_language_bias=image.drop")
        if column.strip() in negatives:
            raise ValueError(f"--negative {item!r}: column {column.strip()!r} is given twice")
        negatives[column.strip()] = spec.strip()
    return negatives


def _resolve_negatives(negatives: dict[str, str] | None, dataset: datasets.Dataset) -> dict[str, str]:
    """The job's negative columns and specs, checked; the default depends on whether the data has audio."""
    if negatives is None:
        has_audio = (
            "audios" in dataset.column_names
            and len(dataset) > 0
            and pc.max(pc.list_value_length(dataset.data.column("audios"))).as_py()
        )
        negatives = dict(AUDIO_NEGATIVES if has_audio else VISION_NEGATIVES)
    if not negatives:
        raise ValueError("no negative to generate: give at least one COLUMN=SPEC")
    for column, spec in negatives.items():
        if column not in REJECTED_COLUMNS:
            raise ValueError(f"negative column {column!r}: expected one of {REJECTED_COLUMNS}")
        if column in dataset.column_names:
            raise ValueError(f"the source already has a {column!r} column: drop it or generate into another column")
        perturb.parse(spec)  # a typo fails here, before any model is loaded, with the list of valid ops
    for needed in ("prompt", "chosen"):
        if needed not in dataset.column_names:
            raise ValueError(
                f"the source has no {needed!r} column (columns: {dataset.column_names}); "
                "napo pairs needs prompt and chosen"
            )
    return negatives


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Create `out`; refuse a non-empty folder that holds no job (even with overwrite: it may be anything)."""
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()) and not (out / "args.json").exists():
        raise ValueError(
            f"{out} is not empty and holds no napo pairs job (no args.json): choose an empty or new folder"
        )
    if overwrite:
        for name in _OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _check_or_write_args(out: Path, job: dict) -> None:
    """First run: record the job. Later runs: refuse unless the recorded job is the same."""
    path = out / "args.json"
    job = json.loads(json.dumps(job))  # the JSON form (tuples -> lists), to compare like with like
    if path.exists():
        recorded = json.loads(path.read_text())
        differ = [
            f"{key}: {recorded.get(key)!r} -> {job.get(key)!r}"
            for key in sorted(set(recorded) | set(job))
            if recorded.get(key) != job.get(key)
        ]
        if differ:
            raise ValueError(
                f"{out} holds a pairs job with other arguments ({'; '.join(differ)}): rerun with the recorded "
                f"arguments (see {path}) to resume, or pass --overwrite to start over"
            )
        return
    write_text_atomic(path, json.dumps(job, indent=2) + "\n")


def _write_shard(
    shard_dir: Path,
    shard_id: int,
    dataset: datasets.Dataset,
    positions: list[int],
    source_index: list[int],
    negatives: dict[str, str],
    config: PairsConfig,
    model: PreTrainedModel,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
) -> None:
    """Generate every negative of one shard of rows and write the shard's rows and counts atomically."""
    rows = dataset.select(positions)
    media = [name for name in ("prompt", "images", "audios", "sampling_rate") if name in dataset.column_names]
    columns = rows.select_columns([*media, "chosen"])[:]  # one batched decode of the shard's images
    samples = [{name: columns[name][k] for name in media} for k in range(len(rows))]
    chosen = columns["chosen"]
    rejects: list[dict] = []
    degraded: dict[str, list[dict]] = {column: [] for column in negatives}
    keep = []
    for k, sample in enumerate(samples):
        row = source_index[positions[k]]
        try:
            per_row = {
                column: perturb.apply(spec, sample, seed=_seed(config.seed, row)) for column, spec in negatives.items()
            }
        except ValueError as error:  # perturb names the malformed key
            rejects.append({"row": row, "field": "prompt/images/audios", "reason": f"cannot be perturbed: {error}"})
            continue
        keep.append(k)
        for column in negatives:
            degraded[column].append(per_row[column])

    answers: dict[str, list[str | None]] = {}
    counts = {"identical": {}, "empty": {}}
    for c, column in enumerate(negatives):
        generated = generate(
            model,
            processing_class,
            degraded[column],
            batch_size=config.batch_size,
            max_new_tokens=config.max_new_tokens,
            do_sample=config.do_sample,
            temperature=config.temperature,
            seed=_seed(config.seed, shard_id, c),
        )
        values: list[str | None] = []
        identical = empty = 0
        for k, answer in zip(keep, generated):
            same = bool(answer) and _same_answer(answer, chosen[k])
            identical += same
            empty += not answer
            # An empty string is no answer to train against; an identical one is counted, then dropped unless kept.
            values.append(None if not answer or (same and not config.keep_identical) else answer)
        answers[column] = values
        counts["identical"][column], counts["empty"][column] = identical, empty

    written = [j for j in range(len(keep)) if any(answers[column][j] is not None for column in negatives)]
    shard = rows.select([keep[j] for j in written])
    for column in negatives:
        shard = shard.add_column(column, [answers[column][j] for j in written], feature=datasets.Value("string"))
    stats = {
        "rows": len(positions),
        "written": len(written),
        "dropped_no_negative": len(keep) - len(written),
        **counts,
        "rejects": rejects,
    }
    write_text_atomic(shard_dir / f"{shard_id:05d}.json", json.dumps(stats) + "\n")
    tmp = shard_dir / f"{shard_id:05d}.tmp-{os.getpid()}"
    shard.save_to_disk(str(tmp))
    os.replace(tmp, shard_dir / f"{shard_id:05d}")  # the folder's existence marks the shard done


def _finish(
    out: Path,
    dataset: datasets.Dataset,
    n_shards: int,
    negatives: dict[str, str],
    config: PairsConfig,
    rejects: list[dict],
    source_rows: int,
) -> dict[str, Any]:
    """Join the shards, inject label noise, write the dataset, parquet copy, rejects and stats."""
    shard_stats = [json.loads((out / "shards" / f"{i:05d}.json").read_text()) for i in range(n_shards)]
    if n_shards:  # memory-mapped shards: joining them copies nothing
        final = datasets.concatenate_datasets(
            [datasets.load_from_disk(str(out / "shards" / f"{i:05d}")) for i in range(n_shards)]
        )
    else:
        features = datasets.Features({**dataset.features, **{column: datasets.Value("string") for column in negatives}})
        final = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    noisy_rows: list[int] = []
    if config.inject_label_noise > 0:
        final, noisy_rows = inject_label_noise(final, config.inject_label_noise, config.seed, list(negatives))

    _replace_dir(out / "dataset", final.save_to_disk)
    tmp = out / f"data.parquet.tmp-{os.getpid()}"
    final.to_parquet(str(tmp))
    os.replace(tmp, out / "data.parquet")
    rejects = sorted(rejects + [r for s in shard_stats for r in s["rejects"]], key=lambda r: r["row"])
    write_text_atomic(out / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))

    outputs = {name: str(out / name) for name in ("dataset", "data.parquet", "rejects.jsonl", "stats.json", "stats.md")}
    stats = {
        "source_rows": source_rows,
        "rows_written": len(final),
        "rejects": len(rejects),
        "dropped_no_negative": sum(s["dropped_no_negative"] for s in shard_stats),
        "negatives": {
            column: {
                "spec": spec,
                "written": sum(v is not None for v in final[column]),
                "identical_to_chosen": sum(s["identical"][column] for s in shard_stats),
                "identical_kept": config.keep_identical,
                "empty": sum(s["empty"][column] for s in shard_stats),
            }
            for column, spec in negatives.items()
        },
        "label_noise": {"rate": config.inject_label_noise, "rows_swapped": len(noisy_rows)},
        "answer_words_histogram": {column: length_histogram(final[column]) for column in ("chosen", *negatives)},
        "bins": bin_labels(),
        "outputs": outputs,
    }
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    write_text_atomic(out / "stats.md", stats_markdown(stats, config))
    return stats


def _seed(*parts: int) -> int:
    """A well-mixed non-negative seed from (job seed, row) or (job seed, shard, column): resumes reproduce it."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _same_answer(answer: str, chosen: str) -> bool:
    """Equal up to case and whitespace: such a negative teaches nothing (or the opposite of what is intended)."""
    return " ".join(answer.split()).casefold() == " ".join(chosen.split()).casefold()


def _replace_dir(path: Path, write: Callable[[str], None]) -> None:
    """Write a folder next to `path`, then swap it in: a kill leaves the old folder or the new one, never half."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(str(tmp))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
