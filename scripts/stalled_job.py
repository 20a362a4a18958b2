"""A `napo pairs` or `napo train` job that stalls part-way, so that a signal or a second job lands mid-run on any
machine, however fast or busy: the one such helper of scripts/reliability.py and the Ctrl-C / kill -9 tests.

    python scripts/stalled_job.py MARKER STALL_S napo-arguments...

runs `napo napo-arguments...` with one change: `pairs`, once its first shard (`OUTPUT_DIR/shards/00000`) is on disk,
and `train`, from global step 2 on (after checkpoint-2 with `--save_steps 1`), create the file MARKER and sleep
STALL_S seconds before every further generate call / training step. Nothing else is changed, so the job's own
signal handling, locks and atomic writes are what a test sees. From Python: `start_stalled` and `wait_for_stall`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()


def start_stalled(marker: Path, *args: str, stall_s: float = 600, **popen_kwargs) -> subprocess.Popen:
    """Start `napo ARGS` stalling as this module's docstring says; stdout and stderr are text pipes unless given.

    The child gets the default SIGINT disposition: a job started in the background (nohup, `&`, some CI runners)
    inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler, unlike a terminal user's job.
    """
    popen_kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen_kwargs}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(marker), str(stall_s), *args],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **popen_kwargs,
    )


def wait_for_stall(marker: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Return once `process` has stalled (MARKER exists); RuntimeError with its stderr if it ended or took longer
    than `timeout` seconds first."""
    deadline = time.monotonic() + timeout
    while not Path(marker).exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stderr = process.stderr.read()[-2000:] if process.stderr and process.poll() is not None else ""
            raise RuntimeError(f"the job ended or took over {timeout:.0f} s before it stalled ({marker}): {stderr}")
        time.sleep(0.1)


def _output_dir(argv: list[str]) -> str:
    """The job's output folder from its arguments (either spelling, `--flag VALUE` or `--flag=VALUE`)."""
    for i, item in enumerate(argv):
        if item in ("--output_dir", "--output-dir") and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith(("--output_dir=", "--output-dir=")):
            return item.partition("=")[2]
    raise SystemExit("stalled_job.py: a stalled pairs job needs --output_dir")


def _run_stalled(marker: str, stall_s: float, argv: list[str]) -> None:
    import napo.pairs
    from napo.cli import main
    from napo.trainer import NaPOTrainer

    generate, training_step = napo.pairs.generate, NaPOTrainer.training_step

    def stall() -> None:
        open(marker, "w").close()
        time.sleep(stall_s)

    def stalling_generate(*args, **kwargs):
        if os.path.isdir(os.path.join(_output_dir(argv), "shards", "00000")):
            stall()
        return generate(*args, **kwargs)

    def stalling_training_step(self, *args, **kwargs):
        if self.state.global_step >= 2:
            stall()
        return training_step(self, *args, **kwargs)

    napo.pairs.generate, NaPOTrainer.training_step = stalling_generate, stalling_training_step
    main(argv)


if __name__ == "__main__":
    _run_stalled(sys.argv[1], float(sys.argv[2]), sys.argv[3:])
