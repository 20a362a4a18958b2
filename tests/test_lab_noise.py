"""The lab's label noise against ground truth: pair labels, the erring annotator, flips tagged the same way."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from napo.lab import load_recipe, sounds
from napo.lab.audio import confusable_note, general_negative
from napo.lab.noise import annotator_noise, label_pairs, pair_label
from napo.lab.vision import confusable_colour
from napo.pairs import inject_label_noise

RECIPE = load_recipe()


def test_pair_label_hand_cases():
    assert pair_label("red", "red", "blue") == "clean"
    assert pair_label("red", "blue", "red") == "inverted"
    assert pair_label("red", "red", "red") == "tie"  # an identical negative to a right chosen
    assert pair_label("red", "blue", "green") == "tie"  # both wrong: neither is better
    assert pair_label("red", "Red.", "blue") == "clean"  # compared as the lab's metrics compare answers
    assert pair_label("red", "red", None) is None


def test_confusable_colour_is_the_nearest_in_rgb():
    # red (220, 40, 40): squared distances purple 27800 < yellow 32800 < green 52400 < blue 66400 < white 80400.
    assert confusable_colour(RECIPE, "red") == "purple"
    # white (240, 240, 240): yellow (240, 220, 40) is 400 + 40000 = 40400 away, the nearest.
    assert confusable_colour(RECIPE, "white") == "yellow"


def lab_rows(n: int, seed: int = 0) -> datasets.Dataset:
    """Pair rows shaped like the lab's: colour questions with and without a prior, existence questions."""
    rng = np.random.default_rng(seed)
    colours = list(RECIPE["colours"])
    rows = []
    for i in range(n):
        noise = float(rng.choice([0.1, 0.2, 0.3, 0.4]))
        if i % 5 == 4:
            answer, prior, kind, wrong = (
                ("no", "yes", "existence", "yes") if i % 2 else ("yes", "yes", "existence", "no")
            )
        else:
            answer = colours[int(rng.integers(len(colours)))]
            prior = None if i % 5 == 3 else "yellow"
            kind, wrong = "attribute", next(c for c in colours if c != answer)
        rows.append(
            {
                "prompt": f"q{i}",
                "chosen": answer,
                "rejected": wrong,
                "rejected_language_bias": prior or wrong,
                "rejected_vision_bias": None if i % 7 == 0 else answer,
                "answer": answer,
                "prior_answer": prior,
                "kind": kind,
                "target": "banana",
                "image_noise": noise,
            }
        )
    return datasets.Dataset.from_list(rows)


def test_annotator_errs_at_the_rate_mostly_on_hard_images_towards_the_prior_or_a_lookalike():
    rows = lab_rows(400)
    noised, erred = annotator_noise(rows, 0.3, seed=1, recipe=RECIPE)
    assert len(erred) == 120 and noised["noisy"] == [i in set(erred) for i in range(400)]
    noise = np.asarray(rows["image_noise"])
    # drawn ∝ image noise: the misannotated rows' mean noise is E[x²]/E[x] ≈ 0.30, the rows' mean 0.25
    assert noise[erred].mean() > noise.mean() + 0.03
    prior_errors = 0
    for i in range(400):
        row, chosen = rows[i], noised[i]["chosen"]
        if i not in erred:
            assert chosen == row["chosen"]
            continue
        assert chosen != row["answer"]
        if row["kind"] == "attribute":
            assert chosen in (row["prior_answer"], confusable_colour(RECIPE, row["answer"]))
            prior_errors += chosen == row["prior_answer"] != confusable_colour(RECIPE, row["answer"])
        else:
            assert chosen == (row["prior_answer"] if row["prior_answer"] != row["answer"] else row["rejected"])
    assert prior_errors > 10  # some errors lean to the prior, not all to the lookalike colour
    # pair labels from the truth: a right negative against a misannotated chosen is inverted
    for i in erred:
        expected = pair_label(rows[i]["answer"], noised[i]["chosen"], rows[i]["rejected_vision_bias"])
        assert noised[i]["pair_label_vision_bias"] == expected
        if rows[i]["rejected_vision_bias"] is not None:
            assert expected == "inverted"  # the vision-biased negative of these rows is the true answer
    # the other columns are untouched and in place
    assert noised.column_names[: len(rows.column_names)] == [c for c in rows.column_names]
    assert noised["rejected"] == rows["rejected"]


