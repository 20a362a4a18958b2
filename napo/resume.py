"""Resuming a `napo train` job safely: the job record (`napo_job.json`: the dataset's fingerprint, the model and every
weight-changing setting) written into the output folder and each checkpoint, and the check that a checkpoint to
resume from was written by the same job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING

import datasets
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from napo.config import NaPOConfig
from napo.provenance import write_json_atomic

if TYPE_CHECKING:  # napo.train imports this module
    from napo.train import TrainArguments

logger = logging.getLogger(__name__)

JOB_RECORD = "napo_job.json"
# NaPOConfig fields that change what is logged, saved or shown but not the weights a step computes: they may differ
# between a job and its resumption. Every other field must match (or the resume is refused, see `resume_mismatch`).
RESUMABLE_CHANGES = (
    "output_dir",
    "logging_dir",
    "run_name",
    "report_to",
    "project",
    "disable_tqdm",
    "resume_from_checkpoint",
    "push_to_hub",
    "hub_token",
    "hub_private_repo",
    "hub_model_id",
    "hub_strategy",
    "hub_always_push",
    "hub_revision",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context",
    "skip_memory_metrics",
    "log_level",
    "log_level_replica",
    "log_on_each_node",
    "per_device_eval_batch_size",
    "eval_accumulation_steps",
    "prediction_loss_only",
    "include_for_metrics",
    "eval_do_concat_batches",
    "eval_use_gather_object",
    "batch_eval_metrics",
    "do_train",
    "do_eval",
    "do_predict",
    "ddp_timeout",
    "local_rank",
    "precompute_ref_batch_size",
    "include_num_input_tokens_seen",
)
RESUMABLE_PREFIXES = ("logging_", "save_", "eval_", "trackio_", "metric_for_", "greater_is_", "load_best_")


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


def dataset_fingerprint(dataset: datasets.Dataset) -> str:
    """SHA-256 of the dataset's columns and values (Arrow IPC serialisation of each record batch), hex.

    Equal for the same rows read again from any of the supported formats' same file; any changed, added, removed or
    reordered row or column changes it.
    """
    digest = hashlib.sha256(str(dataset.features).encode())
    for batch in dataset.data.table.to_batches(max_chunksize=1024):
        digest.update(batch.serialize())
    return digest.hexdigest()


def resume_mismatch(recorded: dict, current: dict) -> list[str]:
    """What differs between the job that wrote a checkpoint and this one, as "name: old -> new" lines."""
    changes = []
    old_data, new_data = recorded.get("dataset", {}), current["dataset"]
    if old_data.get("fingerprint") != new_data["fingerprint"]:
        changes.append(
            f"dataset: {old_data.get('path')} ({old_data.get('rows')} rows, fingerprint "
            f"{str(old_data.get('fingerprint'))[:12]}) -> {new_data['path']} ({new_data['rows']} rows, "
            f"fingerprint {new_data['fingerprint'][:12]})"
        )
    for section in ("model", "settings"):
        old, new = recorded.get(section, {}), current[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def job_record(job: TrainArguments, config: NaPOConfig, fingerprint: str, rows: int) -> dict:
    """What resuming must find unchanged: the dataset, the model and LoRA setup, every weight-changing setting."""
    settings = {
        key: value
        for key, value in json.loads(json.dumps(config.to_dict(), default=str)).items()
        if key not in RESUMABLE_CHANGES and not key.startswith(RESUMABLE_PREFIXES)
    }
    model = {
        "model_name_or_path": os.path.abspath(job.model_name_or_path)
        if os.path.exists(job.model_name_or_path)
        else job.model_name_or_path,
        **{
            name: getattr(job, name)
            for name in (
                "use_peft",
                "lora_r",
                "lora_alpha",
                "lora_dropout",
                "lora_target_modules",
                "eval_split",
                "dtype",
            )
        },
    }
    data_path = os.path.abspath(job.dataset_name) if os.path.exists(job.dataset_name) else job.dataset_name
    return {
        "dataset": {"path": data_path, "rows": rows, "fingerprint": fingerprint},
        "model": model,
        "settings": settings,
    }


def checkpoint_to_resume(job: TrainArguments, config: NaPOConfig, record: dict) -> str | None:
    """The checkpoint this job continues from (None: from scratch), after checking it belongs to the same job."""
    checkpoint = config.resume_from_checkpoint
    if checkpoint is not None and not os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: not a complete checkpoint (no {TRAINER_STATE_NAME})")
    if checkpoint is None and job.resume:
        checkpoint = last_complete_checkpoint(config.output_dir)
    if checkpoint is None:
        return None
    path = os.path.join(checkpoint, JOB_RECORD)
    if not os.path.exists(path):  # a checkpoint napo killed before it recorded the job in it
        path = os.path.join(config.output_dir, JOB_RECORD)
    if not os.path.exists(path):
        logger.warning(
            "%s has no %s (written by napo since it checks resumes): cannot check that %s was trained "
            "on the same data with the same settings",
            config.output_dir,
            JOB_RECORD,
            checkpoint,
        )
        return checkpoint
    with open(path) as f:
        recorded = json.load(f)
    changes = resume_mismatch(recorded, record)
    if changes and not job.resume_anyway:
        raise ValueError(
            f"--resume: {checkpoint} was written by a job with another dataset or other settings ("
            + "; ".join(changes)
            + "). Resuming would train on with the checkpoint's optimizer and scheduler (its "
            "learning rate wins) on data it did not start with. Rerun with the recorded settings (see "
            f"{path}), use another --output_dir to start over, or pass --resume-anyway."
        )
    if changes:
        logger.warning("--resume-anyway: resuming %s although %s", checkpoint, "; ".join(changes))
    return checkpoint


class RecordJob(TrainerCallback):
    """Writes the job record into the output folder when training begins (the trainer is built: the rows passed its
    checks) and into every checkpoint, so that resuming checks the checkpoint's own job."""

    def __init__(self, record: dict):
        self.record = record

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_json_atomic(os.path.join(args.output_dir, JOB_RECORD), self.record)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(checkpoint):
            write_json_atomic(os.path.join(checkpoint, JOB_RECORD), self.record)
