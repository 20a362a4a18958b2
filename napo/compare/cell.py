"""One cell of a `napo compare` grid: noise its pairs, train its objective from the shared SFT model, evaluate
it, and score the margins of its training pairs; `run_cell` returns the cell's row of results.jsonl.
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from napo.compare.grid import cell_key, objective_settings
from napo.provenance import utc_now


def attempt_cell(context: dict, cell: tuple) -> dict[str, Any]:
    """run_cell, with any exception turned into {"error": traceback} so one bad cell never stops the grid."""
    try:
        return run_cell(context, *cell)
    except Exception:  # noqa: BLE001 - recorded in errors.jsonl and retried on the next run
        return {"error": traceback.format_exc()}


def run_cell(context: dict, objective: str, noise_rate: float, seed: int) -> dict[str, Any]:
    """Train and evaluate one cell; return its results.jsonl row (its fields: `napo.compare`'s docstring)."""
    import datasets

    from napo.models import load_model

    started, cpu_started = time.perf_counter(), time.process_time()
    kind = context.get("noise_kind", "flip")
    key = cell_key(objective, noise_rate, seed, kind)
    source = (context.get("replicates") or {}).get(seed, context)  # the replicate's own SFT model and pairs
    cell_dir = Path(context["out"], "cells", key.replace("/", "_"))
    shutil.rmtree(cell_dir, ignore_errors=True)  # a failed attempt's leftovers
    pairs = noisy_pairs(source, kind, noise_rate, seed)
    settings = objective_settings(objective, noise_rate)
    trained = _train_cell(context, source, cell_dir, pairs, seed, settings)
    model, processing_class = load_model(trained["model_dir"])
    # With shared reference log-probs in the pairs, scoring needs no reference model.
    reference = None if "ref_chosen_logps" in pairs.column_names else load_model(source["sft_dir"])[0]
    if context["source"] == "lab":
        from napo.lab.engine import evaluate_lab_model

        metrics = evaluate_lab_model((model, processing_class), source["lab"], n=context["eval_n"])
    else:
        heldout = datasets.load_from_disk(context["heldout"])
        held = pair_margins(model, reference, processing_class, heldout, beta=context["beta"])
        metrics = {
            "heldout_reward_accuracy": float(np.mean(held["margin"] > 0)),
            "heldout_mean_margin": float(np.mean(held["margin"])),
        }
    if context.get("eval"):
        from napo.benchmarks import evaluate_model

        bench_dir = Path(context["out"], "benchmarks", key.replace("/", "_"))
        shutil.rmtree(bench_dir, ignore_errors=True)  # a failed attempt's answers came from other weights
        metrics.update(evaluate_model(context["eval"], model, processing_class, bench_dir, model_id=key))
    train_margins = pair_margins(model, reference, processing_class, pairs, beta=context["beta"])
    if not context["keep_models"]:
        shutil.rmtree(cell_dir, ignore_errors=True)
    return {
        "key": key,
        "objective": objective,
        "noise_kind": kind,
        "noise_rate": noise_rate,
        "seed": seed,
        "replicate": seed,
        "label_smoothing": settings.get("label_smoothing"),
        "source_dir": source["source_dir"],
        "source_digest": source.get("source_digest"),
        "pair_labels": _pair_label_counts(pairs),
        "metrics": {name: float(value) for name, value in metrics.items()},
        "train_wall_s": float(trained["wall_time_s"]),
        "cell_wall_s": time.perf_counter() - started,
        "cell_cpu_s": time.process_time() - cpu_started,
        "margins": margin_summary(train_margins["margin"], train_margins["noisy"]),
        "q_trajectory": q_trajectory(trained["log_history"]),
        "finished": utc_now(),
    }


def noisy_pairs(source: dict, kind: str, noise_rate: float, seed: int):
    """The source's pairs with `round(noise_rate · rows)` rows noised, picked by `seed` (the same rows for every
    objective of a (rate, seed)): flipped (`napo.label_noise.inject_label_noise`, kind "flip") or misannotated
    (`napo.lab.noise.annotator_noise`, kind "annotator"); the noised rows have `noisy` True."""
    import datasets

    from napo.label_noise import inject_label_noise

    clean = datasets.load_from_disk(source["pairs"])
    if kind == "annotator":
        from napo.lab.noise import annotator_noise

        # The annotator replaces chosen answers: shared reference log-probs would no longer be theirs, so this
        # cell computes its own (trainer precomputation; scoring with the reference model).
        shared_refs = [c for c in clean.column_names if c.startswith("ref_") and c.endswith("_logps")]
        lab = source["lab"]
        pairs, _ = annotator_noise(clean.remove_columns(shared_refs), noise_rate, seed, lab["recipe"], task=lab["task"])
    else:
        pairs, _ = inject_label_noise(clean, noise_rate, seed)
        if "answer" in pairs.column_names:  # the lab's ground truth: tag the flipped pairs too
            from napo.lab.noise import label_pairs

            pairs = label_pairs(pairs)
    return pairs


# What a cell's training sets whatever the source, none of it a hyper-parameter: the grid shows one progress bar
# and keeps no checkpoint (the cell folder is removed once evaluated), trackers stay off unless `train` asks.
CELL_LOGISTICS = {"report_to": "none", "save_strategy": "no", "disable_tqdm": True}


def cell_training_config(context: dict, cell_dir: Path, seed: int, settings: dict[str, Any]):
    """The `NaPOConfig` of one cell: the grid's objective settings, seed, β and steps over the source's defaults,
    and the grid's `train` settings over all of them.

    The lab's defaults are the lab's (`napo.lab.engine.lab_training_config`: its learning rate, batch size, steps,
    CPU); a user's dataset and model train with NaPOConfig's (TRL's) defaults and the user's `train` settings, as
    `napo train` would, plus `CELL_LOGISTICS`.
    """
    grid = {"seed": seed, "beta": context["beta"], **settings}
    if context["max_steps"] is not None:
        grid["max_steps"] = context["max_steps"]
    if context["source"] == "lab":
        from napo.lab.engine import lab_training_config

        return lab_training_config(cell_dir, **grid, **context["train"])
    from napo.config import NaPOConfig

    return NaPOConfig(**{**CELL_LOGISTICS, **context["train"], "output_dir": str(cell_dir / "trainer"), **grid})


def _train_cell(context: dict, source: dict, cell_dir: Path, pairs, seed: int, settings: dict[str, Any]) -> dict:
    """Train the cell's model from the source's SFT model (`napo.training.train_preference`); save it to
    `<cell_dir>/model`. Returns model_dir, log_history and wall_time_s (the trainer is not kept: its model and
    optimizer state would share memory with the evaluation's copy)."""
    from napo.lab.progress import TrainingBar
    from napo.models import load_model
    from napo.training import train_preference

    model, processing_class = load_model(source["sft_dir"])
    config = cell_training_config(context, cell_dir, seed, settings)
    # Cells run in worker processes under the grid's own bar: no per-step display, no raw metric dicts.
    quiet = TrainingBar("", enabled=False)
    run = train_preference(
        pairs, model, config, processing_class=processing_class, model_dir=cell_dir / "model", progress_callback=quiet
    )
    return {"model_dir": run.model_dir, "log_history": run.log_history, "wall_time_s": run.wall_time_s}


def _pair_label_counts(pairs) -> dict[str, dict[str, int]]:
    """{label column: {clean/tie/inverted: pairs}} of the cell's training pairs (lab rows only; {} otherwise)."""
    counts = {}
    for column in (c for c in pairs.column_names if c.startswith("pair_label_")):
        values = [v for v in pairs[column] if v is not None]
        counts[column] = {label: values.count(label) for label in sorted(set(values))}
    return counts


def pair_margins(
    model, reference, processing_class, pairs, *, beta: float, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """The β-scaled reward margin z of every (row, negative column) pair of `pairs` under `model` vs `reference`.

    Where `pairs` carry reference log-probs of every answer (`ref_chosen_logps`, `ref_<column>_logps`), those are the
    reference and `reference` may be None.

        z = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]   (nats · β)

    with y_w the row's `chosen` as stored (for a flipped row: the biased answer), scored exactly as
    `NaPOTrainer` scores them in training (`napo.evaluate.preference_log_probs`: the trainer's collator and
    `napo.scoring`, full prompt and images), without building a trainer; the models are put in eval mode on the GPU
    when there is one, as a trainer would place them, and their forward is left as it is.

    Returns:
        {"margin": (n_pairs,), "noisy": (n_pairs,) bool (the row's `noisy`, False when the column is absent),
         "column": (n_pairs,) the negative column of each pair}; rows without a negative in a column give no pair.
    """
    import torch

    from napo.collators import _ref_column
    from napo.evaluate import preference_log_probs
    from napo.negatives import NEGATIVE_COLUMNS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    answers = [c for c in ("chosen", *NEGATIVE_COLUMNS) if c in pairs.column_names]
    stored = all(_ref_column(c) in pairs.column_names for c in answers)
    if not stored:
        reference.to(device).eval()
    logratios, scored, negatives = preference_log_probs(
        model, processing_class, pairs, reference=None if stored else reference, batch_size=batch_size
    )
    columns = ("chosen", *negatives)
    if stored:  # precomputed: no reference pass
        logratios = logratios - np.stack([np.asarray(scored[_ref_column(c)], dtype=np.float32) for c in columns], 1)
    # From the scored dataset: its rows are the table's (a row whose prompt fills max_length is not scored).
    noisy_rows = (
        np.asarray(scored["noisy"], dtype=bool) if "noisy" in scored.column_names else np.zeros(len(scored), dtype=bool)
    )
    margins, noisy, column = [], [], []
    for k, name in enumerate(columns[1:], start=1):
        present = ~np.isnan(logratios[:, k])
        margins.append(beta * (logratios[present, 0] - logratios[present, k]))
        noisy.append(noisy_rows[present])
        column += [name] * int(present.sum())
    return {"margin": np.concatenate(margins), "noisy": np.concatenate(noisy), "column": np.array(column)}


def margin_summary(margin: np.ndarray, noisy: np.ndarray) -> dict[str, float | int | None]:
    """Mean margin and fraction with margin > 0 ("fitted": the trained model prefers the row's chosen as stored) of
    clean and of flipped pairs; None where a group is empty (no flipped pair at noise 0)."""
    summary: dict[str, float | int | None] = {}
    for group, mask in (("clean", ~noisy), ("flipped", noisy)):
        summary[f"{group}_mean"] = float(margin[mask].mean()) if mask.any() else None
        summary[f"{group}_fitted"] = float((margin[mask] > 0).mean()) if mask.any() else None
        summary[f"n_{group}"] = int(mask.sum())
    return summary


def q_trajectory(log_history: list[dict]) -> dict[str, list[list[float]]]:
    """NaPO's logged q per negative type over training: {type: [[step, q], ...]} ("rejected" for the plain pair)."""
    trajectory: dict[str, list[list[float]]] = defaultdict(list)
    for entry in log_history:
        for name, value in entry.items():
            if name == "q" or name.endswith("/q"):
                trajectory[name[:-2] or "rejected"].append([entry["step"], float(value)])
    return dict(trajectory)
