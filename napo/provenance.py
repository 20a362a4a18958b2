"""Where, when and with what a result was produced, and writing result files whole.

Every report napo writes — `napo compare`, the bias labs, the benchmark scripts under `scripts/` — records the
same three facts through this module, so that two reports can be compared on them:

    {"date": utc_now(), "device": device_description(), "versions": versions()}

and writes its files with `write_text_atomic` / `write_json_atomic`: written next to the target, then renamed over
it, so a kill leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# The libraries a training or evaluation result depends on, in the order reports list them: pillow draws the lab's
# images and tokenizers trains its tokenizer, so either can change a rebuilt lab model.
PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "numpy",
    "pillow",
    "tokenizers",
    "napo",
)


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second: '2026-11-25T03:40:00+00:00'."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; `os.cpu_count()` where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_description(device: Any = None) -> str:
    """What computed a result, in words.

    Args:
        device: the `torch.device` (or its name, "cpu", "cuda:1") the work ran on; None: the first GPU when CUDA
            is available, otherwise the CPU.

    Returns the GPU's name ("NVIDIA H200"), or "CPU <model> (<kernels>), <n> cores available, <t> torch threads",
    <kernels> the instruction set torch's CPU kernels use ("AVX2", "AVX512"): float results, and so a retrained
    model, can differ between two CPUs that differ there."""
    import torch

    device = torch.device(device) if device is not None else None
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", 0)
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    kernels, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    return f"CPU {_cpu_model()} ({kernels}), {available_cores()} cores available, {threads} torch threads"


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """{"python": "3.11.9", "torch": "2.13.0+cpu", ...} for `packages` ("not installed" for a missing one), and
    "napo_commit" (short hash, "+dirty" with uncommitted changes) when napo runs from a git checkout."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    commit = _git_commit(Path(__file__).resolve().parents[1])
    if commit:
        found["napo_commit"] = commit
    return found


def versions_text(found: dict[str, str] | None = None) -> str:
    """`versions()` (or `found`) on one line: "python 3.11.9, torch 2.13.0+cpu, ..."."""
    return ", ".join(f"{name} {value}" for name, value in (found or versions()).items())


def provenance(device: Any = None) -> dict[str, Any]:
    """{"date", "device", "versions"} of a result computed now on `device` (see `device_description`)."""
    return {"date": utc_now(), "device": device_description(device), "versions": versions()}


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` whole: into `<path>.tmp-<pid>` first, then renamed over `path` (a failed write removes
    its temporary file and leaves `path` as it was)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, value: Any, *, indent: int | None = 1) -> None:
    """`value` as JSON (`default=str` for paths, dtypes, ...), with a final newline, written whole to `path`."""
    write_text_atomic(path, json.dumps(value, indent=indent, default=str) + "\n")


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(root: Path) -> str | None:
    """The checkout's short commit hash, "+dirty" when tracked files changed; None outside git or without git."""
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
