"""`napo compare`: preference objectives x label-noise rates x seeds, every cell from the same model and pairs.

A *cell* is one (objective, noise rate, seed). The seed is a *replicate*: in the lab (unless `shared_sft`)
each replicate has its own SFT model (init and batch order) and its own sampled pairs; the cell's
seed also picks which `round(rate · rows)` rows get noise — flipped (`noise_kind="flip"`, `napo.pairs`'
label-noise injection) or misannotated (`"annotator"`, `napo.lab.noise.annotator_noise`) — so every objective of
a (rate, seed) sees exactly the same noisy rows: the comparison is paired. A trained cell is evaluated and its
row appended to `results.jsonl`:

    {"key": "napo-paper/noise=0.2/seed=1", "objective": "napo-paper", "noise_kind": "flip", "noise_rate": 0.2,
     "seed": 1, "replicate": 1, "pair_labels": {"pair_label_language_bias": {"clean": 812, "tie": 401, ...}},
     "label_smoothing": null, "source_dir": "<out>/lab/cache/<hash of the lab's settings>", "metrics": {...}, "train_wall_s": 14.2, "cell_wall_s": 31.0,
     "margins": {"clean_mean": ..., "flipped_mean": ..., "clean_fitted": ..., "flipped_fitted": ..., ...},
     "q_trajectory": {"language_bias": [[step, q], ...]}, "finished": "2026-11-25T03:40:00+00:00"}

Two sources of model and pairs:

- the bias lab (default): `napo.lab.prepare_lab` builds the SFT model and pairs once; metrics are the lab's
  (`evaluate_lab_model`: counterfactual / prior-consistent accuracy, blind agreement, POPE, CHAIR, ...);
- a user's preference dataset and model (`dataset` + `model`): a clean held-out split (`holdout` of the rows,
  never noised) is set aside; metrics are the reward accuracy and mean margin of the trained model on it.

Resumable: a cell whose key is in `results.jsonl` is skipped; a cell that raised is recorded in `errors.jsonl`
and retried on the next run. Output layout under `output_dir`:

    results.jsonl   one line per finished cell        errors.jsonl    one line per failed attempt
    summary.csv     mean and std over seeds           README.md       the report (tables, verdict)
    metrics_vs_noise.png  q_trajectory.png  margins_clean_vs_flipped.png
    lab/cache/<hash> or data/<hash>   the shared SFT model and pairs; a row's `source_dir` names the one it used,
                                      and only rows of the current source count as done or enter the report
    cells/<key>/    a cell's training folder (removed after success unless keep_models)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from napo.benchmarks import LOWER_IS_BETTER as BENCHMARK_LOWER_IS_BETTER
from napo.data import DatasetOptions
from napo.jobs import locks_output
from napo.provenance import available_cores, device_description, utc_now, versions_text, write_text_atomic
from napo.sweep import BACKENDS, run_cells

DEFAULT_OBJECTIVES = (
    "dpo",
    "cdpo",
    "rdpo",
    "ipo",
    "hinge",
    "napo-q0.3",
    "napo-q0.7",
    "napo-q1.0",
    "napo-paper",
    "napo-official",
)
DEFAULT_NOISE_RATES = (0.0, 0.1, 0.2, 0.4)
DEFAULT_SEEDS = (0, 1, 2)
NOISE_KINDS = ("flip", "annotator")  # as napo.lab.noise.NOISE_KINDS, without importing trl at CLI start-up
# Two-sided 95% Student t quantiles by degrees of freedom, for the paired intervals (1.96 beyond the table).
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
# cDPO / rDPO are given the true flip rate as their ε (an oracle NaPO does not get, so these are the strongest
# versions of both baselines), clipped: below 0.05 they would be plain DPO although automatically built pairs are
# never perfectly clean, and rDPO's 1/(1 − 2ε) weights blow up as ε → 0.5.
SMOOTHING_RANGE = (0.05, 0.45)
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
# Metrics the verdict compares NaPO and DPO on, by source: the debiasing gain, what it may cost (NOTES: DPO on
# these pairs over-corrects against the prior), and whether the flipped pairs were learned.
VERDICT_METRICS = {
    "lab": ("counterfactual_accuracy", "prior_consistent_accuracy", "margin_flipped_fitted"),
    "dataset": ("heldout_reward_accuracy", "margin_flipped_fitted"),
}
# Shown first in the report and plotted (when present); every other value gets a table after them.
KEY_METRICS = (
    "counterfactual_accuracy",
    "prior_consistent_accuracy",
    "blind_agreement",
    "image_share",
    "pope_f1",
    "chair_s",
    "heldout_reward_accuracy",
    "heldout_mean_margin",
    "margin_clean_mean",
    "margin_flipped_mean",
    "margin_clean_fitted",
    "margin_flipped_fitted",
)
_MARGIN_FIELDS = ("clean_mean", "flipped_mean", "clean_fitted", "flipped_fitted")


@dataclass
class CompareConfig:
    """The arguments of a `napo compare` run. A recipe YAML holds any subset of these fields by name."""

    output_dir: str = field(
        default="napo-compare",
        metadata={"help": "folder for results.jsonl, the report and the plots (rerun to resume)"},
    )
    objectives: list[str] = field(
        default_factory=lambda: list(DEFAULT_OBJECTIVES),
        metadata={
            "help": "objectives: dpo, cdpo, rdpo, ipo, hinge, napo-paper, napo-official or napo-q<fixed q in (0, 1]>"
        },
    )
    noise_rates: list[float] = field(
        default_factory=lambda: list(DEFAULT_NOISE_RATES),
        metadata={"help": "fractions of training rows whose preference is flipped, each in [0, 1)"},
    )
    seeds: list[int] = field(
        default_factory=lambda: list(DEFAULT_SEEDS),
        metadata={
            "help": "seeds (replicates): which rows are noised, training batch order and, in the lab "
            "unless shared_sft, the replicate's own SFT model and pairs"
        },
    )
    noise_kind: str = field(
        default="flip",
        metadata={
            "help": "label noise of every cell: 'flip' (chosen and negatives swapped on uniformly drawn rows, the "
            "control) or 'annotator' (lab only: an automatic annotator picks a wrong chosen, mostly on noisy "
            "images, leaning to the prior or a confusable colour; napo.lab.noise.annotator_noise)"
        },
    )
    shared_sft: bool = field(
        default=False,
        metadata={
            "help": "lab: all seeds share lab_seed's SFT model and pairs (seeds then vary only the noisy rows and "
            "batch order; cheaper); default: every seed is a replicate with its own SFT init and batch order and "
            "its own sampled pairs (lab seed = lab_seed + seed)"
        },
    )
    lab_recipe: str | None = field(
        default=None, metadata={"help": "bias-lab recipe YAML (None: the lab's default colours recipe)"}
    )
    lab_seed: int = field(
        default=0, metadata={"help": "seed of the lab's scenes, SFT model and pairs (shared by all cells)"}
    )
    quick: bool = field(
        default=False, metadata={"help": "the lab's quick mode: smaller data and fewer steps (smoke tests)"}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "your preference dataset (save_to_disk, parquet or JSONL) instead of the lab"}
    )
    model: str | None = field(
        default=None, metadata={"help": "your model (Hugging Face id or folder) to train from; needed with --dataset"}
    )
    holdout: float = field(
        default=0.1, metadata={"help": "with --dataset: fraction of rows held out clean for evaluation"}
    )
    data: DatasetOptions = field(
        default_factory=DatasetOptions,
        metadata={"help": "with --dataset: how it is read (split, layout, columns, media limits)"},
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "training steps per cell (None: the lab's or the trainer's default)"}
    )
    beta: float = field(default=0.1, metadata={"help": "β of every objective; also scales the recorded reward margins"})
    eval_n: int | None = field(default=None, metadata={"help": "lab evaluation rows per split (None: all)"})
    eval: str | None = field(
        default=None,
        metadata={
            "help": "standard benchmarks every trained cell is also evaluated on, as "
            "NAME=FILE[,NAME.option=VALUE] (napo.benchmarks.parse_eval_spec), e.g. "
            "pope=coco_pope_random.json,pope.image_dir=val2014; their metrics enter the tables as pope/f1, "
            "chair/chair_s, ...; cells finished earlier are not re-evaluated"
        },
    )
    workers: int | None = field(
        default=None,
        metadata={
            "help": "local backend: cells trained in parallel (a process pool; None: half the CPU cores); torch "
            "threads per worker = cores / workers (at most OMP_NUM_THREADS)"
        },
    )
    backend: str = field(
        default="local",
        metadata={
            "help": "where cells run: local (this machine, --workers processes) or ray (one Ray task per cell; "
            "pip install napo[ray])"
        },
    )
    ray_address: str | None = field(
        default=None,
        metadata={
            "help": "with --backend ray: the cluster to join ('auto', or ray://HOST:10001); None starts Ray on "
            "this machine"
        },
    )
    cell_cpus: float = field(
        default=1.0, metadata={"help": "with --backend ray: CPUs each cell reserves (its torch threads)"}
    )
    cell_gpus: float = field(
        default=0.0, metadata={"help": "with --backend ray: GPUs each cell reserves (fractions share a GPU)"}
    )
    cell_retries: int = field(
        default=2,
        metadata={"help": "with --backend ray: reruns of a cell whose worker process died (killed, out of memory)"},
    )
    share_reference: bool = field(
        default=True,
        metadata={
            "help": "score the pairs under the SFT reference once per grid and give every cell those log-probs "
            "(a flip swaps them with their answers); off: each cell recomputes them twice (training and scoring)"
        },
    )
    report_only: bool = field(
        default=False, metadata={"help": "train nothing: write the report from the finished cells in results.jsonl"}
    )
    keep_models: bool = field(
        default=False, metadata={"help": "keep every cell's trained model (default: delete it once evaluated)"}
    )
    train: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "extra NaPOConfig fields for every cell, e.g. {learning_rate: 1e-4}"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):  # from a recipe YAML or a results file
            self.data = DatasetOptions(**self.data)
        for name in self.objectives:
            objective_settings(name, 0.0)  # a typo fails now, not after an hour of other cells
        for rate in self.noise_rates:
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"noise rate {rate}: expected a fraction in [0, 1)")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind={self.noise_kind!r}: expected one of {', '.join(NOISE_KINDS)}")
        if self.noise_kind == "annotator" and self.dataset is not None:
            raise ValueError("noise_kind='annotator' needs the lab's ground truth; use 'flip' with --dataset")
        if (self.dataset is None) != (self.model is None):
            raise ValueError("--dataset and --model go together: your pairs and the model to train from them")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout}: expected a fraction in (0, 1)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.backend == "ray" and self.workers is not None:
            raise ValueError(
                "--workers sizes the local process pool; with --backend ray every cell is a Ray task sized "
                "by --cell-cpus / --cell-gpus"
            )
        if self.backend == "local" and self.workers is None:
            self.workers = max(1, available_cores() // 2)
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers={self.workers}: expected at least 1")
        if self.backend == "local" and self.ray_address is not None:
            raise ValueError("--ray-address is for --backend ray; with the local backend it would be ignored")
        if self.cell_cpus <= 0 or self.cell_gpus < 0 or self.cell_retries < 0:
            raise ValueError(
                f"cell_cpus={self.cell_cpus}, cell_gpus={self.cell_gpus}, cell_retries={self.cell_retries}: "
                "expected cpus > 0, gpus >= 0, retries >= 0"
            )
        if self.eval:
            from napo.benchmarks import parse_eval_spec

            parse_eval_spec(self.eval)  # a bad --eval fails now, not after the first cell's training
        if len(set(self.objectives)) != len(self.objectives) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("objectives and seeds must not repeat")
        grid_owned = set(self.train) & {"objective", "q", "label_smoothing", "seed", "beta", "max_steps", "output_dir"}
        if grid_owned:
            raise ValueError(
                f"train settings {sorted(grid_owned)} are set by the grid or by their own option (--beta, --max-steps)"
            )

    @property
    def source(self) -> str:
        """'lab' or 'dataset'."""
        return "lab" if self.dataset is None else "dataset"


def load_recipe(path: str) -> dict[str, Any]:
    """Read a compare recipe (YAML mapping of `CompareConfig` field names); unknown keys are an error."""
    recipe = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in dataclasses.fields(CompareConfig)}
    if not isinstance(recipe, dict) or set(recipe) - known:
        raise ValueError(
            f"{path}: expected a mapping with keys among {sorted(known)}; unknown: {sorted(set(recipe) - known)}"
        )
    return recipe


def label_smoothing_for(noise_rate: float) -> float:
    """ε given to cDPO / rDPO in a cell: the cell's flip rate clipped to SMOOTHING_RANGE (see its comment)."""
    low, high = SMOOTHING_RANGE
    return min(max(noise_rate, low), high)


