"""The `napo` command: one entry point, one subcommand per user job.

This module is a thin layer over functions that can be imported; nothing imports it. Each subcommand
has a `_<name>_parser(subparsers)` that declares its options (each with a default and a help line) and
binds a `run` function that calls into the library and prints where it wrote its outputs.
"""

from __future__ import annotations

import argparse
import sys


def _pairs_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pairs", help="generate language-/vision-biased negatives -> preference dataset")
    p.set_defaults(run=lambda args: sys.exit("napo pairs: not implemented yet"))


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
