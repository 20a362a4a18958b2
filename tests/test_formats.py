"""Every data layout users already have, read as-is by `napo pairs`, `napo train` and NaPOTrainer; and bad rows.

Expected canonical rows are written out by hand from each layout's documentation (LLaVA, LLaMA-Factory, ms-swift,
Alpaca, RLAIF-V, NaPO's RLAIF-V-Bias loader `muffin/data/bias_datasets_trainer.py`), not derived from napo's code.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tracemalloc

import datasets
import numpy as np
import pytest
import torch
from helpers import COMMON, perturbed, wav_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from trl import DPOConfig, DPOTrainer

import perturb
from napo import NaPOConfig, NaPOTrainer
from napo.cli import main
from napo.data import DatasetOptions, RowError, read_dataset
from napo.inference import render_prompt
from napo.models import build_tiny_model

TRAIN_ARGS = [
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
    "--logging_steps",
    "1",
    "--bf16",
    "false",
    "--objective",
    "dpo",
]
IMAGE_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the cat ?"}]}]
TEXT_TURN = [{"role": "user", "content": "what colour is the cat ?"}]


def _png(path, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def _image_bytes(seed=0) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# layout -> (one source row, with "IMG" for an image path, the canonical prompt / chosen / rejected* expected)
LAYOUTS = {
    "trl-conversational": (
        {
            "prompt": IMAGE_TURN,
            "images": ["IMG"],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
            "rejected": [{"role": "assistant", "content": "blue"}],
        },
        {"prompt": IMAGE_TURN, "chosen": "red", "rejected": "blue", "images": 1},
    ),
    "trl-standard-tag": (
        {"prompt": "<image>\nwhat colour is the cat ?", "image": "IMG", "chosen": "red", "rejected": "blue"},
        {"prompt": "<image>\nwhat colour is the cat ?", "chosen": "red", "rejected": "blue", "images": 1},
    ),
    "trl-implicit-prompt": (
        {
            "chosen": [*TEXT_TURN, {"role": "assistant", "content": "red"}],
            "rejected": [*TEXT_TURN, {"role": "assistant", "content": "blue"}],
        },
        {"prompt": TEXT_TURN, "chosen": "red", "rejected": "blue", "images": 0},
    ),
    "rlaif-v": (
        {
            "image": "IMG",
            "question": "what colour is the cat ?",
            "chosen": "red",
            "rejected": "blue",
            "idx": 7,
            "origin_dataset": "coco",
        },
        {"prompt": IMAGE_TURN, "chosen": "red", "rejected": "blue", "images": 1, "idx": 7},
    ),
    "napo-rlaif-v-bias": (
        {
            "image": "IMG",
            "question": "what colour is the cat ?",
            "chosen": "red",
            "rejected": "blue",
            "image_only": "a red cat on a box",
            "question_only": "brown",
        },
        {
            "prompt": IMAGE_TURN,
            "chosen": "red",
            "rejected": "blue",
            "rejected_vision_bias": "a red cat on a box",
            "rejected_language_bias": "brown",
            "images": 1,
        },
    ),
    "llava": (
        {
            "id": "x1",
            "image": "IMG",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is the cat ?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {"prompt": IMAGE_TURN, "chosen": "red", "images": 1, "id": "x1"},
    ),
    "sharegpt": (
        {
            "messages": [
                {"role": "user", "content": "<image>what colour is the cat ?"},
                {"role": "assistant", "content": "red"},
            ],
            "images": ["IMG"],
        },
        {"prompt": IMAGE_TURN, "chosen": "red", "images": 1},
    ),
    "sharegpt-dpo": (
        {
            "conversations": [{"from": "human", "value": "<image>what colour is the cat ?"}],
            "images": ["IMG"],
            "chosen": {"from": "gpt", "value": "red"},
            "rejected": {"from": "gpt", "value": "blue"},
        },
        {"prompt": IMAGE_TURN, "chosen": "red", "rejected": "blue", "images": 1},
    ),
    "ms-swift": (
        {
            "messages": [
                {"role": "user", "content": "<image>what colour is the cat ?"},
                {"role": "assistant", "content": "red"},
            ],
            "rejected_response": "blue",
            "images": ["IMG"],
        },
        {"prompt": IMAGE_TURN, "chosen": "red", "rejected": "blue", "images": 1},
    ),
    "alpaca": (
        {"instruction": "what colour is the cat ?", "input": "", "output": "red"},
        {"prompt": TEXT_TURN, "chosen": "red", "images": 0},
    ),
    "alpaca-dpo": (
        {"instruction": "what colour is", "input": "the cat ?", "chosen": "red", "rejected": "blue"},
        {
            "prompt": [{"role": "user", "content": "what colour is\nthe cat ?"}],
            "chosen": "red",
            "rejected": "blue",
            "images": 0,
        },
    ),
}
LAYOUT_OF = {"trl-conversational": "trl", "trl-standard-tag": "trl", "alpaca-dpo": "alpaca"}
PREFERENCE_LAYOUTS = [name for name, (_, expected) in LAYOUTS.items() if "rejected" in expected]


def _plain(prompt):
    """A prompt as comparable data: typed parts without their None keys (Arrow fills absent struct fields)."""
    if isinstance(prompt, str):
        return prompt
    out = []
    for message in prompt:
        content = message["content"]
        if isinstance(content, list):
            parts = [{k: v for k, v in part.items() if v is not None} for part in content]
            content = parts[0]["text"] if len(parts) == 1 and parts[0]["type"] == "text" else parts
        out.append({"role": message["role"], "content": content})
    return out


def write_layout(folder, name: str, n: int = 4, as_array: bool = False) -> str:
    """n rows of one layout under folder (images as PNG files referenced by relative paths)."""
    row, _ = LAYOUTS[name]
    rows = []
    for i in range(n):
        _png(str(folder / "img" / f"{i}.png"), seed=i)
        rows.append(json.loads(json.dumps(row).replace('"IMG"', f'"img/{i}.png"')))
    path = folder / (f"{name}.json" if as_array else f"{name}.jsonl")
    path.write_text(json.dumps(rows) if as_array else "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout_reads_to_its_canonical_row(name, tmp_path, caplog):
    path = write_layout(tmp_path, name, as_array=name.startswith(("llava", "sharegpt")))  # LLaVA ships .json arrays
    with caplog.at_level(logging.INFO, logger="napo"):
        dataset, bad = read_dataset(path)
    assert bad == []
    assert f"4 rows read as {LAYOUT_OF.get(name, name)}" in caplog.text
    _, expected = LAYOUTS[name]
    row = dataset[0]
    assert len(row.get("images") or []) == expected["images"]
    assert all(image.mode == "RGB" for image in row.get("images") or [])
    for column, value in expected.items():
        if column != "images":
            assert (_plain(row[column]) if column == "prompt" else row[column]) == value, column


# napo-rlaif-v-bias rows already hold both biased negatives: `napo pairs` refuses to overwrite them (below), so
# they go to `napo train` directly.
@pytest.mark.parametrize("name", sorted(set(LAYOUTS) - {"napo-rlaif-v-bias"}))
def test_napo_pairs_reads_every_layout(name, tmp_path, saved_llava, capsys):
    source = write_layout(tmp_path, name)
    out = tmp_path / "out"
    main(
        [
            "pairs",
            "--source",
            source,
            "--model",
            str(saved_llava),
            "--output-dir",
            str(out),
            "--max-new-tokens",
            "3",
            "--batch-size",
            "4",
            "--no-progress",
            "--keep-identical",
        ]
    )
    assert "4 of 4 rows written, 0 rejected" in capsys.readouterr().out
    written = datasets.load_from_disk(str(out / "dataset"))
    _, expected = LAYOUTS[name]
    assert _plain(written[0]["prompt"]) == expected["prompt"]  # the original prompt, not the degraded one
    assert all(v is not None for v in [*written["rejected_language_bias"], *written["rejected_vision_bias"]])


def test_napo_pairs_refuses_to_overwrite_the_released_bias_columns(tmp_path, saved_llava):
    with pytest.raises(SystemExit, match="already has a 'rejected_language_bias' column"):
        main(
            [
                "pairs",
                "--source",
                write_layout(tmp_path, "napo-rlaif-v-bias"),
                "--model",
                str(saved_llava),
                "--output-dir",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )


@pytest.mark.parametrize("name", PREFERENCE_LAYOUTS)
def test_napo_train_reads_every_preference_layout(name, tmp_path, saved_llava):
    out = tmp_path / "out"
    main(
        [
            "train",
            "--dataset",
            write_layout(tmp_path, name),
            "--model",
            str(saved_llava),
            "--output-dir",
            str(out),
            *TRAIN_ARGS,
        ]
    )
    history = json.loads((out / "log_history.json").read_text())
    assert np.isfinite(history[0]["loss"])


def test_napo_train_and_stock_trl_train_the_trl_file_alike(tmp_path, saved_llava):
    """The TRL conversational vision file, trained by `napo train` (DPO objective) and by stock trl.DPOTrainer from
    the same model, seed and order: the same losses step after step (step 1 is log 2; later steps test the
    gradients too)."""
    from napo.models import load_model

    path = write_layout(tmp_path, "trl-conversational", n=4)
    args = [
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "0.05",
        "--seed",
        "0",
        "--gradient_checkpointing",
        "false",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--bf16",
        "false",
        "--objective",
        "dpo",
        "--lr_scheduler_type",
        "constant",
    ]
    main(["train", "--dataset", path, "--model", str(saved_llava), "--output-dir", str(tmp_path / "napo"), *args])
    napo_losses = [h["loss"] for h in json.loads((tmp_path / "napo" / "log_history.json").read_text()) if "loss" in h]

    rows = datasets.load_dataset("json", data_files=path, split="train")
    rows = rows.map(lambda r: {"images": [str(tmp_path / p) for p in r["images"]]})
    rows = rows.cast_column("images", datasets.List(datasets.Image()))
    model, processor = load_model(str(saved_llava))
    stock = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        processing_class=processor,
        train_dataset=rows,
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"),
            max_steps=3,
            per_device_train_batch_size=2,
            learning_rate=0.05,
            seed=0,
            gradient_checkpointing=False,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            bf16=False,
            lr_scheduler_type="constant",
        ),
    )
    stock.train()
    trl_losses = [h["loss"] for h in stock.state.log_history if "loss" in h]
    assert len(napo_losses) == len(trl_losses) == 3
    np.testing.assert_allclose(napo_losses, trl_losses, rtol=1e-4, atol=1e-5)
    assert abs(trl_losses[-1] - np.log(2)) > 1e-3  # the model moved: later steps compare real gradients


# ------------------------------------------------------------------------------------------ containers
def test_parquet_media_paths_resolve_against_its_folder_and_dataset_dict_splits(tmp_path):
    _png(str(tmp_path / "data" / "img" / "0.png"))
    rows = [{"prompt": "q ?", "images": ["img/0.png"], "chosen": "a", "rejected": "b"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data" / "train.parquet"))
    dataset, _ = read_dataset(str(tmp_path / "data" / "train.parquet"))
    assert dataset[0]["images"][0].size == (16, 16)

    embedded = [{**rows[0], "images": [{"bytes": _image_bytes(), "path": None}]}]
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(embedded * 2), "test": datasets.Dataset.from_list(embedded)}
    )
    splits = splits.cast_column("images", datasets.List(datasets.Image()))
    splits.save_to_disk(str(tmp_path / "dict"))
    assert len(read_dataset(str(tmp_path / "dict"))[0]) == 2  # default split: train
    assert len(read_dataset(str(tmp_path / "dict"), DatasetOptions(dataset_split="test"))[0]) == 1
    with pytest.raises(ValueError, match=r"has the splits \['train', 'test'\], not 'dev'"):
        read_dataset(str(tmp_path / "dict"), DatasetOptions(dataset_split="dev"))
    with pytest.raises(ValueError, match=r"train\.parquet holds one table: --dataset-split and --dataset-config apply"):
        read_dataset(str(tmp_path / "data" / "train.parquet"), DatasetOptions(dataset_split="test"))  # not ignored
    with pytest.raises(ValueError, match=r"layout 'llama': expected 'auto' or one of \['trl'"):
        DatasetOptions(layout="llama")


def test_rlaif_v_bias_parquet_with_embedded_image_bytes(tmp_path):
    """NaPO's released RLAIF-V-Bias rows: image {"bytes", "path"}, question, chosen, rejected, image_only,
    question_only and RLAIF-V's metadata."""
    row = {
        "image": {"bytes": _image_bytes(), "path": "coco/1.jpg"},
        "question": "what colour is the cat ?",
        "chosen": "red",
        "rejected": "blue",
        "image_only": "a red cat",
        "question_only": "brown",
        "ds_name": "RLAIF-V",
        "origin_dataset": "coco",
        "idx": 0,
        "image_path": "coco/1.jpg",
    }
    source = datasets.Dataset.from_list([row]).cast_column("image", datasets.Image())
    source.to_parquet(str(tmp_path / "bias.parquet"))
    dataset, _ = read_dataset(str(tmp_path / "bias.parquet"))
    got = dataset[0]
    negatives = (got["rejected_vision_bias"], got["rejected_language_bias"], got["rejected"])
    assert negatives == ("a red cat", "brown", "blue")
    assert got["ds_name"] == "RLAIF-V" and got["image_path"] == "coco/1.jpg" and len(got["images"]) == 1
    assert "image_only" not in dataset.column_names and "question_only" not in dataset.column_names


