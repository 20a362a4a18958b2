"""napo.data: every format reads back the same rows, and every bad input names its row and field."""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest
import soundfile
from helpers import comparable_rows, noise_image
from PIL import Image

from napo.data import REJECTED_COLUMNS, RowError, read_dataset, validate_preference_dataset

# No image part: rows with 0, 1 or 2 images all fit (TRL puts one placeholder per image), where an explicit part
# would be a placeholder/image-count mismatch for some of them.
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "What colour is the bear?"}]}]


def _rows(n: int = 4) -> list[dict]:
    return [
        {
            "prompt": MESSAGES,
            "chosen": f"white {i}",
            "rejected_language_bias": None if i == 1 else f"brown {i}",
            "id": i,
        }
        for i in range(n)
    ]


def _write_jsonl(folder, rows: list[dict], images: dict[int, list[Image.Image]]) -> str:
    """rows -> folder/data.jsonl, with row i's images saved as PNG files under folder/img/ and referenced by relative
    path."""
    os.makedirs(folder / "img", exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        paths = []
        for k, image in enumerate(images.get(i, [])):
            image.save(folder / "img" / f"{i}_{k}.png")
            paths.append(f"img/{i}_{k}.png")
        lines.append(json.dumps({**row, "images": paths}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "data.jsonl")


def test_save_to_disk_parquet_and_jsonl_read_back_equal(tmp_path):
    rows = _rows()
    images = {
        0: [noise_image(0, 12, 10)],
        1: [noise_image(1, 12, 10), noise_image(2, 12, 10)],
        3: [noise_image(3, 12, 10)],
    }  # row 2 is text-only
    with_images = [{**row, "images": images.get(i, [])} for i, row in enumerate(rows)]
    source = datasets.Dataset.from_list(with_images)
    source = source.cast_column("images", datasets.List(datasets.Image()))
    source.save_to_disk(str(tmp_path / "disk"))
    source.to_parquet(str(tmp_path / "data.parquet"))
    os.makedirs(tmp_path / "shards")
    source.select(range(2)).to_parquet(str(tmp_path / "shards" / "0.parquet"))
    source.select(range(2, 4)).to_parquet(str(tmp_path / "shards" / "1.parquet"))
    jsonl = _write_jsonl(tmp_path / "json", rows, images)

    expected = comparable_rows(source)
    for path in (tmp_path / "disk", tmp_path / "data.parquet", tmp_path / "shards", jsonl):
        dataset, bad = read_dataset(str(path))
        assert bad == []
        assert isinstance(dataset.features["images"], datasets.List)
        assert isinstance(dataset.features["images"].feature, datasets.Image)
        assert comparable_rows(dataset) == expected, path


def test_images_are_converted_to_rgb(tmp_path):
    Image.new("L", (5, 5), 128).save(tmp_path / "grey.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "image": "grey.png"}) + "\n")
    dataset, _ = read_dataset(str(tmp_path / "d.jsonl"))
    (image,) = dataset[0]["images"]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (128, 128, 128)


def test_audio_is_float32_mono_16khz(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32) * 0.5
    soundfile.write(tmp_path / "a.wav", stereo, 8000, subtype="FLOAT")  # 1 s, stereo, 8 kHz
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "audio": "a.wav"}) + "\n")
    dataset, _ = read_dataset(str(tmp_path / "d.jsonl"))
    (wave,) = dataset.with_format("numpy")[0]["audios"]
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == 16000
    assert dataset[0]["sampling_rate"] == 16000
    assert 0.4 < np.abs(wave).max() < 0.6
    dataset.save_to_disk(str(tmp_path / "disk"))  # already-decoded arrays read back unchanged
    again, _ = read_dataset(str(tmp_path / "disk"))
    np.testing.assert_array_equal(again.with_format("numpy")[0]["audios"][0], wave)


def test_missing_image_file_names_row_field_and_path(tmp_path):
    jsonl = _write_jsonl(tmp_path, _rows(3), {0: [noise_image(0, 12, 10)], 2: [noise_image(2, 12, 10)]})
    os.remove(tmp_path / "img" / "2_0.png")
    with pytest.raises(RowError, match=r"row 2, field 'images': .*img/2_0\.png does not exist"):
        read_dataset(jsonl)
    dataset, bad = read_dataset(jsonl, on_bad_row="collect")
    assert dataset["id"] == [0, 1]
    assert [(b["row"], b["field"]) for b in bad] == [(2, "images")] and "does not exist" in bad[0]["reason"]


