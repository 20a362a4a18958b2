"""Reading source and preference datasets, and checking preference rows before training.

`read_dataset` turns any of the formats users have (an HF `save_to_disk` folder, parquet, JSONL with
media file paths) into one `datasets.Dataset` whose media columns follow DESIGN.md's preference rows:
`images` is a list of RGB images (an `Image` feature, decoded to PIL on access) and `audios` a list of
1-D float32 arrays at 16 kHz with an int `sampling_rate` column. `validate_preference_dataset` checks
the answer columns the trainer needs and says which row or column is wrong and what to do.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import datasets
import librosa
import numpy as np
from PIL import Image

REJECTED_COLUMNS = ("rejected", "rejected_language_bias", "rejected_vision_bias", "rejected_audio_bias")
SAMPLING_RATE = 16_000  # Hz: every audio array napo stores or feeds a model is at this rate
IMAGE_FIELDS = ("images", "image")  # source field names; a single "image" becomes a one-item "images"
AUDIO_FIELDS = ("audios", "audio")
ON_BAD_ROW = ("raise", "collect")


class RowError(ValueError):
    """A row that cannot be used: names the row (index, or e.g. "line 7 of a.jsonl"), the field, and the problem."""

    def __init__(self, row: int | str, field: str, problem: str):
        self.row, self.field, self.problem = row, field, problem
        where = f"row {row}" if isinstance(row, int) else str(row)
        super().__init__(f"{where}, field {field!r}: {problem}")


def read_dataset(path: str, *, on_bad_row: str = "raise") -> tuple[datasets.Dataset, list[dict]]:
    """Read a dataset of prompts (+ images / audios) and answers, decoding and checking every media file.

    Args:
        path: an HF `save_to_disk` folder, a `.parquet` file or a folder of parquet shards, or a `.jsonl`
            file whose "images"/"image"/"audios"/"audio" fields are file paths (relative to the JSONL's
            folder) or lists of them.
        on_bad_row: "raise" raises `RowError` on the first row with a missing or undecodable media file
            (or, in JSONL, invalid JSON); "collect" leaves such rows out and reports them.

    Returns:
        `(dataset, bad_rows)`. `dataset` keeps every other column as it was and, when the source has media,
        has `images` (list of RGB images, `Image` feature) and/or `audios` (list of 1-D float32 arrays,
        mono, 16 kHz) plus `sampling_rate` (16000); rows without media get empty lists. `bad_rows` is
        `[{"row": i, "field": ..., "reason": ...}]` with `i` the 0-based row index in the source (for
        JSONL, the index among its non-blank lines), always empty with on_bad_row="raise".
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row={on_bad_row!r}: expected one of {ON_BAD_ROW}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: pass a save_to_disk folder, a .parquet file/folder or a .jsonl file")
    if path.endswith(".jsonl"):
        rows, base_dir, source_features = _jsonl_rows(path), os.path.dirname(os.path.abspath(path)), None
    else:
        source = _load_arrow(path)
        rows, base_dir, source_features = _arrow_rows(source), os.path.abspath(path), source.features
    decoded, bad_rows, column_types = [], [], {}
    for index, row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            decoded.append(_decode_row(index, row, base_dir))
            _check_column_types(index, decoded[-1], column_types)
        except RowError as error:
            if on_bad_row == "raise":
                raise
            bad_rows.append({"row": error.row, "field": error.field, "reason": error.problem})
    return _to_dataset(decoded, source_features), bad_rows


def validate_preference_dataset(dataset: datasets.Dataset, *, require_rejected: bool = True) -> list[str]:
    """Check a preference dataset before training; return the rejected columns present, in REJECTED_COLUMNS order.

    Checks: a `prompt` and a `chosen` column; (when `require_rejected`) at least one of REJECTED_COLUMNS;
    in every row a non-empty prompt, a non-empty string `chosen`, and rejected values that are non-empty
    strings or None (None = that kind of negative is missing for this row), with at least one negative.

    Raises:
        ValueError: a column is missing (the message lists the columns found and what to add).
        RowError: a row breaks a rule (the message names the row, the column and what was expected).
    """
    columns = list(dataset.column_names)
    for needed in ("prompt", "chosen"):
        if needed not in columns:
            raise ValueError(
                f"the dataset has no {needed!r} column (columns: {columns}); a preference row needs 'prompt' "
                f"(a string or TRL messages) and 'chosen' (the preferred answer): rename your column or build "
                f"the dataset with `napo pairs`"
            )
    rejected = [name for name in REJECTED_COLUMNS if name in columns]
    if require_rejected and not rejected:
        raise ValueError(
            f"the dataset has none of the rejected columns {list(REJECTED_COLUMNS)} (columns: {columns}); "
            f"generate negatives with `napo pairs` or rename your negative column to 'rejected'"
        )
    for index, row in enumerate(dataset.select_columns(["prompt", "chosen", *rejected])):
        check_prompt(index, row["prompt"])
        check_answer(index, "chosen", row["chosen"])
        for name in rejected:
            check_answer(index, name, row[name], allow_none=True)
        if require_rejected and all(row[name] is None for name in rejected):
            raise RowError(index, "/".join(rejected), "every negative is None: give the row at least one rejected answer or drop it")
    return rejected


