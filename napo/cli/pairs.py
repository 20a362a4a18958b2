"""`napo pairs`: a preference dataset from source rows, its negatives answered by a generator model."""

from __future__ import annotations

from dataclasses import dataclass, field

from napo.cli.parser import Command, Invocation, MappingOption, NapoParser, Progress


@dataclass
class PairsJob:
    overwrite: bool = field(
        default=False,
        metadata={"help": "delete this output folder's previous pairs job and start over (default: resume)"},
    )
    allow_pickle: bool = field(
        default=False, metadata={"help": "allow pickled (.bin) generator weights, which can run code when loaded"}
    )


def _pairs_parser() -> NapoParser:
    from napo.data import DatasetOptions
    from napo.pairs import PairsConfig

    return NapoParser(
        "napo pairs",
        "Answer degraded copies of every source row with a generator model and write the answers as rejected_* "
        "columns beside the original prompt, images and chosen. Rerun the same command to resume.",
        (PairsConfig, DatasetOptions, PairsJob, Progress),
        nested={"data": DatasetOptions},
        mappings=(
            MappingOption(
                "negatives",
                ("--negative", "--negatives"),
                "negative column=perturbation spec (None: image.drop -> rejected_language_bias, "
                "text.drop_question -> rejected_vision_bias; audio data: audio.drop / "
                "text.drop_question)",
                "rejected_language_bias='image.diffusion(t=500)'",
            ),
        ),
        aliases={"source": ["--dataset_name", "--dataset"], "model": ["--model_name_or_path"]},
    )


def _run_pairs(invocation: Invocation) -> tuple[list[str], dict[str, str]]:
    from napo.pairs import PairsConfig, build_pairs

    job = invocation[PairsJob]
    stats = build_pairs(
        invocation[PairsConfig],
        overwrite=job.overwrite,
        progress=not invocation[Progress].no_progress,
        allow_pickle=job.allow_pickle,
    )
    summary = [
        f"{stats['rows_written']} of {stats['source_rows']} rows written, {stats['rejects']} rejected, "
        f"{stats['dropped_no_negative']} dropped (no negative left)"
    ]
    return summary, stats["outputs"]


PAIRS = Command(
    "pairs",
    "generate language-/vision-biased negatives -> preference dataset",
    _pairs_parser,
    _run_pairs,
    "Finished shards are kept: rerun the same command to resume.",
)
