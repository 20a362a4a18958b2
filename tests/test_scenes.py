"""Bias-lab scenes: determinism, the priors the recipe promises, POPE strategies, vocabulary, pixels."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest

from napo.lab import SPLITS, load_recipe, make_split, vocabulary, words

RECIPE = load_recipe()


def _variant(**image: Any) -> dict[str, Any]:
    """The default recipe with some image knobs replaced."""
    rec = copy.deepcopy(RECIPE)
    rec["image"].update(image)
    return rec


def _asked_object(row: dict[str, Any]) -> str:
    """The object an existence question asks about (the only object word of the prompt)."""
    (name,) = [w for w in words(row["prompt"]) if w in RECIPE["objects"]]
    return name


def _within_binomial(hits: int, n: int, p: float) -> bool:
    """|hits/n - p| within 4 standard deviations of a binomial proportion (false alarm ~6e-5)."""
    return abs(hits / n - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_same_seed_same_pixels_other_seed_different() -> None:
    a = make_split(RECIPE, "train", 20, seed=3)
    b = make_split(RECIPE, "train", 20, seed=3)
    c = make_split(RECIPE, "train", 20, seed=4)
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x["images"][0]), np.asarray(y["images"][0]))
        assert {k: v for k, v in x.items() if k != "images"} == {k: v for k, v in y.items() if k != "images"}
    assert all(not np.array_equal(np.asarray(x["images"][0]), np.asarray(z["images"][0])) for x, z in zip(a, c))
    # rows do not depend on n, and splits are different streams
    assert np.array_equal(
        np.asarray(make_split(RECIPE, "train", 5, seed=3)[4]["images"][0]), np.asarray(a[4]["images"][0])
    )
    pairs = make_split(RECIPE, "pairs", 20, seed=3)
    assert all(not np.array_equal(np.asarray(x["images"][0]), np.asarray(p["images"][0])) for x, p in zip(a, pairs))


def test_rows_have_the_documented_fields() -> None:
    for split in SPLITS:
        for row in make_split(RECIPE, split, 30, seed=0):
            assert set(row) == {
                "prompt",
                "images",
                "answer",
                "kind",
                "prior_answer",
                "objects",
                "target",
                "image_noise",
                "split",
            }
            assert row["image_noise"] in RECIPE["image"]["noise"]
            assert (row["target"] is None) == (row["kind"] == "caption")
            if split == "no_prior":
                assert row["kind"] == "attribute" and RECIPE["objects"][row["target"]]["typical"] is None
            assert row["split"] == split
            (image,) = row["images"]
            assert image.mode == "RGB" and image.size == (64, 64)
            assert row["answer"] == row["answer"].strip().lower() and row["answer"]
            assert row["objects"] and set(row["objects"]) <= set(RECIPE["objects"])


def test_train_split_follows_the_recipe_priors() -> None:
    rows = make_split(RECIPE, "train", 2500, seed=0)
    attr = [r for r in rows if r["kind"] == "attribute" and r["prior_answer"] is not None]
    typical_hits = sum(r["answer"] == r["prior_answer"] for r in attr)
    assert len(attr) > 800  # ~0.6 attribute x ~0.68 of the weight on objects with a typical colour
    assert _within_binomial(typical_hits, len(attr), 0.95), typical_hits / len(attr)
    # the prior answer is the recipe's typical colour of the asked object
    assert all(r["prior_answer"] == RECIPE["objects"][r["prompt"].split()[-1].rstrip("?")]["typical"] for r in attr)
    # existence questions are mostly about present objects
    exist = [r for r in rows if r["kind"] == "existence"]
    assert _within_binomial(sum(r["answer"] == "yes" for r in exist), len(exist), RECIPE["train"]["existence_present"])
    # every kind of the mix occurs
    assert {r["kind"] for r in rows} == set(RECIPE["train"]["kinds"])


def test_counterfactual_contradicts_and_prior_consistent_follows_the_prior() -> None:
    for row in make_split(RECIPE, "counterfactual", 300, seed=1):
        assert row["kind"] == "attribute" and row["prior_answer"] is not None
        assert row["answer"] != row["prior_answer"] and row["answer"] in RECIPE["colours"]
    for row in make_split(RECIPE, "prior_consistent", 300, seed=1):
        assert row["kind"] == "attribute" and row["answer"] == row["prior_answer"]


def test_pope_probes_and_strategies() -> None:
    rec = RECIPE
    weight = {n: o["weight"] for n, o in rec["objects"].items()}
    group = {n: o["group"] for n, o in rec["objects"].items()}
    asked_absent: dict[str, set[str]] = {}
    for strategy in ("random", "popular", "adversarial"):
        rows = make_split(rec, f"pope_{strategy}", 400, seed=2)
        assert all(r["kind"] == "existence" for r in rows)
        assert _within_binomial(sum(r["answer"] == "yes" for r in rows), len(rows), rec["pope"]["present"])
        absent = []
        for r in rows:
            obj = _asked_object(r)
            # "yes" asks about a present object, "no" about one that is really absent
            assert (obj in r["objects"]) == (r["answer"] == "yes"), r
            if r["answer"] == "no":
                absent.append(obj)
                not_present = sorted((n for n in rec["objects"] if n not in r["objects"]), key=lambda n: -weight[n])
                if strategy == "popular":
                    assert obj in not_present[: rec["pope"]["popular_k"]]
                if strategy == "adversarial":
                    assert group[obj] in {group[n] for n in r["objects"]}
        asked_absent[strategy] = set(absent)
    # random reaches every object; popular stays on the few most frequent ones
    assert asked_absent["random"] == set(rec["objects"])
    top = sorted(rec["objects"], key=lambda n: -weight[n])[: rec["pope"]["popular_k"] + rec["scene"]["max_objects"]]
    assert asked_absent["popular"] <= set(top) and len(asked_absent["popular"]) < len(asked_absent["random"])


def test_captions_name_the_objects_left_to_right() -> None:
    for row in make_split(RECIPE, "captions", 100, seed=0):
        phrases = row["answer"].split(" and ")
        assert [p.split()[-1] for p in phrases] == row["objects"]
        assert all(p.split()[0] in ("a", "an") and p.split()[1] in RECIPE["colours"] for p in phrases)


def test_vocabulary_covers_every_prompt_and_answer() -> None:
    vocab = set(vocabulary(RECIPE))
    for split in SPLITS:
        for row in make_split(RECIPE, split, 300, seed=5):
            missing = set(words(row["prompt"]) + words(row["answer"])) - vocab
            assert not missing, (split, row["prompt"], row["answer"])


def test_drawn_object_colour_is_closest_to_the_named_colour() -> None:
    # Noise- and jitter-free, one object per scene: the non-background pixels are the object.
    rec = _variant(noise=0.0, colour_jitter=0)
    rec["scene"]["max_objects"] = 1
    background = np.array(rec["image"]["background"])
    names = list(rec["colours"])
    palette = np.array([rec["colours"][c] for c in names], dtype=float)
    rows = [r for r in make_split(rec, "train", 200, seed=0) if r["kind"] == "attribute"]
    assert {r["objects"][0] for r in rows} == set(rec["objects"])  # every shape is drawn
    for row in rows:
        pixels = np.asarray(row["images"][0]).reshape(-1, 3)
        obj = pixels[(pixels != background).any(axis=1)]
        assert 5 <= len(obj) <= 196, row  # at least a few pixels, at most a 14 x 14 box
        nearest = names[int(np.argmin(((palette - obj.mean(axis=0)) ** 2).sum(axis=1)))]
        assert nearest == row["answer"], row


def test_noise_knob_adds_noise_of_the_given_std() -> None:
    # With noise 0.25 the background pixels scatter with std ~ 0.25 * 255 (less where clipped at 0).
    row = make_split(_variant(noise=0.25, colour_jitter=0), "captions", 1, seed=0)[0]
    clean = make_split(_variant(noise=0.0, colour_jitter=0), "captions", 1, seed=0)[0]
    diff = np.asarray(row["images"][0], dtype=float) - np.asarray(clean["images"][0], dtype=float)
    assert 50 < diff.std() < 70


def test_recipe_errors_name_the_field() -> None:
    rec = copy.deepcopy(RECIPE)
    rec["objects"]["cup"]["shape"] = "circle"
    with pytest.raises(ValueError, match=r"objects\.cup\.shape.*already used by tomato"):
        make_split(rec, "train", 1, seed=0)
    rec = copy.deepcopy(RECIPE)
    rec["objects"]["banana"]["typical"] = "pink"
    with pytest.raises(ValueError, match=r"objects\.banana\.typical"):
        vocabulary(rec)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        make_split(RECIPE, "test", 1, seed=0)


def test_spatial_answers_match_the_left_to_right_order() -> None:
    rec = _variant(noise=0.0, colour_jitter=0)
    rec["train"]["kinds"] = {"attribute": 0.5, "spatial": 0.5}  # the default recipe asks no spatial questions
    background = np.array(rec["image"]["background"])
    rows = [r for r in make_split(rec, "train", 400, seed=6) if r["kind"] == "spatial"]
    assert {r["answer"] for r in rows} == {"yes", "no"}
    for row in rows:
        a, b = [w for w in words(row["prompt"]) if w in rec["objects"]]
        left_first = row["objects"].index(a) < row["objects"].index(b)  # objects are listed left to right
        assert row["answer"] == ("yes" if left_first == ("left" in words(row["prompt"])) else "no"), row
        # the two objects occupy disjoint column ranges, so "left of" is unambiguous
        used = (np.asarray(row["images"][0]) != background).any(axis=(0, 2))
        runs = np.flatnonzero(np.diff(np.concatenate([[0], used.astype(int), [0]])) == 1)
        assert len(runs) == 2, row


def test_noise_levels_are_drawn_per_row_and_rendered_at_their_std() -> None:
    """`image.noise: [0.1, 0.2, 0.3, 0.4]`: each row draws a level (all four occur, about equally) and its pixels
    scatter around the noise-free render with that std (the background, 90, is far from clipping below 0.4·255·3)."""
    rec = _variant(colour_jitter=0)
    rows = make_split(rec, "no_prior", 200, seed=3)
    counts = {level: sum(r["image_noise"] == level for r in rows) for level in rec["image"]["noise"]}
    assert all(_within_binomial(c, 200, 0.25) for c in counts.values()), counts
    clean = make_split(_variant(noise=0.0, colour_jitter=0), "no_prior", 1, seed=3)[0]
    for row in rows[:1]:
        diff = np.asarray(row["images"][0], dtype=float) - np.asarray(clean["images"][0], dtype=float)
        assert not np.allclose(diff, 0)
    stds = []
    for level in rec["image"]["noise"]:
        one = _variant(noise=[level], colour_jitter=0)  # a one-level list draws nothing: the clean render lines up
        noisy = make_split(one, "captions", 1, seed=0)[0]
        base = make_split(_variant(noise=0.0, colour_jitter=0), "captions", 1, seed=0)[0]
        diff = np.asarray(noisy["images"][0], dtype=float) - np.asarray(base["images"][0], dtype=float)
        assert noisy["image_noise"] == level
        stds.append(diff.std() / 255)
        if level <= 0.2:  # above, clipping at 0 and 255 shrinks the std
            assert abs(stds[-1] - level) < 0.15 * level, (level, stds[-1])
    assert stds == sorted(stds) and stds[-1] > 0.25, stds


def test_no_prior_split_needs_a_prior_free_object() -> None:
    rec = copy.deepcopy(RECIPE)
    for obj in rec["objects"].values():
        obj["typical"], obj["prior"] = obj["typical"] or "red", 0.9
    with pytest.raises(ValueError, match="no_prior"):
        make_split(rec, "no_prior", 1, seed=0)