def objective_settings(name: str, noise_rate: float) -> dict[str, Any]:
    """NaPOConfig fields of a grid objective name: "dpo" -> {objective: dpo}, "napo-q0.3" -> {objective: napo, q: 0.3}."""
    if name in ("dpo", "ipo", "hinge"):
        return {"objective": name}
    if name in ("cdpo", "rdpo"):
        return {"objective": name, "label_smoothing": label_smoothing_for(noise_rate)}
    match = re.fullmatch(r"napo-(paper|official|q(\d*\.?\d+))", name)
    if match is None:
        raise ValueError(
            f"objective {name!r}: expected dpo, cdpo, rdpo, ipo, hinge, napo-paper, napo-official or napo-q<q>, e.g. napo-q0.3"
        )
    q = match.group(2) or match.group(1)
    if match.group(2) and not 0.0 < float(q) <= 1.0:
        raise ValueError(f"objective {name!r}: a fixed q must be in (0, 1]")
    return {"objective": "napo", "q": q}


def cell_key(objective: str, noise_rate: float, seed: int, noise_kind: str = "flip") -> str:
    """The cell's identity in results.jsonl and its folder name under cells/ ("noise=" for flips, as before)."""
    kind = "noise" if noise_kind == "flip" else noise_kind
    return f"{objective}/{kind}={noise_rate:g}/seed={seed}"


