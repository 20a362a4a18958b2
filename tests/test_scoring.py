"""Evaluation and training score the same rows alike: `napo.evaluate.answer_log_probs` (a plain model, its logits,
rows encoded for generation) against `NaPOTrainer.log_prob_table` (the trainer's collator and fused LM head), and the
layouts of `napo.scoring` against a log-softmax summed by hand."""

import numpy as np
import pytest
import torch
from helpers import COMMON, perturbed, preference_rows

from napo import NaPOConfig, NaPOTrainer
from napo.encoding import answer_batch
from napo.evaluate import answer_log_probs, preference_log_probs
from napo.models import build_tiny_model
from napo.scoring import sequence_logps

COLUMNS = ("rejected", "rejected_language_bias")


def trainer_table(model, reference, processor, dataset, tmp_path, of="policy") -> tuple[NaPOTrainer, np.ndarray]:
    """A trainer of `model` on `dataset` and its `log_prob_table` (rows x answers) of `of`, in eval mode."""
    trainer = NaPOTrainer(
        model=model,
        ref_model=reference,
        args=NaPOConfig(output_dir=str(tmp_path), **COMMON),
        train_dataset=dataset,
        processing_class=processor,
    )
    trainer.model.eval()
    return trainer, trainer.log_prob_table(trainer.train_dataset, batch_size=4, of=of)


@pytest.mark.parametrize("family", ["text", "llava", "qwen2_vl", "paligemma"])
def test_evaluation_log_probs_equal_the_trainers_log_prob_table(family, tmp_path):
    """The margin a user evaluates is the margin training optimises: the same rows (chat prompt, image, K answers of
    different lengths, one missing) give the same summed log-probs through both paths, batched differently."""
    reference, processor = build_tiny_model(family, seed=0)
    model = perturbed(reference)  # away from near-uniform predictions, where any two scorings look alike
    dataset = preference_rows(5, vision=family != "text", columns=COLUMNS)
    trainer, table = trainer_table(model, reference, processor, dataset, tmp_path)
    rows = list(dataset)
    for k, column in enumerate(("chosen", *trainer.negative_columns)):
        present = [i for i, row in enumerate(rows) if row[column] is not None]
        samples = [{"prompt": rows[i]["prompt"], "images": rows[i].get("images") or []} for i in present]
        scored = answer_log_probs(model, processor, samples, [rows[i][column] for i in present], batch_size=3)
        assert np.all(np.isfinite(scored)) and np.ptp(scored) > 1e-3  # real, distinct log-probs
        np.testing.assert_allclose(scored, table[present, k], rtol=1e-4, atol=1e-4, err_msg=column)


@pytest.mark.parametrize("family", ["text", "qwen2_vl"])
def test_preference_log_probs_equal_the_trainers_log_ratio_table(family, tmp_path):
    """Scoring a preference dataset without a trainer (compare's margins, held-out pairs) gives the trainer's
    log-ratios log π − log π_ref, and leaves the models without TRL's fused LM head."""
    reference, processor = build_tiny_model(family, seed=0)
    model = perturbed(reference)
    dataset = preference_rows(5, vision=family != "text", columns=COLUMNS)
    table, scored, columns = preference_log_probs(model, processor, dataset, reference=reference, batch_size=3)
    assert columns == COLUMNS and len(scored) == len(dataset)
    assert "forward" not in vars(model) and "forward" not in vars(reference)  # TRL patches the instance's forward
    _, expected = trainer_table(model, reference, processor, dataset, tmp_path, of="logratio")
    assert np.nanmax(np.abs(expected)) > 1e-2  # policy and reference differ
    np.testing.assert_allclose(table, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma"])
def test_answer_batch_extends_per_token_inputs_over_the_answer(family):
    """Qwen2-VL's `mm_token_type_ids` and PaliGemma's `token_type_ids` run along the tokens: they must cover the
    answer as `input_ids` do (0 = text for Qwen2-VL; 1 = the causal answer block for PaliGemma), and PaliGemma's
    processor labels of the prompt alone must not reach the forward."""
    _, processor = build_tiny_model(family, seed=0)
    samples = [
        {"prompt": row["prompt"], "images": row["images"]}
        for row in preference_rows(2, vision=True, columns=("rejected",))
    ]
    inputs, answer_mask = answer_batch(processor, samples, ["yellow", "a red cat"])
    name = {"qwen2_vl": "mm_token_type_ids", "paligemma": "token_type_ids"}[family]
    assert inputs[name].shape == inputs["input_ids"].shape == answer_mask.shape
    answer = answer_mask.bool()
    assert (inputs[name][answer] == (1 if family == "paligemma" else 0)).all()
    assert "labels" not in inputs


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
def test_every_layout_sums_the_completion_log_softmax(layout):
    """`sequence_logps` of a hand-made batch (two sequences, different prompt and answer lengths, right padding)
    equals Σ log softmax(logits[t-1])[token t] over each answer, computed one sequence at a time."""
    model, _ = build_tiny_model("text", seed=0)
    model = perturbed(model).eval()
    sequences = [([3, 9, 12, 15], [20, 21]), ([3, 9, 12, 15], [22, 23, 24])]  # (prompt, answer): one row
    width = max(len(p) + len(a) for p, a in sequences)
    input_ids = torch.zeros((2, width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    expected = []
    for i, (prompt, answer) in enumerate(sequences):
        ids = torch.tensor(prompt + answer)
        input_ids[i, : len(ids)], attention_mask[i, : len(ids)] = ids, 1
        completion_mask[i, len(prompt) : len(ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.unsqueeze(0)).logits[0].double()
        expected.append(sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(len(prompt), len(ids))))
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "sequence_row": torch.tensor([0, 0]),
    }
    with torch.no_grad():
        got = sequence_logps(
            model, batch, packed=layout == "packed", shared_prompt=layout == "shared_prompt", fused_lm_head=False
        )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.xfail(
    strict=True,
    reason="known disagreement left to a decision: the multimodal collator renders a string prompt's answer as TRL's "
    "vision collator does (no EOS), evaluation and the text collator append EOS",
)
def test_string_prompt_image_rows_are_scored_alike(tmp_path):
    """LLaVA-style string prompts with an `<image>` tag: evaluation scores answer + EOS, training the answer alone."""
    reference, processor = build_tiny_model("llava", seed=0)
    model = perturbed(reference)
    dataset = preference_rows(3, vision=True, conversational=False).map(
        lambda row: {"prompt": "<image>" + row["prompt"]}
    )
    _, table = trainer_table(model, reference, processor, dataset, tmp_path)
    samples = [{"prompt": row["prompt"], "images": row["images"]} for row in dataset]
    scored = answer_log_probs(model, processor, samples, list(dataset["chosen"]))
    np.testing.assert_allclose(scored, table[:, 0], rtol=1e-4, atol=1e-4)
