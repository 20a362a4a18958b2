"""The `napo` command: one entry point, one subcommand per user job.

This module is a thin layer over functions that can be imported; nothing imports it. Each subcommand
has a `_<name>_parser(subparsers)` that declares its options (each with a default and a help line) and
binds a `run` function that calls into the library and prints where it wrote its outputs.
"""

from __future__ import annotations

import argparse
import sys


def _pairs_parser(subparsers: argparse._SubParsersAction) -> None:
    import dataclasses

    from napo.pairs import PairsConfig, build_pairs, parse_negatives

    p = subparsers.add_parser(
        "pairs",
        help="generate language-/vision-biased negatives -> preference dataset",
        description="Answer degraded copies of every source row with a generator model and write the answers as "
        "rejected_* columns beside the original prompt, images and chosen. Rerun the same command to resume.",
    )
    # Options come from PairsConfig's fields, so the CLI and the Python API share defaults and help lines.
    types = {"int": int, "float": float, "str | None": str}
    for f in dataclasses.fields(PairsConfig):
        help_line = f.metadata["help"]
        if f.default is dataclasses.MISSING:
            p.add_argument(f.name, help=help_line)
        elif f.name == "negatives":
            p.add_argument(
                "--negative", dest="negatives", action="append", metavar="COLUMN=SPEC", default=None,
                help=f"repeatable; {help_line}",
            )
        elif f.type == "bool":
            off = "" if "default" in help_line else " (default: off)"
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", help=help_line + off)
        else:
            p.add_argument(
                f"--{f.name.replace('_', '-')}", type=types[f.type], default=f.default,
                help=f"{help_line} (default: {f.default})",
            )
    p.add_argument("--overwrite", action="store_true", help="delete this output folder's previous job and start over (default: resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, e.g. in logs (default: show it)")

    def run(args: argparse.Namespace) -> None:
        job = {f.name: getattr(args, f.name) for f in dataclasses.fields(PairsConfig)}
        try:
            job["negatives"] = parse_negatives(args.negatives) if args.negatives else None
            stats = build_pairs(PairsConfig(**job), overwrite=args.overwrite, progress=not args.no_progress)
        except ValueError as error:  # bad arguments or a job mismatch: a message, not a traceback
            sys.exit(f"napo pairs: {error}")
        print(f"{stats['rows_written']} of {stats['source_rows']} rows written, {stats['rejects']} rejected, "
              f"{stats['dropped_no_negative']} dropped (no negative left)")
        for name, path in stats["outputs"].items():
            print(f"{name}: {path}")

    p.set_defaults(run=run)


def _train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train NaPO or a DPO-family baseline on a preference dataset")
    p.set_defaults(run=lambda args: sys.exit("napo train: not implemented yet"))


def _eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="bias and hallucination metrics of a model on an evaluation set")
    p.set_defaults(run=lambda args: sys.exit("napo eval: not implemented yet"))


def _compare_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="objectives x label-noise rates x seeds -> report")
    p.set_defaults(run=lambda args: sys.exit("napo compare: not implemented yet"))


def _lab_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("lab", help="the whole pipeline end to end on the built-in bias lab")
    p.set_defaults(run=lambda args: sys.exit("napo lab: not implemented yet"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napo",
        description="Noise-aware preference optimization against modality bias in multimodal models.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_pairs_parser, _train_parser, _eval_parser, _compare_parser, _lab_parser):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
