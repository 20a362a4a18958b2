"""Decoding a row's media: image and audio cells (paths, bytes, arrays, PIL images) become RGB image cells and 1-D
float32 waveforms at `SAMPLING_RATE`, each failure a `RowError` naming the row, the field and the file.

Paths resolve against the data file's folder and may not leave it unless `DatasetOptions.allow_outside_paths`;
files over `DatasetOptions.max_media_bytes` are refused before they are read.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import TYPE_CHECKING, Any

import librosa
import numpy as np
from PIL import Image

from napo.rows import RowError, describe_value

if TYPE_CHECKING:  # napo.data imports this module to decode rows
    from napo.data import DatasetOptions

SAMPLING_RATE = 16_000  # Hz: every audio array napo stores or feeds a model is at this rate
IMAGE_FIELDS = ("images", "image")  # source field names; a single "image" becomes a one-item "images"
AUDIO_FIELDS = ("audios", "audio")


def decode_row(index: int, row: dict, base_dir: str, options: DatasetOptions) -> dict:
    """Replace the source's image/audio fields, in place in the column order, by `images` (list of encoded RGB
    images) and `audios` + `sampling_rate`; `_row` records the source index for later checks."""
    image_field = _media_field(index, row, IMAGE_FIELDS)
    audio_field = _media_field(index, row, AUDIO_FIELDS)
    out = {"_row": index}
    for name, value in row.items():
        if name == image_field:
            out["images"] = [_image_cell(index, name, item, base_dir, options) for item in _as_list(value, audio=False)]
        elif name == audio_field:
            source_rate = _sampling_rate(index, "sampling_rate", row.get("sampling_rate"))
            items = _as_list(value, audio=True)
            out["audios"] = [_audio_array(index, name, item, base_dir, source_rate, options) for item in items]
            out["sampling_rate"] = SAMPLING_RATE
        elif name not in IMAGE_FIELDS + AUDIO_FIELDS + ("sampling_rate",):
            out[name] = value
    return out


def _sampling_rate(index: int, field: str, value: Any) -> int:
    """A source sampling rate in Hz: a positive whole number; None means SAMPLING_RATE."""
    if value is None:
        return SAMPLING_RATE
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
        or value != int(value)
    ):
        raise RowError(index, field, f"is {value!r}: expected a positive whole number of Hz, e.g. 16000")
    return int(value)


def _media_field(index: int, row: dict, names: tuple[str, str]) -> str | None:
    present = [name for name in names if name in row]
    if len(present) > 1 and all(row[name] is not None for name in present):
        raise RowError(index, "/".join(present), "both are set: keep one media field (a list under the plural name)")
    return next((name for name in present if row[name] is not None), present[0] if present else None)


def _as_list(value: Any, *, audio: bool) -> list:
    if value is None:
        return []
    if audio and isinstance(value, (list, tuple)) and value and isinstance(value[0], (int, float)):
        return [value]  # one raw waveform
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]  # one path, one image, or one waveform array


def _image_cell(index: int, field: str, value: Any, base_dir: str, options: DatasetOptions) -> dict:
    """Decode one image fully (truncated files fail here, not in training); return it as an `Image` cell of RGB
    bytes."""
    if isinstance(value, Image.Image):
        data, where = None, "the in-memory image"
        image = value
    else:
        data, where = _media_bytes(index, field, value, base_dir, options)
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


def _audio_array(
    index: int, field: str, value: Any, base_dir: str, source_rate: int, options: DatasetOptions
) -> np.ndarray:
    """One waveform as float32 mono at SAMPLING_RATE, every sample finite. Shape: (samples,)."""
    if isinstance(value, dict) and value.get("array") is not None:
        value, source_rate = value["array"], _sampling_rate(index, field, value.get("sampling_rate") or source_rate)
    if isinstance(value, (list, np.ndarray)):
        try:
            wave = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise RowError(index, field, f"is not a numeric waveform: {error}") from None
        if wave.ndim not in (1, 2) or wave.size == 0:
            raise RowError(index, field, f"has shape {wave.shape}: expected (samples,) or (channels, samples)")
        wave = wave.mean(axis=0) if wave.ndim == 2 else wave  # (channels, samples) -> mono
        if not np.isfinite(wave).all():
            raise RowError(index, field, "has NaN or infinite samples: fix or drop the clip")
        if source_rate != SAMPLING_RATE:
            wave = librosa.resample(wave, orig_sr=source_rate, target_sr=SAMPLING_RATE)
        return wave.astype(np.float32)
    data, where = _media_bytes(index, field, value, base_dir, options)
    try:
        wave, _ = librosa.load(io.BytesIO(data), sr=SAMPLING_RATE, mono=True)
    except Exception as error:  # soundfile / audioread raise several unrelated types
        raise RowError(index, field, f"{where} cannot be decoded as audio: {error}") from error
    if not np.isfinite(wave).all():
        raise RowError(index, field, f"{where} has NaN or infinite samples: fix or drop the clip")
    return wave.astype(np.float32)


def _media_bytes(index: int, field: str, value: Any, base_dir: str, options: DatasetOptions) -> tuple[bytes, str]:
    """The raw bytes of a media cell (a path, or an undecoded {"bytes", "path"} cell) and a name for messages.

    A path resolves against `base_dir`; one that leads outside it (`../`, an absolute path, a symlink) is refused
    unless `options.allow_outside_paths`, and a file over `options.max_media_bytes` is refused before it is read."""
    limit = options.max_media_bytes
    if isinstance(value, dict) and value.get("bytes") is not None:
        if len(value["bytes"]) > limit:
            raise RowError(index, field, f"embeds {len(value['bytes'])} bytes, over max_media_bytes={limit}")
        return value["bytes"], f"the embedded file {value.get('path') or ''}".rstrip()
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        raise RowError(index, field, f"holds {describe_value(path)}: expected a file path or image/audio bytes")
    full = os.path.join(base_dir, path)
    if not options.allow_outside_paths:
        folder = os.path.realpath(base_dir)
        if os.path.commonpath([os.path.realpath(full), folder]) != folder:
            raise RowError(
                index,
                field,
                f"{path} is outside the data folder {folder}: move the file there, or pass "
                f"--allow-outside-paths if you trust this dataset",
            )
    if not os.path.isfile(full):
        raise RowError(index, field, f"{full} does not exist: fix the path (relative to {base_dir}) or drop the row")
    size = os.path.getsize(full)
    if size > limit:
        raise RowError(index, field, f"{full} has {size} bytes, over max_media_bytes={limit}: not read")
    with open(full, "rb") as handle:
        return handle.read(), full
