"""Row layouts users already have, and how each becomes napo's canonical row (DESIGN.md, "Preference rows").

One record per layout in `LAYOUTS`: the columns that identify it, a one-line description, a JSON example (shown in
error messages and the README) and `convert(row) -> canonical row`. `napo.data.read_dataset` detects the layout from
the column names (`detect_layout`), converts every row with it and then decodes media and validates, so `napo
pairs`, `napo train`, `napo compare --dataset` and `NaPOTrainer` all read data the same way.

The canonical row: `prompt` (a string, or TRL messages whose `content` is a string or typed parts), the media
fields (`images`/`image`, `audios`/`audio`, `sampling_rate`: still paths or bytes, decoded by `napo.data`),
`chosen`, the rejected columns of `napo.data.REJECTED_COLUMNS` (strings, None where missing; TRL's assistant-message
lists are kept as such when they carry more than one plain-text turn), and every other column unchanged.

Media tags: `<image>` and `<audio>` inside a message's string content become `{"type": "image"}` /
`{"type": "audio"}` parts in place, so the model's chat template writes its own placeholder. In a string prompt
they stay as written and are replaced by the model's placeholder when the prompt is rendered
(`napo.encoding.expand_media_tags`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from napo.negatives import NEGATIVE_COLUMNS

MEDIA_TAGS = {"<image>": "image", "<audio>": "audio"}
_TAG_PATTERN = re.compile("(" + "|".join(map(re.escape, MEDIA_TAGS)) + ")")
# ShareGPT / LLaVA / LLaMA-Factory speaker names -> TRL roles.
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


class LayoutError(ValueError):
    """A row that does not fit its layout; `napo.data` turns it into a quarantined reject naming the row."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"field {field!r}: {problem}")


@dataclass(frozen=True)
class Layout:
    """One row layout. It matches a dataset whose columns hold at least one name of every group in `requires` and
    none of `forbids`; among the layouts that match, those with the most groups win (an RLAIF-V-Bias row is also an
    RLAIF-V row), and a tie is ambiguous."""

    name: str
    description: str
    requires: tuple[tuple[str, ...], ...]
    convert: Callable[[dict, str], dict]  # (row, kind) -> canonical row; kind is "preference" or "source"
    example: dict
    forbids: tuple[str, ...] = ()

    def matches(self, columns: set[str]) -> bool:
        return all(columns & set(group) for group in self.requires) and not columns & set(self.forbids)


# ------------------------------------------------------------------------------------------- shared pieces
def with_media_parts(content: Any) -> Any:
    """A message content with `<image>`/`<audio>` tags of its strings turned into typed parts, in place.

    "<image>\\nWhat is this?" -> [{"type": "image"}, {"type": "text", "text": "What is this?"}] (the newline that
    LLaVA puts after a tag is dropped with it). Content without tags is returned unchanged.
    """
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                converted = with_media_parts(part["text"])
                parts.extend(converted if isinstance(converted, list) else [part])
            else:
                parts.append(part)
        return parts
    if not isinstance(content, str) or not _TAG_PATTERN.search(content):
        return content
    parts = []
    for piece in _TAG_PATTERN.split(content):
        if piece in MEDIA_TAGS:
            parts.append({"type": MEDIA_TAGS[piece]})
        elif piece.strip():
            parts.append({"type": "text", "text": piece.strip("\n")})
    return parts


def messages(turns: Any, field: str) -> list[dict]:
    """TRL messages from OpenAI-style ({"role", "content"}) or ShareGPT-style ({"from", "value"}) turns."""
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)  # some exports store the conversation as a JSON string
        except ValueError:
            raise LayoutError(field, "is a string that is not a JSON list of turns") from None
    if not isinstance(turns, list) or not turns:
        raise LayoutError(field, f"is {_kind(turns)}: expected a non-empty list of turns")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise LayoutError(field, f"has turn {turn!r}: expected {{'role', 'content'}} or {{'from', 'value'}}")
        speaker = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if speaker not in _ROLES or content is None:
            raise LayoutError(field, f"has turn {turn!r}: expected a role among {sorted(_ROLES)} and a content")
        message = {"role": _ROLES[speaker], "content": with_media_parts(content)}
        if turn.get("tool_calls"):
            message["tool_calls"] = turn["tool_calls"]
        out.append(message)
    return out


