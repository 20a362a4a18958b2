"""Reading source and preference datasets: files, folders and hub ids, their layouts, one checked canonical row each.

`read_dataset` reads the data users have (JSONL, `.json` arrays, parquet files or folders, `save_to_disk` folders
including `DatasetDict`, Hugging Face hub ids through `datasets.load_dataset`), detects its row layout
(`napo.formats.LAYOUTS`: TRL, RLAIF-V, NaPO's RLAIF-V-Bias, LLaVA, ShareGPT / LLaMA-Factory, ms-swift, Alpaca),
converts every row to napo's canonical row and checks it, so one bad row is a reject naming its row, field and
reason, never a crash of the job. Media columns follow DESIGN.md's preference rows: `images` is a list of RGB images
(an `Image` feature, decoded to PIL on access) and `audios` a list of 1-D float32 arrays at 16 kHz with an int
`sampling_rate` column.

The jobs live one per module: `napo.rows` checks rows (`RowError`, `validate_preference_dataset`, which checks the
answer columns the trainer needs), `napo.media` decodes images and audio; this module reads sources and builds the
table. Their public names are importable from here too, as they were before the split.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets

from napo.formats import LAYOUT_NAMES, Layout, LayoutError, detect_layout, parse_columns
from napo.media import SAMPLING_RATE, decode_row
from napo.negatives import NEGATIVE_COLUMNS
from napo.rows import (
    RowError,
    check_answer,
    check_column_types,
    check_media_placeholders,
    check_prompt,
    prepare_preference_dataset,
    validate_preference_dataset,
)

__all__ = [
    "REJECTED_COLUMNS",
    "SAMPLING_RATE",
    "DatasetOptions",
    "RowError",
    "check_answer",
    "check_prompt",
    "prepare_preference_dataset",
    "read_dataset",
    "validate_preference_dataset",
]

logger = logging.getLogger(__name__)

REJECTED_COLUMNS = NEGATIVE_COLUMNS  # the negative columns (`napo.negatives`), under the name this module used
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
    check_column_types(decoded, bad_rows, on_bad_row)
    dataset = _to_dataset(path, decoded, source_features)
    logger.info(
        f"{path}: {len(dataset)} rows read as {layout.name if layout else 'plain rows'}"
        f"{f', {len(bad_rows)} rejected' if bad_rows else ''}"
    )
    return dataset, bad_rows


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
    row = decode_row(index, row, base_dir, options)
    if "prompt" in row or kind != "rows":
        check_prompt(index, row.get("prompt"))
    for name in ("chosen", *REJECTED_COLUMNS):
        if name in row or (name == "chosen" and kind != "rows"):
            messages_ok = kind == "preference" or name != "chosen"
            check_answer(index, name, row.get(name), allow_none=name != "chosen", allow_messages=messages_ok)
    check_media_placeholders(index, row)
    return row


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
