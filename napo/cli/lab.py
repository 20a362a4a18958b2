"""`napo lab`: the whole pipeline end to end on the built-in bias lab (vision, or audio with --audio)."""

from __future__ import annotations

from dataclasses import dataclass, field

from napo.cli.parser import Command, Invocation, NapoParser


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
    recipe: str | None = field(default=None, metadata={"help": "lab recipe YAML (None: the packaged colors.yaml)"})
    audio: bool = field(
        default=False,
        metadata={
            "help": "the audio lab instead: a tiny Qwen2-Audio on synthetic notes with a note prior (recipe "
            "default: the packaged sounds.yaml); writes audio_report.md / .json"
        },
    )
    drop_identical: bool = field(
        default=False,
        metadata={
            "help": "vision lab: drop negatives identical to chosen instead of keeping them as the paper does (a "
            "kept one has margin 0 and no gradient but pulls its type's ψ, hence q, and its dynamic weight "
            "towards 0)"
        },
    )


def _lab_parser() -> NapoParser:
    return NapoParser(
        "napo lab",
        "SFT a tiny LLaVA on synthetic scenes with a strong colour prior, build language-/vision-biased pairs with it, "
        "train DPO and NaPO from the same checkpoint for every seed, and write report.md, report.json and PNG plots. "
        "The SFT checkpoint and pairs are cached under OUT/cache/.",
        (LabArguments,),
    )


def _run_lab(invocation: Invocation) -> tuple[list[str], dict[str, str]]:
    from napo.lab.audio import run_audio_lab
    from napo.lab.pipeline import run_lab

    args = invocation[LabArguments]
    out = args.out or ("benchmarks/lab/quick" if args.quick else "benchmarks/lab")
    if args.audio and args.drop_identical:
        raise ValueError("--drop-identical applies to the vision lab only (the audio lab has its own pairs)")
    options = {} if args.audio else {"keep_identical": not args.drop_identical}
    lab = run_audio_lab if args.audio else run_lab
    report = lab(
        out, seeds=tuple(args.seeds), recipe=args.recipe, quick=args.quick, command=invocation.command_line, **options
    )
    return [f"wall time: {report['wall_time_s']:.0f} s"], report["outputs"]


LAB = Command(
    "lab",
    "the whole pipeline end to end on the built-in bias lab",
    _lab_parser,
    _run_lab,
    "The cached SFT model and pairs are kept: rerun the same command to resume.",
)