def test_hub_ids_load_through_datasets_and_say_when_absent_offline(tmp_path):
    # A hub-style folder (data files + a README declaring configs) goes through datasets.load_dataset, config included.
    (tmp_path / "repo" / "colours").mkdir(parents=True)
    (tmp_path / "repo" / "shapes").mkdir()
    (tmp_path / "repo" / "colours" / "train.jsonl").write_text(
        json.dumps({"prompt": "c ?", "chosen": "a", "rejected": "b"}) + "\n"
    )
    (tmp_path / "repo" / "shapes" / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": "s ?", "chosen": "a", "rejected": "b"}) + "\n" for _ in range(3))
    )
    (tmp_path / "repo" / "README.md").write_text(
        "---\nconfigs:\n- config_name: colours\n  data_files:\n  - split: train\n    path: colours/train.jsonl\n"
        "- config_name: shapes\n  data_files:\n  - split: train\n    path: shapes/train.jsonl\n---\n"
    )
    dataset, _ = read_dataset(str(tmp_path / "repo"), DatasetOptions(dataset_config="shapes"))
    assert dataset["prompt"] == ["s ?"] * 3
    absent = r"nobody-xyz/absent-dataset is not a local file.*only datasets already in the local cache"
    with pytest.raises(ValueError, match=absent):
        read_dataset("nobody-xyz/absent-dataset")


