"""Text degradations of the prompt's question.

The *question* is the whole prompt when it is a str, and the text of the last ``user`` message
when it is conversational; system messages, earlier turns and placeholders (``{"type": "image"}``)
are kept. Ops have the signature ``op(sample, rng, *, args) -> sample`` and receive a sample
already validated and copied by `perturb.apply`. No prompt, or no user message -> unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from perturb._sample import MEDIA_TAGS, Prompt

_WHITESPACE = re.compile(r"(\s+)")


def _last_user(prompt: list[dict]) -> int | None:
    users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
    return users[-1] if users else None


def _with_question(sample: dict, rewrite: Callable[[list[str]], list[str]]) -> dict:
    """Replace the question's text segments by ``rewrite(segments)`` (same count).

    A segment is the str prompt, a str message content, or one text part's ``text``.
    """
    prompt: Prompt | None = sample.get("prompt")
    if prompt is None:
        return sample
    if isinstance(prompt, str):
        return {**sample, "prompt": rewrite([prompt])[0]}
    index = _last_user(prompt)
    if index is None:
        return sample
    message = prompt[index]
    if isinstance(message["content"], str):
        content: str | list[dict] = rewrite([message["content"]])[0]
    else:
        parts = message["content"]
        texts = iter(rewrite([p["text"] for p in parts if p["type"] == "text"]))
        content = [{**p, "text": next(texts)} if p["type"] == "text" else p for p in parts]
    return {**sample, "prompt": [*prompt[:index], {**message, "content": content}, *prompt[index + 1 :]]}


def _with_words(sample: dict, rewrite: Callable[[list[str]], list[str]]) -> dict:
    """Rewrite the question's words (maximal non-whitespace runs) jointly across its segments.

    `rewrite` maps the list of words to a list of the same length; whitespace (newlines included)
    stays where it was.
    """

    def segments(texts: list[str]) -> list[str]:
        pieces = [_WHITESPACE.split(t) for t in texts]  # words at even indices, whitespace at odd
        slots = [(i, j) for i, p in enumerate(pieces) for j in range(0, len(p), 2) if p[j]]
        for (i, j), word in zip(slots, rewrite([pieces[i][j] for i, j in slots]), strict=True):
            pieces[i][j] = word
        return ["".join(p) for p in pieces]

    return _with_question(sample, segments)


def drop_question(sample: dict, rng: np.random.Generator, *, prompt: str = "Describe the image.") -> dict:
    """Replace the question by a generic instruction `prompt` (the vision-bias negative).

    The model then answers from the image alone. A str prompt (or str message content) becomes its
    ``<image>`` / ``<audio>`` tags, each on its own line, then `prompt`; in a conversational prompt
    the last user message's text parts are replaced by one text part holding `prompt`, placed where
    the first text part was (appended if there was none), and its image/audio placeholders stay.
    Use e.g. ``prompt="Describe the audio."`` for audio models.
    """
    original = sample.get("prompt")
    if isinstance(original, list) and (index := _last_user(original)) is not None:
        message = original[index]
        if isinstance(message["content"], list):
            parts = message["content"]
            first = next((i for i, p in enumerate(parts) if p["type"] == "text"), len(parts))
            kept = [p for p in parts if p["type"] != "text"]
            content = [*kept[:first], {"type": "text", "text": prompt}, *kept[first:]]
            return {**sample, "prompt": [*original[:index], {**message, "content": content}, *original[index + 1 :]]}
    return _with_question(sample, lambda texts: ["".join(t + "\n" for t in _TAGS.findall(texts[0])) + prompt])


_TAGS = re.compile("|".join(re.escape(tag) for tag in MEDIA_TAGS.values()))


def mask_tokens(sample: dict, rng: np.random.Generator, *, ratio: float = 0.3, mask: str = "<unk>") -> dict:
    """Replace ``round(ratio * n_words)`` randomly chosen words of the question by `mask`.

    Words are whitespace-separated runs (punctuation stays attached). `ratio` in [0, 1]: 0.15 is
    BERT-like, 0.3 removes most of the key nouns of a short question, 1 masks everything.
    """

    def masked(words: list[str]) -> list[str]:
        chosen = set(rng.choice(len(words), size=round(ratio * len(words)), replace=False).tolist())
        return [mask if i in chosen else w for i, w in enumerate(words)]

    return _with_words(sample, masked)


def shuffle_words(sample: dict, rng: np.random.Generator) -> dict:
    """Randomly permute the question's words (bag of words kept, syntax destroyed)."""
    return _with_words(sample, lambda words: [words[i] for i in rng.permutation(len(words))])
