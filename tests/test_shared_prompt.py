"""Shared-prompt scoring (`share_prompt=True`, `napo.shared_prompt`): families whose positions or masks it cannot split
are refused by name, a scoring that disagrees with the padded path stops the job, and settings that need the padded
forward are refused. That it gives the padded path's log-probs, loss and gradients, with the prompt (and its image)
run once per row: tests/test_throughput_equivalence.py."""

import pytest
from helpers import COMMON, family_preference_rows, fresh_rows, loss_and_grads, perturbed

from napo import NaPOConfig, NaPOTrainer
from napo.models import build_tiny_model


def shared_prompt_trainer(family: str, tmp_path) -> NaPOTrainer:
    """A `share_prompt=True` trainer of a policy moved away from its `family` reference, on that family's rows."""
    reference, processor = build_tiny_model(family, seed=0)
    reference.eval().requires_grad_(False)
    return NaPOTrainer(
        model=perturbed(reference).requires_grad_(True),
        ref_model=reference,
        args=NaPOConfig(output_dir=str(tmp_path), share_prompt=True, **COMMON),
        train_dataset=family_preference_rows(family),
        processing_class=processor,
    )


@pytest.mark.parametrize(
    "family,message", [("paligemma", "per-token input `token_type_ids`"), ("qwen2_vl", "multimodal rotary positions")]
)
def test_families_whose_positions_cannot_be_split_are_refused(family, message, tmp_path):
    shared = shared_prompt_trainer(family, tmp_path)
    with pytest.raises(ValueError, match=f"share_prompt: .*{message}"):
        loss_and_grads(shared, fresh_rows(shared, 2))


def test_a_shared_prompt_path_that_disagrees_with_the_padded_one_stops_on_the_first_batch(tmp_path, monkeypatch):
    """The first-batch check compares with the padded path: a scoring that is off by half a nat per sequence (what a
    model with another position rule gives) must stop the job instead of training on wrong log-probs."""
    import napo.shared_prompt as module

    shared = shared_prompt_trainer("text", tmp_path)
    original = module.shared_prompt_logps
    monkeypatch.setattr("napo.scoring.shared_prompt_logps", lambda model, batch: original(model, batch) + 0.5)
    with pytest.raises(ValueError, match="share_prompt: this model .* nats away"):
        loss_and_grads(shared, fresh_rows(shared, 2))


@pytest.mark.parametrize("setting", [{"padding_free": True}, {"gradient_checkpointing": True}, {"use_weighting": True}])
def test_settings_that_need_the_padded_forward_are_refused(setting, tmp_path):
    with pytest.raises(ValueError, match="share_prompt"):
        NaPOConfig(output_dir=str(tmp_path), share_prompt=True, **{**COMMON, **setting})