def answer_text(value: Any, field: str) -> Any:
    """An answer as napo stores it: a string, from a string, a {"from"/"role", "value"/"content"} turn or a one-turn
    assistant message list with plain-text content; any other message list (tool calls, several turns) is kept as
    TRL messages. None stays None (that negative is missing)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        turns = messages(value, field)
        if len(turns) == 1 and "tool_calls" not in turns[0]:
            text = _plain_text(turns[0]["content"])
            if text is not None:
                return text
        return turns
    return value  # left for napo.data's type check, which names the row


def _plain_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text") or "" for p in content)
    return None


def split_last_answer(turns: list[dict], field: str) -> tuple[list[dict], str | list]:
    """(prompt, chosen) of a conversation: everything before the last assistant turn, and that turn's answer."""
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise LayoutError(field, "has no assistant turn after a user turn: nothing to use as the answer")
    return turns[:last], answer_text(turns[last:], field)


def split_implicit_prompt(row: dict, answer_columns: tuple[str, ...]) -> dict:
    """TRL's implicit prompt for several answers: the longest shared prefix of `chosen` and every non-None negative
    (message by message for conversations, character by character for strings, as `trl.extract_prompt`) becomes
    `prompt`, and each answer keeps what follows it."""
    answers = [row[c] for c in answer_columns if row.get(c) is not None]
    length = min(len(a) for a in answers)
    cut = next((i for i in range(length) if any(a[i] != answers[0][i] for a in answers[1:])), length)
    if isinstance(answers[0], str) and cut > 0 and answers[0][cut - 1] == " ":
        cut -= 1  # TRL keeps the space with the answer
    out = {**row, "prompt": answers[0][:cut]}
    for column in answer_columns:
        if row.get(column) is not None:
            out[column] = row[column][cut:]
    return out


def _kind(value: Any) -> str:
    return "missing (None)" if value is None else f"a {type(value).__name__}"


def _keep(row: dict, *drop: str) -> dict:
    return {k: v for k, v in row.items() if k not in drop}


def _user_turn(text: Any, has_image: bool, field: str) -> list[dict]:
    if not isinstance(text, str) or not text.strip():
        what = _kind(text) if not isinstance(text, str) else "an empty string"
        raise LayoutError(field, f"is {what}: expected the question")
    content = with_media_parts(text)
    if has_image and isinstance(content, str):
        content = [{"type": "image"}, {"type": "text", "text": content}]
    return [{"role": "user", "content": content}]


# ------------------------------------------------------------------------------------------- converters
def _trl(row: dict, kind: str) -> dict:
    out = dict(row)
    if isinstance(row.get("prompt"), list):
        out["prompt"] = messages(row["prompt"], "prompt")
    for column in ("chosen", *NEGATIVE_COLUMNS):
        if column in row:
            out[column] = answer_text(row[column], column)
    return out


def _trl_implicit(row: dict, kind: str) -> dict:
    columns = tuple(c for c in ("chosen", *NEGATIVE_COLUMNS) if c in row)
    if any(isinstance(row[c], list) for c in columns):
        row = {**row, **{c: messages(row[c], c) for c in columns if row[c] is not None}}
    out = split_implicit_prompt(row, columns)
    if not out["prompt"]:
        raise LayoutError("chosen", "shares no prefix with the rejected answers: there is no implicit prompt")
    return _trl(out, kind)


def _rlaif_v(row: dict, kind: str) -> dict:
    image = row.get("image", row.get("images"))
    prompt = _user_turn(row["question"], image is not None, "question")
    answers = {c: answer_text(row[c], c) for c in ("chosen", "rejected") if c in row}
    return {"prompt": prompt, **_keep(row, "question", "prompt"), **answers}


