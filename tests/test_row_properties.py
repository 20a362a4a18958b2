"""Property tests: malformed rows among good ones, through `napo pairs` and `napo train` as the command runs them.

napo pairs: every valid row is written exactly once, every invalid row is in rejects.jsonl exactly once with its
index, and the job ends normally. napo train: the job stops before training with exit 3 naming an invalid row
(types are checked while reading, the other rules after), or trains when every row is valid. Never exit 1 (a
crash) in either.

A source whose every row is invalid is expected to fail for now (`test_a_source_of_only_invalid_rows_is_all_rejected`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import datasets
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from napo.cli import main

COLOURS = ["yellow", "red", "green", "blue", "white", "brown"]
# What makes a source row invalid for napo pairs, and files it needs (name -> bytes), by kind.
SOURCE_KINDS = {
    "valid": ({}, {}),
    "missing image": ({}, {"images": ["img/nowhere.png"]}),
    "truncated image": ({"bad.png": b"\x89PNG\r\n\x1a\n\0\0"}, {"images": ["img/bad.png"]}),
    "0-byte image": ({"empty.png": b""}, {"images": ["img/empty.png"]}),
    "image is a number": ({}, {"images": 12345}),
    "images: [12345]": ({}, {"images": [12345]}),
    "chosen is a number": ({}, {"chosen": 42}),
    "empty chosen": ({}, {"chosen": ""}),
    "empty prompt": ({}, {"prompt": ""}),
    "prompt is a number": ({}, {"prompt": 7}),
}
# Preference rows for napo train (text model): what makes one invalid.
PREFERENCE_KINDS = {
    "valid": {},
    "chosen is a number": {"chosen": 42},
    "empty chosen": {"chosen": " "},
    "empty prompt": {"prompt": ""},
    "prompt is a number": {"prompt": 7},
    "no negative": {"rejected_language_bias": None},
    "negative is a list": {"rejected_language_bias": ["red"]},
}
PROPERTY = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def run_napo(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as ended:
        return ended.code
    return 0


def run_pairs(kinds: list[str], table: dict, folder: Path, saved_llava: Path) -> int:
    """Write a source of one row per kind under `folder`, run `napo pairs` on it into folder/out; its exit code."""
    (folder / "img").mkdir()
    lines = []
    for i, kind in enumerate(kinds):
        files, changes = table[kind]
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
        for name, data in files.items():
            (folder / "img" / name).write_bytes(data)
        row = {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"colour {i}?"}]}],
            "images": [f"img/{i}.png"],
            "chosen": f"answer {i}",
            "id": i,
            **changes,
        }
        lines.append(json.dumps(row))
    (folder / "source.jsonl").write_text("\n".join(lines) + "\n")
    out = folder / "out"
    return run_napo(
        [
            "pairs",
            "--source",
            str(folder / "source.jsonl"),
            "--model",
            str(saved_llava),
            "--output_dir",
            str(out),
            "--max_new_tokens",
            "2",
            "--shard_size",
            "3",
            "--keep_identical",
            "--no_progress",
        ]
    )


def check_pairs(kinds: list[str], table: dict, folder: Path, saved_llava: Path) -> None:
    code = run_pairs(kinds, table, folder, saved_llava)
    out = folder / "out"
    assert code == 0, (kinds, code)
    valid = [i for i, kind in enumerate(kinds) if kind == "valid"]
    written = datasets.load_from_disk(str(out / "dataset"))["id"]
    assert sorted(written) == valid, (kinds, written)  # each valid row once, no invalid one
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in rejects) == [i for i, kind in enumerate(kinds) if kind != "valid"], (kinds, rejects)
    assert all(r["field"] and r["reason"] for r in rejects)


@given(kinds=st.lists(st.sampled_from(sorted(SOURCE_KINDS)), min_size=1, max_size=6), at=st.integers(0, 6))
@PROPERTY
def test_pairs_writes_every_valid_row_once_and_rejects_every_invalid_row_once(saved_llava, kinds, at):
    kinds.insert(at % (len(kinds) + 1), "valid")  # at least one valid row: an all-invalid source is the next test's
    with tempfile.TemporaryDirectory() as folder:
        check_pairs(kinds, SOURCE_KINDS, Path(folder), saved_llava)


def test_a_source_of_only_invalid_rows_stops_with_every_reject_written(saved_llava, capsys):
    with tempfile.TemporaryDirectory() as folder:
        code = run_pairs(["missing image", "0-byte image"], SOURCE_KINDS, Path(folder), saved_llava)
        assert code == 3  # a data error, not an empty dataset written as a success
        assert "every row of" in capsys.readouterr().err
        rejects = [json.loads(line) for line in (Path(folder) / "out" / "rejects.jsonl").read_text().splitlines()]
        assert sorted(r["row"] for r in rejects) == [0, 1] and all(r["field"] and r["reason"] for r in rejects)


@given(kinds=st.lists(st.sampled_from(sorted(PREFERENCE_KINDS)), min_size=1, max_size=6))
@PROPERTY
def test_train_stops_naming_an_invalid_row_or_trains(saved_text_model, kinds, capsys):
    with tempfile.TemporaryDirectory() as folder:
        rows = [
            {
                "prompt": [{"role": "user", "content": f"what colour is the cat {i} ?"}],
                "chosen": COLOURS[i % 6],
                "rejected_language_bias": COLOURS[(i + 1) % 6],
                **PREFERENCE_KINDS[kind],
            }
            for i, kind in enumerate(kinds)
        ]
        path = Path(folder) / "prefs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        capsys.readouterr()
        code = run_napo(
            [
                "train",
                "--dataset",
                str(path),
                "--model",
                str(saved_text_model),
                "--output_dir",
                str(Path(folder) / "out"),
                "--max_steps",
                "1",
                "--per_device_train_batch_size",
                "2",
                "--gradient_checkpointing",
                "false",
                "--use_cpu",
                "true",
                "--report_to",
                "none",
                "--save_strategy",
                "no",
            ]
        )
        err = capsys.readouterr().err
        invalid = [i for i, kind in enumerate(kinds) if kind != "valid"]
        if invalid:
            # Types are checked while reading, the other rules after: the message names one of the invalid rows.
            assert code == 3 and any(f"row {i}," in err for i in invalid), (kinds, code, err[-500:])
            assert not (Path(folder) / "out").exists()  # stopped before anything was written
        else:
            assert code == 0 and (Path(folder) / "out" / "model.safetensors").exists(), (kinds, err[-500:])
