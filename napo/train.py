"""One preference-training job from paths: a dataset on disk, a model directory or id, a `NaPOConfig`.

`TrainArguments` holds what a job needs besides the `NaPOConfig`, under TRL's names (`dataset_name`,
`model_name_or_path`, `use_peft`, `lora_r`, ...), so that `napo train` reads TRL's command lines; `run_training`
runs it. The output folder is locked for the job (`napo.jobs.output_lock`), and `<output_dir>/napo_job.json`
records the dataset's fingerprint and the training settings so that `--resume` can refuse a checkpoint written by
another job.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import datasets
from peft import LoraConfig

from napo.config import NEGATIVE_TYPES, NaPOConfig
from napo.data import DatasetOptions, read_dataset
from napo.jobs import output_lock
from napo.models import load_model
from napo.provenance import write_json_atomic
from napo.resume import RecordJob, checkpoint_to_resume, dataset_fingerprint, job_record
from napo.trainer import NaPOTrainer
from napo.training import train_preference

logger = logging.getLogger(__name__)


@dataclass
class TrainArguments:
    """What `napo train` needs besides the NaPOConfig: data, model, LoRA and resuming. Names follow TRL's scripts."""

    dataset_name: str = field(
        metadata={
            "aliases": ["--dataset"],
            "help": "preference rows: a save_to_disk folder, parquet or JSONL (required)",
        }
    )
    model_name_or_path: str = field(
        metadata={"aliases": ["--model"], "help": "model folder or Hugging Face id to start from (required)"}
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "preference rows to evaluate on (same formats as --dataset), for --eval_strategy steps/epoch"
        },
    )
    eval_split: float | None = field(
        default=None,
        metadata={
            "help": "instead of --eval_dataset: hold out this fraction of --dataset's rows (picked with --seed) "
            "for evaluation, in (0, 1)"
        },
    )
    use_peft: bool = field(
        default=False, metadata={"help": "train a LoRA adapter (the model with the adapter disabled is the reference)"}
    )
    lora_r: int | None = field(
        default=None,
        metadata={
            "aliases": ["--lora-rank", "--lora_rank"],
            "help": "LoRA rank; giving it turns --use_peft on (default with --use_peft: 16)",
        },
    )
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA scaling α (default: 2 × lora_r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path (with --use_peft)"})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "modules that get adapters: all-linear, or module names (space or comma separated) "
            "(default with --use_peft: all-linear)"
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue from the last complete checkpoint in --output_dir (same dataset and settings "
            "required); starts from scratch when there is none"
        },
    )
    resume_anyway: bool = field(
        default=False,
        metadata={
            "aliases": ["--resume-anyway"],
            "help": "resume even if the dataset or training settings differ from the checkpoint's job (the "
            "checkpoint's optimizer and scheduler state, and so its learning rate, still win)",
        },
    )
    allow_pickle: bool = field(
        default=False,
        metadata={"help": "allow pickled (.bin) weights, which can run code when loaded; safetensors only by default"},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "choices": ["sdpa", "eager", "flash_attention_2", "flash_attention_3", "xformers"],
            "help": "attention kernels; xformers needs CUDA and `pip install napo[gpu]` (default: transformers' sdpa)",
        },
    )
    dtype: str | None = field(
        default=None, metadata={"help": "dtype the model is loaded in, e.g. bfloat16 or auto (default: float32)"}
    )

    def __post_init__(self) -> None:
        if self.lora_r is not None:
            self.use_peft = True
        lora_given = [name for name in ("lora_alpha", "lora_target_modules") if getattr(self, name) is not None]
        if self.lora_dropout:
            lora_given.append("lora_dropout")
        if lora_given and not self.use_peft:
            raise ValueError(
                f"{', '.join('--' + n for n in lora_given)} given without --use_peft: add --use_peft "
                "(or --lora_r N) to train a LoRA adapter, or drop them"
            )
        if self.use_peft and self.lora_r is None:
            self.lora_r = 16
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(
                f"--lora_r {self.lora_r}: expected a rank >= 1 (leave --use_peft off to train every weight)"
            )
        if self.eval_split is not None:
            if self.eval_dataset is not None:
                raise ValueError("--eval_dataset and --eval_split both given: pass one of them")
            if not 0.0 < self.eval_split < 1.0:
                raise ValueError(f"--eval_split {self.eval_split}: expected a fraction in (0, 1)")
        if self.resume_anyway:
            self.resume = True

    def peft_config(self) -> LoraConfig | None:
        """The LoRA configuration, or None for a full fine-tune."""
        if not self.use_peft:
            return None
        modules = [m for item in (self.lora_target_modules or ["all-linear"]) for m in item.split(",") if m]
        targets = "all-linear" if modules == ["all-linear"] else modules
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha or 2 * self.lora_r,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
        )


