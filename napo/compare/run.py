"""Running a `napo compare` grid: the cells not yet finished from the current source, where `napo.sweep` runs them,
results.jsonl / errors.jsonl appended as cells finish, then the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from napo.compare.cell import attempt_cell
from napo.compare.grid import CompareConfig, cell_key, grid_keys
from napo.compare.report import write_report
from napo.compare.source import prepare_sources, source_ids
from napo.jobs import locks_output
from napo.lab.tasks import lab_task, sft_gate
from napo.provenance import available_cores, utc_now
from napo.sweep import run_cells


def read_results(path: Path) -> list[dict]:
    """The rows of a results.jsonl; a torn last line (a kill during a write) is ignored, it will be redone."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@locks_output(lambda arguments: arguments["config"].output_dir)
def run_compare(config: CompareConfig, *, command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the grid, then write the report; return counts and the written paths under "outputs".

    Args:
        config: the grid and the source of model and pairs.
        command: the command line recorded in the report (the CLI passes its own).
        progress: show a tqdm bar over cells.
    """
    start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    context = prepare_sources(config, out)
    # Only cells trained from this very SFT model and pairs, with these training settings, count: after the lab, the
    # data or the settings change, every cell reruns (the cell key names only objective, noise and seed).
    sources = source_ids(context, config.seeds)
    fingerprint = settings_fingerprint(config, context["max_steps"])

    def current(row: dict) -> bool:
        source = sources.get(row.get("seed"))
        if source is None or row.get("settings") != fingerprint:
            return False
        if source["digest"] is not None and "source_digest" in row:  # the lab: by content, wherever it was built
            return row["source_digest"] == source["digest"]
        return row.get("source_dir") == source["dir"]  # a user's data, or a row from before digests: by folder

    done = {row["key"] for row in read_results(results_path) if current(row)}
    # Seed-major order: a run stopped early holds whole replicates of the grid, not whole noise rates.
    todo = [
        (objective, rate, seed)
        for seed in config.seeds
        for rate in config.noise_rates
        for objective in config.objectives
        if cell_key(objective, rate, seed, config.noise_kind) not in done and not config.report_only
    ]
    total = len(config.objectives) * len(config.noise_rates) * len(config.seeds)
    failed = 0
    threads = _threads_per_worker(config.workers) if config.backend == "local" else 1
    with tqdm(total=total, initial=total - len(todo), unit="cell", desc="napo compare", disable=not progress) as bar:
        cells = run_cells(
            attempt_cell,
            context,
            todo,
            backend=config.backend,
            workers=config.workers,
            threads=threads,
            ray_address=config.ray_address,
            cell_cpus=config.cell_cpus,
            cell_gpus=config.cell_gpus,
            cell_retries=config.cell_retries,
        )
        for cell, outcome in cells:
            if "error" in outcome:
                failed += 1
                _append_line(
                    out / "errors.jsonl",
                    {"key": cell_key(*cell, config.noise_kind), "error": outcome["error"], "time": utc_now()},
                )
                bar.set_postfix(failed=failed)
            else:
                _append_line(results_path, {**outcome, "settings": fingerprint})
                bar.update(1)
    rows = [row for row in read_results(results_path) if row["key"] in grid_keys(config) and current(row)]
    meta = {
        "command": command or "napo.compare.run_compare (Python API)",
        "date": utc_now(),
        "run_wall_s": time.perf_counter() - start,
        "cells_run": len(todo) - failed,
        "cells_failed": failed,
        "cells_total": total,
        "max_steps": context["max_steps"],
        "lab_settings": context.get("lab", {}).get("settings"),
        "sft_metrics": context.get("sft_metrics", {}),
        "noise_kind": config.noise_kind,
        "replicate_sft": bool(context.get("replicates")),
        "replicate_gates": replicate_gates(context),
        "replicate_sft_metrics": {seed: r["sft_metrics"] for seed, r in (context.get("replicates") or {}).items()},
    }
    outputs = write_report(out, rows, config, meta)
    return {"cells_total": total, "cells_run": len(todo) - failed, "cells_failed": failed, "outputs": outputs}


def replicate_gates(context: dict) -> dict[int, dict]:
    """Each replicate's own SFT model against its lab's gate ({seed: `sft_gate`}; {} without replicates): a grid is
    read knowing which of its starting points were the model the lab wants."""
    return {
        seed: sft_gate(r["sft_metrics"], lab_task(r["lab"]["task"]).gate)
        for seed, r in (context.get("replicates") or {}).items()
    }


def settings_fingerprint(config: CompareConfig, max_steps: int | None) -> str:
    """A short hash of what decides a cell's result beyond its key and its source: the extra training settings, β,
    the step count and the evaluation (lab rows per split, benchmarks). Recorded in every results row as
    `settings`."""
    decisive = dict(train=config.train, beta=config.beta, max_steps=max_steps, eval_n=config.eval_n, eval=config.eval)
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _append_line(path: Path, row: dict) -> None:
    """Append one JSON line with a single write, flushed and fsynced: a kill leaves whole lines (at most a torn
    last one, which `read_results` ignores)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _threads_per_worker(workers: int) -> int:
    """cores / workers torch threads, capped by OMP_NUM_THREADS when set: on a shared, oversubscribed machine
    one thread per process is faster than threads that wait on each other at every parallel region."""
    threads = max(1, available_cores() // workers)
    return (
        min(threads, int(os.environ["OMP_NUM_THREADS"])) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else threads
    )
