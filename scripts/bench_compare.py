"""What one `napo compare` cell costs: the per-cell path (every cell scores its pairs under the reference itself)
against the shared path (the reference scores the grid's pairs once), side by side on the same cells.

Both variants run the same grid subset from the same SFT model and pairs, one cell at a time and interleaved
(per-cell A, shared A, per-cell B, ...), so machine load falls on both alike. Per cell: wall and CPU seconds (from
the cells' own results rows), their ratio shared / per-cell, and the largest difference of any metric or margin
between the two (the results must agree). The shared path's one-off cost (scoring the pairs once) is reported
beside it and amortised over the subset's cells.

    python scripts/bench_compare.py --quick --objectives dpo napo-paper --noise-rates 0.0 0.2 --seeds 0 \
        --out benchmarks/compare/cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napo.provenance import provenance, write_json_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--objectives", nargs="+", default=["dpo", "napo-paper"], help="objectives (default: dpo napo-paper)"
    )
    p.add_argument(
        "--noise-rates", nargs="+", type=float, default=[0.0, 0.2], help="label-noise rates (default: 0 0.2)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="cell seeds (default: 0)")
    p.add_argument("--quick", action="store_true", help="the lab's quick mode (default: the full lab)")
    p.add_argument("--eval-n", type=int, default=None, help="lab evaluation rows per split (default: the lab's)")
    p.add_argument(
        "--shared-set",
        nargs="*",
        default=["share_prompt=true"],
        metavar="FIELD=VALUE",
        help="NaPOConfig settings of the shared variant's cells only: levers that must not change results "
        "(value read as YAML; default: %(default)s)",
    )
    p.add_argument(
        "--baseline-set",
        nargs="*",
        default=["share_prompt=false"],
        metavar="FIELD=VALUE",
        help="NaPOConfig settings of the per-cell variant's cells, to reproduce the code before the levers "
        "(default: %(default)s, the padded forward of the previous round)",
    )
    p.add_argument("--work-dir", default=None, help="where the lab and the cells go (default: a temporary folder)")
    p.add_argument("--out", default="benchmarks/compare/cost.json", help="result JSON (default: %(default)s)")
    return p.parse_args(argv)


def _levers(settings: list[str]) -> dict:
    import yaml

    pairs = [item.partition("=") for item in settings]
    return {name: yaml.safe_load(value) for name, _, value in pairs}


def _config(args: argparse.Namespace, out: Path, share: bool, cell: tuple[str, float, int]):
    from napo.compare import CompareConfig

    objective, rate, seed = cell
    return CompareConfig(
        output_dir=str(out),
        objectives=[objective],
        noise_rates=[rate],
        seeds=[seed],
        quick=args.quick,
        eval_n=args.eval_n,
        workers=1,
        share_reference=share,
        train=_levers(args.shared_set if share else args.baseline_set),
    )


def _largest_difference(a: dict, b: dict) -> float:
    values = [(a["metrics"][k], b["metrics"][k]) for k in a["metrics"]]
    values += [(a["margins"][k], b["margins"][k]) for k in a["margins"] if a["margins"][k] is not None]
    return max(abs(x - y) for x, y in values)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from napo.compare import cell_key, read_results, run_compare
    from napo.compare.source import with_reference_logps
    from napo.lab.engine import prepare_lab

    torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-compare-"))
    runs = {"per-cell": work / "per-cell", "shared": work / "shared"}
    cells = [(o, r, s) for s in args.seeds for r in args.noise_rates for o in args.objectives]
    # The lab (SFT model and pairs) is built once, here; the shared run reads the same cache through a link.
    (runs["per-cell"] / "lab").mkdir(parents=True, exist_ok=True)
    runs["shared"].mkdir(parents=True, exist_ok=True)
    if not (runs["shared"] / "lab").exists():
        (runs["shared"] / "lab").symlink_to(runs["per-cell"] / "lab", target_is_directory=True)
    lab = prepare_lab(str(runs["per-cell"] / "lab"), quick=args.quick)
    start = time.perf_counter()  # the shared path's one-off cost: the reference scores the pairs once
    with_reference_logps(
        lab["pairs_dir"], lab["sft_dir"], Path(lab["sft_dir"]).parent / "pairs_reference", _levers(args.shared_set)
    )
    shared_setup = time.perf_counter() - start
    for cell in cells:
        for name, share in (("per-cell", False), ("shared", True)):
            run_compare(_config(args, runs[name], share, cell), progress=False)
    rows = {name: {r["key"]: r for r in read_results(path / "results.jsonl")} for name, path in runs.items()}
    per_cell = []
    for cell in cells:
        key = cell_key(*cell)
        a, b = rows["per-cell"][key], rows["shared"][key]
        per_cell.append(
            {
                "cell": key,
                "per_cell_wall_s": a["cell_wall_s"],
                "shared_wall_s": b["cell_wall_s"],
                "per_cell_cpu_s": a["cell_cpu_s"],
                "shared_cpu_s": b["cell_cpu_s"],
                "wall_ratio": b["cell_wall_s"] / a["cell_wall_s"],
                "cpu_ratio": b["cell_cpu_s"] / a["cell_cpu_s"],
                "largest_result_difference": _largest_difference(a, b),
            }
        )
    wall = np.array([c["wall_ratio"] for c in per_cell])
    cpu = np.array([c["cpu_ratio"] for c in per_cell])
    mean_per_cell = float(np.mean([c["per_cell_wall_s"] for c in per_cell]))
    mean_shared = float(np.mean([c["shared_wall_s"] for c in per_cell]))
    record = {
        "command": "python scripts/bench_compare.py " + " ".join(sys.argv[1:] if argv is None else argv),
        **provenance("cpu"),  # the lab's cells train on the CPU
        "shared_variant_settings": _levers(args.shared_set),
        "per_cell_variant_settings": _levers(args.baseline_set),
        "cells": per_cell,
        "wall_ratio": {"mean": float(wall.mean()), "min": float(wall.min()), "max": float(wall.max())},
        "cpu_ratio": {"mean": float(cpu.mean()), "min": float(cpu.min()), "max": float(cpu.max())},
        "shared_setup_wall_s": shared_setup,
        "amortised_wall_ratio": (mean_shared + shared_setup / len(cells)) / mean_per_cell,
        "largest_result_difference": max(c["largest_result_difference"] for c in per_cell),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record)
    print(
        json.dumps(
            {k: record[k] for k in ("wall_ratio", "cpu_ratio", "amortised_wall_ratio", "largest_result_difference")},
            indent=1,
        )
    )
    print(f"result: {args.out}")
    return record


if __name__ == "__main__":
    main()
