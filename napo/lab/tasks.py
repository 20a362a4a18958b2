"""What a bias-lab task is: one `LabTask` record (data, model family, negatives, metrics, report), run by the one
engine in `napo.lab.engine`. The vision lab's record is `napo.lab.vision.TASK`, the audio lab's
`napo.lab.audio.TASK`.

A new lab task is one module holding its `TASK = LabTask(...)` (its recipe loader and split generator, like
`scenes.py` / `sounds.py`, its tiny model, its pair source rows, its evaluation and its report) plus its name in
`TASK_MODULES`; `napo lab --task NAME` then runs it through the same SFT, pairs, preference training, evaluation,
progress bar and cache as the others.

This module imports nothing heavy (no torch, no trl): `napo compare`'s report and the CLI read it at start-up.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Where each task's record lives: `napo lab --task NAME` and `lab_task(NAME)` import `TASK_MODULES[NAME].TASK`.
TASK_MODULES = {"vision": "napo.lab.vision", "audio": "napo.lab.audio"}

# The vision lab's headline metrics: its one-line summary per model, and the first rows (and the plots) of a
# `napo compare` report on the lab (`napo.compare.report.KEY_METRICS` starts with them).
KEY_METRICS = (
    "counterfactual_accuracy",
    "prior_consistent_accuracy",
    "blind_agreement",
    "image_share",
    "pope_f1",
    "chair_s",
)

# Evaluation splits whose metrics every lab also reports per media-noise level (its task's `hardness`): metric -> split.
PER_NOISE_SPLITS = {
    "counterfactual_accuracy": "counterfactual",
    "prior_consistent_accuracy": "prior_consistent",
    "no_prior_accuracy": "no_prior",
}

# The SFT gate of lab v2 (issue 15): the model reads the modality where no prior competes, follows the prior where
# it agrees with the input, and is torn where they disagree — as real VLMs are. {metric: (low, high)}, inclusive.
SFT_GATE = {
    "no_prior_accuracy": (0.9, 1.0),
    "counterfactual_accuracy": (0.3, 0.7),
    "prior_consistent_accuracy": (0.95, 1.0),
}

# Issue 15's first item, what preference training on clean pairs (noise 0) should do to a lab's SFT model: gain ≥ 0.15
# counterfactual accuracy and lose ≤ 0.03 prior-consistent and ≤ 0.03 no-prior accuracy (in a grid: means over
# replicates, each cell against its own replicate's SFT model).
CLEAN_PAIR_RULE = {
    "noise_rate": 0.0,
    "gain_metric": "counterfactual_accuracy",
    "min_gain": 0.15,
    "max_loss": {"prior_consistent_accuracy": 0.03, "no_prior_accuracy": 0.03},
}


def meets_clean_pair_rule(changes: dict[str, float], rule: dict[str, Any] | None = None) -> bool:
    """Whether changes against the SFT model ({metric: value after − value before}) meet `rule` (default
    `CLEAN_PAIR_RULE`): the gain metric up by ≥ `min_gain`, each `max_loss` metric down by at most its bound; a
    missing metric fails. Changes are rounded to 9 decimals first: accuracies are fractions of rows, and 6 of 200
    rows lost is a change of −0.03, not the −0.030000000000000027 that 0.96 − 0.99 gives in floating point."""
    rule = rule or CLEAN_PAIR_RULE
    change = {metric: round(value, 9) for metric, value in changes.items()}
    if change.get(rule["gain_metric"], -math.inf) < rule["min_gain"]:
        return False
    return all(change.get(metric, -math.inf) >= -bound for metric, bound in rule["max_loss"].items())


@dataclass(frozen=True)
class LabTask:
    """One bias-lab task: everything the engine (`napo.lab.engine`) needs that differs between tasks.

    Settings: `settings` is a frozen dataclass with `full()` and `quick()` and at least the fields n_train,
    text_only_fraction (`napo.lab.sft.text_only_rows`), sft_steps, sft_batch_size, sft_lr (SFT), n_pairs,
    n_counterfactual_pairs (pair source rows), pref_steps, pref_batch_size, pref_lr, beta, sft_weight (preference
    training), keep_identical and pair_temperature (the pair generator) and n_eval (rows per evaluation split).

    Data: `load_recipe(path | None)` reads and checks a recipe (None: the packaged default, `default_recipe`);
    `make_split(recipe, split, n, seed)` draws rows with "prompt" (the question, a string), the media (`images` or
    `audios`), "answer" and "prior_answer"; `modality` ("image" / "audio") is the content part put before the
    question when a row becomes a chat (`as_chat`).

    Model: `build_model(recipe, settings, seed)` returns a fresh (model, processor), its family one of
    `napo.models.FAMILIES` (`family`, for the report).

    Negatives: `pair_source(rows, recipe, settings, seed)` turns the pair split's chat rows into a source
    `datasets.Dataset` for `napo.pairs.build_pairs` (prompt, media, chosen and any fixed negative or metadata
    columns); `pair_options(settings, seed)` gives the `PairsConfig` fields beyond source / model / output_dir
    (sampling, which perturbation makes which negative column is `napo pairs`' default for the modality).

    Metrics: `evaluate(model, processor, recipe, n)` returns (metrics: {name: float in [0, 1]}, per-row shares of
    the modality on the counterfactual split); `report_metrics` are the report table's rows, `summary_metrics` the
    one-line summary logged per model; `gate` the SFT gate ({metric: (low, high)}); `eval_passes` how many
    generations and scorings one evaluation makes per row and split size (for the progress bar's ETA).

    Annotator noise (`napo.lab.noise.annotator_noise`): `hardness` names the rows' media-noise column (errors
    fall on rows ∝ it; metrics are also reported per level of it), `confusable(recipe, answer)` the look-alike
    of a true attribute answer (an erring annotator's other choice besides the prior).

    Report: `report_name` (`<out>/<report_name>.json` and `.md`), `render_report(report) -> markdown`,
    `plots(out, report, shares) -> {name: path}` or None, `report_extras(lab) -> dict` of task-specific report
    fields. Cache: `<out>/cache/<cache_prefix><key>/`; `log_prefix` labels its log lines and bars;
    `logging_steps` is the preference trainer's logging interval.
    """

    name: str
    modality: str
    family: str
    settings: type
    default_recipe: str
    load_recipe: Callable[[str | None], dict[str, Any]]
    make_split: Callable[[dict[str, Any], str, int, int], list[dict[str, Any]]]
    build_model: Callable[..., tuple[Any, Any]]
    pair_source: Callable[..., Any]
    pair_options: Callable[[Any, int], dict[str, Any]]
    evaluate: Callable[..., tuple[dict[str, float], list[float]]]
    report_metrics: tuple[str, ...]
    summary_metrics: tuple[str, ...]
    report_name: str
    render_report: Callable[[dict[str, Any]], str]
    gate: dict[str, tuple[float, float]]
    eval_passes: int
    hardness: str
    confusable: Callable[[dict[str, Any], str], str]
    plots: Callable[..., dict[str, str]] | None = None
    report_extras: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    cache_prefix: str = ""
    log_prefix: str = "[lab]"
    logging_steps: int = 10

    def rows(self, recipe: dict[str, Any], split: str, n: int, seed: int) -> list[dict[str, Any]]:
        """`make_split`'s rows as samples: the question becomes a one-turn chat with the media before it."""
        return as_chat(self.make_split(recipe, split, n, seed), self.modality)

    def recipe(self, recipe: str | dict | None) -> dict[str, Any]:
        """A recipe path, an already loaded recipe, or None (the packaged default), as a loaded recipe."""
        return recipe if isinstance(recipe, dict) else self.load_recipe(recipe)


def as_chat(rows: list[dict[str, Any]], modality: str) -> list[dict[str, Any]]:
    """Turn each row's string prompt into a one-turn user chat: a `{"type": modality}` part, then the question.
    Mutates and returns `rows`."""
    for row in rows:
        row["prompt"] = [{"role": "user", "content": [{"type": modality}, {"type": "text", "text": row["prompt"]}]}]
    return rows


def lab_task(name: str) -> LabTask:
    """The record of task `name` (a key of `TASK_MODULES`); ValueError naming the known tasks otherwise."""
    if name not in TASK_MODULES:
        raise ValueError(f"unknown lab task {name!r}; expected one of {sorted(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[name]).TASK


def sft_gate(metrics: dict[str, float], gate: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """Whether the SFT model is the one lab v2 wants (`gate`, default `SFT_GATE`):
    {metric: {"value", "range", "pass"}, "pass": all}."""
    checks = {
        name: {"value": metrics[name], "range": list(bounds), "pass": bounds[0] <= metrics[name] <= bounds[1]}
        for name, bounds in (gate or SFT_GATE).items()
    }
    return {**checks, "pass": all(c["pass"] for c in checks.values())}
