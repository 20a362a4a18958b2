"""The model-running metrics against independent references: an unbatched forward summed by hand, and
fake answer / score functions whose outputs the test sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import noise_image

import napo.evaluate as evaluate
from napo.evaluate import answer_batch, answer_log_probs, metrics_per_noise_level, modality_metrics
from napo.models import build_tiny_model


def _chat(question: str, image: bool = True) -> list[dict]:
    parts = [{"type": "image"}] if image else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def llava_and_processor():
    model, processor = build_tiny_model("llava", seed=1)
    return model, processor


def _by_hand(model, processor, sample: dict, answer: str) -> float:
    """One sample, no batching: render prompt + answer + <eos> as one text, forward, sum log-softmax of the last
    tokens."""
    tokenizer = processor.tokenizer
    text = (
        processor.apply_chat_template(sample["prompt"], tokenize=False, add_generation_prompt=True)
        + answer
        + tokenizer.eos_token
    )
    inputs = processor(
        text=[text],
        images=[sample["images"]] if sample.get("images") else None,
        return_tensors="pt",
        add_special_tokens=False,
    )
    n_answer = len(tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    ids = inputs["input_ids"][0]
    total = 0.0
    for position in range(len(ids) - n_answer, len(ids)):
        total += torch.log_softmax(logits[position - 1].double(), dim=-1)[ids[position]].item()
    return total


def test_answer_log_probs_equals_unbatched_sum_of_log_softmax(llava_and_processor) -> None:
    model, processor = llava_and_processor
    samples = [
        {"prompt": _chat("what colour is the banana?"), "images": [noise_image(0)]},
        {"prompt": _chat("how many cats are there in this picture?"), "images": [noise_image(1)]},
        {"prompt": _chat("is there a dog?", image=False), "images": []},
        {"prompt": _chat("what colour is the sky?"), "images": [noise_image(2)]},
    ]
    answers = ["yellow", "two cats", "no", "a blue sky with one bird"]  # different lengths: padding must not leak in
    got = answer_log_probs(model, processor, samples, answers, batch_size=2)
    expected = [_by_hand(model, processor, s, a) for s, a in zip(samples, answers)]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.all(got < 0)


def test_answer_batch_masks_exactly_the_answer_and_eos(llava_and_processor) -> None:
    _, processor = llava_and_processor
    samples = [
        {"prompt": _chat("is there a cat?"), "images": [noise_image(0)]},
        {"prompt": _chat("what colour is the banana?"), "images": [noise_image(1)]},
    ]
    inputs, mask = answer_batch(processor, samples, ["yes", "a red cat"])
    tokenizer = processor.tokenizer
    for i, answer in enumerate(["yes", "a red cat"]):
        assert tokenizer.decode(inputs["input_ids"][i][mask[i].bool()]) == f"{answer} <eos>"
        # right padding: every real token comes before every pad
        n = int(inputs["attention_mask"][i].sum())
        assert inputs["attention_mask"][i][:n].all() and not inputs["attention_mask"][i][n:].any()
    assert "pixel_values" in inputs
    with pytest.raises(ValueError, match="some samples have images"):
        answer_batch(
            processor, [samples[0], {"prompt": _chat("is there a cat?", image=False), "images": []}], ["yes", "no"]
        )


def test_modality_metrics_on_controlled_answers_and_scores(monkeypatch) -> None:
    """A 'model' that answers the prior ("yellow") without the image and captions without the question.

    Rows 0-2 are answered correctly from the image; row 3 is answered "yellow" even with the image.
    """
    rows = [
        {"prompt": _chat("what colour is the banana?"), "images": [noise_image(i)], "answer": answer}
        for i, answer in enumerate(["purple", "red", "yellow", "green"])
    ]
    full_answers = ["purple", "red", "yellow", "yellow"]

    def fake_generate(model, processor, samples, **kwargs):
        out = []
        for i, s in enumerate(samples):
            text = next(p["text"] for p in s["prompt"][0]["content"] if p["type"] == "text")
            if not s["images"]:
                assert not any(p["type"] == "image" for p in s["prompt"][0]["content"])  # placeholder removed too
                out.append("yellow")
            elif text == "Describe the image.":
                out.append("a banana")
            else:
                out.append(full_answers[i])
        return out

    # v(subset) per row: full, no image, no question, neither. Row 0: only the image matters;
    # row 1: only the text matters; rows 2-3: both equally.
    values = {
        (True, True): np.array([-1.0, -1.0, -1.0, -1.0]),
        (False, True): np.array([-5.0, -1.0, -3.0, -3.0]),
        (True, False): np.array([-1.0, -5.0, -3.0, -3.0]),
        (False, False): np.array([-5.0, -5.0, -5.0, -5.0]),
    }

    def fake_scores(model, processor, samples, answers, **kwargs):
        assert list(answers) == [r["answer"] for r in rows]  # always the reference answer
        has_image = bool(samples[0]["images"])
        has_question = "Describe the image." not in str(samples[0]["prompt"])
        return values[(has_image, has_question)]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    monkeypatch.setattr(evaluate, "answer_log_probs", fake_scores)
    result = modality_metrics(None, None, rows)
    assert result["accuracy"] == pytest.approx(0.75)
    # blind answers are all "yellow": agree with full answers on rows 2 and 3
    assert result["blind_agreement"] == pytest.approx(0.5)
    assert result["question_blind_agreement"] == 0.0
    # Shapley image share per row: 1, 0, 0.5, 0.5
    np.testing.assert_allclose(result["image_shares"], [1.0, 0.0, 0.5, 0.5])
    assert result["image_share"] == pytest.approx(0.5)
    assert result["blind_answers"] == ["yellow"] * 4


def test_metrics_per_noise_level_by_hand():
    rows = [
        {"answer": "red", "prior_answer": "yellow", "image_noise": 0.1},
        {"answer": "red", "prior_answer": "yellow", "image_noise": 0.1},
        {"answer": "blue", "prior_answer": "white", "image_noise": 0.4},
        {"answer": "blue", "prior_answer": "white", "image_noise": 0.4},
        {"answer": "green", "prior_answer": "white", "image_noise": 0.4},
    ]
    answers = ["red", "yellow", "white", "blue", "white"]
    assert metrics_per_noise_level("counterfactual_accuracy", rows, answers, level="image_noise") == {
        "counterfactual_accuracy@noise0.1": 0.5,
        "prior_following_rate@noise0.1": 0.5,
        "counterfactual_accuracy@noise0.4": 1 / 3,
        "prior_following_rate@noise0.4": 2 / 3,
    }
    assert metrics_per_noise_level("no_prior_accuracy", rows, answers, level="image_noise") == {
        "no_prior_accuracy@noise0.1": 0.5,
        "no_prior_accuracy@noise0.4": 1 / 3,
    }
