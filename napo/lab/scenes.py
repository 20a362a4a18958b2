"""Synthetic scenes and questions of the bias lab, with a language prior under our control.

A recipe (YAML, see `recipes/colors.yaml`) names colours, objects (each with a fixed shape, a
frequency, a co-occurrence group and optionally a typical colour with a prior strength), how hard
the images are to read, and the mix of question kinds. `make_split` draws rows from it:

    {"prompt": "what colour is the banana?", "images": [PIL.Image 64x64 RGB], "answer": "yellow",
     "kind": "attribute", "prior_answer": "yellow", "objects": ["banana", "cat"], "target": "banana",
     "image_noise": 0.2, "split": "train"}

The train split shows each object in its typical colour at the recipe's rate (0.97 in the default recipe) and asks
existence questions mostly about present objects, so a model can score well from the question
alone. Evaluation splits separate the two sources: `counterfactual` (atypical colour: the prior is
wrong), `prior_consistent` (typical colour), `no_prior` (colour of an object without a typical colour: only
the image can answer), POPE-style existence probes and captions for CHAIR. `image.noise` may list several
pixel-noise levels: each row draws one (`image_noise`), so every metric can be read per level of difficulty.

Every row is a pure function of (recipe, split, seed, row index): the same call returns the same
pixels, and the first k rows do not depend on n.
"""

from __future__ import annotations

import copy
import re
import string
import zlib
from importlib import resources
from typing import Any

import numpy as np
import yaml

from napo.lab.drawing import place, render
from napo.lab.recipe_checks import (
    NUMBER_WORDS,
    check_count_weights,
    check_probability,
    check_questions,
    check_sections,
    check_splits_and_seed,
    check_train,
    need,
)

SPLITS = (
    "train",
    "pairs",
    "counterfactual",
    "prior_consistent",
    "no_prior",
    "pope_random",
    "pope_popular",
    "pope_adversarial",
    "captions",
)
KINDS = ("attribute", "existence", "count", "spatial", "caption")
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "frame", "cross", "x", "bar", "column", "half_disc")
_EXAMPLE = "napo/lab/recipes/colors.yaml"
RELATIONS = ("left of", "right of")
# Placeholders a question template of each kind may use.
_PLACEHOLDERS = {
    "attribute": {"object", "objects", "a"},
    "existence": {"object", "objects", "a"},
    "count": {"object", "objects", "a"},
    "spatial": {"object", "objects", "a", "other", "relation"},
    "caption": set(),
}
_WORD = re.compile(r"\w+|[^\w\s]+")


def words(text: str) -> list[str]:
    """Split text into the words `vocabulary` lists: runs of letters/digits, and runs of punctuation.

    This is the split of the `tokenizers` Whitespace pre-tokenizer: "is there a cat?" ->
    ["is", "there", "a", "cat", "?"].
    """
    return _WORD.findall(text)


def load_recipe(path: str | None = None) -> dict[str, Any]:
    """Read and check a lab recipe; None reads the packaged default (`napo/lab/recipes/colors.yaml`).

    Returns the recipe as a plain dict, with defaults filled in (each object's `plural`, `typical`
    None and `prior` 0 for objects without a typical colour). Raises ValueError naming the field.
    """
    if path is None:
        text = resources.files("napo.lab").joinpath("recipes/colors.yaml").read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    return _checked(yaml.safe_load(text))


def vocabulary(recipe: dict[str, Any]) -> list[str]:
    """Every word (in the sense of `words`) that any prompt or answer of any split can contain, sorted.

    Meant to build a word-level tokenizer; it covers templates, colours, object names and plurals,
    articles, "and", "yes"/"no", the count words of `scene.count_weights` and the relations.
    """
    rec = _checked(recipe)
    vocab = {"a", "an", "and", "yes", "no"}
    for templates in rec["questions"].values():
        for template in templates:
            vocab.update(words(string.Formatter().vformat(template, (), _Blank())))
    vocab.update(rec["colours"])
    for name, obj in rec["objects"].items():
        vocab.update([name, obj["plural"]])
    vocab.update(NUMBER_WORDS[c] for c in rec["scene"]["count_weights"])
    for relation in RELATIONS:
        vocab.update(words(relation))
    return sorted(vocab)


