"""Every hostile case of issue #17, run as a user would run it: the `napo` command in a subprocess, on tiny models.

Each case states what must happen and records what did: the exit code, the first line of the message, and the
checks on the output folder (no mixed shards, no temporary file left, a rerun finishing with the rows of an
uninterrupted run). A *crash* is exit code 1 or a Python traceback on stderr; *corruption* is an output that
differs from the uninterrupted run's or mixes two jobs. Cases whose behaviour is being built on another branch are
run too and marked "waits on <branch>" when they do not hold yet.

    python scripts/reliability.py                      # every case, ~10 min on 2 busy cores
    python scripts/reliability.py --only pairs-ctrl-c  # some cases

writes benchmarks/reliability/README.md (the table) and results.json, with the command, date and versions.
Read-only and full-disk cases mount a small tmpfs (root only); elsewhere they are reported as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from napo.provenance import device_description, utc_now, versions_text, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
# Runs the napo command with its generator (pairs) or training step (train) slowed down once a first shard or
# checkpoint exists, so that a signal or a second job lands mid-run on any machine. Nothing else is changed.
SLOWED = textwrap.dedent("""
    import os, sys, time
    marker, rest = sys.argv[1], sys.argv[2:]
    import napo.pairs
    from napo.trainer import NaPOTrainer
    from napo.cli import main
    out = rest[rest.index("--output_dir") + 1]
    generate, step = napo.pairs.generate, NaPOTrainer.training_step
    def slow_generate(*args, **kwargs):
        if os.path.isdir(os.path.join(out, "shards", "00000")):
            open(marker, "w").close()
            time.sleep(float(os.environ.get("NAPO_SLOW_S", "600")))
        return generate(*args, **kwargs)
    def slow_step(self, *args, **kwargs):
        if self.state.global_step >= 2:
            open(marker, "w").close()
            time.sleep(float(os.environ.get("NAPO_SLOW_S", "600")))
        return step(self, *args, **kwargs)
    napo.pairs.generate, NaPOTrainer.training_step = slow_generate, slow_step
    main(rest)
