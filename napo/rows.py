"""Checking canonical preference rows: the `RowError` every reader and collator raises, the value checks of prompts
and answers, and `validate_preference_dataset`, the check of a dataset the trainer is given.

A canonical row (DESIGN.md, `napo.formats`) has a `prompt` (a string or TRL messages), a `chosen` answer and the
negative columns of `napo.negatives.NEGATIVE_COLUMNS` (strings, TRL assistant messages, or None where that kind of
negative is missing). `napo.data.read_dataset` runs these checks on every row it reads.
"""

from __future__ import annotations

from typing import Any

import datasets

from napo.formats import MEDIA_TAGS, split_implicit_prompt
from napo.negatives import NEGATIVE_COLUMNS


class RowError(ValueError):
    """A row that cannot be used: names the row (index, or e.g. "line 7 of a.jsonl"), the field, and the problem."""

    def __init__(self, row: int | str, field: str, problem: str):
        self.row, self.field, self.problem = row, field, problem
        where = f"row {row}" if isinstance(row, int) else str(row)
        super().__init__(f"{where}, field {field!r}: {problem}")


def prepare_preference_dataset(dataset: datasets.Dataset) -> datasets.Dataset:
    """A TRL dataset as napo's trainer takes it: without a `prompt` column, the shared prefix of `chosen` and the
    rejected answers becomes the prompt (TRL's implicit prompt); every other dataset is returned as it is."""
    columns = dataset.column_names or list(next(iter(dataset)))  # an IterableDataset may not know its columns
    if "prompt" in columns or "chosen" not in columns:
        return dataset
    answers = tuple(c for c in ("chosen", *NEGATIVE_COLUMNS) if c in columns)
    described = {"desc": "Extracting the implicit prompts"} if isinstance(dataset, datasets.Dataset) else {}
    return dataset.map(split_implicit_prompt, fn_kwargs={"answer_columns": answers}, **described)


def validate_preference_dataset(dataset: datasets.Dataset, *, require_rejected: bool = True) -> list[str]:
    """Check a preference dataset before training; return the rejected columns present, in NEGATIVE_COLUMNS order.

    Checks: a `prompt` and a `chosen` column; (when `require_rejected`) at least one of NEGATIVE_COLUMNS;
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
    rejected = [name for name in NEGATIVE_COLUMNS if name in columns]
    if require_rejected and not rejected:
        raise ValueError(
            f"the dataset has none of the rejected columns {list(NEGATIVE_COLUMNS)} (columns: {columns}); "
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
        raise RowError(
            row, "prompt", f"is {describe_value(prompt)}: expected a non-empty string or a list of TRL messages"
        )
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
        raise RowError(row, field, f"is {describe_value(value)}: expected {allowed}")


def describe_value(value: Any) -> str:
    """A bad value as an error message names it: "missing (None)", "an empty string", its repr, or its type."""
    if value is None:
        return "missing (None)"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else repr(value)
    return f"a {type(value).__name__}"


def check_media_placeholders(index: int, row: dict) -> None:
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


def check_column_types(rows: list[dict], bad_rows: list[dict], on_bad_row: str) -> None:
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
                if name in ("chosen", *NEGATIVE_COLUMNS):
                    continue
                expected = column_types.setdefault(name, kind)
                if kind is not expected:
                    problem = f"is {describe_value(value)} where earlier rows have a {expected.__name__}"
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
    for name in ("chosen", *NEGATIVE_COLUMNS):
        values = [row.get(name) for row in rows]
        if any(isinstance(v, list) for v in values) and any(isinstance(v, str) for v in values):
            for row in rows:
                if isinstance(row.get(name), str):
                    row[name] = [{"role": "assistant", "content": row[name]}]