def test_columns_mapping_and_unknown_or_ambiguous_layouts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "what ?", "good": "red", "bad": "blue"}) + "\n")
    unknown = r"has no layout napo knows \(columns found: \['bad', 'good', 'q'\]\). Layouts supported: trl"
    with pytest.raises(ValueError, match=unknown):
        read_dataset(str(path))
    dataset, _ = read_dataset(str(path), DatasetOptions(columns="q=prompt,good=chosen,bad=rejected"))
    assert (dataset[0]["prompt"], dataset[0]["chosen"], dataset[0]["rejected"]) == ("what ?", "red", "blue")
    with pytest.raises(ValueError, match=r"--columns names \['nope'\]"):
        read_dataset(str(path), DatasetOptions(columns="nope=prompt"))
    path.write_text(json.dumps({"prompt": "a ?", "question": "b ?", "chosen": "red"}) + "\n")
    with pytest.raises(ValueError, match=r"is ambiguous: it fits \['trl', 'rlaif-v'\]"):
        read_dataset(str(path))
    assert read_dataset(str(path), DatasetOptions(layout="rlaif-v"))[0][0]["prompt"][0]["content"] == "b ?"


# ------------------------------------------------------------------------------------------ bad rows
def test_bad_rows_are_each_rejected_once_with_row_field_and_reason(tmp_path):
    _png(str(tmp_path / "ok.png"))
    (tmp_path / "a.wav").write_bytes(wav_bytes(np.zeros(160, np.float32), 16_000))
    good = {"prompt": "what ?", "chosen": "red", "rejected": "blue", "tag": "x"}
    rows = [
        good,  # 0 kept
        {**good, "chosen": 42},  # 1 chosen
        {**good, "chosen": ""},  # 2 chosen
        {**good, "images": [12345]},  # 3 images
        {**good, "prompt": "<image><image> what ?", "images": ["ok.png"]},  # 4 prompt (2 tags, 1 image)
        {**good, "images": ["ok.png"], "audios": ["a.wav"]},  # 5 images/audios
        {**good, "audios": ["a.wav"], "sampling_rate": float("nan")},  # 6 sampling_rate
        {**good, "audios": [[0.0, float("nan"), 0.1]]},  # 7 audios
        {**good, "tag": 3},  # 8 tag (mixed types)
        {**good, "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]},  # 9
        {**good, "images": ["ok.png"], "prompt": "<image> what ?"},  # 10 kept
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r).replace("NaN", "NaN") + "\n" for r in rows))
    dataset, bad = read_dataset(str(path), on_bad_row="collect")
    expected = {
        1: "chosen",
        2: "chosen",
        3: "images",
        4: "prompt",
        5: "images/audios",
        6: "sampling_rate",
        7: "audios",
        8: "tag",
        9: "prompt",
    }
    assert {b["row"]: b["field"] for b in bad} == expected and len(bad) == len(expected)
    assert all(b["reason"] for b in bad)
    assert len(dataset) == 2 and dataset["prompt"] == ["what ?", "<image> what ?"]
    with pytest.raises(RowError, match=r"row 1, field 'chosen': is a int"):
        read_dataset(str(path))


