"""One preference-training job from paths: a dataset on disk, a model directory or id, a `NaPOConfig`."""

from __future__ import annotations

import json
import os

from peft import LoraConfig
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from napo.config import NaPOConfig
from napo.data import DatasetOptions, read_dataset
from napo.models import load_model
from napo.trainer import NaPOTrainer


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The `checkpoint-<step>` folder of `output_dir` with the highest step that was written completely, or None.

    The Trainer writes a checkpoint's weights, optimizer, scheduler and RNG states first and `trainer_state.json`
    last, so a job killed while saving leaves a folder without it: resuming from such a folder would fail, or
    load half-written weights. Those folders are passed over.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = {}
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        complete = os.path.isfile(os.path.join(output_dir, name, TRAINER_STATE_NAME))
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and complete:
            steps[int(step)] = os.path.join(output_dir, name)
    return steps[max(steps)] if steps else None


def train_from_paths(
    dataset: str,
    model: str,
    config: NaPOConfig,
    *,
    lora_rank: int = 0,
    lora_alpha: int | None = None,
    lora_target_modules: str = "all-linear",
    resume: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    dataset_options: DatasetOptions | None = None,
) -> dict[str, str]:
    """Train `model` on the preference rows at `dataset` and save the result in `config.output_dir`.

    Args:
        dataset: an HF `save_to_disk` folder, a parquet file or folder, or a JSONL file with image/audio paths.
            A row whose media cannot be read stops the job before training, naming the row and field.
        model: a local model folder or a Hugging Face model id (safetensors only unless `allow_pickle`).
        config: the training configuration (objective, q, weights and every TRL / transformers argument).
        lora_rank: 0 trains every weight against a frozen reference copy; r > 0 trains a LoRA adapter of rank r
            and uses the model with the adapter disabled as the reference (no second model in memory).
        lora_alpha: LoRA scaling α (default 2·r).
        lora_target_modules: modules that get adapters ("all-linear" or comma-separated names).
        resume: continue from the last checkpoint in `config.output_dir` (same data order, optimizer and
            scheduler state); starts from scratch when there is none.
        attn_implementation: the model's attention kernels (see `napo.models.load_model`); None: transformers' default.
        dataset_options: how `dataset` is read (split, hub config, layout, column renames, media limits).

    Returns:
        Paths of what was written: the model (or adapter) folder and the training log.
    """
    train_dataset, _ = read_dataset(dataset, dataset_options)
    policy, processing_class = load_model(
        model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, attn_implementation=attn_implementation
    )
    peft_config = None
    if lora_rank:
        targets = lora_target_modules if lora_target_modules == "all-linear" else lora_target_modules.split(",")
        peft_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, target_modules=targets)
    trainer = NaPOTrainer(
        model=policy,
        args=config,
        train_dataset=train_dataset,
        processing_class=processing_class,
        peft_config=peft_config,
    )
    checkpoint = last_complete_checkpoint(config.output_dir) if resume else None
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(config.output_dir)
    log_path = os.path.join(config.output_dir, "log_history.json")
    if trainer.is_world_process_zero():  # one writer under `accelerate launch`
        with open(log_path + ".tmp", "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
        os.replace(log_path + ".tmp", log_path)
    return {"model": config.output_dir, "log_history": log_path}
