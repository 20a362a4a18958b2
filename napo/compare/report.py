"""The report of a `napo compare` grid: summary.csv, README.md (tables, the NaPO-vs-DPO verdict, provenance) and
three plots, all from the finished cells' rows (`napo.compare.stats` computes the numbers).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from napo.compare.grid import SMOOTHING_RANGE, CompareConfig
from napo.compare.stats import (
    LOWER_IS_BETTER,
    claim_verdict,
    clean_pair_check,
    gains_over_sft,
    interval_text,
    paired_differences,
    summarize,
)
from napo.lab.tasks import CLEAN_PAIR_RULE
from napo.lab.tasks import KEY_METRICS as LAB_KEY_METRICS
from napo.provenance import device_description, versions_text, write_text_atomic

# Metrics the verdict compares NaPO and DPO on, by source: the debiasing gain, what it may cost (NOTES: DPO on
# these pairs over-corrects against the prior), and whether the flipped pairs were learned.
VERDICT_METRICS = {
    "lab": ("counterfactual_accuracy", "prior_consistent_accuracy", "margin_flipped_fitted"),
    "dataset": ("heldout_reward_accuracy", "margin_flipped_fitted"),
}
# Shown first in the report and plotted (when present); every other value gets a table after them: the bias lab's
# headline metrics, then a user dataset's held-out ones and the margins of clean and flipped pairs.
KEY_METRICS = (
    *LAB_KEY_METRICS,
    "heldout_reward_accuracy",
    "heldout_mean_margin",
    "margin_clean_mean",
    "margin_flipped_mean",
    "margin_clean_fitted",
    "margin_flipped_fitted",
)


def write_report(out: Path, rows: list[dict], config: CompareConfig, meta: dict) -> dict[str, str]:
    """summary.csv, README.md and the three plots from the finished cells; return {name: path}."""
    summary = summarize(rows)
    outputs = {"results": out / "results.jsonl", "summary": out / "summary.csv", "report": out / "README.md"}
    _write_csv(outputs["summary"], summary)
    outputs.update(_plots(out, rows, summary, config, meta.get("sft_metrics", {})))
    write_text_atomic(outputs["report"], _markdown(rows, summary, config, meta))
    if (out / "errors.jsonl").exists():
        outputs["errors"] = out / "errors.jsonl"
    return {name: str(path) for name, path in outputs.items()}


def _write_csv(path: Path, summary: list[dict]) -> None:
    lines = ["objective,noise_rate,metric,mean,std,n"]
    lines += [
        f"{s['objective']},{s['noise_rate']!r},{s['metric']},{s['mean']!r},{s['std']!r},{s['n']}" for s in summary
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _table(
    summary: list[dict], metric: str, objectives: list[str], rates: list[float], start: float | None = None
) -> list[str]:
    """A markdown table of one metric: objectives x noise rates, mean ± std, the best mean of each column in bold;
    `start`: the SFT model's value, shown in a first row (it does not depend on the noise rate)."""
    cells = {(s["objective"], s["noise_rate"]): s for s in summary if s["metric"] == metric}
    pick = min if metric in LOWER_IS_BETTER else max
    best = {}
    for rate in rates:
        means = [cells[(o, rate)]["mean"] for o in objectives if (o, rate) in cells]
        best[rate] = pick(means) if means else None
    lines = ["| objective | " + " | ".join(f"noise {r:g}" for r in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    if start is not None:
        lines.append("| *SFT (start)* | " + " | ".join(f"*{start:.3f}*" for _ in rates) + " |")
    for objective in objectives:
        entries = []
        for rate in rates:
            s = cells.get((objective, rate))
            if s is None:
                entries.append("—")
                continue
            text = f"{s['mean']:.3f}" + ("" if math.isnan(s["std"]) else f" ± {s['std']:.3f}")
            entries.append(f"**{text}**" if s["mean"] == best[rate] else text)
        lines.append(f"| {objective} | " + " | ".join(entries) + " |")
    return lines


def _verdict_table(rows: list[dict], metrics: tuple[str, ...], rates: list[float], objectives: list[str]) -> list[str]:
    """`paired_differences` as a markdown table ([] when no NaPO variant has a DPO cell to compare with)."""
    lines = []
    for d in paired_differences(rows, metrics, rates, objectives):
        interval = "—" if math.isnan(d["low"]) else f"[{d['low']:+.3f}, {d['high']:+.3f}]"
        lines.append(
            f"| {d['metric']} | {d['objective']} | {d['noise_rate']:g} | {d['mean']:+.3f} | {interval} | {d['n']} "
            f"| {d['call']} |"
        )
    if not lines:
        return []
    return [
        "| metric | objective | noise | Δ vs DPO (paired mean over seeds) | 95% interval | seeds | verdict |",
        "|---|---|---|---|---|---|---|",
        *lines,
    ]


def _claim_lines(rows: list[dict]) -> list[str]:
    """The paper's claim decided by `stats.claim_verdict`'s rule, with the numbers it was decided on."""
    decided = claim_verdict(rows)
    rule = decided["rule"]
    lines = [
        f"**The paper's claim: {decided['verdict']}.** Rule: at every noise rate ≥ {rule['min_noise_rate']:g}, "
        f"{rule['objective']} − DPO (paired over ≥ {rule['min_replicates']} replicates) gains ≥ "
        f"{rule['min_gain']:+.2f} {rule['gain_metric']} with its 95% interval above 0, and its "
        f"{rule['cost_metric']} interval reaches 0 or above (not significantly worse); refuted otherwise, and on fewer "
        "replicates too once the required gain lies above the gain's whole interval.",
    ]
    lines += [f"- {reason}" for reason in decided["reasons"]]
    return lines


def _clean_pair_lines(rows: list[dict], replicate_sft: dict[int, dict[str, float]], objectives: list[str]) -> list[str]:
    """Issue 15's first item: each objective's change on clean pairs against its own replicate's SFT model (mean
    over replicates and 95% interval), and whether it meets `CLEAN_PAIR_RULE`, in the order of `objectives`; []
    without such cells."""
    rule = CLEAN_PAIR_RULE
    metrics = (rule["gain_metric"], *rule["max_loss"])
    gains = gains_over_sft(rows, replicate_sft, metrics, rule["noise_rate"])
    if not gains:
        return []
    cell = {(g["objective"], g["metric"]): g for g in gains}
    meets = clean_pair_check(gains)
    bounds = "".join(f", lose ≤ {bound:g} {metric}" for metric, bound in rule["max_loss"].items())
    lines = [
        "",
        f"## Clean pairs (noise {rule['noise_rate']:g}): change against each replicate's own SFT model",
        "",
        f"Mean over replicates of (cell − its SFT model) and 95% interval. Issue 15 asks each objective to gain ≥ "
        f"{rule['min_gain']:+.2f} {rule['gain_metric']}{bounds} (means).",
        "",
        f"| objective | {' | '.join(metrics)} | replicates | meets the bounds |",
        "|---|" + "---|" * (len(metrics) + 2),
    ]
    for objective in [o for o in objectives if o in meets]:
        changes = [interval_text(cell[(objective, m)]) if (objective, m) in cell else "—" for m in metrics]
        n = cell[(objective, rule["gain_metric"])]["n"] if (objective, rule["gain_metric"]) in cell else 0
        lines.append(f"| {objective} | {' | '.join(changes)} | {n} | {'yes' if meets[objective] else 'no'} |")
    return lines


def _against_dpo_lines(rows: list[dict], rates: list[float], objectives: list[str]) -> list[str]:
    """Every objective against DPO on the lab's gain and cost metrics (`CLEAN_PAIR_RULE`'s), paired over replicates,
    at the noise rates above 0 (`paired_differences`); [] without such cells."""
    metrics = (CLEAN_PAIR_RULE["gain_metric"], *CLEAN_PAIR_RULE["max_loss"])
    noisy = [rate for rate in rates if rate > 0]
    found = {
        (d["objective"], d["noise_rate"], d["metric"]): d
        for d in paired_differences(rows, metrics, noisy, objectives, napo_only=False)
    }
    lines = [
        "",
        "## Every objective against DPO under noise (paired over replicates, mean and 95% interval)",
        "",
        f"| objective | noise | {' | '.join(metrics)} |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for objective in [o for o in objectives if o != "dpo"]:
        for rate in noisy:
            if any((objective, rate, m) in found for m in metrics):
                cells = [
                    interval_text(found[(objective, rate, m)]) if (objective, rate, m) in found else "—"
                    for m in metrics
                ]
                lines.append(f"| {objective} | {rate:g} | {' | '.join(cells)} |")
    return lines if len(lines) > 5 else []


def _gates_line(gates: dict[int, dict]) -> str:
    """Each replicate's SFT gate (`napo.lab.tasks.sft_gate`) on one line: how many passed, then seed by seed."""
    return f"- SFT gate per replicate: {sum(g['pass'] for g in gates.values())} of {len(gates)} passed; " + "; ".join(
        f"seed {seed} {'passed' if g['pass'] else 'NOT passed'} ("
        + ", ".join(f"{name} {c['value']:.3f}" for name, c in g.items() if name != "pass")
        + ")"
        for seed, g in sorted(gates.items())
    )


def _source_text(config: CompareConfig) -> str:
    """What the grid's cells trained from, in words: the bias lab, or the user's dataset and model."""
    if config.source == "lab":
        return f"the {config.lab_task} bias lab" + (" (quick mode)" if config.quick else "")
    return f"dataset `{config.dataset}`, model `{config.model}`, {config.holdout:g} of its rows held out clean"


def _markdown(rows: list[dict], summary: list[dict], config: CompareConfig, meta: dict) -> str:
    objectives = [o for o in config.objectives if any(r["objective"] == o for r in rows)]
    rates = sorted(r for r in config.noise_rates if any(row["noise_rate"] == r for row in rows))
    present = {s["metric"] for s in summary}
    metrics = [m for m in KEY_METRICS if m in present] + sorted(present - set(KEY_METRICS))
    train_time = sum(r["train_wall_s"] for r in rows)
    lines = [
        "# napo compare: objectives under controlled label noise",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- wall time of this invocation: {meta['run_wall_s']:.0f} s ({meta['cells_run']} cells run, "
        f"{meta['cells_failed']} failed; a resumed grid's earlier cells ran in earlier invocations); summed over the "
        f"{len(rows)} finished cells: training {train_time:.0f} s, training + evaluation + scoring "
        f"{sum(r['cell_wall_s'] for r in rows):.0f} s (cells of parallel workers overlap)",
        f"- cells finished: {len(rows)} of {meta['cells_total']}",
        f"- device: {device_description()}",
        f"- versions: {versions_text()}",
        f"- source: {_source_text(config)}",
        f"- noise: {config.noise_kind} "
        + (
            "(an automatic annotator picks a wrong chosen on round(rate · rows) rows, mostly on noisy images or clips, "
            'leaning to the prior or a confusable colour or note; "flipped" below = misannotated rows)'
            if config.noise_kind == "annotator"
            else "(chosen and negatives swapped on uniformly drawn rows)"
        )
        + "; replicates: "
        + (
            "each seed its own SFT init, text-only SFT rows, batch order and sampled pairs"
            if meta.get("replicate_sft")
            else "seeds share one SFT model and pairs (they vary noise and batch order only)"
        ),
        f"- β = {config.beta}; cDPO/rDPO ε = the cell's noise rate clipped to {list(SMOOTHING_RANGE)} (oracle flip "
        f"rate); training steps per cell = {meta['max_steps'] or 'the trainer default'}; extra training settings: "
        f"{config.train or 'none'}",
    ]
    if meta["lab_settings"]:
        lines.append(f"- lab settings: {meta['lab_settings']}")
    if meta.get("replicate_gates"):
        lines.append(_gates_line(meta["replicate_gates"]))
    lines += [
        "",
        "Mean ± sample std over seeds; the best mean of each column in bold (highest, or lowest for "
        f"{', '.join(sorted(LOWER_IS_BETTER))}). "
        "`margin_*` are the final β-scaled reward margins of the training pairs under the trained model vs the SFT "
        "reference: `clean_mean`/`flipped_mean` average them over clean and deliberately flipped pairs (margin toward "
        "the label as trained, so a negative flipped mean means the model did not learn the flipped preference), "
        "`*_fitted` is the fraction with margin > 0.",
        "",
        "## Does NaPO beat DPO under label noise?",
        "",
    ]
    lines += _verdict_table(rows, VERDICT_METRICS[config.source], rates, objectives) or [
        "(no DPO and NaPO cells to compare yet)"
    ]
    if config.source == "lab":
        lines += [
            "",
            *_claim_lines(rows),
            *_clean_pair_lines(rows, meta.get("replicate_sft_metrics") or {}, objectives),
            *_against_dpo_lines(rows, rates, objectives),
        ]
    for metric in metrics:
        lines += ["", f"## {metric}", "", *_table(summary, metric, objectives, rates, meta["sft_metrics"].get(metric))]
    lines += [
        "",
        "## Plots",
        "",
        "![metrics vs noise](metrics_vs_noise.png)",
        "",
        "![q over training](q_trajectory.png)",
        "",
        "![final margins of clean vs flipped pairs](margins_clean_vs_flipped.png)",
        "",
        "Data: `results.jsonl` (one line per cell), `summary.csv` (the tables), `errors.jsonl` (failed attempts, if "
        "any).",
    ]
    return "\n".join(lines) + "\n"


def _plots(
    out: Path, rows: list[dict], summary: list[dict], config: CompareConfig, sft: dict[str, float]
) -> dict[str, Path]:
    """The report's three PNGs under `out`; return {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = [o for o in config.objectives if any(r["objective"] == o for r in rows)]
    colours = {o: plt.cm.tab10(i % 10) for i, o in enumerate(objectives)}
    paths = {name: out / f"{name}.png" for name in ("metrics_vs_noise", "q_trajectory", "margins_clean_vs_flipped")}
    _plot_metrics_vs_noise(plt, paths["metrics_vs_noise"], summary, objectives, colours, sft)
    _plot_q_trajectory(plt, paths["q_trajectory"], rows, objectives, colours)
    _plot_margins(plt, paths["margins_clean_vs_flipped"], rows, summary, objectives)
    return paths


def _plot_metrics_vs_noise(plt, path: Path, summary: list[dict], objectives: list[str], colours: dict, sft: dict):
    """Every key metric against the noise rate, one line per objective (error bars: std over seeds); the SFT
    model's value as a dotted line."""
    metrics = [m for m in KEY_METRICS if any(s["metric"] == m for s in summary)]
    cols = 3
    fig, axes = plt.subplots(
        max(1, math.ceil(len(metrics) / cols)),
        cols,
        figsize=(5 * cols, 3.6 * max(1, math.ceil(len(metrics) / cols))),
        squeeze=False,
    )
    for ax, metric in zip(axes.flat, metrics):
        for objective in objectives:
            points = sorted(
                (s["noise_rate"], s["mean"], 0 if math.isnan(s["std"]) else s["std"])
                for s in summary
                if s["metric"] == metric and s["objective"] == objective
            )
            if points:
                x, y, e = zip(*points)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=objective, color=colours[objective])
        if metric in sft:
            ax.axhline(sft[metric], color="grey", linestyle=":", label="SFT (start)")
        ax.set_title(metric)
        ax.set_xlabel("label-noise rate")
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    if objectives:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_q_trajectory(plt, path: Path, rows: list[dict], objectives: list[str], colours: dict) -> None:
    """q over training steps: NaPO objectives, one panel per noise rate, one line per negative type (solid:
    language bias, dashed: the others), averaged over seeds."""
    rates = sorted({r["noise_rate"] for r in rows}) or [0.0]
    fig, axes = plt.subplots(1, len(rates), figsize=(4.5 * len(rates), 3.6), squeeze=False)
    for ax, rate in zip(axes.flat, rates):
        for objective in objectives:
            curves: dict[str, list] = defaultdict(list)
            for row in rows:
                if row["objective"] == objective and row["noise_rate"] == rate:
                    for kind, points in row["q_trajectory"].items():
                        curves[kind].append(points)
            for kind, runs in curves.items():
                length = min(len(run) for run in runs)
                if length == 0:
                    continue
                steps = [p[0] for p in runs[0][:length]]
                mean_q = np.mean([[p[1] for p in run[:length]] for run in runs], axis=0)
                ax.plot(
                    steps,
                    mean_q,
                    color=colours[objective],
                    linestyle="-" if kind == "language_bias" else "--",
                    label=f"{objective} {kind}",
                )
        ax.set_title(f"noise {rate:g}")
        ax.set_xlabel("training step")
        ax.set_ylabel("q (mean over seeds)")
        ax.set_ylim(0, 1.05)
    handles = axes.flat[0].get_legend_handles_labels()[0]
    if handles:
        axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_margins(plt, path: Path, rows: list[dict], summary: list[dict], objectives: list[str]) -> None:
    """Final margins of clean vs flipped training pairs (mean ± std over seeds), per objective and noise rate > 0."""
    rates = sorted({r["noise_rate"] for r in rows}) or [0.0]
    noisy_rates = [r for r in rates if r > 0] or rates
    fig, axes = plt.subplots(
        1, len(noisy_rates), figsize=(max(5, 0.6 * len(objectives) + 2) * len(noisy_rates) / 1.5, 3.8), squeeze=False
    )
    for ax, rate in zip(axes.flat, noisy_rates):
        for offset, group, colour in ((-0.2, "clean", "tab:blue"), (0.2, "flipped", "tab:red")):
            means, errors = [], []
            for objective in objectives:
                s = next(
                    (
                        s
                        for s in summary
                        if s["objective"] == objective
                        and s["noise_rate"] == rate
                        and s["metric"] == f"margin_{group}_mean"
                    ),
                    None,
                )
                means.append(s["mean"] if s else np.nan)
                errors.append(0 if s is None or math.isnan(s["std"]) else s["std"])
            ax.bar(
                np.arange(len(objectives)) + offset,
                means,
                width=0.4,
                yerr=errors,
                color=colour,
                label=f"{group} pairs",
                capsize=2,
            )
        ax.axhline(0, color="black", linewidth=0.7)
        ax.set_xticks(np.arange(len(objectives)), objectives, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"noise {rate:g}")
        ax.set_ylabel("final margin z (toward the trained label)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