def test_confusable_note_is_the_nearest_in_pitch():
    recipe = sounds.load_recipe()
    # do 261.63, re 293.66, mi 329.63, fa 349.23 (a semitone above mi), ..., la 440.00, ti 493.88
    assert confusable_note(recipe, "do") == "re"
    assert confusable_note(recipe, "mi") == "fa"  # 1 semitone up beats 2 down
    assert confusable_note(recipe, "fa") == "mi"
    assert confusable_note(recipe, "ti") == "la"


def test_audio_annotator_errs_on_noisy_clips_towards_the_prior_or_the_neighbouring_note():
    """The audio lab's annotator: rows drawn ∝ `audio_noise`, attribute errors the typical or the nearest note,
    other kinds the prior answer or the row's general negative."""
    recipe = sounds.load_recipe()
    recipe["audio"]["snr_db"] = [6.0, 0.0, -6.0]  # amplitude ratios 0.501, 1, 1.995: a 4x spread of hardness
    rows = sounds.make_split(recipe, "pairs", 300, 0)
    rng = np.random.default_rng(0)
    keys = ("answer", "prior_answer", "kind", "audio_noise")
    dataset = datasets.Dataset.from_list(
        [{"chosen": r["answer"], "rejected": general_negative(recipe, r, rng), **{k: r[k] for k in keys}} for r in rows]
    )
    assert all(a != b for a, b in zip(dataset["rejected"], dataset["answer"]))
    noised, erred = annotator_noise(dataset, 0.3, seed=2, recipe=recipe, task="audio")
    assert len(erred) == 90
    noise = np.asarray(dataset["audio_noise"])
    assert noise[erred].mean() > noise.mean() + 0.1  # E[x²]/E[x] = 1.42 against the mean 1.17
    for i in erred:
        row, chosen = dataset[i], noised[i]["chosen"]
        assert chosen != row["answer"]
        if row["kind"] == "attribute":
            assert chosen in (row["prior_answer"], confusable_note(recipe, row["answer"]))
        else:
            assert chosen == (row["prior_answer"] if row["prior_answer"] != row["answer"] else row["rejected"])
    with pytest.raises(ValueError, match="audio_noise"):
        annotator_noise(dataset.remove_columns("audio_noise"), 0.2, 0, recipe, task="audio")


def test_annotator_at_rate_zero_changes_no_answer_and_labels_every_pair():
    rows = lab_rows(50)
    noised, erred = annotator_noise(rows, 0.0, seed=0, recipe=RECIPE)
    assert erred == [] and noised["chosen"] == rows["chosen"] and not any(noised["noisy"])
    assert set(noised["pair_label_rejected"]) == {"clean"}
    assert set(noised["pair_label_vision_bias"]) == {"tie", None}  # identical to a right chosen, or absent


def test_annotator_is_seeded_and_refuses_rows_without_ground_truth():
    rows = lab_rows(100)
    assert annotator_noise(rows, 0.2, 3, RECIPE)[1] == annotator_noise(rows, 0.2, 3, RECIPE)[1]
    assert annotator_noise(rows, 0.2, 3, RECIPE)[1] != annotator_noise(rows, 0.2, 4, RECIPE)[1]
    with pytest.raises(ValueError, match="image_noise"):
        annotator_noise(rows.remove_columns("image_noise"), 0.2, 0, RECIPE)
    with pytest.raises(ValueError, match="error rate"):
        annotator_noise(rows, 1.5, 0, RECIPE)


def test_flipped_rows_are_tagged_inverted_where_the_negative_was_wrong():
    rows = lab_rows(60)
    flipped_rows, flipped = inject_label_noise(rows, 0.5, seed=0)
    labelled = label_pairs(flipped_rows)
    for i in flipped:
        # a flip makes chosen the first negative (`rejected`, a wrong answer) and every negative the truth
        assert labelled[i]["pair_label_rejected"] == "inverted"
