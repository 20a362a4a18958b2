"""`napo compare`: objectives x label-noise rates x seeds trained, evaluated and reported (`napo.compare`)."""

from __future__ import annotations

from typing import Any

from napo.cli.parser import Command, Invocation, MappingOption, NapoParser, Progress


def _compare_parser() -> NapoParser:
    from napo.compare import CompareConfig
    from napo.data import DatasetOptions

    return NapoParser(
        "napo compare",
        "Train every (objective, label-noise rate, seed) cell from the same SFT model and pairs (the bias lab, or "
        "--dataset/--model), evaluate it and write results.jsonl, a markdown report, a CSV and plots. Rerun the same "
        "command to resume: finished cells are skipped, failed ones retried. --recipe is --config.",
        (CompareConfig, DatasetOptions, Progress),
        nested={"data": DatasetOptions},
        mappings=(
            MappingOption(
                "train",
                ("--set",),
                "a NaPOConfig field for every cell, value read as YAML",
                "learning_rate=1e-4",
                parse_value=_yaml_value,
            ),
        ),
        aliases={"dataset": ["--dataset_name"], "model": ["--model_name_or_path"]},
    )


def _yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _run_compare(invocation: Invocation) -> tuple[list[str], dict[str, str]]:
    from napo.compare import CompareConfig, run_compare

    stats = run_compare(
        invocation[CompareConfig], command=invocation.command_line, progress=not invocation[Progress].no_progress
    )
    summary = [
        f"{stats['cells_run']} cells run, {stats['cells_failed']} failed (see errors.jsonl; rerun to retry), "
        f"{stats['cells_total']} in the grid"
    ]
    return summary, stats["outputs"]


COMPARE = Command(
    "compare",
    "objectives x label-noise rates x seeds -> report",
    _compare_parser,
    _run_compare,
    "Finished cells are kept in results.jsonl: rerun the same command to resume.",
    earlier_spellings=(("--recipe", "--config"),),  # --recipe, the option's earlier name, is --config
)