def read_results(path: Path) -> list[dict]:
    """The rows of a results.jsonl; a torn last line (a kill during a write) is ignored, it will be redone."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@locks_output(lambda arguments: arguments["config"].output_dir)
def run_compare(config: CompareConfig, *, command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the grid, then write the report; return counts and the written paths under "outputs".

    Args:
        config: the grid and the source of model and pairs.
        command: the command line recorded in the report (the CLI passes its own).
        progress: show a tqdm bar over cells.
    """
    start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    context = _prepare(config, out)
    # Only cells trained from this very SFT model and pairs count: after the lab (or the data) changes, every cell reruns.
    sources = _source_dirs(context, config.seeds)
    done = {row["key"] for row in read_results(results_path) if row.get("source_dir") == sources.get(row.get("seed"))}
    # Seed-major order: a run stopped early holds whole replicates of the grid, not whole noise rates.
    todo = [
        (objective, rate, seed)
        for seed in config.seeds
        for rate in config.noise_rates
        for objective in config.objectives
        if cell_key(objective, rate, seed, config.noise_kind) not in done and not config.report_only
    ]
    total = len(config.objectives) * len(config.noise_rates) * len(config.seeds)
    failed = 0
    threads = _threads_per_worker(config.workers) if config.backend == "local" else 1
    with tqdm(total=total, initial=total - len(todo), unit="cell", desc="napo compare", disable=not progress) as bar:
        cells = run_cells(
            _attempt_cell,
            context,
            todo,
            backend=config.backend,
            workers=config.workers,
            threads=threads,
            ray_address=config.ray_address,
            cell_cpus=config.cell_cpus,
            cell_gpus=config.cell_gpus,
            cell_retries=config.cell_retries,
        )
        for cell, outcome in cells:
            if "error" in outcome:
                failed += 1
                _append_line(
                    out / "errors.jsonl",
                    {"key": cell_key(*cell, config.noise_kind), "error": outcome["error"], "time": utc_now()},
                )
                bar.set_postfix(failed=failed)
            else:
                _append_line(results_path, outcome)
                bar.update(1)
    rows = [
        row
        for row in read_results(results_path)
        if row["key"] in _grid_keys(config) and row.get("source_dir") == sources.get(row.get("seed"))
    ]
    meta = {
        "command": command or "napo.compare.run_compare (Python API)",
        "date": utc_now(),
        "run_wall_s": time.perf_counter() - start,
        "cells_run": len(todo) - failed,
        "cells_failed": failed,
        "cells_total": total,
        "max_steps": context["max_steps"],
        "lab_settings": context.get("lab", {}).get("settings"),
        "sft_metrics": context.get("sft_metrics", {}),
        "noise_kind": config.noise_kind,
        "replicate_sft": bool(context.get("replicates")),
    }
    outputs = write_report(out, rows, config, meta)
    return {"cells_total": total, "cells_run": len(todo) - failed, "cells_failed": failed, "outputs": outputs}


