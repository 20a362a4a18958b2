"""The grid of `napo compare`: its settings (`CompareConfig`, a recipe YAML), the objective-name grammar and the
cells' keys.

An objective name of the grid is read from the objective registry (`objective_settings`): adding an objective to
`napo.objectives.OBJECTIVES` makes it a grid name too.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from napo.data import DatasetOptions
from napo.lab.tasks import TASK_MODULES
from napo.objectives import OBJECTIVES, Q_MIN_DEFAULTS
from napo.provenance import available_cores
from napo.sweep import BACKENDS

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
# cDPO / rDPO are given the true flip rate as their ε (an oracle NaPO does not get, so these are the strongest
# versions of both baselines), clipped: below 0.05 they would be plain DPO although automatically built pairs are
# never perfectly clean, and rDPO's 1/(1 − 2ε) weights blow up as ε → 0.5.
SMOOTHING_RANGE = (0.05, 0.45)


def label_smoothing_for(noise_rate: float) -> float:
    """ε given to cDPO / rDPO in a cell: the cell's flip rate clipped to SMOOTHING_RANGE (see its comment)."""
    low, high = SMOOTHING_RANGE
    return min(max(noise_rate, low), high)


def objective_settings(name: str, noise_rate: float) -> dict[str, Any]:
    """NaPOConfig fields of a grid objective name, read from the objective registry (`napo.objectives.OBJECTIVES`).

    An objective whose loss takes no q is named as registered: "dpo" -> {objective: dpo}; one whose loss reads the
    flip rate ε ("cdpo", "rdpo") also gets `label_smoothing_for(noise_rate)`. An objective whose loss takes q is
    named with its q: "<name>-<variant>" for each adaptive variant (`napo.objectives.Q_MIN_DEFAULTS`: "napo-paper",
    "napo-official") or "<name>-q<fixed q in (0, 1]>" ("napo-q0.3" -> {objective: napo, q: "0.3"}).
    """
    base, _, suffix = name.partition("-")
    loss = OBJECTIVES.get(base)
    takes = inspect.signature(loss).parameters if loss is not None else {}
    if loss is None or bool(suffix) != ("q" in takes):
        raise ValueError(f"objective {name!r}: expected {objective_grammar()}")
    settings: dict[str, Any] = {"objective": base}
    if "label_smoothing" in takes:
        settings["label_smoothing"] = label_smoothing_for(noise_rate)
    if suffix:
        fixed = re.fullmatch(r"q(\d*\.?\d+)", suffix)
        if suffix not in Q_MIN_DEFAULTS and fixed is None:
            raise ValueError(f"objective {name!r}: expected {objective_grammar()}")
        if fixed is not None and not 0.0 < float(fixed.group(1)) <= 1.0:
            raise ValueError(f"objective {name!r}: a fixed q must be in (0, 1]")
        settings["q"] = fixed.group(1) if fixed is not None else suffix
    return settings


def objective_grammar() -> str:
    """The grid's objective names, in words: "dpo, cdpo, ..., napo-paper, napo-official or napo-q<q in (0, 1]>"."""
    names = []
    for name, loss in OBJECTIVES.items():
        if "q" in inspect.signature(loss).parameters:
            names += [f"{name}-{variant}" for variant in Q_MIN_DEFAULTS] + [f"{name}-q<fixed q in (0, 1]>"]
        else:
            names.append(name)
    return ", ".join(names[:-1]) + f" or {names[-1]}"


@dataclass
class CompareConfig:
    """The arguments of a `napo compare` run. A recipe YAML holds any subset of these fields by name."""

    output_dir: str = field(
        default="napo-compare",
        metadata={"help": "folder for results.jsonl, the report and the plots (rerun to resume)"},
    )
    objectives: list[str] = field(
        default_factory=lambda: list(DEFAULT_OBJECTIVES),
        metadata={"help": f"objectives: {objective_grammar()}"},
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
            "images or clips, leaning to the prior or a confusable colour or note; napo.lab.noise.annotator_noise)"
        },
    )
    shared_sft: bool = field(
        default=False,
        metadata={
            "help": "lab: all seeds share lab_seed's SFT model and pairs (seeds then vary only the noisy rows and "
            "batch order; cheaper); default: every seed is a replicate with its own SFT init, text-only SFT rows and "
            "batch order and its own sampled pairs (lab seed = lab_seed + seed)"
        },
    )
    lab_task: str = field(
        default="vision",
        metadata={
            "help": "which bias lab is the source: vision (colours of shapes, a tiny LLaVA) or audio (notes of "
            "instruments, a tiny Qwen2-Audio); napo.lab.tasks"
        },
    )
    lab_recipe: str | None = field(
        default=None,
        metadata={"help": "bias-lab recipe YAML (None: the task's packaged recipe, colors.yaml or sounds.yaml)"},
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
        if self.lab_task not in TASK_MODULES:
            raise ValueError(f"lab_task={self.lab_task!r}: expected one of {', '.join(TASK_MODULES)}")
        if self.dataset is not None and (self.lab_task != "vision" or self.lab_recipe is not None):
            raise ValueError("--lab-task and --lab-recipe choose the bias lab; with --dataset there is no lab")
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


def cell_key(objective: str, noise_rate: float, seed: int, noise_kind: str = "flip") -> str:
    """The cell's identity in results.jsonl and its folder name under cells/ ("noise=" for flips, as before)."""
    kind = "noise" if noise_kind == "flip" else noise_kind
    return f"{objective}/{kind}={noise_rate:g}/seed={seed}"


def grid_keys(config: CompareConfig) -> set[str]:
    """The keys of every cell of the grid (finished or not)."""
    return {
        cell_key(o, r, s, config.noise_kind)
        for o in config.objectives
        for r in config.noise_rates
        for s in config.seeds
    }
