"""`napo lab`: the whole pipeline end to end on a built-in bias lab (`--task vision`, the default, or `--task audio`:
the `napo.lab.tasks.LabTask` records, run by `napo.lab.engine.run_lab`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from napo.cli.parser import Command, Invocation, NapoParser, Progress
from napo.lab.tasks import TASK_MODULES


@dataclass
class LabArguments:
    """`napo lab`: the whole pipeline on the built-in bias lab."""

    quick: bool = field(default=False, metadata={"help": "a tiny variant (about a minute) for tests and CI"})
    out: str | None = field(
        default=None,
        metadata={
            "aliases": ["--output_dir", "--output-dir"],
            "help": "output folder (None: benchmarks/lab, or benchmarks/lab/quick with --quick)",
        },
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "preference-training seeds"})
    task: str = field(
        default="vision",
        metadata={
            "choices": list(TASK_MODULES),
            "help": "which lab (a napo.lab.tasks.LabTask): vision, a tiny LLaVA on synthetic scenes with a colour "
            "prior (report.md / .json, PNG plots); audio, a tiny Qwen2-Audio on synthetic notes with a note prior "
            "(audio_report.md / .json)",
        },
    )
    recipe: str | None = field(
        default=None,
        metadata={"help": "lab recipe YAML (None: the task's packaged recipe, colors.yaml or sounds.yaml)"},
    )
    drop_identical: bool = field(
        default=False,
        metadata={
            "help": "drop negatives identical to chosen instead of keeping them as the paper does (a "
            "kept one has margin 0 and no gradient but pulls its type's ψ, hence q, and its dynamic weight "
            "towards 0)"
        },
    )


def _lab_parser() -> NapoParser:
    return NapoParser(
        "napo lab",
        "SFT a tiny LLaVA on synthetic scenes with a strong colour prior (--task audio: a tiny Qwen2-Audio on notes "
        "with a note prior), build language- and modality-biased pairs with it, train DPO and NaPO from the same "
        "checkpoint for every seed, and write report.md, report.json and PNG plots (audio: audio_report.md / .json). "
        "The SFT checkpoint and pairs are cached under OUT/cache/; a bar shows the stages and the ETA.",
        (LabArguments, Progress),
    )


def _run_lab(invocation: Invocation) -> tuple[list[str], dict[str, str]]:
    from napo.lab.engine import run_lab

    args = invocation[LabArguments]
    report = run_lab(
        args.out or ("benchmarks/lab/quick" if args.quick else "benchmarks/lab"),
        seeds=tuple(args.seeds),
        recipe=args.recipe,
        quick=args.quick,
        command=invocation.command_line,
        keep_identical=not args.drop_identical,
        task=args.task,
        progress=not invocation[Progress].no_progress,
    )
    return [f"wall time: {report['wall_time_s']:.0f} s"], report["outputs"]


LAB = Command(
    "lab",
    "the whole pipeline end to end on the built-in bias lab",
    _lab_parser,
    _run_lab,
    "The cached SFT model and pairs are kept: rerun the same command to resume.",
)
