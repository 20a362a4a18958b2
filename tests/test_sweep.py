"""`napo compare --backend ray`: a local Ray instance (2 CPUs) gives the local backend's results, and a worker
killed in the middle of a cell costs a rerun of that cell, nothing else."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from napo.compare import CompareConfig, cell_key, read_results, run_compare

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def grid(source, out, max_steps=3, **overrides) -> CompareConfig:
    settings = dict(
        output_dir=str(out),
        objectives=["dpo", "napo-paper"],
        noise_rates=[0.0, 0.4],
        seeds=[0],
        holdout=0.25,
        max_steps=max_steps,
        workers=None if overrides.get("backend") == "ray" else 1,
        train={"per_device_train_batch_size": 8, "learning_rate": 1e-3},
        **source,
    )
    return CompareConfig(**{**settings, **overrides})


def by_key(out: Path) -> dict[str, dict]:
    rows = read_results(out / "results.jsonl")
    assert len(rows) == len({r["key"] for r in rows}), "a cell was recorded twice"
    return {r["key"]: r for r in rows}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2,
        object_store_memory=100 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


def test_ray_backend_matches_local_backend(colour_grid_source, tmp_path, local_ray):
    run_compare(grid(colour_grid_source, tmp_path / "local"), progress=False)
    stats = run_compare(grid(colour_grid_source, tmp_path / "ray", backend="ray"), progress=False)
    assert stats["cells_run"] == 4 and stats["cells_failed"] == 0
    local, remote = by_key(tmp_path / "local"), by_key(tmp_path / "ray")
    assert set(local) == set(remote) and len(local) == 4
    for key, row in local.items():
        assert remote[key]["metrics"] == pytest.approx(row["metrics"], abs=1e-4), key
        for name, value in row["margins"].items():
            assert remote[key]["margins"][name] == pytest.approx(value, abs=1e-4), (key, name)
    # Ray runs resume from the same results.jsonl: a finished cell is never rerun.
    again = run_compare(grid(colour_grid_source, tmp_path / "ray", backend="ray"), progress=False)
    assert again["cells_run"] == 0


def _busy_ray_tasks() -> list[int]:
    """pids of Ray workers executing a cell right now (Ray renames a worker's process after the task it runs)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path("/proc", entry, "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::_in_ray_task"):
                pids.append(int(entry))
    return pids


def test_worker_killed_mid_cell_loses_nothing(colour_grid_source, tmp_path, local_ray):
    out = tmp_path / "ray"
    killed = []

    def kill_first_busy_worker():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            cells = out / "cells"
            busy = _busy_ray_tasks()
            if busy and cells.exists() and any(cells.iterdir()):  # a cell has started training
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_first_busy_worker)
    watcher.start()
    stats = run_compare(grid(colour_grid_source, out, max_steps=20, backend="ray", cell_retries=2), progress=False)
    watcher.join()
    assert killed, "no cell was caught running"
    assert stats["cells_failed"] == 0 and stats["cells_run"] == 4
    assert set(by_key(out)) == {cell_key(o, r, 0) for o in ("dpo", "napo-paper") for r in (0.0, 0.4)}
    assert not (out / "errors.jsonl").exists()


def test_ray_worker_deaths_past_the_retries_are_recorded_not_raised(colour_grid_source, tmp_path, local_ray):
    out = tmp_path / "ray"
    stop = threading.Event()

    def kill_every_busy_worker():
        while not stop.is_set():
            for pid in _busy_ray_tasks():
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_every_busy_worker)
    watcher.start()
    try:
        stats = run_compare(
            grid(
                colour_grid_source,
                out,
                max_steps=20,
                backend="ray",
                cell_retries=0,
                objectives=["dpo"],
                noise_rates=[0.0],
            ),
            progress=False,
        )
    finally:
        stop.set()
        watcher.join()
    assert stats["cells_failed"] == 1 and stats["cells_run"] == 0
    assert cell_key("dpo", 0.0, 0) in (out / "errors.jsonl").read_text()


def test_backend_options_are_checked(colour_grid_source, tmp_path):
    with pytest.raises(ValueError, match="backend='slurm'"):
        grid(colour_grid_source, tmp_path, backend="slurm")
    with pytest.raises(ValueError, match="--ray-address is for --backend ray"):
        grid(colour_grid_source, tmp_path, ray_address="auto")
    with pytest.raises(ValueError, match="--workers sizes the local process pool"):
        CompareConfig(output_dir=str(tmp_path), backend="ray", workers=4, **colour_grid_source)
    with pytest.raises(ValueError, match="cell_cpus=0"):
        grid(colour_grid_source, tmp_path, backend="ray", cell_cpus=0)