def train_from_paths(
    dataset: str, model: str, config: NaPOConfig, *, dataset_options: DatasetOptions | None = None, **options: Any
) -> dict[str, str]:
    """`run_training` with the dataset and model as arguments; `options` are the other `TrainArguments` fields."""
    job = TrainArguments(dataset_name=dataset, model_name_or_path=model, **options)
    return run_training(job, config, dataset_options)


def run_training(
    job: TrainArguments, config: NaPOConfig, dataset_options: DatasetOptions | None = None
) -> dict[str, str]:
    """Train `job.model_name_or_path` on the preference rows of `job.dataset_name`; save it in `config.output_dir`.

    Before anything is loaded, the output folder is locked for this job and every tracker of `report_to` is checked
    to be installed. A row whose media cannot be read stops the job before training, naming the row and field.
    With `job.use_peft` a LoRA adapter is trained and the model with the adapter disabled is the reference (no
    second model in memory); otherwise every weight is trained against a frozen copy.

    Resuming (`job.resume`, or `config.resume_from_checkpoint` = a checkpoint folder) continues from the checkpoint
    with the same data order, optimizer and scheduler state, after checking that the dataset and the training
    settings are those recorded by the job that wrote it (`napo_job.json`); a mismatch is refused, naming what
    changed, unless `job.resume_anyway`.

    `dataset_options` say how the training (and evaluation) rows are read: split, hub config, layout, column
    renames, media limits (None: `DatasetOptions()`).

    Returns:
        Paths of what was written: the model (or adapter) folder, its model card, the training log and, with an
        evaluation set, the evaluation metrics.
    """
    # Under `accelerate launch` / torchrun every process runs this function: the job is one, so only the global rank 0
    # holds the folder's lock (the other ranks would be refused by it).
    main_process = int(os.environ.get("RANK", "0")) == 0
    with output_lock(config.output_dir) if main_process else contextlib.nullcontext():
        _check_trackers(config.report_to)
        train_dataset, _ = read_dataset(job.dataset_name, dataset_options)
        fingerprint, rows = dataset_fingerprint(train_dataset), len(train_dataset)
        eval_dataset = None
        if job.eval_dataset is not None:
            eval_dataset, _ = read_dataset(job.eval_dataset, dataset_options)
        elif job.eval_split is not None:
            split = train_dataset.train_test_split(test_size=job.eval_split, seed=config.seed)
            train_dataset, eval_dataset = split["train"], split["test"]
        if config.eval_strategy != "no" and eval_dataset is None:
            raise ValueError(
                f"--eval_strategy {config.eval_strategy} needs evaluation rows: pass --eval_dataset "
                "PATH or --eval_split FRACTION"
            )
        record = job_record(job, config, fingerprint, rows)
        checkpoint = checkpoint_to_resume(job, config, record)

        dtype, attn_implementation = _model_loading(job, config)
        policy, processing_class = load_model(
            job.model_name_or_path,
            trust_remote_code=config.trust_remote_code,
            allow_pickle=job.allow_pickle,
            dtype=dtype,
            attn_implementation=attn_implementation,
        )
        run = train_preference(
            train_dataset,
            policy,
            config,
            job.peft_config(),
            processing_class=processing_class,
            eval_dataset=eval_dataset,
            callbacks=[RecordJob(record)],  # records the job once the rows passed the trainer's checks
            resume_from_checkpoint=checkpoint,
        )
        trainer = run.trainer
        outputs = {"model": config.output_dir}
        if trainer.is_world_process_zero():  # one writer under `accelerate launch`
            outputs["model_card"] = write_model_card(trainer, job, train_dataset)
            outputs["log_history"] = os.path.join(config.output_dir, "log_history.json")
            write_json_atomic(outputs["log_history"], trainer.state.log_history)
            if eval_dataset is not None:
                outputs["eval_metrics"] = os.path.join(config.output_dir, "eval_results.json")
                write_json_atomic(outputs["eval_metrics"], trainer.evaluate())
    return outputs