def test_corrupt_image_names_row_and_reason(tmp_path):
    jsonl = _write_jsonl(tmp_path, _rows(2), {0: [noise_image(0, 12, 10)], 1: [noise_image(1, 12, 10)]})
    data = (tmp_path / "img" / "0_0.png").read_bytes()
    (tmp_path / "img" / "0_0.png").write_bytes(data[: len(data) // 2])  # truncated: the header still parses
    with pytest.raises(RowError, match=r"row 0, field 'images': .*0_0\.png cannot be decoded as an image: "):
        read_dataset(jsonl)
    dataset, bad = read_dataset(jsonl, on_bad_row="collect")
    assert dataset["id"] == [1] and bad[0]["row"] == 0


def test_corrupt_image_inside_parquet(tmp_path):
    source = datasets.Dataset.from_list(
        [{"prompt": "q", "chosen": "a", "images": [{"bytes": b"not an image", "path": None}]}]
    )
    source.cast_column("images", datasets.List(datasets.Image())).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(RowError, match=r"row 0, field 'images': the embedded file.* cannot be decoded as an image"):
        read_dataset(str(tmp_path / "d.parquet"))


def test_invalid_json_names_the_line(tmp_path):
    good = json.dumps({"prompt": "q", "chosen": "a"})
    (tmp_path / "d.jsonl").write_text(f'{good}\n\n{good}\n{{"prompt": "q", "chosen": \n{good}\n')
    with pytest.raises(RowError, match=r"row 2, field '<json>': line 4 of .*d\.jsonl is not valid JSON"):
        read_dataset(str(tmp_path / "d.jsonl"))
    dataset, bad = read_dataset(str(tmp_path / "d.jsonl"), on_bad_row="collect")
    assert len(dataset) == 3 and [b["row"] for b in bad] == [2]


def test_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_dataset(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"expected a save_to_disk folder, a \.parquet"):
        read_dataset(str(tmp_path / "d.csv"))


def _preferences(**columns) -> datasets.Dataset:
    base = {"prompt": ["q0", "q1"], "chosen": ["a0", "a1"], "rejected_vision_bias": ["b0", "b1"]}
    return datasets.Dataset.from_dict({k: v for k, v in {**base, **columns}.items() if v is not None})


def test_validate_returns_rejected_columns_in_order():
    dataset = _preferences(rejected_language_bias=["c0", None], rejected=["d0", "d1"])
    assert validate_preference_dataset(dataset) == ["rejected", "rejected_language_bias", "rejected_vision_bias"]
    assert REJECTED_COLUMNS[0] == "rejected"


def test_validate_accepts_messages_prompts():
    dataset = datasets.Dataset.from_list([{"prompt": MESSAGES, "chosen": "a", "rejected": "b"}])
    assert validate_preference_dataset(dataset) == ["rejected"]


def test_validate_no_chosen_column():
    with pytest.raises(ValueError, match=r"no 'chosen' column \(columns: \['prompt', 'rejected_vision_bias'\]\)"):
        validate_preference_dataset(_preferences(chosen=None))


def test_validate_no_rejected_column():
    with pytest.raises(ValueError, match=r"none of the rejected columns .*napo pairs"):
        validate_preference_dataset(_preferences(rejected_vision_bias=None))
    assert validate_preference_dataset(_preferences(rejected_vision_bias=None), require_rejected=False) == []


def test_validate_empty_answer_names_row_and_column():
    with pytest.raises(RowError, match=r"row 1, field 'chosen': is an empty string: expected a non-empty string"):
        validate_preference_dataset(_preferences(chosen=["a0", "  "]))
    with pytest.raises(RowError, match=r"row 0, field 'rejected_vision_bias': is an empty string"):
        validate_preference_dataset(_preferences(rejected_vision_bias=["", "b1"]))


def test_validate_row_without_any_negative():
    dataset = _preferences(rejected_language_bias=["c0", None], rejected_vision_bias=["b0", None])
    with pytest.raises(
        RowError, match=r"row 1, field 'rejected_language_bias/rejected_vision_bias': every negative is None"
    ):
        validate_preference_dataset(dataset)


def test_validate_empty_prompt():
    with pytest.raises(RowError, match=r"row 0, field 'prompt': is an empty string"):
        validate_preference_dataset(_preferences(prompt=["", "q1"]))
