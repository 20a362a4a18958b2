"""The vision lab's report: report.md (the table of metrics per model and plain sentences on them) and the PNG
plots, from the report dict `napo.lab.engine.run_lab` builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napo.lab.report import cell, gate_line, stage_time
from napo.lab.tasks import CLEAN_PAIR_RULE, meets_clean_pair_rule

# The metrics the report's `models` table carries for every model (the list).
REPORT_METRICS = (
    "counterfactual_accuracy",
    "prior_consistent_accuracy",
    "no_prior_accuracy",
    "prior_following_rate",
    "blind_agreement",
    "question_blind_agreement",
    "image_share",
    "pope_f1",
    "pope_accuracy",
    "pope_yes_ratio",
    "chair_s",
    "chair_i",
)


def render_report(report: dict[str, Any]) -> str:
    """The markdown report of `run_lab`: the table of metrics per model (mean ± std over seeds) and what they say."""
    models = report["models"]
    lines = [
        "# napo bias lab",
        "",
        f"`{report['command']}` — {report['date']}, {report['device']}, "
        f"{report['wall_time_s']:.0f} s end to end, {report['cpu_time_s']:.0f} CPU-seconds "
        f"(SFT {stage_time(report['sft_wall_time_s'])}, pairs {stage_time(report['pairs_wall_time_s'])}).",
        f"Seeds {report['seeds']} (preference training; SFT and pairs are shared). "
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
        "",
        "| metric | " + " | ".join(models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    per_noise = sorted(k for k in models["sft"] if "@noise" in k)
    for metric in (*REPORT_METRICS, *per_noise):
        cells = [cell(models[name][metric]) for name in models]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    if "sft_gate" in report:
        lines += ["", gate_line(report["sft_gate"])]
    pairs = report["pairs"]
    lines += [
        "",
        f"Pairs: {pairs['rows_written']} rows; "
        + "; ".join(
            f"{column} ({n['spec']}) {n['written']} written, {n['identical_to_chosen']} identical to chosen "
            + (
                "kept (ties: z ≡ 0, no gradient; they pull ψ and the type's dynamic weight towards 0)"
                if n.get("identical_kept")
                else "dropped"
            )
            for column, n in pairs["negatives"].items()
        )
        + ". Blind agreement, question-blind agreement, prior following and image share are measured on the "
        "counterfactual split; POPE values are means over random / popular / adversarial.",
        "",
        "![metrics per model](metrics.png)",
        "",
        "![image share](image_share.png)",
        "",
        "## What it shows",
        "",
    ]
    lines += _findings(report)
    return "\n".join(lines) + "\n"


def _findings(report: dict[str, Any]) -> list[str]:
    """Plain sentences on the numbers: the SFT bias, what DPO and NaPO changed, and which is better."""
    m = {name: {k: v["mean"] for k, v in stats.items()} for name, stats in report["models"].items()}
    s = {name: {k: v["std"] for k, v in stats.items()} for name, stats in report["models"].items()}
    sft = m["sft"]
    gap = sft["prior_consistent_accuracy"] - sft["counterfactual_accuracy"]
    lines = [
        f"- **Bias after SFT**: counterfactual accuracy {sft['counterfactual_accuracy']:.3f} vs prior-consistent "
        f"{sft['prior_consistent_accuracy']:.3f} (gap {gap:.3f}, {'above' if gap > 0.2 else 'NOT above'} the 0.2 "
        "the lab asks for); "
        f"{sft['prior_following_rate']:.3f} of counterfactual answers are the prior colour; blind agreement "
        f"{sft['blind_agreement']:.3f}; image share {sft['image_share']:.3f}.",
    ]
    for name in ("dpo", "napo"):
        d = m[name]
        lines.append(
            f"- **{name.upper()}** (n={len(report['seeds'])} seeds): counterfactual "
            f"{sft['counterfactual_accuracy']:.3f} → "
            f"{d['counterfactual_accuracy']:.3f} ± {s[name]['counterfactual_accuracy']:.3f}, while prior-consistent "
            f"{sft['prior_consistent_accuracy']:.3f} → {d['prior_consistent_accuracy']:.3f} ± "
            f"{s[name]['prior_consistent_accuracy']:.3f}; "
            f"blind agreement {sft['blind_agreement']:.3f} → {d['blind_agreement']:.3f}; image share "
            f"{sft['image_share']:.3f} → {d['image_share']:.3f}; POPE F1 {sft['pope_f1']:.3f} → {d['pope_f1']:.3f}; "
            f"CHAIRs {sft['chair_s']:.3f} → {d['chair_s']:.3f}."
        )
    if "sft_gate" in report:
        gate = report["sft_gate"]
        lines.append(
            "- **SFT gate** (no-prior ≥ 0.9, counterfactual in [0.3, 0.7], prior-consistent ≥ 0.95): "
            + (
                "passed"
                if gate["pass"]
                else "NOT passed: "
                + ", ".join(f"{k} {c['value']:.3f}" for k, c in gate.items() if k != "pass" and not c["pass"])
            )
            + "."
        )
    for name in ("dpo", "napo"):
        lines += _clean_pair_goal(report, m, name)
    lines.append(_verdict(report, m, s))
    return lines


def _clean_pair_goal(report: dict[str, Any], m: dict[str, dict[str, float]], name: str) -> list[str]:
    """Whether objective `name` met issue 15's goal on clean pairs (`napo.lab.tasks.CLEAN_PAIR_RULE`: ≥ +0.15
    counterfactual, ≤ 0.03 prior-consistent and ≤ 0.03 no-prior lost), and a warning when it lost more than it
    gained."""
    sft, rule = m["sft"], CLEAN_PAIR_RULE
    change = {k: m[name].get(k, 0.0) - sft.get(k, 0.0) for k in (rule["gain_metric"], *rule["max_loss"])}
    gain, loss = change[rule["gain_metric"]], -change["prior_consistent_accuracy"]
    met = meets_clean_pair_rule(change)
    lines = [
        f"- **{name.upper()} on clean pairs** (issue 15 asks ≥ {rule['min_gain']:+.2f} counterfactual, "
        + ", ".join(
            f"≤ {bound:g} {k.removesuffix('_accuracy').replace('_', '-')} lost" for k, bound in rule["max_loss"].items()
        )
        + "): "
        + f"{gain:+.3f} / {change['prior_consistent_accuracy']:+.3f} / {change['no_prior_accuracy']:+.3f} — "
        + (
            "met."
            if met
            else "NOT met"
            + (
                f" ({budget_note(report, name)})"
                if gain < rule["min_gain"]
                else ": it trades prior-consistent or no-prior accuracy for the gain."
            )
        )
    ]
    if loss > gain:
        lines.append(
            f"- **{name.upper()} trades more than it gains**: +{gain:.3f} counterfactual for -{loss:.3f} "
            "prior-consistent. "
            "The model learnt mostly to avoid the prior colour, not to read the image."
        )
    return lines


def _verdict(report: dict[str, Any], m: dict[str, dict[str, float]], s: dict[str, dict[str, float]]) -> str:
    """NaPO vs DPO on counterfactual accuracy, against twice the seed spread."""
    diff = m["napo"]["counterfactual_accuracy"] - m["dpo"]["counterfactual_accuracy"]
    noise = max(s["napo"]["counterfactual_accuracy"], s["dpo"]["counterfactual_accuracy"])
    if abs(diff) <= 2 * noise or abs(diff) < 0.01:
        return (
            f"- **NaPO vs DPO**: counterfactual accuracy differs by {diff:+.3f}, within twice the seed spread "
            f"({noise:.3f}): on these clean pairs NaPO does not beat DPO. That is expected: NaPO's adaptive q only "
            "reweights pairs by how confidently they are already separated, which matters when labels are noisy "
            "(see `napo compare`); with clean labels both optimise nearly the same direction"
            + _napo_end_state(report)
            + "."
        )
    better = "NaPO" if diff > 0 else "DPO"
    verdict = (
        f"- **NaPO vs DPO**: {better} is ahead on counterfactual accuracy by {abs(diff):.3f} (seed spread {noise:.3f})."
    )
    if diff < 0:
        verdict += (
            " NaPO does not beat DPO here. Our reading: these labels are clean, so NaPO's robustness buys nothing, "
            "while its gradient dL/dz = −σ(z)^q·(1 − σ(z)) is DPO's scaled by σ(z)^q ≤ 1 "
            "(≈ 0.7 near z = 0 with q ≈ 0.5): "
            "at the same learning rate and step count NaPO moves the model a little less, in both directions (less "
            "counterfactual gain, slightly less prior-consistent loss)."
        )
    return verdict


def _napo_end_state(report: dict[str, Any]) -> str:
    """ ", and the NaPO runs end with reward margins 0.14 and language-biased q 0.50 (means over seeds), where σ(z)^q
    barely reweights": what NaPO's last logged step says, or "" without NaPO runs that logged both."""
    logs = [r["final_log"] for r in report.get("runs", []) if r["objective"] == "napo"]
    logs = [log for log in logs if "rewards/margins" in log and "language_bias/q" in log]
    if not logs:
        return ""
    margin = float(np.mean([log["rewards/margins"] for log in logs]))
    q = float(np.mean([log["language_bias/q"] for log in logs]))
    return (
        f", and the NaPO runs end with reward margins {margin:.2f} and language-biased q {q:.2f} (means over seeds), "
        "where σ(z)^q barely reweights"
    )


