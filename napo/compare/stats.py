"""The numbers of a `napo compare` report: per-cell values, their mean and spread over seeds, and NaPO's paired
differences to DPO with Student-t intervals. Pure functions of results.jsonl rows; nothing here draws or writes.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from napo.benchmarks import LOWER_IS_BETTER as BENCHMARK_LOWER_IS_BETTER
from napo.lab.tasks import meets_clean_pair_rule

# Metrics where a lower value is better (bold = the minimum in report tables); every other metric: higher is better.
LOWER_IS_BETTER = (
    frozenset(
        {
            "blind_agreement",
            "chair_s",
            "chair_i",
            "margin_flipped_mean",
            "margin_flipped_fitted",
            "train_wall_s",
            "cell_wall_s",
        }
    )
    | BENCHMARK_LOWER_IS_BETTER
)
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}
_MARGIN_FIELDS = ("clean_mean", "flipped_mean", "clean_fitted", "flipped_fitted")


def cell_values(row: dict) -> dict[str, float]:
    """The numbers of a results row that the report aggregates: its metrics, margins (prefixed margin_) and times."""
    values = dict(row["metrics"])
    values.update(
        {f"margin_{name}": row["margins"][name] for name in _MARGIN_FIELDS if row["margins"].get(name) is not None}
    )
    values["train_wall_s"] = row["train_wall_s"]
    return values


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation (ddof=1; NaN for a single seed) over seeds of every value of
    `cell_values`, per (objective, noise rate, metric): [{objective, noise_rate, metric, mean, std, n}, ...]."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        for metric, value in cell_values(row).items():
            groups[(row["objective"], row["noise_rate"], metric)].append(value)
    return [
        {
            "objective": objective,
            "noise_rate": rate,
            "metric": metric,
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
            "n": len(values),
        }
        for (objective, rate, metric), values in groups.items()
    ]


def paired_differences(
    rows: list[dict], metrics: tuple[str, ...], rates: list[float], objectives: list[str], *, napo_only: bool = True
) -> list[dict]:
    """The NaPO variants among `objectives` (every objective but DPO with `napo_only=False`) against DPO per metric
    and noise rate: the mean paired difference over seeds (replicates; the same noisy rows per seed) with its 95%
    Student-t interval, and whether the interval excludes 0, in the metric's better direction.

        d_s = value(objective, rate, seed s) − value(dpo, rate, s);   mean ± t_{0.975, n−1} · std(d, ddof=1) / √n

    Returns [{metric, objective, noise_rate, mean, low, high (NaN for one seed), n, call}, ...], call one of
    "NaPO better" (or "<objective> better" for another objective), "DPO better", "interval includes 0", "one seed:
    no interval".
    """
    values = {(r["objective"], r["noise_rate"], r["seed"]): cell_values(r) for r in rows}
    found = []
    for metric in metrics:
        for napo in [o for o in objectives if (o.startswith("napo") if napo_only else o != "dpo")]:
            for rate in rates:
                diffs = [
                    v[metric] - values[("dpo", rate, s)][metric]
                    for (o, r, s), v in values.items()
                    if o == napo and r == rate and metric in v and metric in values.get(("dpo", rate, s), {})
                ]
                if not diffs:
                    continue
                mean, half = mean_and_half_interval(diffs)
                if math.isnan(half):
                    call = "one seed: no interval"
                elif abs(mean) > half:
                    better = "NaPO" if napo.startswith("napo") else napo
                    call = f"{better} better" if (mean > 0) != (metric in LOWER_IS_BETTER) else "DPO better"
                else:
                    call = "interval includes 0"
                found.append(
                    {
                        "metric": metric,
                        "objective": napo,
                        "noise_rate": rate,
                        "mean": mean,
                        "low": mean - half,
                        "high": mean + half,
                        "n": len(diffs),
                        "call": call,
                    }
                )
    return found


def mean_and_half_interval(values: list[float]) -> tuple[float, float]:
    """The mean of paired differences and the half-width of its 95% Student-t interval,
    t_{0.975, n−1} · std(values, ddof=1) / √n (NaN for a single value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan
    return mean, t_quantile_975(len(values) - 1) * float(np.std(values, ddof=1) / math.sqrt(len(values)))


def gains_over_sft(
    rows: list[dict], sft_metrics: dict[int, dict[str, float]], metrics: tuple[str, ...], rate: float
) -> list[dict]:
    """What each objective's cells at noise `rate` changed against their own replicate's SFT model: per objective
    and metric, d_s = value(cell of replicate s) − value(SFT model of replicate s), mean over replicates with its
    95% Student-t interval (`mean_and_half_interval`). Rows whose replicate has no SFT metrics are left out.

    Returns [{objective, metric, mean, low, high, n}, ...] in the order objectives first appear in `rows`.
    """
    diffs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        sft = sft_metrics.get(row.get("replicate"))
        if row["noise_rate"] != rate or sft is None:
            continue
        for metric in metrics:
            if metric in row["metrics"] and metric in sft:
                diffs[(row["objective"], metric)].append(row["metrics"][metric] - sft[metric])
    found = []
    for (objective, metric), values in diffs.items():
        mean, half = mean_and_half_interval(values)
        found.append(
            {
                "objective": objective,
                "metric": metric,
                "mean": mean,
                "low": mean - half,
                "high": mean + half,
                "n": len(values),
            }
        )
    return found


def clean_pair_check(gains: list[dict], rule: dict | None = None) -> dict[str, bool]:
    """Issue 15's first item per objective on `gains_over_sft` entries: whether its mean changes meet `rule` (default
    `CLEAN_PAIR_RULE`, by `napo.lab.tasks.meets_clean_pair_rule`). {objective: meets}."""
    changes: dict[str, dict[str, float]] = defaultdict(dict)
    for gain in gains:
        changes[gain["objective"]][gain["metric"]] = gain["mean"]
    return {objective: meets_clean_pair_rule(change, rule) for objective, change in changes.items()}


def t_quantile_975(df: int) -> float:
    """The two-sided 95% Student t quantile for `df` ≥ 1 degrees of freedom (the next tabulated df below; 1.96
    beyond 30)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    return _T975[max(k for k in _T975 if k <= df)] if df <= 30 else 1.96


# Issue 15's decision rule for the paper's claim (NaPO beats DPO under the noise NaPO is for), on the lab's metrics.
CLAIM_RULE = {
    "objective": "napo-paper",
    "min_noise_rate": 0.15,
    "gain_metric": "counterfactual_accuracy",
    "min_gain": 0.05,
    "cost_metric": "prior_consistent_accuracy",
    "min_replicates": 5,
}


def claim_verdict(rows: list[dict], rule: dict | None = None) -> dict:
    """The paper's claim decided from a lab grid's rows by `rule` (default `CLAIM_RULE`).

    At every noise rate ε ≥ `min_noise_rate` with paired cells of `objective` and DPO, with d_s the paired
    per-replicate difference `objective` − DPO (`paired_differences`):

        confirmed  ⇔  for each such ε:  mean(d[gain_metric]) ≥ min_gain  and  low95(d[gain_metric]) > 0
                                        and  high95(d[cost_metric]) ≥ 0   (prior-consistent not significantly worse)

    "refuted" otherwise. With fewer than `min_replicates` replicates at some rate the claim is "undecided", unless
    the data already exclude it: the gain's whole interval below `min_gain` (high95 < min_gain) at some rate is
    "refuted" on any number of replicates (the required gain is already outside the 95% interval). Also
    "undecided" when no rate ≥ `min_noise_rate` has paired cells. `reasons` says which rates decided.
    Returns {verdict, rule, rates: [{noise_rate, n, gain (mean, low, high), cost (mean, low, high), passes,
    gain_excluded}], reasons: [str]}.
    """
    rule = dict(CLAIM_RULE, **(rule or {}))
    objective, gain, cost = rule["objective"], rule["gain_metric"], rule["cost_metric"]
    rates = sorted({r["noise_rate"] for r in rows if r["noise_rate"] >= rule["min_noise_rate"]})
    diffs = {
        (d["metric"], d["noise_rate"]): d
        for d in paired_differences(rows, (gain, cost), rates, ["dpo", objective])
        if d["objective"] == objective
    }
    checked, reasons = [], []
    for rate in rates:
        g, c = diffs.get((gain, rate)), diffs.get((cost, rate))
        if g is None or c is None:
            continue
        passes = g["mean"] >= rule["min_gain"] and g["low"] > 0 and c["high"] >= 0
        excluded = g["high"] < rule["min_gain"]  # NaN (one replicate) compares False: nothing is excluded
        checked.append(
            {
                "noise_rate": rate,
                "n": g["n"],
                "gain": {k: g[k] for k in ("mean", "low", "high")},
                "cost": {k: c[k] for k in ("mean", "low", "high")},
                "passes": bool(passes),
                "gain_excluded": bool(excluded),
            }
        )
        if excluded:
            reasons.append(
                f"noise {rate:g}: {gain} {interval_text(g)} over {g['n']} replicates: the interval lies below "
                f"the required {rule['min_gain']:+.2f}"
            )
        elif g["n"] < rule["min_replicates"]:
            reasons.append(f"noise {rate:g}: {g['n']} paired replicates, the rule needs {rule['min_replicates']}")
        elif not passes:
            reasons.append(f"noise {rate:g}: {gain} {interval_text(g)}, {cost} {interval_text(c)}")
    if not checked:
        verdict = "undecided"
        reasons.append(f"no noise rate ≥ {rule['min_noise_rate']:g} has paired {objective} and dpo cells")
    elif any(r["gain_excluded"] for r in checked):
        verdict = "refuted"
    elif any(r["n"] < rule["min_replicates"] for r in checked):
        verdict = "undecided"
    else:
        verdict = "confirmed" if all(r["passes"] for r in checked) else "refuted"
    return {"verdict": verdict, "rule": rule, "rates": checked, "reasons": reasons}


def interval_text(difference: dict) -> str:
    """ "+0.012 [-0.003, +0.027]": a `paired_differences` or `gains_over_sft` entry's mean and 95% interval (the
    mean alone for a single replicate, which has no interval)."""
    if math.isnan(difference["low"]):
        return f"{difference['mean']:+.3f}"
    return f"{difference['mean']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]"
