"""Metrics against values computed by hand on small fixed inputs."""

from __future__ import annotations

import numpy as np
import pytest

from napo.evaluate import accuracy, agreement, chair, modality_shapley, normalize, pope_metrics, prior_following_rate


def test_normalize() -> None:
    assert normalize("  Yellow. ") == "yellow"
    assert normalize("A  red\tcat!?") == "a red cat"
    assert normalize("yes .") == "yes"


def test_accuracy_normalises_case_space_and_trailing_punctuation() -> None:
    preds = ["Yellow.", " red", "blue!", "a red cat", "two"]
    answers = ["yellow", "red", "green", "a red cat.", "three"]
    # matches: rows 0, 1, 3 -> 3 / 5
    assert accuracy(preds, answers) == pytest.approx(0.6)


def test_prior_following_rate() -> None:
    preds = ["yellow", "Purple", "yellow.", "red"]
    priors = ["yellow", "yellow", "yellow", "red"]
    # answered the prior: rows 0, 2, 3 -> 3 / 4
    assert prior_following_rate(preds, priors) == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"prior_answers\[1\]"):
        prior_following_rate(["a", "b"], ["a", None])  # type: ignore[list-item]


def test_agreement() -> None:
    with_image = ["red", "yes", "two", "blue"]
    without_image = ["red", "no", "Two", "yellow"]
    # equal after normalisation: rows 0, 2 -> 2 / 4
    assert agreement(with_image, without_image) == pytest.approx(0.5)


@pytest.mark.parametrize("fn", [accuracy, prior_following_rate, agreement, pope_metrics])
def test_empty_and_mismatched_inputs_raise(fn) -> None:
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        fn(["yes", "no"], ["yes"])


def test_pope_metrics_by_hand() -> None:
    preds = ["Yes", "yes, there is", "no", "No.", "yes", "blue", "blue"]
    answers = ["yes", "yes", "yes", "no", "no", "yes", "no"]
    # pred yes/no/None: Y Y N N Y - -     labels: Y Y Y N N Y N
    # TP = rows 0,1 = 2; FP = row 4 = 1; TN = row 3 = 1; FN = rows 2,5 = 2; row 6 unparsed, answer no: wrong
    # accuracy = (2+1)/7; precision = 2/3; recall = 2/4; f1 = 2*(2/3)*(1/2)/(2/3+1/2) = (2/3)/(7/6) = 4/7
    # yes_ratio = 3/7; unparsed_ratio = 2/7
    m = pope_metrics(preds, answers)
    assert m["accuracy"] == pytest.approx(3 / 7)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(3 / 7)
    assert m["unparsed_ratio"] == pytest.approx(2 / 7)


def test_pope_all_yes_predictions() -> None:
    answers = ["yes", "no", "no", "yes", "no"]
    # TP = 2, FP = 3, TN = 0, FN = 0: accuracy 2/5, precision 2/5, recall 1, f1 = 2*(0.4)/(1.4) = 4/7
    m = pope_metrics(["yes"] * 5, answers)
    assert m == pytest.approx(
        {"accuracy": 0.4, "precision": 0.4, "recall": 1.0, "f1": 4 / 7, "yes_ratio": 1.0, "unparsed_ratio": 0.0}
    )


def test_pope_all_no_predictions_has_zero_precision_not_nan() -> None:
    # TP = FP = 0: precision defined as 0, recall 0/2, f1 0; accuracy = TN/n = 1/3
    m = pope_metrics(["no", "no", "no"], ["yes", "no", "yes"])
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["accuracy"] == pytest.approx(1 / 3)


def test_pope_rejects_reference_that_is_not_yes_no() -> None:
    with pytest.raises(ValueError, match=r"answers\[1\] is 'maybe'"):
        pope_metrics(["yes", "no"], ["yes", "maybe"])


def test_chair_by_hand() -> None:
    vocab = ["banana", "cat", "ball", "hot dog", "dog"]
    captions = [
        "a yellow banana and a red cat",  # mentions banana, cat; present banana, cat -> none hallucinated
        "a yellow banana and a blue ball",  # mentions banana, ball; ball absent -> 1 hallucinated
        "a hot dog next to a dog and a dog",  # mentions hot dog, dog (twice, counted once); both absent -> 2
        "a green square",  # no mention
    ]
    present = [["banana", "cat"], ["banana"], ["cat"], ["ball"]]
    # chair_s = captions with a hallucination: 2 / 4; chair_i = hallucinated / mentioned = (0+1+2) / (2+2+2+0) = 3/6
    m = chair(captions, present, vocab)
    assert m["chair_s"] == pytest.approx(0.5)
    assert m["chair_i"] == pytest.approx(0.5)
    assert m["hallucinated"] == [[], ["ball"], ["hot dog", "dog"], []]