# ---------------------------------------------------------------------------------------------- running cells
def _prepare(config: CompareConfig, out: Path) -> dict[str, Any]:
    """Build (or reuse) what every cell shares; a plain dict of paths and settings, sent to worker processes."""
    context = {
        "source": config.source,
        "source_dir": None,
        "out": str(out),
        "beta": config.beta,
        "max_steps": config.max_steps,
        "eval_n": config.eval_n,
        "eval": config.eval,
        "keep_models": config.keep_models,
        "train": dict(config.train),
        "noise_kind": config.noise_kind,
    }
    if config.source == "lab":
        from napo.lab.pipeline import prepare_lab

        def replicate(lab_seed: int) -> dict[str, Any]:
            lab = prepare_lab(str(out / "lab"), recipe=config.lab_recipe, seed=lab_seed, quick=config.quick)
            pairs = lab["pairs_dir"]
            if config.share_reference:
                pairs = _with_reference_logps(
                    pairs, lab["sft_dir"], Path(lab["sft_dir"]).parent / "pairs_reference", config.train
                )
            return {
                "lab": lab,
                "sft_dir": lab["sft_dir"],
                "pairs": pairs,
                # The lab's cache folder names a hash of its recipe, settings and seed: a changed lab is another source.
                "source_dir": str(Path(lab["sft_dir"]).parent),
                "sft_metrics": _sft_metrics(Path(lab["sft_dir"]).parent / "sft_metrics.json", lab, config.eval_n),
            }

        replicates = {} if config.shared_sft else {seed: replicate(config.lab_seed + seed) for seed in config.seeds}
        shared = dict(replicates[config.seeds[0]]) if replicates else replicate(config.lab_seed)
        steps = config.max_steps or shared["lab"]["settings"]["pref_steps"]  # quick mode trains fewer steps
        if replicates:  # the report's SFT row: the mean over the replicates' SFT models
            names = shared["sft_metrics"]
            shared["sft_metrics"] = {
                k: float(np.mean([r["sft_metrics"][k] for r in replicates.values()])) for k in names
            }
        return {**context, **shared, "max_steps": steps, "replicates": replicates}
    # Keyed like the lab's cache: another dataset, model or split is another source, whose cells all run anew.
    source = [
        os.path.abspath(config.dataset),
        config.model,
        config.holdout,
        config.lab_seed,
        dataclasses.asdict(config.data),
    ]
    key = hashlib.sha256(json.dumps(source).encode()).hexdigest()[:12]
    data_dir = out / "data" / key
    splits = _split_dataset(config, data_dir)
    if config.share_reference:
        splits = {
            name: _with_reference_logps(path, config.model, data_dir / f"{name}_reference", config.train)
            for name, path in splits.items()
        }
    return {**context, "source_dir": str(data_dir), "sft_dir": config.model, **splits}