def make_split(recipe: dict[str, Any], split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Draw n rows of a split (one of SPLITS); see the module docstring for a row's fields.

    - train, pairs: kinds mixed as `train.kinds`; colours follow the priors; existence questions
      ask about a present object with probability `train.existence_present`.
    - counterfactual / prior_consistent: attribute questions about an object with a typical colour,
      drawn in another colour / in the typical colour.
    - no_prior: attribute questions about an object without a typical colour (any colour, uniformly).
    - pope_random / pope_popular / pope_adversarial: existence questions, present with probability
      `pope.present`; an absent object is drawn uniformly among all absent objects / among the
      `pope.popular_k` most frequent absent objects / among absent members of the groups present.
    - captions: "describe the image." -> "a yellow banana and a red cat" (objects left to right).

    `prior_answer` is what the language prior predicts: the typical colour (None for objects
    without one), the frequent existence answer of the train split, the most frequent count;
    None for spatial questions and captions. `objects` lists the object kinds present, left to right;
    `target` is the object the question asks about (None for captions); `image_noise` the row's pixel-noise std.
    """
    if split not in SPLITS:
        raise ValueError(f"make_split: unknown split {split!r}; expected one of {SPLITS}")
    if n < 0 or seed < 0:
        raise ValueError(f"make_split: n and seed must be non-negative, got n={n}, seed={seed}")
    rec = _checked(recipe)
    if split == "no_prior" and all(o["typical"] for o in rec["objects"].values()):
        raise ValueError("make_split: the no_prior split needs an object without a typical colour in the recipe")
    split_id = zlib.crc32(split.encode())  # a stable per-split stream, unlike hash()
    rows = []
    for i in range(n):
        rng = np.random.default_rng([seed, split_id, i])
        row = _row(rec, split, rng)
        row["split"] = split
        rows.append(row)
    return rows


class _Blank(dict):
    """Format mapping that turns every placeholder into an empty string."""

    def __missing__(self, key: str) -> str:
        return ""


# ---------------------------------------------------------------------------------------------
# recipe checking


def _checked(recipe: dict[str, Any]) -> dict[str, Any]:
    """A checked copy of the recipe with defaults filled in; ValueError names the bad field."""
    rec = copy.deepcopy(recipe)
    check_sections(
        rec, ("image", "colours", "objects", "scene", "train", "pope", "questions", "splits", "seed"), _EXAMPLE
    )
    _check_image(rec["image"])
    _check_colours(rec["colours"], rec["image"])
    groups = _check_objects(rec["objects"], rec["colours"])
    _check_scene(rec["scene"], groups)
    check_train(rec["train"], KINDS)
    check_probability(rec["pope"], "present", "pope.present")
    need(
        isinstance(rec["pope"].get("popular_k"), int) and rec["pope"]["popular_k"] >= 1,
        "pope.popular_k",
        "expected an int >= 1",
    )
    check_questions(rec["questions"], _PLACEHOLDERS)
    check_splits_and_seed(rec, SPLITS)
    return rec


def _check_image(img: dict[str, Any]) -> None:
    """image: size, object_size, noise (one std or a list, one drawn per row), colour_jitter."""
    need(isinstance(img.get("size"), int) and img["size"] >= 16, "image.size", "expected an int >= 16")
    lo, hi = img.get("object_size", (0, 0))
    need(
        1 <= lo <= hi <= img["size"] // 3,
        "image.object_size",
        f"expected [lo, hi], 1 <= lo <= hi <= {img['size'] // 3}",
    )
    levels = img.get("noise", -1)
    levels = levels if isinstance(levels, list) else [levels]
    need(
        len(levels) > 0 and all(isinstance(v, (int, float)) and v >= 0 for v in levels),
        "image.noise",
        "expected a std >= 0 (fraction of 0-255) or a non-empty list of them (one drawn per row)",
    )
    need(
        isinstance(img.get("colour_jitter"), int) and img["colour_jitter"] >= 0,
        "image.colour_jitter",
        "expected an int >= 0",
    )


def _check_colours(colours: dict[str, Any], img: dict[str, Any]) -> None:
    """image.background and every colour an [r, g, b] in 0-255; colour names single lowercase words, unlike the
    background; at least two colours."""
    for name, rgb in [("image.background", img.get("background"))] + [(f"colours.{c}", v) for c, v in colours.items()]:
        need(
            isinstance(rgb, list) and len(rgb) == 3 and all(0 <= v <= 255 for v in rgb),
            name,
            f"expected [r, g, b] in 0-255, got {rgb}",
        )
    for c, rgb in colours.items():
        need(re.fullmatch(r"[a-z]+", c) is not None, f"colours.{c}", "colour names are single lowercase words")
        need(rgb != img["background"], f"colours.{c}", "equals image.background; the object would be invisible")
    need(len(colours) >= 2, "colours", "need at least two colours (counterfactuals need an atypical one)")


def _check_objects(objects: dict[str, Any], colours: dict[str, Any]) -> dict[str, int]:
    """Each object: a name, its own shape, a typical colour of the recipe with its prior (or none: prior 0), a
    weight and a group; fills `typical`, `plural`, `prior`. Some object has a typical colour. Returns the group
    sizes."""
    shapes_used: dict[str, str] = {}
    groups: dict[str, int] = {}
    for name, obj in objects.items():
        field = f"objects.{name}"
        need(re.fullmatch(r"[a-z]+", name) is not None, field, "object names are single lowercase words")
        need(obj.get("shape") in SHAPES, f"{field}.shape", f"{obj.get('shape')!r} is not one of {SHAPES}")
        need(
            obj["shape"] not in shapes_used,
            f"{field}.shape",
            f"{obj['shape']} is already used by {shapes_used.get(obj['shape'])}; every object needs its own shape",
        )
        shapes_used[obj["shape"]] = name
        obj.setdefault("typical", None)
        obj.setdefault("plural", name + "s")
        if obj["typical"] is None:
            obj["prior"] = 0.0
        else:
            need(obj["typical"] in colours, f"{field}.typical", f"{obj['typical']!r} is not a colour of the recipe")
            check_probability(obj, "prior", f"{field}.prior")
        need(obj.get("weight", 0) > 0, f"{field}.weight", "expected a relative frequency > 0")
        need(isinstance(obj.get("group"), str), f"{field}.group", "expected a group name")
        groups[obj["group"]] = groups.get(obj["group"], 0) + 1
    need(
        any(o["typical"] for o in objects.values()),
        "objects",
        "no object has a typical colour: there is no prior to study",
    )
    return groups


def _check_scene(scene: dict[str, Any], groups: dict[str, int]) -> None:
    """scene: max_objects (below every group's size), cooccurrence, count_weights."""
    need(
        isinstance(scene.get("max_objects"), int) and scene["max_objects"] >= 1,
        "scene.max_objects",
        "expected an int >= 1",
    )
    for group, size in groups.items():
        # POPE adversarial probes need an absent member of a present group in every scene.
        need(
            size > scene["max_objects"],
            f"objects (group {group})",
            f"has {size} members; needs more than scene.max_objects={scene['max_objects']}",
        )
    check_probability(scene, "cooccurrence", "scene.cooccurrence")
    check_count_weights(scene.get("count_weights"), "scene.count_weights")


# ---------------------------------------------------------------------------------------------
# rows


def _row(rec: dict[str, Any], split: str, rng: np.random.Generator) -> dict[str, Any]:
    """One row of a split: choose the kind and its scene, then render the image."""
    if split in ("train", "pairs"):
        kinds = rec["train"]["kinds"]
        kind = _weighted(list(kinds), list(kinds.values()), rng)
    elif split in ("counterfactual", "prior_consistent", "no_prior"):
        kind = "attribute"
    elif split.startswith("pope_"):
        kind = "existence"
    else:
        kind = "caption"

    if kind == "attribute":
        typical = {"counterfactual": False, "prior_consistent": True, "no_prior": None}.get(split)
        entries, fill, answer, prior = _attribute(rec, rng, typical, prior_free=split == "no_prior")
    elif kind == "existence":
        if split.startswith("pope_"):
            present, strategy = rec["pope"]["present"], split.removeprefix("pope_")
        else:
            present, strategy = rec["train"]["existence_present"], "random"
        entries, fill, answer, prior = _existence(rec, rng, present, strategy)
    elif kind == "count":
        entries, fill, answer, prior = _count(rec, rng)
    elif kind == "spatial":
        entries, fill, answer, prior = _spatial(rec, rng)
    else:
        entries, fill, answer, prior = _caption(rec, rng)

    instances = place(rec, entries, rng, disjoint_x=(kind == "spatial"))
    if kind == "spatial":
        # The answer depends on where the two objects landed.
        box = {inst["name"]: inst["box"] for inst in instances}
        a_left = box[fill["object"]][2] < box[fill["other"]][0]
        answer = "yes" if a_left == (fill["relation"] == "left of") else "no"
    if kind == "caption":
        answer = " and ".join(f"{_article(inst['colour'])} {inst['colour']} {inst['name']}" for inst in instances)
    template = rec["questions"][kind][int(rng.integers(len(rec["questions"][kind])))]
    objects = list(dict.fromkeys(inst["name"] for inst in instances))  # distinct, left to right
    image, noise = render(rec, instances, rng)
    return {
        "prompt": template.format(**fill),
        "images": [image],
        "answer": answer,
        "kind": kind,
        "prior_answer": prior,
        "objects": objects,
        "target": fill.get("object"),
        "image_noise": noise,
    }


# Each question kind returns (entries, template fields, answer, prior answer); an entry is
# (object name, colour name, number of instances).
_Entries = list[tuple[str, str, int]]


def _attribute(
    rec: dict[str, Any], rng: np.random.Generator, typical: bool | None, prior_free: bool = False
) -> tuple[_Entries, dict[str, str], str, str | None]:
    """'what colour is the banana?'; typical None draws from the prior, True/False forces it; prior_free asks only
    about objects without a typical colour."""
    names = list(rec["objects"])
    if typical is not None:  # counterfactual / prior-consistent: only objects that have a prior
        names = [n for n in names if rec["objects"][n]["typical"]]
    if prior_free:
        names = [n for n in names if not rec["objects"][n]["typical"]]
    target = _weighted(names, [rec["objects"][n]["weight"] for n in names], rng)
    colour = _colour(rec, target, rng, typical)
    entries = [(target, colour, 1)] + [(n, _colour(rec, n, rng), 1) for n in _companions(rec, target, rng)]
    return entries, _fields(rec, target), colour, rec["objects"][target]["typical"]


def _existence(
    rec: dict[str, Any], rng: np.random.Generator, present: float, strategy: str
) -> tuple[_Entries, dict[str, str], str, str | None]:
    """'is there a cat?' about a present object, or an absent one chosen by the POPE strategy."""
    first = _weighted(list(rec["objects"]), [o["weight"] for o in rec["objects"].values()], rng)
    names = [first] + _companions(rec, first, rng)
    entries = [(n, _colour(rec, n, rng), 1) for n in names]
    prior = "yes" if rec["train"]["existence_present"] >= 0.5 else "no"
    if rng.random() < present:
        return entries, _fields(rec, names[int(rng.integers(len(names)))]), "yes", prior
    absent = [n for n in rec["objects"] if n not in names]
    if strategy == "popular":
        # stable sort: equal weights keep recipe order
        absent = sorted(absent, key=lambda n: -rec["objects"][n]["weight"])[: rec["pope"]["popular_k"]]
    elif strategy == "adversarial":
        present_groups = {rec["objects"][n]["group"] for n in names}
        absent = [n for n in absent if rec["objects"][n]["group"] in present_groups]
    return entries, _fields(rec, absent[int(rng.integers(len(absent)))]), "no", prior


def _count(rec: dict[str, Any], rng: np.random.Generator) -> tuple[_Entries, dict[str, str], str, str | None]:
    """'how many bananas are there?' -> 'two'; all instances share one colour."""
    target = _weighted(list(rec["objects"]), [o["weight"] for o in rec["objects"].values()], rng)
    weights = rec["scene"]["count_weights"]
    count = _weighted(list(weights), list(weights.values()), rng)
    entries = [(target, _colour(rec, target, rng), count)] + [
        (n, _colour(rec, n, rng), 1) for n in _companions(rec, target, rng)
    ]
    prior = NUMBER_WORDS[max(weights, key=weights.get)]
    return entries, _fields(rec, target), NUMBER_WORDS[count], prior


def _spatial(rec: dict[str, Any], rng: np.random.Generator) -> tuple[_Entries, dict[str, str], str, str | None]:
    """'is the banana left of the cat?'; two objects, answer filled in by `_row` after placement."""
    first = _weighted(list(rec["objects"]), [o["weight"] for o in rec["objects"].values()], rng)
    second = _companions(rec, first, rng, k=1)[0]
    a, b = (first, second) if rng.random() < 0.5 else (second, first)
    fields = _fields(rec, a) | {"other": b, "relation": RELATIONS[int(rng.integers(len(RELATIONS)))]}
    return [(first, _colour(rec, first, rng), 1), (second, _colour(rec, second, rng), 1)], fields, "", None


def _caption(rec: dict[str, Any], rng: np.random.Generator) -> tuple[_Entries, dict[str, str], str, str | None]:
    """'describe the image.'; the answer is written by `_row` once the objects are placed."""
    first = _weighted(list(rec["objects"]), [o["weight"] for o in rec["objects"].values()], rng)
    names = [first] + _companions(rec, first, rng)
    return [(n, _colour(rec, n, rng), 1) for n in names], {}, "", None


def _companions(rec: dict[str, Any], first: str, rng: np.random.Generator, k: int | None = None) -> list[str]:
    """k other object kinds (0..max_objects-1 at random when k is None), from first's group mostly."""
    if k is None:
        k = int(rng.integers(rec["scene"]["max_objects"]))
    chosen = [first]
    for _ in range(k):
        pool = [n for n in rec["objects"] if n not in chosen]
        same = [n for n in pool if rec["objects"][n]["group"] == rec["objects"][first]["group"]]
        if same and rng.random() < rec["scene"]["cooccurrence"]:
            pool = same
        chosen.append(_weighted(pool, [rec["objects"][n]["weight"] for n in pool], rng))
    return chosen[1:]


def _colour(rec: dict[str, Any], name: str, rng: np.random.Generator, typical: bool | None = None) -> str:
    """Colour of one object: its typical colour with probability `prior` (or as forced), else another."""
    colours = list(rec["colours"])
    t = rec["objects"][name]["typical"]
    if t is None:
        return colours[int(rng.integers(len(colours)))]
    if typical is None:
        typical = bool(rng.random() < rec["objects"][name]["prior"])
    if typical:
        return t
    others = [c for c in colours if c != t]
    return others[int(rng.integers(len(others)))]


def _fields(rec: dict[str, Any], name: str) -> dict[str, str]:
    """Template fields for one object: name, plural and article."""
    return {"object": name, "objects": rec["objects"][name]["plural"], "a": _article(name)}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _weighted(items: list, weights: list[float], rng: np.random.Generator) -> Any:
    """One item drawn with probability proportional to its weight."""
    w = np.asarray(weights, dtype=float)
    return items[int(np.searchsorted(np.cumsum(w), rng.random() * w.sum(), side="right"))]
