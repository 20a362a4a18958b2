"""The fixtures of scripts/reliability.py's cases: the `napo` command run as a user runs it (`napo`, `Run`), the tiny
models and data files every case uses (`Lab`), and checks on an output folder (`rows_of`, `leftovers`)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [
    "--per_device_train_batch_size",
    "2",
    "--gradient_checkpointing",
    "false",
    "--use_cpu",
    "true",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--seed",
    "0",
    "--learning_rate",
    "1e-3",
    "--save_steps",
    "1",
]
COLOURS = ["yellow", "red", "green", "blue", "white", "brown"]


class Run:
    """One finished command: exit code, output, wall time."""

    def __init__(self, returncode: int, stdout: str, stderr: str, wall: float):
        self.returncode, self.stdout, self.stderr, self.wall = returncode, stdout, stderr, wall

    @property
    def crashed(self) -> bool:
        return self.returncode == 1 or self.returncode < 0 or "Traceback (most recent call last)" in self.stderr

    @property
    def message(self) -> str:
        """The napo message line (the last stderr line that starts with "napo"), or the last stderr line."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        napo_lines = [line for line in lines if line.startswith("napo")]
        return (napo_lines or lines or [""])[-1][:300]


def napo(*args: str, timeout: float = 600, env: dict | None = None) -> Run:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "napo.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return Run(result.returncode, result.stdout, result.stderr, time.perf_counter() - start)


def finish(process: subprocess.Popen, timeout: float = 300) -> Run:
    out, err = process.communicate(timeout=timeout)
    return Run(process.returncode, out, err, 0.0)


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs at `path` (root only); yields False where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    mounted = mount.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], capture_output=True)


class Lab:
    """The tiny models and data files every case uses, under one work folder."""

    def __init__(self, work: Path):
        from napo.models import build_tiny_model

        self.work = work
        self.llava, self.text = work / "llava", work / "text-model"
        model, processor = build_tiny_model("llava", seed=1)
        model.generation_config.min_new_tokens = 2  # non-empty negatives from a random model
        model.save_pretrained(self.llava)
        processor.save_pretrained(self.llava)
        model, tokenizer = build_tiny_model("text", seed=0)
        model.save_pretrained(self.text)
        tokenizer.save_pretrained(self.text)
        self.source = self.image_rows(work / "source", 8)
        self.prefs = self.text_prefs(work / "prefs.jsonl", 8)
        self.references: dict[tuple, list] = {}

    @staticmethod
    def image_rows(folder: Path, n: int, changes: dict[int, dict] | None = None) -> Path:
        (folder / "img").mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            pixels = np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
            content = [{"type": "image"}, {"type": "text", "text": f"colour of {i}?"}]
            row = {
                "prompt": [{"role": "user", "content": content}],
                "images": [f"img/{i}.png"],
                "chosen": f"colour {i}",
                "id": i,
            }
            row.update((changes or {}).get(i, {}))
            lines.append(json.dumps(row))
        (folder / "source.jsonl").write_text("\n".join(lines) + "\n")
        return folder / "source.jsonl"

    @staticmethod
    def text_prefs(path: Path, n: int, changes: dict[int, dict] | None = None, shift: int = 0) -> Path:
        rows = []
        for i in range(n):
            row = {
                "prompt": [{"role": "user", "content": f"what colour is the {['banana', 'cat', 'frog'][i % 3]} ?"}],
                "chosen": COLOURS[(i + shift) % 6],
                "rejected_language_bias": COLOURS[(i + 1) % 6],
                "id": i,
            }
            row.update((changes or {}).get(i, {}))
            rows.append(row)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def pairs_args(self, out: Path, *extra: str, source: Path | None = None) -> list[str]:
        return [
            "pairs",
            "--source",
            str(source or self.source),
            "--model",
            str(self.llava),
            "--output_dir",
            str(out),
            "--max_new_tokens",
            "3",
            "--shard_size",
            "2",
            "--no_progress",
            *extra,
        ]

    def reference_rows(self, *extra: str) -> list:
        """The rows an uninterrupted `napo pairs` with these extra arguments writes (run once, cached)."""
        if extra not in self.references:
            out = self.work / f"reference-{len(self.references)}"
            run = napo(*self.pairs_args(out, *extra))
            assert run.returncode == 0, run.stderr[-2000:]
            self.references[extra] = datasets.load_from_disk(str(out / "dataset")).to_list()
        return self.references[extra]

    def train_args(self, out: Path, *extra: str, dataset: Path | None = None) -> list[str]:
        return [
            "train",
            "--dataset",
            str(dataset or self.prefs),
            "--model",
            str(self.text),
            "--output_dir",
            str(out),
            *TRAIN,
            *extra,
        ]


def rows_of(out: Path) -> list | None:
    try:
        return datasets.load_from_disk(str(out / "dataset")).to_list()
    except (FileNotFoundError, OSError, ValueError):
        return None


def leftovers(out: Path) -> list[str]:
    temporary = sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp-*"))
    return temporary + (["lock"] if (out / ".napo-lock").exists() else [])
