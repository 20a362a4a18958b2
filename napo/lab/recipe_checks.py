"""Checks that the lab recipes (`scenes.py`'s colours, `sounds.py`'s notes) share: every failure is a ValueError
"recipe field FIELD: what was expected"."""

from __future__ import annotations

import string
from typing import Any

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def need(ok: bool, field: str, what: str) -> None:
    """Raise ValueError("recipe field FIELD: WHAT") unless `ok`."""
    if not ok:
        raise ValueError(f"recipe field {field}: {what}")


def check_sections(rec: dict[str, Any], sections: tuple[str, ...], example: str) -> None:
    """Every top-level section is present; `example` names the packaged recipe that has them all."""
    for key in sections:
        need(key in rec, key, f"missing; see {example} for every field")


def check_probability(section: dict[str, Any], key: str, field: str) -> None:
    """`section[key]` is a probability in [0, 1] (missing counts as bad)."""
    need(0.0 <= section.get(key, -1) <= 1.0, field, "expected a probability in [0, 1]")


def check_count_weights(counts: dict[int, float] | None, field: str) -> None:
    """{count: weight} with counts in 1..9 (a `NUMBER_WORDS` word each) and weights >= 0 summing above 0."""
    counts = counts or {}
    need(
        len(counts) > 0 and all(isinstance(c, int) and 1 <= c < len(NUMBER_WORDS) for c in counts),
        field,
        f"expected {{count: weight}} with counts in 1..{len(NUMBER_WORDS) - 1}",
    )
    need(
        all(w >= 0 for w in counts.values()) and sum(counts.values()) > 0,
        field,
        "weights must be >= 0 with a positive sum",
    )


def check_train(train: dict[str, Any], kinds: tuple[str, ...]) -> None:
    """`train.kinds` weighs question kinds among `kinds`; `train.existence_present` is a probability."""
    weights = train.get("kinds") or {}
    need(
        set(weights) <= set(kinds) and sum(weights.values()) > 0,
        "train.kinds",
        f"expected weights for kinds among {kinds}",
    )
    check_probability(train, "existence_present", "train.existence_present")


def check_questions(questions: dict[str, Any], placeholders: dict[str, set[str]]) -> None:
    """A non-empty list of templates for every kind of `placeholders`, each using only that kind's placeholders."""
    for kind, allowed in placeholders.items():
        templates = questions.get(kind)
        need(
            isinstance(templates, list) and len(templates) > 0,
            f"questions.{kind}",
            "expected a non-empty list of templates",
        )
        for t in templates:
            used = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
            need(
                used <= allowed,
                f"questions.{kind}",
                f"template {t!r} uses {sorted(used - allowed)}; allowed: {sorted(allowed)}",
            )


def check_splits_and_seed(rec: dict[str, Any], splits: tuple[str, ...]) -> None:
    """`splits` sizes name known splits; `seed` is an int."""
    need(all(s in splits for s in rec["splits"]), "splits", f"expected sizes for splits among {splits}")
    need(isinstance(rec["seed"], int), "seed", "expected an int")