def _with_reference_logps(pairs_dir: str, sft_dir: str, target: Path, train: dict[str, Any]) -> str:
    """Save the pairs at `pairs_dir` with the SFT reference's log-probs of every answer (`ref_chosen_logps`,
    `ref_<column>_logps`, NaN where a row lacks the negative) at `target`, once; return `target`.

    Scored by the cells' own trainer (NaPOTrainer's reference precomputation with the grid's `train` settings, so
    tokenization and truncation are the cells'), then joined back to the pairs by row index: rows the trainer drops
    (a prompt that fills max_length) get NaN, and every cell drops them too.
    """
    import datasets
    import torch

    from napo import NaPOConfig, NaPOTrainer
    from napo.trainer import ROW_INDEX, _ref_column

    key = hashlib.sha256(json.dumps(train, sort_keys=True, default=str).encode()).hexdigest()[:12]
    target = target.with_name(f"{target.name}-{key}")  # other train settings, other tokenization: another table
    if (target / "dataset_info.json").exists():
        return str(target)
    pairs = datasets.load_from_disk(pairs_dir)
    model, processing_class = _load(sft_dir)
    args = NaPOConfig(
        **{
            **train,
            "output_dir": str(target) + ".work",
            "report_to": "none",
            "precompute_ref_log_probs": True,
            "use_cpu": not torch.cuda.is_available(),
            "gradient_checkpointing": False,
        }
    )
    trainer = NaPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=processing_class)
    scored = trainer.train_dataset
    for column in ("chosen", *trainer.negative_columns):
        values = np.full(len(pairs), np.nan)
        values[np.asarray(scored[ROW_INDEX])] = scored[_ref_column(column)]
        pairs = pairs.add_column(_ref_column(column), values.tolist())
    pairs.save_to_disk(str(target) + ".tmp")
    os.replace(str(target) + ".tmp", target)  # renamed last: a complete table or none
    shutil.rmtree(str(target) + ".work", ignore_errors=True)
    return str(target)


def _source_dirs(context: dict, seeds: list[int]) -> dict[int, str]:
    """The source (SFT model and pairs folder) each seed's cells train from."""
    replicates = context.get("replicates") or {}
    return {seed: replicates[seed]["source_dir"] if seed in replicates else context["source_dir"] for seed in seeds}


def _sft_metrics(path: Path, lab: dict, n: int | None) -> dict[str, float]:
    """The lab's metrics of the SFT model itself (every cell's starting point), computed once per `n`."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("n") == n and saved.get("sft_dir") == lab["sft_dir"]:
        return saved["metrics"]
    from napo.lab.pipeline import evaluate_lab_model

    metrics = evaluate_lab_model(lab["sft_dir"], lab, n=n)
    write_text_atomic(path, json.dumps({"n": n, "sft_dir": lab["sft_dir"], "metrics": metrics}) + "\n")
    return metrics


def _split_dataset(config: CompareConfig, data_dir: Path) -> dict[str, str]:
    """Hold out a clean split of the user's pairs once (seeded by lab_seed) and save both halves."""
    train_dir, heldout_dir = data_dir / "train", data_dir / "heldout"
    if not heldout_dir.exists():
        from napo.data import read_dataset, validate_preference_dataset

        dataset, _ = read_dataset(config.dataset, config.data)
        validate_preference_dataset(dataset)
        if "noisy" in dataset.column_names:  # the user's pairs count as clean: only injected flips are "noisy"
            dataset = dataset.remove_columns("noisy")
        split = dataset.train_test_split(test_size=config.holdout, seed=config.lab_seed)
        split["train"].save_to_disk(str(train_dir))
        split["test"].save_to_disk(str(heldout_dir) + ".tmp")
        os.replace(str(heldout_dir) + ".tmp", heldout_dir)  # written last: its presence marks the split done
    return {"pairs": str(train_dir), "heldout": str(heldout_dir)}