def budget_note(report: dict[str, Any], name: str) -> str:
    """The facts behind a small gain: the preference budget, and counterfactual accuracy per image-noise level."""
    settings = report["settings"]
    sft, trained = report["models"]["sft"], report["models"][name]
    levels = sorted(k.split("@noise")[1] for k in sft if k.startswith("counterfactual_accuracy@noise"))
    per_level = ", ".join(
        f"{level}: {sft[f'counterfactual_accuracy@noise{level}']['mean']:.2f} → "
        f"{trained[f'counterfactual_accuracy@noise{level}']['mean']:.2f}"
        for level in levels
    )
    return (
        f"{settings['pref_steps']} steps of {settings['pref_batch_size']} rows at lr {settings['pref_lr']:g}, "
        f"β {settings['beta']:g}; counterfactual accuracy per image-noise level {per_level}"
    )


def plots(out: Path, report: dict[str, Any], shares: dict[str, list[float]]) -> dict[str, str]:
    """metrics.png (bars with ±std per model) and image_share.png (histograms before and after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(names)
    x = np.arange(len(REPORT_METRICS))
    for i, name in enumerate(names):
        stats = report["models"][name]
        ax.bar(
            x + i * width,
            [stats[k]["mean"] for k in REPORT_METRICS],
            width,
            yerr=[stats[k]["std"] for k in REPORT_METRICS],
            capsize=2,
            label=name,
        )
    ax.set_xticks(x + width * (len(names) - 1) / 2, REPORT_METRICS, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("bias lab: metrics per model (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in names:
        ax.hist(shares[name], bins=20, range=(0, 1), histtype="step", density=True, linewidth=1.5, label=name)
    ax.set_xlabel("image share of the reference answer's log-prob (counterfactual rows)")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "image_share.png", dpi=110)
    plt.close(fig)
    return {"metrics.png": str(out / "metrics.png"), "image_share.png": str(out / "image_share.png")}