def check_prompt(row: int | str, prompt: Any) -> None:
    """Raise `RowError` unless `prompt` is a non-empty string or a non-empty list of {"role", "content"} messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError(row, "prompt", "is an empty string: expected the question (a string or TRL messages)")
        return
    if not isinstance(prompt, list) or not prompt:
        raise RowError(row, "prompt", f"is {_describe(prompt)}: expected a non-empty string or a list of TRL messages")
    for message in prompt:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(row, "prompt", f"has message {message!r}: expected {{'role': ..., 'content': ...}}")


def check_answer(row: int | str, field: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise `RowError` unless `value` is a non-empty string (or None when `allow_none`)."""
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value.strip():
        allowed = "a non-empty string or None (negative missing)" if allow_none else "a non-empty string"
        raise RowError(row, field, f"is {_describe(value)}: expected {allowed}")


def _describe(value: Any) -> str:
    if value is None:
        return "missing (None)"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else repr(value)
    return f"a {type(value).__name__}"


def _load_arrow(path: str) -> datasets.Dataset:
    """A save_to_disk folder, a parquet file or a folder of parquet shards, with media left undecoded."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json")):
        source = datasets.load_from_disk(path)
        if isinstance(source, datasets.DatasetDict):
            raise ValueError(f"{path} holds several splits {list(source)}: pass the folder of one split")
    elif path.endswith(".parquet"):
        source = datasets.Dataset.from_parquet(path)
    elif os.path.isdir(path):
        shards = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".parquet"))
        if not shards:
            raise ValueError(f"{path} is neither a save_to_disk folder nor a folder of .parquet files")
        source = datasets.Dataset.from_parquet(shards)
    else:
        raise ValueError(f"{path}: expected a save_to_disk folder, a .parquet file/folder or a .jsonl file")
    # Decoding ourselves (PIL, librosa) gives one error path for every format, per row.
    undecoded = datasets.Features({name: _undecoded(feature) for name, feature in source.features.items()})
    return source.cast(undecoded) if undecoded != source.features else source


def _undecoded(feature: Any) -> Any:
    if isinstance(feature, (datasets.Image, datasets.Audio)):
        return type(feature)(decode=False)
    if isinstance(feature, (datasets.List, datasets.Sequence)):
        return type(feature)(_undecoded(feature.feature))
    return feature


def _arrow_rows(source: datasets.Dataset) -> Iterator[tuple[int, dict]]:
    for index, row in enumerate(source):
        yield index, row


def _jsonl_rows(path: str) -> Iterator[tuple[int, dict | RowError]]:
    """(row index, row) per non-blank line; a line that is not a JSON object yields a RowError in its place."""
    index = 0
    # Bytes: json.loads decodes each line, so a line that is not UTF-8 becomes that row's error, not the file's.
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as error:
                row = RowError(index, "<json>", f"line {line_number} of {path} is not valid JSON: {error}")
            yield index, row
            index += 1


def _check_column_types(index: int, row: dict, column_types: dict[str, type]) -> None:
    """Raise `RowError` for a value of the wrong type, which Arrow would refuse for the whole dataset without naming
    the row: `prompt` and the answer columns are checked against their rules (`check_prompt`, `check_answer`); any
    other non-media column must keep the type (str, list, dict, number, bool) of its first value, recorded in
    `column_types`. None is allowed in every column but `prompt`."""
    for name, value in row.items():
        if name == "prompt":
            check_prompt(index, value)
        elif name in ("chosen", *REJECTED_COLUMNS):
            check_answer(index, name, value, allow_none=True)
        elif value is not None and name not in ("images", "audios", "sampling_rate"):
            kind = float if type(value) is int else type(value)  # 1 and 1.5 share a column
            expected = column_types.setdefault(name, kind)
            if kind is not expected:
                problem = f"is {_describe(value)} where earlier rows have a {expected.__name__}"
                raise RowError(index, name, f"{problem}: use one type per column")


def _decode_row(index: int, row: dict, base_dir: str) -> dict:
    """Replace the source's image/audio fields, in place in the column order, by `images` (list of encoded RGB
    images) and `audios` + `sampling_rate`."""
    image_field = _media_field(index, row, IMAGE_FIELDS)
    audio_field = _media_field(index, row, AUDIO_FIELDS)
    out = {}
    for name, value in row.items():
        if name == image_field:
            out["images"] = [_image_cell(index, name, item, base_dir) for item in _as_list(value)]
        elif name == audio_field:
            source_rate = row.get("sampling_rate") or SAMPLING_RATE
            out["audios"] = [_audio_array(index, name, item, base_dir, source_rate) for item in _as_list(value)]
            out["sampling_rate"] = SAMPLING_RATE
        elif name not in IMAGE_FIELDS + AUDIO_FIELDS + ("sampling_rate",):
            out[name] = value
    return out


def _media_field(index: int, row: dict, names: tuple[str, str]) -> str | None:
    present = [name for name in names if name in row]
    if len(present) > 1 and all(row[name] is not None for name in present):
        raise RowError(index, "/".join(present), "both are set: keep one media field (a list under the plural name)")
    return next((name for name in present if row[name] is not None), present[0] if present else None)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) and not (value and isinstance(value[0], (int, float))):
        return list(value)
    return [value]  # one path, one image, or one raw waveform


def _image_cell(index: int, field: str, value: Any, base_dir: str) -> dict:
    """Decode one image fully (truncated files fail here, not in training); return it as an `Image` cell of RGB bytes."""
    if isinstance(value, Image.Image):
        data, where = None, "the in-memory image"
        image = value
    else:
        data, where = _media_bytes(index, field, value, base_dir)
        try:
            with warnings.catch_warnings():
                # PIL only warns between MAX_IMAGE_PIXELS and twice that, then decodes hundreds of MB: refuse those too.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                image.load()
        except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError ...)
            raise RowError(index, field, f"{where} cannot be decoded as an image: {error}") from error
    if data is not None and image.mode == "RGB" and image.format in ("PNG", "JPEG", "WEBP"):
        return {"bytes": data, "path": None}  # already RGB: keep the original bytes (no lossy re-encode)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _audio_array(index: int, field: str, value: Any, base_dir: str, source_rate: int) -> np.ndarray:
    """One waveform as float32 mono at SAMPLING_RATE. Shape: (samples,)."""
    if isinstance(value, dict) and value.get("array") is not None:
        value, source_rate = value["array"], value.get("sampling_rate") or source_rate
    if isinstance(value, (list, np.ndarray)):
        wave = np.asarray(value, dtype=np.float32)
        wave = wave.mean(axis=0) if wave.ndim == 2 else wave  # (channels, samples) -> mono
        if source_rate != SAMPLING_RATE:
            wave = librosa.resample(wave, orig_sr=source_rate, target_sr=SAMPLING_RATE)
        return wave.astype(np.float32)
    data, where = _media_bytes(index, field, value, base_dir)
    try:
        wave, _ = librosa.load(io.BytesIO(data), sr=SAMPLING_RATE, mono=True)
    except Exception as error:  # soundfile / audioread raise several unrelated types
        raise RowError(index, field, f"{where} cannot be decoded as audio: {error}") from error
    return wave.astype(np.float32)


def _media_bytes(index: int, field: str, value: Any, base_dir: str) -> tuple[bytes, str]:
    """The raw bytes of a media cell (a path, or an undecoded {"bytes", "path"} cell) and a name for messages."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"], f"the embedded file {value.get('path') or ''}".rstrip()
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        raise RowError(index, field, f"holds {_describe(path)}: expected a file path or image/audio bytes")
    full = os.path.join(base_dir, path)
    if not os.path.isfile(full):
        raise RowError(index, field, f"{full} does not exist: fix the path (relative to {base_dir}) or drop the row")
    with open(full, "rb") as handle:
        return handle.read(), full


def _to_dataset(rows: list[dict], source_features: datasets.Features | None) -> datasets.Dataset:
    """Build the output with explicit media features; other columns keep the source's features (inferred for JSONL)."""
    media = {"images": datasets.List(datasets.Image()), "audios": datasets.List(datasets.List(datasets.Value("float32"))), "sampling_rate": datasets.Value("int32")}
    names = list(dict.fromkeys(name for row in rows for name in row))
    if source_features is not None:
        other = {name: source_features[name] for name in names if name not in media and name in source_features}
    else:
        plain = [{name: row.get(name) for name in names if name not in media} for row in rows]
        other = dict(datasets.Dataset.from_list(plain).features) if plain and plain[0] else {}
    features = datasets.Features({name: media[name] if name in media else other[name] for name in names})
    if not rows:
        return datasets.Dataset.from_dict({name: [] for name in names}, features=features)
    empty = {"images": [], "audios": [], "sampling_rate": SAMPLING_RATE}  # a row without media, in a dataset with some
    return datasets.Dataset.from_list([{name: row.get(name, empty.get(name)) for name in names} for row in rows], features=features)