def write_model_card(trainer: NaPOTrainer, job: TrainArguments, train_dataset: datasets.Dataset) -> str:
    """TRL's model card (README.md in the output folder; NaPO's paper and citation) plus what this job trained.

    The card's front matter names the base model and the dataset when they are Hugging Face ids (a local path is
    not a hub reference); the added section always names them, with the objective, its q and β, and the weight of
    every negative column of the dataset.
    """
    config = trainer.args
    local_data = os.path.exists(job.dataset_name)
    trainer.create_model_card(
        model_name=os.path.basename(os.path.normpath(config.output_dir)),
        dataset_name=None if local_data else job.dataset_name,
        tags=[config.objective],
    )
    path = os.path.join(config.output_dir, "README.md")
    if os.path.exists(job.model_name_or_path):  # TRL leaves a local base model out of the card
        with open(path) as f:
            card = f.read()
        if card.startswith("---\n") and "base_model:" not in card.split("---\n")[1]:
            card = card.replace("---\n", f"---\nbase_model: {os.path.abspath(job.model_name_or_path)}\n", 1)
        with open(path, "w") as f:
            f.write(card)
    negatives = [c for c in NEGATIVE_TYPES if c in train_dataset.column_names]
    weights = {c: config.negative_type_settings(c)[0] for c in negatives}
    total = sum(weights.values()) or 1.0
    lines = [
        "",
        "## NaPO training",
        "",
        f"- base model: `{job.model_name_or_path}`" + (f" (LoRA adapter, rank {job.lora_r})" if job.use_peft else ""),
        f"- dataset: `{job.dataset_name}`, {len(train_dataset)} rows",
        f"- objective: `{config.objective}`"
        + (f", q = `{config.q}`" if config.objective == "napo" else "")
        + f", β = {config.beta}",
        "- negative columns (weight γ, renormalised over the columns present): "
        + ", ".join(f"`{c}` {weights[c] / total:.3g}" for c in negatives),
        f"- learning rate {config.learning_rate}, {trainer.state.global_step} optimizer steps, "
        f"{config.per_device_train_batch_size} rows per device per step × {config.gradient_accumulation_steps} "
        "accumulation",
    ]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _check_trackers(report_to: list[str] | str | None) -> None:
    """Refuse, before any loading, a `report_to` tracker that is not installed (transformers would raise later)."""
    from transformers.integrations import get_reporting_integration_callbacks

    for callback in get_reporting_integration_callbacks(report_to):
        try:
            callback()
        except (RuntimeError, ImportError) as error:
            name = callback.__name__.removesuffix("Callback")
            extra = "`pip install 'napo[track]'`" if "TensorBoard" in name else "install it"
            raise ImportError(
                f"--report_to asks for {name}, which is not installed ({error}): {extra}, or pass --report_to none"
            ) from None


def _model_loading(job: TrainArguments, config: NaPOConfig) -> tuple[str | None, str | None]:
    """dtype and attention kernels of the model napo loads: the job's options, or TRL's `model_init_kwargs` (which
    TRL applies when it loads a model from its name; napo loads the model itself, so it reads them here). A key napo
    cannot apply, or one given two different ways, is refused rather than ignored."""
    init = dict(config.model_init_kwargs or {})
    given = {
        "dtype": init.pop("dtype", init.pop("torch_dtype", None)),
        "attn_implementation": init.pop("attn_implementation", None),
    }
    if init:
        raise ValueError(
            f"--model_init_kwargs {sorted(init)}: napo train loads the model itself and applies only "
            "dtype and attn_implementation from it; drop the others"
        )
    chosen = {"dtype": job.dtype, "attn_implementation": job.attn_implementation}
    for name, value in given.items():
        if value is not None and chosen[name] is not None and str(value) != str(chosen[name]):
            raise ValueError(f"{name} given twice: --{name} {chosen[name]} and --model_init_kwargs {name}={value}")
        chosen[name] = chosen[name] if chosen[name] is not None else value
    return chosen["dtype"], chosen["attn_implementation"]