# kind -> (row changes, the field a reject must name, or None for a valid row)
ROW_VARIANTS = {
    "plain": ({}, None),
    "messages": ({"prompt": [{"role": "user", "content": "what ?"}]}, None),
    "assistant answer": ({"chosen": [{"role": "assistant", "content": "red"}]}, None),
    "one negative missing": ({"rejected_vision_bias": None}, None),
    "image": ({"images": ["ok.png"]}, None),
    "tagged image": ({"prompt": "<image> what ?", "images": ["ok.png"]}, None),
    "chosen int": ({"chosen": 42}, "chosen"),
    "chosen empty": ({"chosen": " "}, "chosen"),
    "rejected list of str": ({"rejected": ["blue"]}, "rejected"),
    "prompt dict": ({"prompt": {"text": "what ?"}}, "prompt"),
    "image int": ({"images": [12345]}, "images"),
    "missing image": ({"images": ["nope.png"]}, "images"),
    "outside image": ({"images": ["../ok.png"]}, "images"),
    "tags without image": ({"prompt": "<image> what ?"}, "prompt"),
    "image and audio": ({"images": ["ok.png"], "audios": [[0.0, 0.1]]}, "images/audios"),
    "rate nan": ({"audios": [[0.0, 0.1]], "sampling_rate": float("nan")}, "sampling_rate"),
    "rate negative": ({"audios": [[0.0, 0.1]], "sampling_rate": -3}, "sampling_rate"),
    "nan sample": ({"audios": [[0.0, float("nan")]]}, "audios"),
    "extra str": ({"note": "x"}, None),
    "extra int": ({"note": 7}, None),  # a reject where the column's first `note` is a string (worked out below)
}