def _napo_rlaif_v_bias(row: dict, kind: str) -> dict:
    out = _rlaif_v(row, kind)
    language = "question_only" if "question_only" in row else "question_only_None"
    out["rejected_vision_bias"] = answer_text(row.get("image_only"), "image_only")
    out["rejected_language_bias"] = answer_text(row.get(language), language)
    return _keep(out, "image_only", "question_only")


def _conversation(row: dict, kind: str) -> dict:
    field = "conversations" if "conversations" in row else "messages"
    turns = messages(row[field], field)
    if "chosen" in row and "rejected" in row:  # LLaMA-Factory DPO: the prompt turns, then two answer turns
        prompt, chosen = turns, answer_text(row["chosen"], "chosen")
        extra = {"rejected": answer_text(row["rejected"], "rejected")}
    elif "rejected_response" in row:  # ms-swift: the last assistant turn is chosen
        prompt, chosen = split_last_answer(turns, field)
        extra = {"rejected": answer_text(row["rejected_response"], "rejected_response")}
    else:
        prompt, chosen = split_last_answer(turns, field)
        extra = {}
    if isinstance(row.get("system"), str) and row["system"].strip() and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": row["system"]}, *prompt]
    return {
        "prompt": prompt,
        "chosen": chosen,
        **extra,
        **_keep(row, field, "chosen", "rejected", "rejected_response", "system"),
    }


def _alpaca(row: dict, kind: str) -> dict:
    instruction, extra_input = row["instruction"], row.get("input")
    text = f"{instruction}\n{extra_input}" if isinstance(extra_input, str) and extra_input.strip() else instruction
    prompt = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        prompt.append({"role": "system", "content": row["system"]})
    for pair in row.get("history") or []:  # [[user, assistant], ...]
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise LayoutError("history", f"has {pair!r}: expected [user turn, assistant turn] pairs")
        prompt += [{"role": "user", "content": with_media_parts(pair[0])}, {"role": "assistant", "content": pair[1]}]
    prompt += _user_turn(text, False, "instruction")
    answers = {"chosen": answer_text(row["output"] if "output" in row else row["chosen"], "output")}
    if "rejected" in row:
        answers["rejected"] = answer_text(row["rejected"], "rejected")
    return {
        "prompt": prompt,
        **answers,
        **_keep(row, "instruction", "input", "output", "chosen", "rejected", "system", "history"),
    }