def _attempt_cell(context: dict, cell: tuple) -> dict[str, Any]:
    """run_cell, with any exception turned into {"error": traceback} so one bad cell never stops the grid."""
    try:
        return run_cell(context, *cell)
    except Exception:  # noqa: BLE001 - recorded in errors.jsonl and retried on the next run
        return {"error": traceback.format_exc()}


def run_cell(context: dict, objective: str, noise_rate: float, seed: int) -> dict[str, Any]:
    """Train and evaluate one cell; return its results.jsonl row (see the module docstring)."""
    import datasets

    from napo.pairs import inject_label_noise

    started, cpu_started = time.perf_counter(), time.process_time()
    kind = context.get("noise_kind", "flip")
    key = cell_key(objective, noise_rate, seed, kind)
    source = (context.get("replicates") or {}).get(seed, context)  # the replicate's own SFT model and pairs
    cell_dir = Path(context["out"], "cells", key.replace("/", "_"))
    shutil.rmtree(cell_dir, ignore_errors=True)  # a failed attempt's leftovers
    clean = datasets.load_from_disk(source["pairs"])
    if kind == "annotator":
        from napo.lab.noise import annotator_noise

        # The annotator replaces chosen answers: shared reference log-probs would no longer be theirs, so this
        # cell computes its own (trainer precomputation; scoring with the reference model).
        shared_refs = [c for c in clean.column_names if c.startswith("ref_") and c.endswith("_logps")]
        pairs, _ = annotator_noise(clean.remove_columns(shared_refs), noise_rate, seed, source["lab"]["recipe"])
    else:
        pairs, _ = inject_label_noise(clean, noise_rate, seed)
        if "answer" in pairs.column_names:  # the lab's ground truth: tag the flipped pairs too
            from napo.lab.noise import label_pairs

            pairs = label_pairs(pairs)
    settings = objective_settings(objective, noise_rate)
    trained = _train_cell(context, source, cell_dir, pairs, seed, settings)
    model, processing_class = _load(trained["model_dir"])
    # With shared reference log-probs in the pairs, scoring needs no reference model.
    reference = None if "ref_chosen_logps" in pairs.column_names else _load(source["sft_dir"])[0]
    if context["source"] == "lab":
        from napo.lab.pipeline import evaluate_lab_model

        metrics = evaluate_lab_model((model, processing_class), source["lab"], n=context["eval_n"])
    else:
        heldout = datasets.load_from_disk(context["heldout"])
        held = pair_margins(
            model, reference, processing_class, heldout, beta=context["beta"], work_dir=cell_dir / "scoring"
        )
        metrics = {
            "heldout_reward_accuracy": float(np.mean(held["margin"] > 0)),
            "heldout_mean_margin": float(np.mean(held["margin"])),
        }
    if context.get("eval"):
        from napo.benchmarks import evaluate_model

        bench_dir = Path(context["out"], "benchmarks", key.replace("/", "_"))
        shutil.rmtree(bench_dir, ignore_errors=True)  # a failed attempt's answers came from other weights
        metrics.update(evaluate_model(context["eval"], model, processing_class, bench_dir, model_id=key))
    # After evaluation: scoring wraps the model in a trainer, which patches its forward.
    train_margins = pair_margins(
        model, reference, processing_class, pairs, beta=context["beta"], work_dir=cell_dir / "scoring"
    )
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
        "pair_labels": _pair_label_counts(pairs),
        "metrics": {name: float(value) for name, value in metrics.items()},
        "train_wall_s": float(trained["wall_time_s"]),
        "cell_wall_s": time.perf_counter() - started,
        "cell_cpu_s": time.process_time() - cpu_started,
        "margins": margin_summary(train_margins["margin"], train_margins["noisy"]),
        "q_trajectory": q_trajectory(trained["log_history"]),
        "finished": utc_now(),
    }


# What a cell's training sets whatever the source, none of it a hyper-parameter: the grid shows one progress bar
# and keeps no checkpoint (the cell folder is removed once evaluated), trackers stay off unless `train` asks.
CELL_LOGISTICS = {"report_to": "none", "save_strategy": "no", "disable_tqdm": True}


def cell_training_config(context: dict, cell_dir: Path, seed: int, settings: dict[str, Any]):
    """The `NaPOConfig` of one cell: the grid's objective settings, seed, β and steps over the source's defaults,
    and the grid's `train` settings over all of them.

    The lab's defaults are the lab's (`napo.lab.pipeline.lab_training_config`: its learning rate, batch size, steps,
    CPU); a user's dataset and model train with NaPOConfig's (TRL's) defaults and the user's `train` settings, as
    `napo train` would, plus `CELL_LOGISTICS`.
    """
    grid = {"seed": seed, "beta": context["beta"], **settings}
    if context["max_steps"] is not None:
        grid["max_steps"] = context["max_steps"]
    if context["source"] == "lab":
        from napo.lab.pipeline import lab_training_config

        return lab_training_config(cell_dir, **grid, **context["train"])
    from napo.config import NaPOConfig

    return NaPOConfig(**{**CELL_LOGISTICS, **context["train"], "output_dir": str(cell_dir / "trainer"), **grid})


