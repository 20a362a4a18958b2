"""Where the cells of a `napo compare` grid run: this process, a local process pool, or a Ray cluster.

A backend takes a picklable `attempt(context, cell) -> outcome` function (an outcome is a cell's results row, or
`{"error": traceback}`) and yields `(cell, outcome)` as cells finish, in any order. Backends never write files:
the caller appends each outcome to `results.jsonl` as it arrives, so a cell finished on any worker is recorded
once and never rerun, and a crash of the caller loses at most the cells still running.

Ray (`pip install "napo[ray]"`): each cell is one Ray task asking for `cell_cpus` CPUs and `cell_gpus` GPUs. A
task whose worker process dies (killed, out of memory, node lost) is rerun by Ray up to `cell_retries` times from
scratch; an exception inside a cell is not a worker death: it comes back as `{"error": ...}` like on the local
backend, is recorded in `errors.jsonl` and retried on the next run. Every path in `context` (the SFT model, the
pairs, the output folder) must be on a filesystem every Ray node sees.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

BACKENDS = ("local", "ray")
Attempt = Callable[[dict, tuple], dict[str, Any]]


def run_cells(
    attempt: Attempt,
    context: dict,
    cells: list[tuple],
    *,
    backend: str = "local",
    workers: int = 1,
    threads: int = 1,
    ray_address: str | None = None,
    cell_cpus: float = 1.0,
    cell_gpus: float = 0.0,
    cell_retries: int = 2,
) -> Iterator[tuple[tuple, dict[str, Any]]]:
    """Yield `(cell, attempt(context, cell))` for every cell as it finishes.

    Args:
        attempt: a module-level function (pickled by reference into worker processes / Ray tasks).
        backend: "local" (this process when workers == 1, else a spawn process pool) or "ray".
        workers, threads: local backend: processes, and torch threads in each.
        ray_address: Ray backend: a cluster to join ("auto": the one this node belongs to, or "ray://host:10001");
            None starts a Ray instance on this machine for the run.
        cell_cpus, cell_gpus: Ray backend: resources each cell reserves (torch threads = max(1, int(cell_cpus))).
        cell_retries: Ray backend: reruns of a cell whose worker process died.
    """
    if backend == "ray":
        yield from _ray_cells(attempt, context, cells, ray_address, cell_cpus, cell_gpus, cell_retries)
    elif backend == "local":
        yield from _local_cells(attempt, context, cells, workers, threads)
    else:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")


def _local_cells(attempt: Attempt, context: dict, cells: list[tuple], workers: int, threads: int):
    if workers == 1 or len(cells) <= 1:
        set_threads(threads)
        for cell in cells:
            yield cell, attempt(context, cell)
        return
    import multiprocessing

    # spawn: a forked child would inherit torch's thread pools and locks from the parent.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=set_threads, initargs=(threads,)) as pool:
        pending = {pool.submit(attempt, context, cell): cell for cell in cells}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield pending.pop(future), future.result()


def set_threads(threads: int) -> None:
    """torch intra-op threads of this process (a worker's share of the cores)."""
    import torch

    torch.set_num_threads(threads)


def _in_ray_task(attempt: Attempt, context: dict, cell: tuple, threads: int) -> dict[str, Any]:
    set_threads(threads)
    return attempt(context, cell)


def _ray_cells(
    attempt: Attempt, context: dict, cells: list[tuple], address: str | None, cpus: float, gpus: float, retries: int
):
    try:
        import ray
    except ImportError as error:
        raise ImportError('backend="ray" needs Ray: pip install "napo[ray]"') from error
    started_here = not ray.is_initialized()
    if started_here:
        # Cells hand back small dicts and share models and pairs through the filesystem, so a local instance needs
        # only a small object store (Ray's default reserves 30% of RAM in /dev/shm); Ray workers inherit this
        # process's environment (PYTHONPATH, OMP_NUM_THREADS, HF_*_OFFLINE).
        local = {} if address else {"object_store_memory": 100 * 1024**2, "include_dashboard": False}
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": _forwarded_env()}, **local)
    task = ray.remote(_in_ray_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=False)
    threads = max(1, int(cpus))
    pending = {task.remote(attempt, context, cell, threads): cell for cell in cells}
    try:
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished:
                cell = pending.pop(ref)
                try:
                    yield cell, ray.get(ref)
                except Exception:  # noqa: BLE001 - the worker died more than `retries` times: a failed attempt
                    yield cell, {"error": traceback.format_exc()}
    finally:
        for ref in pending:  # stopped early (Ctrl-C, the caller's error): cancel what has not finished
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def _forwarded_env() -> dict[str, str]:
    """The environment a cell needs on any node: napo's import path, thread caps and offline switches."""
    names = (
        "PYTHONPATH",
        "OMP_NUM_THREADS",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        "HF_HOME",
    )
    return {name: os.environ[name] for name in names if name in os.environ}
