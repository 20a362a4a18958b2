"""The one preference-training path: build the `NaPOTrainer`, train, save.

`napo train` (`napo.train.run_training`), the bias labs (`napo.lab.engine.train_lab_model`) and every `napo compare`
cell (`napo.compare.cell.run_cell`) train through `train_preference`. Each caller brings its own `NaPOConfig`: the
CLI's is what the user typed over NaPOConfig's defaults, the lab's is `napo.lab.engine.lab_training_config`, a
compare cell on a user's dataset gets the user's settings plus the grid's. Nothing here picks a hyper-parameter.

    config = NaPOConfig(output_dir="out", learning_rate=1e-5, max_steps=200)
    run = train_preference(pairs, model, config, processing_class=processor)
    run.model_dir, run.wall_time_s, run.log_history

`scripts/bench_train.py` builds its trainers itself: it times single optimizer steps of several trainers (stock
TRL's among them) over one shared model, which `trainer.train()` would hide.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import datasets
from peft import PeftConfig
from transformers import PreTrainedModel, PrinterCallback, ProcessorMixin, ProgressCallback, TrainerCallback

from napo.config import NaPOConfig
from napo.trainer import NaPOTrainer


@dataclass
class PreferenceRun:
    """What `train_preference` leaves: the trainer (for model cards, evaluation), where the model was saved and how
    long `trainer.train()` took (seconds of wall time, training only: not building, reference precomputation or
    saving)."""

    trainer: NaPOTrainer
    model_dir: str
    wall_time_s: float

    @property
    def log_history(self) -> list[dict[str, Any]]:
        """The trainer's logged dicts: loss, `language_bias/q`, `vision_bias/rewards/margins`, learning_rate, ..."""
        return self.trainer.state.log_history


def train_preference(
    dataset: datasets.Dataset,
    model: PreTrainedModel,
    config: NaPOConfig,
    peft_config: PeftConfig | None = None,
    *,
    processing_class: ProcessorMixin,
    ref_model: PreTrainedModel | None = None,
    eval_dataset: datasets.Dataset | None = None,
    callbacks: list[TrainerCallback] | None = None,
    resume_from_checkpoint: str | None = None,
    model_dir: str | os.PathLike | None = None,
    progress_callback: TrainerCallback | None = None,
) -> PreferenceRun:
    """Train `model` on the preference rows of `dataset` with `config`; save it (and `processing_class`).

    Args:
        dataset: preference rows (`prompt`, `chosen`, negative columns, optional `images` / `audios`).
        model: the policy to train; with `ref_model=None` and no LoRA a frozen copy of it is the reference.
        config: every training setting (the caller's: nothing is added here).
        peft_config: train a LoRA adapter instead of every weight (the model with the adapter disabled is then the
            reference, no second model in memory).
        processing_class: the model's tokenizer or processor (saved beside the model).
        ref_model: an explicit reference policy.
        eval_dataset: rows for `config.eval_strategy` evaluations.
        callbacks: extra `TrainerCallback`s (e.g. `napo train`'s job record).
        resume_from_checkpoint: a `checkpoint-<step>` folder to continue from (data order, optimizer, scheduler).
        model_dir: where the trained model (or adapter) and `processing_class` are saved, with TRL's
            `training_args.bin` (the `config` trained with); None: `config.output_dir`.
        progress_callback: replaces transformers' own display (`PrinterCallback` with `disable_tqdm`, else
            `ProgressCallback`), both of which print every log as a raw dict (e.g. the lab's
            `napo.lab.progress.TrainingBar`); None keeps transformers' display.
    """
    trainer = NaPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if progress_callback is not None:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress_callback)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    wall_time_s = time.perf_counter() - start
    model_dir = str(model_dir if model_dir is not None else config.output_dir)
    trainer.save_model(model_dir)  # every rank takes part (sharded weights); one writes
    return PreferenceRun(trainer=trainer, model_dir=model_dir, wall_time_s=wall_time_s)
