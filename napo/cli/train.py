"""`napo train`: NaPO or a DPO-family baseline on a preference dataset (`napo.train.run_training`)."""

from __future__ import annotations

from napo.cli.parser import Command, Invocation, NapoParser


def _train_parser() -> NapoParser:
    from napo.config import NaPOConfig
    from napo.data import DatasetOptions
    from napo.train import TrainArguments

    return NapoParser(
        "napo train",
        "Preference training with NaPOTrainer (a TRL DPOTrainer) on rows with 'chosen' and any of 'rejected', "
        "'rejected_language_bias', 'rejected_vision_bias', 'rejected_audio_bias'. Every TRL DPOConfig / transformers "
        "TrainingArguments option is accepted under its TRL name, as are TRL's model and LoRA options.",
        (TrainArguments, DatasetOptions, NaPOConfig),
        defaults={"output_dir": "outputs/napo-train"},
        epilog="TrainingArguments' own `debug` setting can only be given in --config: --debug is napo's.",
    )


def _run_train(invocation: Invocation) -> tuple[list[str], dict[str, str]]:
    from napo.config import NaPOConfig
    from napo.data import DatasetOptions
    from napo.train import TrainArguments, run_training

    return [], run_training(invocation[TrainArguments], invocation[NaPOConfig], invocation[DatasetOptions])


TRAIN = Command(
    "train",
    "train NaPO or a DPO-family baseline on a preference dataset",
    _train_parser,
    _run_train,
    "Checkpoints written so far are kept (see --save_steps): rerun the same command with --resume to "
    "resume from the last one.",
)
