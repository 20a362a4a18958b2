"""Shared-prompt scoring (`share_prompt=True`, `napo.shared_prompt`) gives the padded path's log-probs, loss and
gradients, with the prompt (and its image) run once per row; families whose positions or masks it cannot split are
refused by name."""

import copy

import numpy as np
import pytest
import torch
from test_padding_free import rows_for
from test_trainer import COMMON, fresh_rows, loss_and_grads, perturbed

from napo import NaPOConfig, NaPOTrainer
from napo.models import build_tiny_model


def trainers_for(family: str, tmp_path, **extra):
    reference, processor = build_tiny_model(family, seed=0)
    reference.eval().requires_grad_(False)
    policy = perturbed(reference).requires_grad_(True)
    dataset = rows_for(family)
    return {
        share: NaPOTrainer(
            model=copy.deepcopy(policy),
            ref_model=reference,
            args=NaPOConfig(output_dir=str(tmp_path / str(share)), share_prompt=share, **COMMON, **extra),
            train_dataset=dataset,
            processing_class=processor,
        )
        for share in (False, True)
    }


@pytest.mark.parametrize("family", ["text", "llava", "idefics3", "qwen2_audio"])
def test_shared_prompt_gives_the_padded_log_probs_loss_and_gradients(family, tmp_path):
    trainers = trainers_for(family, tmp_path)
    padded, shared = trainers[False], trainers[True]
    batch = shared._prepare_inputs(shared.data_collator(fresh_rows(shared, 4)))
    rows = int(batch["sequence_row"].max()) + 1
    assert batch["input_ids"].size(0) > rows  # several sequences per row: there is a prompt to share

    tables = {k: t.log_prob_table(t.train_dataset, batch_size=4, of="logratio") for k, t in trainers.items()}
    assert np.isfinite(tables[False][:, 0]).all() and np.nanmax(np.abs(tables[False])) > 1e-2  # margins are not all 0
    np.testing.assert_allclose(tables[True], tables[False], rtol=1e-4, atol=1e-4)

    padded_loss, padded_grads = loss_and_grads(padded, fresh_rows(padded, 4))
    shared_loss, shared_grads = loss_and_grads(shared, fresh_rows(shared, 4))
    torch.testing.assert_close(shared_loss, padded_loss, rtol=1e-4, atol=1e-6)
    assert shared_grads.keys() == padded_grads.keys() and shared_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "family,message", [("paligemma", "per-token input `token_type_ids`"), ("qwen2_vl", "multimodal rotary positions")]
)
def test_families_whose_positions_cannot_be_split_are_refused(family, message, tmp_path):
    shared = trainers_for(family, tmp_path)[True]
    with pytest.raises(ValueError, match=f"share_prompt: .*{message}"):
        loss_and_grads(shared, fresh_rows(shared, 2))


def test_a_shared_prompt_path_that_disagrees_with_the_padded_one_stops_on_the_first_batch(tmp_path, monkeypatch):
    """The first-batch check compares with the padded path: a scoring that is off by half a nat per sequence (what a
    model with another position rule gives) must stop the job instead of training on wrong log-probs."""
    import napo.shared_prompt as module

    shared = trainers_for("text", tmp_path)[True]
    original = module.shared_prompt_logps
    monkeypatch.setattr("napo.scoring.shared_prompt_logps", lambda model, batch: original(model, batch) + 0.5)
    with pytest.raises(ValueError, match="share_prompt: this model .* nats away"):
        loss_and_grads(shared, fresh_rows(shared, 2))


@pytest.mark.parametrize("setting", [{"padding_free": True}, {"gradient_checkpointing": True}, {"use_weighting": True}])
def test_settings_that_need_the_padded_forward_are_refused(setting, tmp_path):
    with pytest.raises(ValueError, match="share_prompt"):
        NaPOConfig(output_dir=str(tmp_path), share_prompt=True, **{**COMMON, **setting})