def test_chair_synonyms_map_mentions_and_present_objects() -> None:
    vocab = ["banana", "cat"]
    synonyms = {"bananas": "banana", "kitten": "cat"}
    captions = ["two Bananas and a kitten", "a kitten", "a cat"]
    present = [["banana"], ["kitten"], ["banana"]]
    # caption 0: banana (ok), cat (absent -> hallucinated); caption 1: cat, present as "kitten" -> ok;
    # caption 2: cat absent -> hallucinated. chair_s = 2/3, chair_i = (1+0+1)/(2+1+1) = 2/4
    m = chair(captions, present, vocab, synonyms)
    assert m["chair_s"] == pytest.approx(2 / 3)
    assert m["chair_i"] == pytest.approx(0.5)
    # without synonyms "bananas" and "kitten" are not object words: only caption 2 mentions anything
    # and it hallucinates: chair_s = 1/3, chair_i = 1/1
    plain = chair(captions, present, vocab)
    assert (plain["chair_s"], plain["chair_i"]) == pytest.approx((1 / 3, 1.0))


def test_chair_errors_and_no_mentions() -> None:
    assert chair(["a red square"], [["cat"]], ["cat"])["chair_i"] == 0.0  # 0 mentions -> 0, not nan
    with pytest.raises(ValueError, match="not in the vocabulary"):
        chair(["a kitten"], [[]], ["cat"], {"kitten": "dog"})
    with pytest.raises(ValueError, match="empty"):
        chair([], [], ["cat"])


def test_modality_shapley_by_hand() -> None:
    v_full = np.array([-1.0, -2.0, -3.0])
    v_no_image = np.array([-4.0, -2.5, -3.0])
    v_no_text = np.array([-2.0, -5.0, -3.0])
    v_none = np.array([-5.0, -6.0, -3.0])
    # sample 0: phi_image = 0.5*[(-1+4) + (-2+5)] = 3;    phi_text = 0.5*[(-1+2) + (-4+5)] = 1;   share 3/4
    # sample 1: phi_image = 0.5*[(-2+2.5) + (-5+6)] = 0.75; phi_text = 0.5*[(-2+5) + (-2.5+6)] = 3.25;
    #           share 0.75/4 = 0.1875
    # sample 2: nothing changes -> both 0, share defined as 0.5
    out = modality_shapley(v_full, v_no_image, v_no_text, v_none)
    np.testing.assert_allclose(out["phi_image"], [3.0, 0.75, 0.0])
    np.testing.assert_allclose(out["phi_text"], [1.0, 3.25, 0.0])
    np.testing.assert_allclose(out["image_share"], [0.75, 0.1875, 0.5])
    assert out["phi_image_mean"] == pytest.approx(3.75 / 3)
    assert out["phi_text_mean"] == pytest.approx(4.25 / 3)
    assert out["image_share_mean"] == pytest.approx((0.75 + 0.1875 + 0.5) / 3)


def test_modality_shapley_efficiency_and_negative_contributions() -> None:
    rng = np.random.default_rng(0)
    v = [rng.normal(size=50) for _ in range(4)]
    out = modality_shapley(*v)
    # efficiency: the two contributions add up to the total gain from no input to full input
    np.testing.assert_allclose(out["phi_image"] + out["phi_text"], v[0] - v[3])
    # a harmful image (phi_image < 0) still counts by magnitude
    one = modality_shapley(np.array([-3.0]), np.array([-1.0]), np.array([-3.0]), np.array([-2.0]))
    # phi_image = 0.5*[(-3+1) + (-3+2)] = -1.5; phi_text = 0.5*[(-3+3) + (-1+2)] = 0.5; share 1.5/2
    assert (one["phi_image"][0], one["phi_text"][0], one["image_share"][0]) == pytest.approx((-1.5, 0.5, 0.75))


def test_modality_shapley_shape_errors() -> None:
    with pytest.raises(ValueError, match="v_no_text has shape"):
        modality_shapley(np.zeros(3), np.zeros(3), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        modality_shapley(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))