def _train_cell(context: dict, source: dict, cell_dir: Path, pairs, seed: int, settings: dict[str, Any]) -> dict:
    """Train the cell's model from the source's SFT model (`napo.training.train_preference`); save it to
    `<cell_dir>/model`. Returns model_dir, log_history and wall_time_s (the trainer is not kept: its model and
    optimizer state would share memory with the evaluation's copy)."""
    from napo.training import train_preference

    model, processing_class = _load(source["sft_dir"])
    config = cell_training_config(context, cell_dir, seed, settings)
    run = train_preference(pairs, model, config, processing_class=processing_class, model_dir=cell_dir / "model")
    return {"model_dir": run.model_dir, "log_history": run.log_history, "wall_time_s": run.wall_time_s}


def _pair_label_counts(pairs) -> dict[str, dict[str, int]]:
    """{label column: {clean/tie/inverted: pairs}} of the cell's training pairs (lab rows only; {} otherwise)."""
    counts = {}
    for column in (c for c in pairs.column_names if c.startswith("pair_label_")):
        values = [v for v in pairs[column] if v is not None]
        counts[column] = {label: values.count(label) for label in sorted(set(values))}
    return counts


def _load(path: str):
    from napo.models import load_model

    return load_model(path)


# ------------------------------------------------------------------------------------------------- margins
def pair_margins(
    model, reference, processing_class, pairs, *, beta: float, work_dir: Path, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """The β-scaled reward margin z of every (row, negative column) pair of `pairs` under `model` vs `reference`.

    Where `pairs` carry reference log-probs of every answer (`ref_chosen_logps`, `ref_<column>_logps`), those are the
    reference and `reference` may be None.

        z = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]   (nats · β)

    with y_w the row's `chosen` as stored (for a flipped row: the biased answer), scored exactly as
    `NaPOTrainer` scores them in training (same tokenization, full prompt and images).

    Returns:
        {"margin": (n_pairs,), "noisy": (n_pairs,) bool (the row's `noisy`, False when the column is absent),
         "column": (n_pairs,) the negative column of each pair}; rows without a negative in a column give no pair.
    """
    import torch

    from napo import NaPOConfig, NaPOTrainer
    from napo.trainer import _ref_column

    args = NaPOConfig(
        output_dir=str(work_dir),
        beta=beta,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
    )
    trainer = NaPOTrainer(
        model=model, ref_model=reference, args=args, train_dataset=pairs, processing_class=processing_class
    )
    trainer.model.eval()
    columns = ("chosen", *trainer.negative_columns)
    scored = trainer.train_dataset
    if all(_ref_column(c) in scored.column_names for c in columns):  # precomputed: no reference pass
        stored = np.stack([np.asarray(scored[_ref_column(c)], dtype=np.float32) for c in columns], axis=1)
        logratios = trainer.log_prob_table(scored, batch_size, of="policy") - stored
    else:
        logratios = trainer.log_prob_table(scored, batch_size, of="logratio")
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


# ------------------------------------------------------------------------------------------------- report
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


def _verdict(rows: list[dict], metrics: tuple[str, ...], rates: list[float], objectives: list[str]) -> list[str]:
    """NaPO variants against DPO per noise rate and metric: the mean paired difference over seeds (replicates; the
    same noisy rows per seed) with its 95% Student-t interval, and whether the interval excludes 0, in the
    metric's better direction."""
    values = {(r["objective"], r["noise_rate"], r["seed"]): cell_values(r) for r in rows}
    lines = []
    for metric in metrics:
        for napo in [o for o in objectives if o.startswith("napo")]:
            for rate in rates:
                diffs = [
                    v[metric] - values[("dpo", rate, s)][metric]
                    for (o, r, s), v in values.items()
                    if o == napo and r == rate and metric in v and metric in values.get(("dpo", rate, s), {})
                ]
                if not diffs:
                    continue
                mean = float(np.mean(diffs))
                se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan
                half = t_quantile_975(len(diffs) - 1) * se if len(diffs) > 1 else math.nan
                if math.isnan(se):
                    call, interval = "one seed: no interval", "—"
                else:
                    interval = f"[{mean - half:+.3f}, {mean + half:+.3f}]"
                    if abs(mean) > half:
                        call = "NaPO better" if (mean > 0) != (metric in LOWER_IS_BETTER) else "DPO better"
                    else:
                        call = "interval includes 0"
                lines.append(f"| {metric} | {napo} | {rate:g} | {mean:+.3f} | {interval} | {len(diffs)} | {call} |")
    if not lines:
        return []
    return [
        "| metric | objective | noise | Δ vs DPO (paired mean over seeds) | 95% interval | seeds | verdict |",
        "|---|---|---|---|---|---|---|",
        *lines,
    ]


def t_quantile_975(df: int) -> float:
    """The two-sided 95% Student t quantile for `df` ≥ 1 degrees of freedom (the next tabulated df below; 1.96
    beyond 30)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    return _T975[max(k for k in _T975 if k <= df)] if df <= 30 else 1.96


def _markdown(rows: list[dict], summary: list[dict], config: CompareConfig, meta: dict) -> str:
    objectives = [o for o in config.objectives if any(r["objective"] == o for r in rows)]
    rates = sorted(r for r in config.noise_rates if any(row["noise_rate"] == r for row in rows))
    present = {s["metric"] for s in summary}
    metrics = [m for m in KEY_METRICS if m in present] + sorted(present - set(KEY_METRICS))
    train_time = sum(r["train_wall_s"] for r in rows)
    if config.source == "lab":
        source = "the bias lab" + (" (quick mode)" if config.quick else "")
    else:
        source = f"dataset `{config.dataset}`, model `{config.model}`, {config.holdout:g} of its rows held out clean"
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
        f"- source: {source}",
        f"- noise: {config.noise_kind} "
        + (
            "(an automatic annotator picks a wrong chosen on round(rate · rows) rows, mostly on noisy images, leaning to "
            'the prior or a confusable colour; "flipped" below = misannotated rows)'
            if config.noise_kind == "annotator"
            else "(chosen and negatives swapped on uniformly drawn rows)"
        )
        + "; replicates: "
        + (
            "each seed its own SFT init, batch order and sampled pairs"
            if meta.get("replicate_sft")
            else "seeds share one SFT model and pairs (they vary noise and batch order only)"
        ),
        f"- β = {config.beta}; cDPO/rDPO ε = the cell's noise rate clipped to {list(SMOOTHING_RANGE)} (oracle flip rate); "
        f"training steps per cell = {meta['max_steps'] or 'the trainer default'}; extra training settings: {config.train or 'none'}",
    ]
    if meta["lab_settings"]:
        lines.append(f"- lab settings: {meta['lab_settings']}")
    lines += [
        "",
        "Mean ± sample std over seeds; the best mean of each column in bold (highest, or lowest for "
        f"{', '.join(sorted(LOWER_IS_BETTER))}). "
        "`margin_*` are the final β-scaled reward margins of the training pairs under the trained model vs the SFT "
        "reference: `clean_mean`/`flipped_mean` average them over clean and deliberately flipped pairs (margin toward the "
        "label as trained, so a negative flipped mean means the model did not learn the flipped preference), "
        "`*_fitted` is the fraction with margin > 0.",
        "",
        "## Does NaPO beat DPO under label noise?",
        "",
    ]
    lines += _verdict(rows, VERDICT_METRICS[config.source], rates, objectives) or [
        "(no DPO and NaPO cells to compare yet)"
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
        "Data: `results.jsonl` (one line per cell), `summary.csv` (the tables), `errors.jsonl` (failed attempts, if any).",
    ]
    return "\n".join(lines) + "\n"


def _plots(
    out: Path, rows: list[dict], summary: list[dict], config: CompareConfig, sft: dict[str, float]
) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = [o for o in config.objectives if any(r["objective"] == o for r in rows)]
    colours = {o: plt.cm.tab10(i % 10) for i, o in enumerate(objectives)}
    paths = {name: out / f"{name}.png" for name in ("metrics_vs_noise", "q_trajectory", "margins_clean_vs_flipped")}

    # 1. every metric against the noise rate, one line per objective (error bars: std over seeds).
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
    fig.savefig(paths["metrics_vs_noise"], dpi=110)
    plt.close(fig)

    # 2. q over training steps: NaPO objectives, one panel per noise rate, per negative type, seeds averaged.
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
    fig.savefig(paths["q_trajectory"], dpi=110)
    plt.close(fig)

    # 3. final margins of clean vs flipped training pairs, per objective and noise rate > 0.
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
    fig.savefig(paths["margins_clean_vs_flipped"], dpi=110)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------ helpers
def _grid_keys(config: CompareConfig) -> set[str]:
    return {
        cell_key(o, r, s, config.noise_kind)
        for o in config.objectives
        for r in config.noise_rates
        for s in config.seeds
    }


def _append_line(path: Path, row: dict) -> None:
    """Append one JSON line with a single write, flushed and fsynced: a kill leaves whole lines (at most a torn
    last one, which `read_results` ignores)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _threads_per_worker(workers: int) -> int:
    """cores / workers torch threads, capped by OMP_NUM_THREADS when set: on a shared, oversubscribed machine
    one thread per process is faster than threads that wait on each other at every parallel region."""
    threads = max(1, available_cores() // workers)
    return (
        min(threads, int(os.environ["OMP_NUM_THREADS"])) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else threads
    )