@given(kinds=st.lists(st.sampled_from(sorted(ROW_VARIANTS)), min_size=1, max_size=8))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_valid_row_is_kept_once_and_every_bad_row_rejected_once(kinds, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rows")
    _png(str(folder / "data" / "ok.png"))
    _png(str(folder / "ok.png"))
    good = {"prompt": "what ?", "chosen": "red", "rejected": "blue", "rejected_vision_bias": "a red cat"}
    rows = [{**good, **ROW_VARIANTS[kind][0], "id": index} for index, kind in enumerate(kinds)]
    expected = {index: ROW_VARIANTS[kind][1] for index, kind in enumerate(kinds) if ROW_VARIANTS[kind][1]}
    # A column's type is its first value's (among rows not rejected for another reason): other types are rejects
    # (answers excepted: strings beside messages become assistant messages).
    for column in ("prompt", "note"):
        types = [(i, type(row[column])) for i, row in enumerate(rows) if column in row and i not in expected]
        expected.update({i: column for i, kind in types if kind is not types[0][1]})
    (folder / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset, bad = read_dataset(str(folder / "data" / "rows.jsonl"), on_bad_row="collect")
    assert sorted(b["row"] for b in bad) == sorted(expected), kinds  # each bad row once, no good row
    assert {b["row"]: b["field"] for b in bad} == expected, kinds
    assert (dataset["id"] if len(dataset) else []) == [i for i in range(len(rows)) if i not in expected]


def test_a_nested_structure_arrow_cannot_hold_names_the_file_and_first_row(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "meta": {"k": [1]}}] * 3 + [{"prompt": "p", "chosen": "a", "meta": {"k": 2}}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"m\.jsonl: .*the first row that breaks it is row 3"):
        read_dataset(str(tmp_path / "m.jsonl"), kind="source")


def test_napo_pairs_counts_bad_rows_right(tmp_path, saved_llava, capsys):
    """A 6-row source with `chosen: 42` and `chosen: ""`: 4 written, 2 rejected (no ArrowTypeError, no valid row
    blamed)."""
    rows = [{"prompt": "what colour is the cat ?", "chosen": c} for c in ["red", 42, "blue", "", "green", "white"]]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(
        [
            "pairs",
            "--source",
            str(tmp_path / "s.jsonl"),
            "--model",
            str(saved_llava),
            "--output-dir",
            str(tmp_path / "o"),
            "--max-new-tokens",
            "3",
            "--no-progress",
            "--keep-identical",
        ]
    )
    assert "4 of 6 rows written, 2 rejected" in capsys.readouterr().out
    rejects = [json.loads(line) for line in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejects] == [(1, "chosen"), (3, "chosen")]


def test_media_over_the_size_cap_is_refused_before_it_is_read(tmp_path):
    with open(tmp_path / "huge.wav", "wb") as handle:  # sparse: 800 MB long, no disk used
        handle.truncate(800 * 2**20)
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "audios": ["huge.wav"]}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    tracemalloc.start()
    with pytest.raises(RowError, match=r"row 0, field 'audios': .*huge\.wav has 838860800 bytes, over max_media_bytes"):
        read_dataset(str(tmp_path / "rows.jsonl"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50e6


def test_paths_outside_the_data_folder_are_refused_unless_allowed(tmp_path):
    _png(str(tmp_path / "outside.png"))
    (tmp_path / "data").mkdir()
    for value in ("../outside.png", str(tmp_path / "outside.png")):
        (tmp_path / "data" / "rows.jsonl").write_text(
            json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "images": [value]}) + "\n"
        )
        with pytest.raises(RowError, match=r"row 0, field 'images': .*outside the data folder.*--allow-outside-paths"):
            read_dataset(str(tmp_path / "data" / "rows.jsonl"))
        dataset, _ = read_dataset(str(tmp_path / "data" / "rows.jsonl"), DatasetOptions(allow_outside_paths=True))
        assert len(dataset[0]["images"]) == 1


