"""The cases of scripts/reliability.py, in the order they run: each states what must happen (`case`) and returns
what did (`ok`, `crash`, `corruption`, `observed`, or `skipped` with the reason)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from reliability_fixtures import Lab, Run, finish, leftovers, napo, rows_of, tmpfs
from safetensors.torch import load_file
from stalled_job import start_stalled, wait_for_stall

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
    first = start_stalled(lab.work / "two-jobs.marker", *lab.pairs_args(out), stall_s=20)
    wait_for_stall(lab.work / "two-jobs.marker", first)
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
    first = start_stalled(lab.work / "killed.marker", *lab.pairs_args(out))
    wait_for_stall(lab.work / "killed.marker", first)
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
    job = start_stalled(lab.work / "ctrl-c.marker", *lab.pairs_args(out))
    wait_for_stall(lab.work / "ctrl-c.marker", job)
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
    job = start_stalled(lab.work / "train-ctrl-c.marker", *args)
    wait_for_stall(lab.work / "train-ctrl-c.marker", job)
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
