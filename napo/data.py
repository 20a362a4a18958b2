"""Reading source and preference datasets, and checking preference rows before training.

`read_dataset` reads the data users have (JSONL, `.json` arrays, parquet files or folders, `save_to_disk` folders
including `DatasetDict`, Hugging Face hub ids through `datasets.load_dataset`), detects its row layout
(`napo.formats.LAYOUTS`: TRL, RLAIF-V, NaPO's RLAIF-V-Bias, LLaVA, ShareGPT / LLaMA-Factory, ms-swift, Alpaca),
converts every row to napo's canonical row and checks it, so one bad row is a reject naming its row, field and
reason, never a crash of the job. Media columns follow DESIGN.md's preference rows: `images` is a list of RGB images
(an `Image` feature, decoded to PIL on access) and `audios` a list of 1-D float32 arrays at 16 kHz with an int
`sampling_rate` column. `validate_preference_dataset` checks the answer columns the trainer needs.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
import librosa
import numpy as np
from PIL import Image

from napo.formats import (
    LAYOUT_NAMES,
    MEDIA_TAGS,
    Layout,
    LayoutError,
    detect_layout,
    parse_columns,
    split_implicit_prompt,
)
from napo.negatives import NEGATIVE_COLUMNS

logger = logging.getLogger(__name__)

REJECTED_COLUMNS = NEGATIVE_COLUMNS  # the negative columns (`napo.negatives`), under the name this module used
SAMPLING_RATE = 16_000  # Hz: every audio array napo stores or feeds a model is at this rate
IMAGE_FIELDS = ("images", "image")  # source field names; a single "image" becomes a one-item "images"
AUDIO_FIELDS = ("audios", "audio")
ON_BAD_ROW = ("raise", "collect")
KINDS = ("preference", "source", "rows")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class DatasetOptions:
    """How `read_dataset` finds and reads a dataset; `napo pairs`, `napo train` expose every field as a flag."""

    dataset_split: str | None = field(
        default=None, metadata={"help": "split of a DatasetDict folder or a hub dataset; None: train"}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "configuration name of a hub dataset (datasets.load_dataset's `name`)"}
    )
    columns: str | None = field(
        default=None,
        metadata={
            "help": "rename your columns before the layout is detected, as YOURS=NAPO pairs, e.g. "
            "question=prompt,answer=chosen; None: keep the names"
        },
    )
    layout: str = field(
        default="auto",
        metadata={
            "help": "row layout (see README, 'Your data'); auto: detect it from the columns",
            "choices": ("auto", *LAYOUT_NAMES),
        },
    )
    allow_outside_paths: bool = field(
        default=False,
        metadata={"help": "read media paths that point outside the data file's folder (../, absolute paths)"},
    )
    max_media_bytes: int = field(
        default=256 * 2**20,
        metadata={"help": "largest media file read, in bytes; bigger files are rejected before being read"},
    )

    def __post_init__(self) -> None:
        if self.layout not in ("auto", *LAYOUT_NAMES):
            raise ValueError(f"layout {self.layout!r}: expected 'auto' or one of {list(LAYOUT_NAMES)}")
        if not isinstance(self.max_media_bytes, int) or self.max_media_bytes <= 0:
            raise ValueError(f"max_media_bytes={self.max_media_bytes!r}: expected a positive number of bytes")
        parse_columns(self.columns)  # a malformed mapping fails now, not after the file is read

    @property
    def split(self) -> str:
        """The split read from a DatasetDict folder or a hub dataset."""
        return self.dataset_split or "train"


class RowError(ValueError):
    """A row that cannot be used: names the row (index, or e.g. "line 7 of a.jsonl"), the field, and the problem."""

    def __init__(self, row: int | str, field: str, problem: str):
        self.row, self.field, self.problem = row, field, problem
        where = f"row {row}" if isinstance(row, int) else str(row)
        super().__init__(f"{where}, field {field!r}: {problem}")


def read_dataset(
    path: str, options: DatasetOptions | None = None, *, on_bad_row: str = "raise", kind: str = "preference"
) -> tuple[datasets.Dataset, list[dict]]:
    """Read a dataset of prompts (+ images / audios) and answers in any supported layout, checking every row.

    Args:
        path: a `.jsonl` file, a `.json` array (or JSON lines), a `.parquet` file or a folder of parquet shards, an HF
            `save_to_disk` folder (a `DatasetDict` folder: `options.split`), a folder of data files, or a hub
            id read with `datasets.load_dataset` (offline: from the local cache only). Relative media paths resolve
            against the data file's folder (the folder itself for folders, the working directory for hub ids).
        options: split, hub config, column renames, layout and media limits; None: `DatasetOptions()`.
        on_bad_row: "raise" raises `RowError` on the first bad row; "collect" leaves bad rows out and reports them.
        kind: "preference" (training rows: answers may be TRL assistant messages), "source" (`napo pairs` rows:
            `chosen` must be a string, negatives optional) or "rows" (any rows with a prompt, e.g. an eval set: a
            dataset that fits no layout is kept as it is).

    Returns:
        `(dataset, bad_rows)`. `dataset` holds canonical rows (DESIGN.md, `napo.formats`): every column the layout
        does not consume kept, `images` (list of RGB images, `Image` feature) and/or `audios` (list of 1-D float32
        arrays, mono, 16 kHz) plus `sampling_rate` (16000) when the source has media; rows without media get empty
        lists. `bad_rows` is `[{"row": i, "field": ..., "reason": ...}]` with `i` the 0-based row index in the source
        (for JSONL, the index among its non-blank lines), always empty with on_bad_row="raise".

    Raises:
        FileNotFoundError: `path` is neither a local file or folder nor a hub id.
        ValueError: a job-level problem (unknown or ambiguous layout, missing split, unreadable file), naming the file.
        RowError: with on_bad_row="raise", the first bad row.
    """
    options = options or DatasetOptions()
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row={on_bad_row!r}: expected one of {ON_BAD_ROW}")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    rows, columns, base_dir, source_features = _load_rows(path, options)
    mapping = parse_columns(options.columns)
    missing = [name for name in mapping if name not in columns]
    if missing:
        raise ValueError(
            f"{path}: --columns names {missing}, which the data does not have (columns: {sorted(columns)})"
        )
    clashes = [target for target in mapping.values() if target in columns and target not in mapping]
    if clashes:
        raise ValueError(f"{path}: --columns renames onto {clashes}, which the data already has: rename those too")
    columns = [mapping.get(name, name) for name in columns]
    try:
        layout = detect_layout(columns, options.layout) if columns else None  # no row parsed: each one is a reject
    except ValueError as error:
        if kind != "rows" or options.layout != "auto":
            raise ValueError(f"{path}: {error}") from None
        layout = None  # an eval set (prompt, answer, ...): kept as it is
    decoded, bad_rows = [], []
    for index, row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            decoded.append(
                _canonical_row(index, {mapping.get(k, k): v for k, v in row.items()}, layout, kind, base_dir, options)
            )
        except RowError as error:
            if on_bad_row == "raise":
                raise
            bad_rows.append({"row": error.row, "field": error.field, "reason": error.problem})
    _check_column_types(decoded, bad_rows, on_bad_row)
    dataset = _to_dataset(path, decoded, source_features)
    logger.info(
        f"{path}: {len(dataset)} rows read as {layout.name if layout else 'plain rows'}"
        f"{f', {len(bad_rows)} rejected' if bad_rows else ''}"
    )
    return dataset, bad_rows


def prepare_preference_dataset(dataset: datasets.Dataset) -> datasets.Dataset:
    """A TRL dataset as napo's trainer takes it: without a `prompt` column, the shared prefix of `chosen` and the
    rejected answers becomes the prompt (TRL's implicit prompt); every other dataset is returned as it is."""
    columns = dataset.column_names or list(next(iter(dataset)))  # an IterableDataset may not know its columns
    if "prompt" in columns or "chosen" not in columns:
        return dataset
    answers = tuple(c for c in ("chosen", *REJECTED_COLUMNS) if c in columns)
    described = {"desc": "Extracting the implicit prompts"} if isinstance(dataset, datasets.Dataset) else {}
    return dataset.map(split_implicit_prompt, fn_kwargs={"answer_columns": answers}, **described)


def validate_preference_dataset(dataset: datasets.Dataset, *, require_rejected: bool = True) -> list[str]:
    """Check a preference dataset before training; return the rejected columns present, in REJECTED_COLUMNS order.

    Checks: a `prompt` and a `chosen` column; (when `require_rejected`) at least one of REJECTED_COLUMNS;
    in every row a non-empty prompt, a `chosen` that is a non-empty string or TRL assistant messages, and rejected
    values of the same kinds or None (None = that kind of negative is missing for this row), with at least one
    negative.

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
            raise RowError(
                index,
                "/".join(rejected),
                "every negative is None: give the row at least one rejected answer or drop it",
            )
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


def check_answer(
    row: int | str, field: str, value: Any, *, allow_none: bool = False, allow_messages: bool = True
) -> None:
    """Raise `RowError` unless `value` is a non-empty string, a non-empty list of assistant messages (TRL's
    conversational answers, when `allow_messages`), or None when `allow_none`."""
    if value is None and allow_none:
        return
    if allow_messages and isinstance(value, list) and value:
        for message in value:
            if (
                not isinstance(message, dict)
                or message.get("role") != "assistant"
                or (not message.get("content") and not message.get("tool_calls"))
            ):
                raise RowError(row, field, f"has message {message!r}: expected assistant turns with content")
        return
    if not isinstance(value, str) or not value.strip():
        allowed = "a non-empty string" + (" or assistant messages" if allow_messages else "")
        allowed += " or None (negative missing)" if allow_none else ""
        raise RowError(row, field, f"is {_describe(value)}: expected {allowed}")


def _describe(value: Any) -> str:
    if value is None:
        return "missing (None)"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else repr(value)
    return f"a {type(value).__name__}"


# ------------------------------------------------------------------------------------------- reading files
def _load_rows(path: str, options: DatasetOptions) -> tuple[Iterator, list[str], str, datasets.Features | None]:
    """(rows as (index, row or RowError), column names, folder media paths resolve against, Arrow features)."""
    single = path.endswith((".jsonl", ".json", ".parquet")) or os.path.exists(os.path.join(path, "state.json"))
    if os.path.exists(path) and single and (options.dataset_split or options.dataset_config):
        raise ValueError(
            f"{path} holds one table: --dataset-split and --dataset-config apply to DatasetDict folders and hub "
            f"datasets only"
        )
    if not os.path.exists(path):
        if not _HUB_ID.match(path):
            raise FileNotFoundError(
                f"{path} does not exist: pass a .jsonl/.json file, a .parquet file/folder, a save_to_disk folder "
                f"or a Hugging Face dataset id"
            )
        return _arrow(_load_hub(path, options), os.getcwd())
    if path.endswith((".jsonl", ".json")):
        rows = list(_json_rows(path))
        columns = list(dict.fromkeys(k for _, row in rows if isinstance(row, dict) for k in row))
        return iter(rows), columns, os.path.dirname(os.path.abspath(path)), None
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_dict.json")):
        if options.dataset_config:
            raise ValueError(f"{path} is a DatasetDict folder: --dataset-config applies to hub datasets only")
        splits = datasets.load_from_disk(path)
        if options.split not in splits:
            raise ValueError(f"{path} has the splits {list(splits)}, not {options.split!r}: pass --dataset-split")
        return _arrow(_undecoded_media(splits[options.split]), os.path.abspath(path))
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json")):
        return _arrow(_undecoded_media(datasets.load_from_disk(path)), os.path.abspath(path))
    if path.endswith(".parquet"):
        source = datasets.Dataset.from_parquet(path)
        return _arrow(_undecoded_media(source), os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(path):
        shards = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".parquet"))
        if shards:
            return _arrow(_undecoded_media(datasets.Dataset.from_parquet(shards)), os.path.abspath(path))
        return _arrow(_load_hub(path, options), os.path.abspath(path))  # a hub-style folder of data files
    raise ValueError(
        f"{path}: expected a save_to_disk folder, a .parquet file/folder, a .jsonl/.json file or a hub dataset id"
    )


def _arrow(source: datasets.Dataset, base_dir: str) -> tuple[Iterator, list[str], str, datasets.Features]:
    return enumerate(source), list(source.column_names), base_dir, source.features


def _load_hub(path: str, options: DatasetOptions) -> datasets.Dataset:
    """`datasets.load_dataset(path, options.dataset_config, split=options.split)` with media undecoded."""
    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )
    try:
        source = datasets.load_dataset(path, options.dataset_config, split=options.split)
    except (ValueError, OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        hint = (
            " Offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set), only datasets already in the local cache load: "
            "load it once online, or pass a local file."
            if offline
            else ""
        )
        raise ValueError(
            f"{path} is not a local file or folder, and datasets.load_dataset({path!r}, "
            f"{options.dataset_config!r}, split={options.split!r}) failed: {error}.{hint}"
        ) from None
    if isinstance(source, datasets.IterableDataset):
        raise ValueError(f"{path}: a streamed dataset cannot be read here; save it with save_to_disk first")
    return _undecoded_media(source)


def _undecoded_media(source: datasets.Dataset) -> datasets.Dataset:
    """Media columns left undecoded: decoding ourselves (PIL, librosa) gives one error path per row, every format."""
    undecoded = datasets.Features({name: _undecoded(feature) for name, feature in source.features.items()})
    return source.cast(undecoded) if undecoded != source.features else source


def _undecoded(feature: Any) -> Any:
    if isinstance(feature, (datasets.Image, datasets.Audio)):
        return type(feature)(decode=False)
    if isinstance(feature, (datasets.List, datasets.Sequence)):
        return type(feature)(_undecoded(feature.feature))
    return feature


def _json_rows(path: str) -> Iterator[tuple[int, dict | RowError]]:
    """(row index, row) per object of a JSON array, or per non-blank line of JSON lines; an entry that is not a JSON
    object yields a RowError in its place."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            with open(path, "rb") as handle:
                entries = json.load(handle)
        except ValueError as error:
            raise ValueError(f"{path} starts like a JSON array but is not valid JSON: {error}") from None
        for index, entry in enumerate(entries):
            yield (
                index,
                entry
                if isinstance(entry, dict)
                else RowError(
                    index, "<json>", f"entry {index} of {path} is a {type(entry).__name__}: expected a JSON object"
                ),
            )
        return
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


# ------------------------------------------------------------------------------------------- one row
def _canonical_row(
    index: int, row: dict, layout: Layout | None, kind: str, base_dir: str, options: DatasetOptions
) -> dict:
    """One source row -> napo's canonical row with decoded media, checked; raises `RowError` naming the field."""
    if layout is not None:
        try:
            row = layout.convert(row, kind)
        except LayoutError as error:
            raise RowError(index, error.field, error.problem) from None
        except (KeyError, TypeError, AttributeError, IndexError) as error:  # a value of an unexpected shape
            raise RowError(index, "<layout>", f"does not fit the {layout.name} layout: {error!r}") from None
    row = _decode_row(index, row, base_dir, options)
    if "prompt" in row or kind != "rows":
        check_prompt(index, row.get("prompt"))
    for name in ("chosen", *REJECTED_COLUMNS):
        if name in row or (name == "chosen" and kind != "rows"):
            messages_ok = kind == "preference" or name != "chosen"
            check_answer(index, name, row.get(name), allow_none=name != "chosen", allow_messages=messages_ok)
    _check_media(index, row)
    return row


def _check_media(index: int, row: dict) -> None:
    """Raise `RowError` for a row with both images and audio, or whose prompt has another number of placeholders
    (typed parts, or `<image>`/`<audio>` tags in strings) than it has images / audio clips (0 placeholders: TRL puts
    one per item before the first user text)."""
    counts = {"image": len(row.get("images") or []), "audio": len(row.get("audios") or [])}
    if counts["image"] and counts["audio"]:
        raise RowError(index, "images/audios", "has both images and audio: napo trains one modality per row")
    prompt = row.get("prompt")
    for kind, count in counts.items():
        tag = next(t for t, k in MEDIA_TAGS.items() if k == kind)
        if isinstance(prompt, str):
            placeholders = prompt.count(tag)
        elif isinstance(prompt, list):
            placeholders = sum(
                part.get("type") == kind if isinstance(part, dict) else 0
                for message in prompt
                if isinstance(message.get("content"), list)
                for part in message["content"]
            ) + sum(message["content"].count(tag) for message in prompt if isinstance(message.get("content"), str))
        else:
            placeholders = 0
        if placeholders and placeholders != count:
            raise RowError(
                index,
                "prompt",
                f"has {placeholders} {kind} placeholder(s) for {count} {kind} item(s): "
                f"give one {tag} tag or {{'type': '{kind}'}} part per item, or none",
            )


def _check_column_types(rows: list[dict], bad_rows: list[dict], on_bad_row: str) -> None:
    """Reject (in place) rows whose value in a non-media column has another type than the column's first value:
    Arrow would refuse the whole dataset without naming the row. 1 and 1.5 share a column; None fits any column;
    an answer column may mix strings and messages (strings are then turned into assistant messages), and message
    contents may mix strings and typed parts (strings then become one text part)."""
    column_types: dict[str, type] = {}
    kept = []
    for row in rows:
        try:
            for name, value in row.items():
                if value is None or name in ("images", "audios", "sampling_rate", "_row"):
                    continue
                kind = float if type(value) is int else type(value)
                if name in ("chosen", *REJECTED_COLUMNS):
                    continue
                expected = column_types.setdefault(name, kind)
                if kind is not expected:
                    problem = f"is {_describe(value)} where earlier rows have a {expected.__name__}"
                    raise RowError(row["_row"], name, f"{problem}: use one type per column")
            kept.append(row)
        except RowError as error:
            if on_bad_row == "raise":
                raise
            bad_rows.append({"row": error.row, "field": error.field, "reason": error.problem})
    rows[:] = kept
    # Arrow holds one type per column: once some message content is a list of typed parts, string contents become
    # one text part (chat templates render both alike).
    prompts = [row["prompt"] for row in rows if isinstance(row.get("prompt"), list)]
    if any(isinstance(m.get("content"), list) for prompt in prompts for m in prompt):
        for prompt in prompts:
            for k, message in enumerate(prompt):
                if isinstance(message.get("content"), str):
                    prompt[k] = {**message, "content": [{"type": "text", "text": message["content"]}]}
    for name in ("chosen", *REJECTED_COLUMNS):
        values = [row.get(name) for row in rows]
        if any(isinstance(v, list) for v in values) and any(isinstance(v, str) for v in values):
            for row in rows:
                if isinstance(row.get(name), str):
                    row[name] = [{"role": "assistant", "content": row[name]}]


def _decode_row(index: int, row: dict, base_dir: str, options: DatasetOptions) -> dict:
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
        raise RowError(index, field, f"holds {_describe(path)}: expected a file path or image/audio bytes")
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


_MEDIA_FEATURES = {
    "images": datasets.List(datasets.Image()),
    "audios": datasets.List(datasets.List(datasets.Value("float32"))),
    "sampling_rate": datasets.Value("int32"),
}


def _to_dataset(path: str, rows: list[dict], source_features: datasets.Features | None) -> datasets.Dataset:
    """Build the output with explicit media features; columns the layout passed through keep the source's
    features, the others (prompt, answers, JSON columns) are inferred. Should the rows still not form one Arrow
    table, the error names the file and the first row that breaks it (found by bisecting the prefixes)."""
    sources = [row.pop("_row", k) for k, row in enumerate(rows)]  # the source index of each kept row
    try:
        return _table(rows, source_features)
    except (ValueError, TypeError, KeyError) as error:  # pyarrow's ArrowInvalid / ArrowTypeError subclass these
        good, bad = 0, len(rows)  # _table(rows[:good]) works, _table(rows[:bad]) fails
        while bad - good > 1:
            middle = (good + bad) // 2
            try:
                _table(rows[:middle], source_features)
                good = middle
            except (ValueError, TypeError, KeyError):
                bad = middle
        raise ValueError(
            f"{path}: the rows that passed the checks still cannot form one table; the first row that breaks it is "
            f"row {sources[bad - 1]} ({error}). Give every row of a column the same structure"
        ) from None


def _table(rows: list[dict], source_features: datasets.Features | None) -> datasets.Dataset:
    names = list(dict.fromkeys(name for row in rows for name in row))
    canonical = ("prompt", "chosen", *REJECTED_COLUMNS)
    kept = {
        name: source_features[name]
        for name in names
        if source_features is not None
        and name in source_features
        and name not in canonical
        and name not in _MEDIA_FEATURES
    }
    inferred = [name for name in names if name not in kept and name not in _MEDIA_FEATURES]
    plain = [{name: row.get(name) for name in inferred} for row in rows]
    other = dict(datasets.Dataset.from_list(plain).features) if plain and inferred else {}
    features = datasets.Features({name: _MEDIA_FEATURES.get(name) or kept.get(name) or other[name] for name in names})
    if not rows:
        return datasets.Dataset.from_dict({name: [] for name in names}, features=features)
    empty = {"images": [], "audios": [], "sampling_rate": SAMPLING_RATE}  # a row without media, beside some with
    return datasets.Dataset.from_list([{n: row.get(n, empty.get(n)) for n in names} for row in rows], features=features)