""")
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


def start_slowed(marker: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOWED, str(marker), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        # A background run (nohup, `&`) inherits SIGINT ignored: give the job the terminal's default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the job ended or stalled before {path} appeared: {process.stderr.read()[-2000:]}")
        time.sleep(0.1)


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


# ------------------------------------------------------------------------------------------------------ fixtures
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


# --------------------------------------------------------------------------------------------------------- cases
CASES: list[tuple[str, str, str, Callable]] = []  # (name, branch that builds it, expected, function)


def case(name: str, expected: str, branch: str = "cli"):
    def register(function):
        CASES.append((name, branch, expected, function))
        return function

    return register


@case(
    "pairs-two-jobs-overwrite",
    "the second job (other arguments, --overwrite) is refused with exit 5 naming the "
    "first job's pid; the first finishes with the rows of an uninterrupted run; args.json is its own",
)
def pairs_two_jobs(lab: Lab) -> dict:
    out = lab.work / "two-jobs"
    first = start_slowed(lab.work / "two-jobs.marker", *lab.pairs_args(out), env={"NAPO_SLOW_S": "20"})
    wait_for(lab.work / "two-jobs.marker", first)
    second = napo(*lab.pairs_args(out, "--batch_size", "1", "--overwrite"))
    done = finish(first)
    same = rows_of(out) == lab.reference_rows()
    recorded = json.loads((out / "args.json").read_text())["batch_size"]
    refused = second.returncode == 5 and f"pid {first.pid}" in second.stderr
    ok = refused and done.returncode == 0 and same and recorded == 8
    return {
        "ok": ok,
        "crash": second.crashed or done.crashed,
        "corruption": not same or recorded != 8,
        "observed": f"second job: exit {second.returncode}, '{second.message}'; first job: exit {done.returncode}, "
        f"rows identical to an uninterrupted run: {same}, args.json batch_size {recorded}",
    }


@case(
    "pairs-overwrite-after-kill-9",
    "after kill -9 of a job, a job with other arguments and --overwrite takes "
    "over the stale lock (saying so) and writes only its own rows",
)
def pairs_overwrite_after_kill(lab: Lab) -> dict:
    out = lab.work / "killed"
    first = start_slowed(lab.work / "killed.marker", *lab.pairs_args(out))
    wait_for(lab.work / "killed.marker", first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = napo(*lab.pairs_args(out, "--max_new_tokens", "4", "--overwrite"))
    expected = lab.reference_rows("--max_new_tokens", "4")
    same = rows_of(out) == expected
    took_over = f"lock left by pid {first.pid}" in second.stderr
    return {
        "ok": second.returncode == 0 and same and took_over and not leftovers(out),
        "crash": second.crashed,
        "corruption": not same,
        "observed": f"exit {second.returncode}; stale lock of pid {first.pid} taken over "
        f"with a warning: {took_over}; rows equal an uninterrupted run of the second job: {same}",
    }


@case(
    "pairs-ctrl-c",
    "exit 130 with 'rerun the same command to resume', no traceback, lock and temp files gone; "
    "the rerun writes the rows of an uninterrupted run",
)
def pairs_ctrl_c(lab: Lab) -> dict:
    out = lab.work / "ctrl-c"
    job = start_slowed(lab.work / "ctrl-c.marker", *lab.pairs_args(out))
    wait_for(lab.work / "ctrl-c.marker", job)
    job.send_signal(signal.SIGINT)
    stopped = finish(job)
    left = leftovers(out)
    rerun = napo(*lab.pairs_args(out))
    same = rows_of(out) == lab.reference_rows()
    ok = stopped.returncode == 130 and "rerun the same command to resume" in stopped.stderr and not left and same
    return {
        "ok": ok and rerun.returncode == 0,
        "crash": stopped.crashed or rerun.crashed,
        "corruption": not same,
        "observed": f"exit {stopped.returncode}, '{stopped.message}'; left behind: {left or 'nothing'}; rerun "
        f"exit {rerun.returncode}, rows identical: {same}",
    }


@case("train-ctrl-c", "exit 130 naming --resume, no traceback; the rerun with --resume finishes from the checkpoint")
def train_ctrl_c(lab: Lab) -> dict:
    out = lab.work / "train-ctrl-c"
    args = lab.train_args(out, "--max_steps", "4")
    job = start_slowed(lab.work / "train-ctrl-c.marker", *args)
    wait_for(lab.work / "train-ctrl-c.marker", job)
    job.send_signal(signal.SIGINT)
    stopped = finish(job)
    rerun = napo(*args, "--resume")
    history = json.loads((out / "log_history.json").read_text()) if rerun.returncode == 0 else []
    steps = [h["step"] for h in history if "loss" in h]
    ok = stopped.returncode == 130 and "--resume" in stopped.stderr and rerun.returncode == 0 and steps[-1:] == [4]
    return {
        "ok": ok,
        "crash": stopped.crashed or rerun.crashed,
        "corruption": False,
        "observed": f"exit {stopped.returncode}, '{stopped.message}'; --resume: exit {rerun.returncode}, "
        f"logged steps after resuming {steps}",
    }


@case("read-only-output", "exit 4 with 'cannot write' naming the folder, for pairs and train")
def read_only(lab: Lab) -> dict:
    with tmpfs(lab.work / "ro", "ro,size=1m") as mounted:
        if not mounted:
            return {"skipped": "cannot mount a read-only tmpfs here (needs root)"}
        runs = [napo(*lab.pairs_args(lab.work / "ro" / "pairs")), napo(*lab.train_args(lab.work / "ro" / "train"))]
    ok = all(r.returncode == 4 and "cannot write" in r.message for r in runs)
    return {
        "ok": ok,
        "crash": any(r.crashed for r in runs),
        "corruption": False,
        "observed": "; ".join(f"exit {r.returncode}, '{r.message}'" for r in runs),
    }


@case("unmakeable-output", "exit 4: a file is in the way of the output folder")
def unmakeable(lab: Lab) -> dict:
    (lab.work / "a-file").write_text("")
    runs = [napo(*lab.pairs_args(lab.work / "a-file" / "out")), napo(*lab.train_args(lab.work / "a-file" / "out"))]
    ok = all(r.returncode == 4 and "in the way" in r.message for r in runs)
    return {
        "ok": ok,
        "crash": any(r.crashed for r in runs),
        "corruption": False,
        "observed": "; ".join(f"exit {r.returncode}, '{r.message}'" for r in runs),
    }


@case(
    "full-disk-pairs",
    "exit 4 'the disk is full', no data.parquet.tmp-<pid> left; after freeing space the same "
    "command finishes with the rows of an uninterrupted run",
)
def full_disk(lab: Lab) -> dict:
    disk = lab.work / "small-disk"
    with tmpfs(disk, "size=4m") as mounted:
        if not mounted:
            return {"skipped": "cannot mount a small tmpfs here (needs root)"}
        filler = disk / "filler"
        out = disk / "pairs"
        reference = lab.work / "reference-0"
        lab.reference_rows()
        needed = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file())
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"\0" * max(0, free - needed // 2))  # room for about half of the job's outputs
        full = napo(*lab.pairs_args(out))
        left = [p for p in leftovers(out) if p != "lock"] if out.exists() else []
        filler.unlink()
        rerun = napo(*lab.pairs_args(out))
        same = rows_of(out) == lab.reference_rows()
    ok = full.returncode == 4 and "disk is full" in full.message and not left and rerun.returncode == 0 and same
    return {
        "ok": ok,
        "crash": full.crashed or rerun.crashed,
        "corruption": not same,
        "observed": f"exit {full.returncode}, '{full.message}'; temp files left: {left or 'none'}; rerun exit "
        f"{rerun.returncode}, rows identical: {same}",
    }


@case(
    "eval-bad-input",
    "napo eval: a missing model, a missing file and a set without 'answer' each end with a "
    "message and exit 3 or 4, never a traceback",
)
def eval_errors(lab: Lab) -> dict:
    runs = [
        napo("eval", "--model", str(lab.work / "no-model"), "--dataset", str(lab.source)),
        napo("eval", "--model", str(lab.llava), "--dataset", str(lab.work / "none.jsonl")),
        napo("eval", "--model", str(lab.llava), "--dataset", str(lab.source), "--n", "2"),
    ]
    ok = runs[0].returncode in (3, 4) and runs[1].returncode == 4
    ok = ok and runs[2].returncode == 3 and "answer" in runs[2].message
    return {
        "ok": ok,
        "crash": any(r.crashed for r in runs),
        "corruption": False,
        "observed": "; ".join(f"exit {r.returncode}, '{r.message[:120]}'" for r in runs),
    }


@case("allow-pickle-hint", "napo pairs refuses pickled weights suggesting --allow-pickle, and accepts --allow-pickle")
def allow_pickle(lab: Lab) -> dict:
    pickled = lab.work / "pickled"
    pickled.mkdir(exist_ok=True)
    for item in lab.llava.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, pickled / item.name)
    torch.save(load_file(lab.llava / "model.safetensors"), pickled / "pytorch_model.bin")
    args = [
        "pairs",
        "--source",
        str(lab.source),
        "--model",
        str(pickled),
        "--output_dir",
        str(lab.work / "pickle-out"),
        "--max_new_tokens",
        "2",
        "--no_progress",
    ]
    refused, allowed = napo(*args), napo(*args, "--allow-pickle")
    ok = refused.returncode == 3 and "--allow-pickle" in refused.message and allowed.returncode == 0
    return {
        "ok": ok,
        "crash": refused.crashed or allowed.crashed,
        "corruption": False,
        "observed": f"without: exit {refused.returncode}; with --allow-pickle: exit {allowed.returncode}",
    }


@case(
    "resume-changed-run",
    "--resume with another dataset or learning rate is refused (exit 3) naming what changed; --resume-anyway resumes",
)
def resume_changed(lab: Lab) -> dict:
    out = lab.work / "resume"
    first = napo(*lab.train_args(out, "--max_steps", "2"))
    other = lab.text_prefs(lab.work / "other.jsonl", 8, shift=1)
    runs = [
        napo(*lab.train_args(out, "--max_steps", "2", "--resume", dataset=other)),
        napo(*lab.train_args(out, "--max_steps", "2", "--resume", "--learning_rate", "5e-4")),
        napo(*lab.train_args(out, "--max_steps", "3", "--resume-anyway")),
    ]
    ok = (
        first.returncode == 0
        and runs[0].returncode == 3
        and "dataset:" in runs[0].message
        and runs[1].returncode == 3
        and "learning_rate: 0.001 -> 0.0005" in runs[1].message
        and runs[2].returncode == 0
    )
    return {
        "ok": ok,
        "crash": any(r.crashed for r in [first, *runs]),
        "corruption": False,
        "observed": f"other dataset: exit {runs[0].returncode}; other lr: exit {runs[1].returncode} "
        f"('{runs[1].message[:160]}'); --resume-anyway: exit {runs[2].returncode}",
    }


@case("debug-traceback", "--debug prints the traceback, then the same message and exit code")
def debug_flag(lab: Lab) -> dict:
    run = napo(*lab.train_args(lab.work / "debug", dataset=lab.work / "missing.jsonl"), "--debug")
    ok = run.returncode == 4 and "Traceback" in run.stderr and run.message.startswith("napo train:")
    return {
        "ok": ok,
        "crash": run.returncode == 1,
        "corruption": False,
        "observed": f"exit {run.returncode}, traceback shown: {'Traceback' in run.stderr}",
    }


# Row-level validation (data branch): one bad row among good ones, through napo pairs (quarantine) and napo train.
def _audio_row(folder: Path, rate) -> dict:
    import soundfile

    soundfile.write(folder / "a.wav", np.zeros(1600, np.float32), 16000)
    return {"audios": ["a.wav"], "sampling_rate": rate}


BAD_ROWS = {
    "placeholder-count": (
        "two image placeholders for one image",
        lambda f: {
            "prompt": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what colour?"}],
                }
            ]
        },
    ),
    "mixed-prompt-types": ("a string prompt among message-list prompts", lambda f: {"prompt": "<image> what colour?"}),
    "mixed-modalities": ("images and audios in one row", lambda f: {**_audio_row(f, 16000), "images": ["img/3.png"]}),
    "nan-sampling-rate": ("sampling_rate NaN", lambda f: {**_audio_row(f, float("nan")), "images": []}),
    "mixed-type-column": (
        "an extra column that is a number in one row, a string in the others",
        lambda f: {"id": "three"},
    ),
    "image-is-a-number": ("images: [12345]", lambda f: {"images": [12345]}),
    "chosen-42": ("chosen: 42", lambda f: {"chosen": 42}),
    "chosen-empty": ('chosen: ""', lambda f: {"chosen": ""}),
    "outside-path": ("an image path ../ outside the data folder", lambda f: {"images": ["../outside.png"]}),
}


def _bad_row_case(name: str, what: str, change: Callable[[Path], dict]) -> None:
    @case(
        f"row-{name}",
        f"{what}: napo pairs quarantines row 3 (rejects.jsonl names row and field) and writes the "
        "7 other rows; napo train stops with exit 3 naming row 3",
        branch="data",
    )
    def run(lab: Lab) -> dict:
        folder = lab.work / f"row-{name}"
        folder.mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(lab.work / "outside.png")
        changes = {3: change(folder)}
        source = lab.image_rows(folder, 8, changes)
        pairs = napo(*lab.pairs_args(folder / "out", source=source))
        rejects = (
            [json.loads(line) for line in (folder / "out" / "rejects.jsonl").read_text().splitlines()]
            if (folder / "out" / "rejects.jsonl").exists()
            else []
        )
        written = rows_of(folder / "out")
        ids = sorted(r["id"] for r in written) if written else None
        quarantined = pairs.returncode == 0 and [r["row"] for r in rejects] == [3] and ids == [0, 1, 2, 4, 5, 6, 7]
        prefs = lab.text_prefs(
            folder / "prefs.jsonl",
            8,
            {3: {k: v for k, v in changes[3].items() if k in ("chosen", "prompt", "id")} or changes[3]},
        )
        for image in (folder / "img").iterdir():
            shutil.copy(image, folder / image.name)
        train = napo(*lab.train_args(folder / "train", "--max_steps", "1", dataset=prefs))
        named = train.returncode == 3 and "row 3" in train.message
        return {
            "ok": quarantined and named,
            "crash": pairs.crashed or train.crashed,
            "corruption": written is not None and ids is not None and len(ids) != len(set(ids)),
            "observed": f"pairs: exit {pairs.returncode}, rejects {[(r['row'], r['field']) for r in rejects]}, "
            f"written ids {ids}{'' if pairs.returncode == 0 else ', ' + repr(pairs.message[:120])}; train: exit "
            f"{train.returncode}, '{train.message[:140]}'",
        }


for _name, (_what, _change) in BAD_ROWS.items():
    _bad_row_case(_name, _what, _change)


@case(
    "huge-non-image",
    "an 800 MB file named .png is rejected by a size cap before it is read (peak memory stays far below 800 MB)",
    branch="data",
)
def huge_file(lab: Lab) -> dict:
    folder = lab.work / "huge"
    source = lab.image_rows(folder, 4)
    with open(folder / "img" / "1.png", "wb") as f:  # sparse: no disk used, 800 MB read if read whole
        f.truncate(800 * 2**20)
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "napo.cli", *lab.pairs_args(folder / "out", source=source)],
        capture_output=True,
        text=True,
    )
    last = (result.stderr.strip().splitlines() or [""])[-1]  # /usr/bin/time -f %M: peak RSS in KiB
    peak_mb = int(last) / 1024 if last.isdigit() else math.nan
    rejects = (folder / "out" / "rejects.jsonl").read_text() if (folder / "out" / "rejects.jsonl").exists() else ""
    rejected = '"row": 1' in rejects
    ok = result.returncode == 0 and rejected and peak_mb < 800
    run = Run(result.returncode, result.stdout, result.stderr, time.perf_counter() - start)
    return {
        "ok": ok,
        "crash": run.crashed,
        "corruption": False,
        "observed": f"exit {result.returncode}, row 1 rejected: {rejected}, peak RSS {peak_mb:.0f} MB, "
        f"{run.wall:.0f} s",
    }


@case("saturation-warning", "at β = 1e6 the loss and gradients vanish: a warning says so", branch="trainer")
def saturation(lab: Lab) -> dict:
    # 12 steps: the warning comes after `saturation_warning_steps` (default 10) saturated batches in a row.
    run = napo(*lab.train_args(lab.work / "beta", "--max_steps", "12", "--beta", "1e6", "--save_strategy", "no"))
    warned = "saturat" in run.stderr.lower()
    return {
        "ok": run.returncode == 0 and warned,
        "crash": run.crashed,
        "corruption": False,
        "observed": f"exit {run.returncode}, warning shown: {warned}",
    }


# --------------------------------------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "reliability"), help="report folder (default: %(default)s)"
    )
    parser.add_argument("--only", nargs="+", default=None, help="case names to run (default: all)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other cases' rows of an existing results.json (default: write only this run's)",
    )
    args = parser.parse_args()
    selected = [c for c in CASES if args.only is None or c[0] in args.only]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        lab = Lab(Path(folder))
        for name, branch, expected, function in selected:
            start = time.perf_counter()
            try:
                outcome = function(lab)
            except Exception as error:  # noqa: BLE001 - a broken case is reported, the others still run
                outcome = {
                    "ok": False,
                    "crash": False,
                    "corruption": False,
                    "observed": f"case could not run: {error!r}"[:400],
                }
            status = (
                "skipped"
                if "skipped" in outcome
                else "pass"
                if outcome["ok"]
                else "FAIL"
                if branch == "cli" or outcome["crash"] or outcome["corruption"]
                else f"waits on {branch} branch"
            )
            row = {
                "case": name,
                "branch": branch,
                "expected": expected,
                "status": status,
                "command": COMMAND,
                "wall_s": round(time.perf_counter() - start, 1),
                **outcome,
            }
            results.append(row)
            print(f"[{status}] {name}: {outcome.get('observed') or outcome.get('skipped')}", flush=True)
    previous = Path(args.out) / "results.json"
    if args.update and previous.exists():
        rerun = {r["case"] for r in results}
        order = [name for name, *_ in CASES]
        recorded = json.loads(previous.read_text())
        kept = [{"command": recorded["command"], **r} for r in recorded["results"] if r["case"] not in rerun]
        results = sorted(kept + results, key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
    write_report(Path(args.out), results)


COMMAND = "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_report(out: Path, results: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    commands = sorted({r.get("command", COMMAND) for r in results})
    meta = {
        "command": "; ".join(commands),
        "date": utc_now(),
        "device": device_description("cpu"),  # every case runs CPU only
        "versions": versions_text(),
        "crashes": sum(bool(r.get("crash")) for r in results),
        "corruption": sum(bool(r.get("corruption")) for r in results),
        "passed": sum(r["status"] == "pass" for r in results),
        "cases": len(results),
    }
    write_json_atomic(out / "results.json", {**meta, "results": results})
    lines = [
        "# Reliability under hostile use (issue #17)",
        "",
        f"`{meta['command']}` — {meta['date']}, {meta['device']}; {meta['versions']}.",
        "",
        f"**{meta['passed']} of {meta['cases']} cases hold; {meta['crashes']} crashes (exit 1 or a traceback), "
        f"{meta['corruption']} with corrupted output.** Each case runs the `napo` command in a subprocess on tiny "
        'models built offline (`scripts/reliability.py`); "waits on X branch" marks behaviour being built there.',
        "",
        "| case | expected | observed | status |",
        "|---|---|---|---|",
    ]
    for r in results:
        observed = (r.get("observed") or r.get("skipped") or "").replace("|", "/")
        expected = r["expected"].replace("|", "/")
        lines.append(f"| {r['case']} | {expected} | {observed} | {r['status']} |")
    write_text_atomic(out / "README.md", "\n".join(lines) + "\n")
    print(f"report: {out / 'README.md'}")


if __name__ == "__main__":
    main()