# ------------------------------------------------------------------------------------------ media tags
def test_string_prompt_tags_become_the_model_placeholder_and_leave_with_the_modality():
    _, qwen = build_tiny_model("qwen2_vl", seed=0)
    sample = {"prompt": "<image>\nwhat colour is the cat ?", "images": [Image.new("RGB", (28, 28))]}
    assert render_prompt(qwen, sample) == "<|vision_start|><|image_pad|><|vision_end|>\nwhat colour is the cat ?"
    assert perturb.apply("image.drop", sample)["prompt"] == "what colour is the cat ?"
    assert perturb.apply("text.drop_question", sample)["prompt"] == "<image>\nDescribe the image."
    messages = [{"role": "user", "content": "<audio>\nwhat note ?"}]
    dropped = perturb.apply("audio.drop", {"prompt": messages, "audios": [np.zeros(16, np.float32)]})
    assert dropped["prompt"][0]["content"] == "what note ?"


# ------------------------------------------------------------------------------------------ the trainer (Python API)
def _first_batch_loss(trainer, n):
    trainer.model.train()
    batch = trainer._prepare_inputs(trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(n)]))
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def _napo_and_trl_losses(family, rows, tmp_path, processing=None):
    base, built = build_tiny_model(family, seed=0)
    processing = processing or built
    losses = []
    for trainer_class, config in (
        (NaPOTrainer, NaPOConfig(output_dir=str(tmp_path / "n"), objective="dpo", **COMMON)),
        (DPOTrainer, DPOConfig(output_dir=str(tmp_path / "t"), **COMMON)),
    ):
        trainer = trainer_class(
            model=perturbed(base),
            ref_model=copy.deepcopy(base),
            args=config,
            train_dataset=datasets.Dataset.from_list(copy.deepcopy(rows)),
            processing_class=processing,
        )
        losses.append(_first_batch_loss(trainer, len(rows)))
    return losses


COLOURS = ["red", "blue", "green", "white"]