_RLAIF_EXAMPLE = {
    "image": "img/0.jpg",
    "question": "What is in the image?",
    "chosen": "A cat on a sofa.",
    "rejected": "A dog.",
}
LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "trl",
        "TRL standard or conversational: prompt, chosen (+ rejected*), images/image optional",
        (("prompt",), ("chosen",)),
        _trl,
        {
            "prompt": [{"role": "user", "content": "<image>What colour is the bear?"}],
            "images": ["img/0.png"],
            "chosen": [{"role": "assistant", "content": "White."}],
            "rejected": [{"role": "assistant", "content": "Brown."}],
        },
    ),
    Layout(
        "trl-implicit-prompt",
        "TRL implicit prompt: chosen and rejected share the prompt as their prefix",
        (("chosen",), ("rejected",)),
        _trl_implicit,
        {
            "chosen": [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "Green."}],
        },
        forbids=("prompt", "question", "instruction", "conversations", "messages"),
    ),
    Layout(
        "rlaif-v",
        "RLAIF-V: image (bytes or path), question, chosen (+ rejected); other columns kept",
        (("question",), ("chosen",)),
        _rlaif_v,
        _RLAIF_EXAMPLE,
    ),
    Layout(
        "napo-rlaif-v-bias",
        "NaPO's RLAIF-V-Bias: RLAIF-V + image_only (-> rejected_vision_bias) + question_only "
        "(-> rejected_language_bias)",
        (("question",), ("chosen",), ("image_only", "question_only", "question_only_None")),
        _napo_rlaif_v_bias,
        {**_RLAIF_EXAMPLE, "image_only": "A cat on a sofa next to a lamp.", "question_only": "A dog."},
    ),
    Layout(
        "llava",
        "LLaVA instruct: image, conversations of {from: human/gpt, value} with <image> tags",
        (("conversations",), ("image",)),
        _conversation,
        {
            "image": "img/0.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}],
        },
    ),
    Layout(
        "sharegpt",
        "ShareGPT / LLaMA-Factory SFT: conversations or messages (+ images); answer = last assistant turn",
        (("conversations", "messages"),),
        _conversation,
        {
            "messages": [
                {"role": "user", "content": "<image>What is this?"},
                {"role": "assistant", "content": "A cat."},
            ],
            "images": ["img/0.jpg"],
        },
    ),
    Layout(
        "sharegpt-dpo",
        "LLaMA-Factory ShareGPT DPO: conversations/messages, chosen and rejected as one turn each",
        (("conversations", "messages"), ("chosen",), ("rejected",)),
        _conversation,
        {
            "conversations": [{"from": "human", "value": "<image>What is this?"}],
            "images": ["img/0.jpg"],
            "chosen": {"from": "gpt", "value": "A cat."},
            "rejected": {"from": "gpt", "value": "A dog."},
        },
    ),
    Layout(
        "ms-swift",
        "ms-swift DPO: messages (last assistant turn = chosen) + rejected_response (+ images)",
        (("messages",), ("rejected_response",)),
        _conversation,
        {
            "messages": [
                {"role": "user", "content": "<image>What is this?"},
                {"role": "assistant", "content": "A cat."},
            ],
            "rejected_response": "A dog.",
            "images": ["img/0.jpg"],
        },
    ),
    Layout(
        "alpaca",
        "Alpaca: instruction, input, output (DPO: chosen, rejected); system and history optional",
        (("instruction",), ("output", "chosen")),
        _alpaca,
        {"instruction": "Name the colour of the sky.", "input": "", "output": "Blue."},
    ),
)
LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)


def detect_layout(columns: list[str] | set[str], requested: str = "auto") -> Layout:
    """The layout of a dataset with these columns: `requested` by name, or the most specific match ("auto").

    Raises:
        ValueError: no layout or several equally specific ones match (the message lists the columns found, the
            layouts supported with their identifying columns, and `--columns` / `--layout`).
    """
    found = set(columns)
    if requested != "auto":
        by_name = {layout.name: layout for layout in LAYOUTS}
        if requested not in by_name:
            raise ValueError(f"layout {requested!r}: expected 'auto' or one of {list(by_name)}")
        layout = by_name[requested]
        if not all(found & set(group) for group in layout.requires):
            raise ValueError(
                f"layout {requested!r} needs the columns {_describe_requires(layout)}; found {sorted(found)}"
            )
        return layout
    matching = [layout for layout in LAYOUTS if layout.matches(found)]
    best = max((len(layout.requires) for layout in matching), default=0)
    winners = [layout for layout in matching if len(layout.requires) == best]
    if len(winners) == 1:
        return winners[0]
    what = f"is ambiguous: it fits {[w.name for w in winners]}" if winners else "has no layout napo knows"
    raise ValueError(
        f"the data {what} (columns found: {sorted(found)}). Layouts supported: "
        + "; ".join(f"{layout.name} ({_describe_requires(layout)})" for layout in LAYOUTS)
        + ". Pick one with --layout NAME, or map your columns with --columns yours=prompt,other=chosen"
    )


def _describe_requires(layout: Layout) -> str:
    return " + ".join("/".join(group) for group in layout.requires)


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str]:
    """ "question=prompt,answer=chosen" (or a dict) -> {"question": "prompt", "answer": "chosen"}."""
    if spec is None or isinstance(spec, dict):
        return dict(spec or {})
    mapping = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        source, sep, target = (s.strip() for s in item.partition("="))
        if not sep or not source or not target:
            raise ValueError(f"--columns {spec!r}: expected YOURS=NAPO pairs separated by commas, e.g. question=prompt")
        if source in mapping or target in mapping.values():
            raise ValueError(f"--columns {spec!r}: {source!r} or {target!r} is named twice")
        mapping[source] = target
    return mapping