@pytest.mark.parametrize("family", ["text", "llava"])
def test_trainer_takes_trl_conversational_rows_as_stock_trl(family, tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        row = {
            "prompt": [{"role": "user", "content": [{"type": "text", "text": f"what colour is the cat {i} ?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": COLOURS[i]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": COLOURS[3 - i] + " cat"}]}],
        }
        if family == "llava":
            row["images"] = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))]
            row["prompt"][0]["content"].insert(0, {"type": "image"})
        rows.append(row)
    napo_loss, trl_loss = _napo_and_trl_losses(family, rows, tmp_path)
    assert abs(napo_loss - trl_loss) < 1e-5 and abs(napo_loss - np.log(2)) > 1e-3


def test_trainer_extracts_the_implicit_prompt_as_stock_trl(tmp_path):
    rows = [
        {
            "chosen": [
                {"role": "user", "content": f"what colour is the cat {i} ?"},
                {"role": "assistant", "content": c},
            ],
            "rejected": [
                {"role": "user", "content": f"what colour is the cat {i} ?"},
                {"role": "assistant", "content": "brown " + c},
            ],
        }
        for i, c in enumerate(COLOURS)
    ]
    napo_loss, trl_loss = _napo_and_trl_losses("text", rows, tmp_path)
    assert abs(napo_loss - trl_loss) < 1e-5 and abs(napo_loss - np.log(2)) > 1e-3


def test_trainer_passes_tools_and_chat_template_kwargs_as_stock_trl(tmp_path):
    _, tokenizer = build_tiny_model("text", seed=0)
    # A template that writes the tools' names and a `brief` switch into the prompt: both change the tokens.
    tokenizer.chat_template = (
        "{{- bos_token -}}{%- if tools -%}{%- for t in tools -%}{{ t['function']['name'] }} {% endfor -%}{%- endif -%}"
        "{%- if brief -%}short {% endif -%}"
        "{%- for m in messages -%}{{- '<|' + m['role'] + '|>' + m['content'] + eos_token -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
    )
    schema = {"type": "object", "properties": {}}
    tool = {"type": "function", "function": {"name": "colour", "description": "d", "parameters": schema}}
    rows = [
        {
            "prompt": [{"role": "user", "content": f"what colour is the cat {i} ?"}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": "brown"}],
            "tools": json.dumps([tool]),
            "chat_template_kwargs": {"brief": True},
        }
        for i, c in enumerate(COLOURS)
    ]
    napo_loss, trl_loss = _napo_and_trl_losses("text", rows, tmp_path, processing=tokenizer)
    assert abs(napo_loss - trl_loss) < 1e-5
    plain = [{k: v for k, v in r.items() if k not in ("tools", "chat_template_kwargs")} for r in rows]
    napo_plain, _ = _napo_and_trl_losses("text", plain, tmp_path, processing=tokenizer)
    assert abs(napo_plain - napo_loss) > 1e-4  # the tools and the switch reached the template


def test_napo_compare_reads_a_layout_with_renamed_columns(tmp_path):
    """`napo compare --dataset` reads through the same reader: an ms-swift file whose answer column has another name,
    renamed with --columns, trains one grid cell."""
    model, tokenizer = build_tiny_model("text", seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [
        {
            "dialogue": [
                {"role": "user", "content": f"what colour is the cat {i} ?"},
                {"role": "assistant", "content": COLOURS[i % 4]},
            ],
            "rejected_response": "brown",
        }
        for i in range(8)
    ]
    (tmp_path / "swift.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "grid"
    main(
        [
            "compare",
            "--dataset",
            str(tmp_path / "swift.jsonl"),
            "--model",
            str(tmp_path / "model"),
            "--columns",
            "dialogue=messages",
            "--output-dir",
            str(out),
            "--objectives",
            "dpo",
            "--noise-rates",
            "0",
            "--seeds",
            "0",
            "--max-steps",
            "1",
            "--workers",
            "1",
            "--holdout",
            "0.25",
            "--no-progress",
            "--set",
            "per_device_train_batch_size=2",
        ]
    )
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 1 and "heldout_reward_accuracy" in results[0]["metrics"]  # failed cells go elsewhere


def test_trainer_expands_string_prompt_tags_for_a_model_with_another_placeholder(tmp_path):
    """Qwen2-VL's placeholder is not `<image>`: a string prompt's tag must become it, or the processor finds no image
    token for the image (and fails)."""
    base, processor = build_tiny_model("qwen2_vl", seed=0)
    rng = np.random.default_rng(0)
    rows = [
        {
            "prompt": "<image>\nwhat colour is the cat ?",
            "chosen": c,
            "rejected": "brown",
            "images": [Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8))],
        }
        for c in COLOURS
    ]
    trainer = NaPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        processing_class=processor,
        args=NaPOConfig(output_dir=str(tmp_path), objective="dpo", **COMMON),
        train_dataset=datasets.Dataset.from_list(rows),
    )
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(4)])
    assert (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).any()
    assert np.isfinite(_first_batch_loss(trainer, 4))
