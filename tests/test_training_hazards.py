"""Silent training hazards made loud: margins saturated past σ's range, and `train_loss` over skipped batches."""

import copy
import logging

import numpy as np
import pytest
import torch
from helpers import COMMON, perturbed, preference_rows

from napo import NaPOConfig, NaPOTrainer
from napo.models import build_tiny_model


@pytest.mark.parametrize("beta, warned", [(1e6, True), (0.1, False)])
def test_saturated_margins_warn_after_n_batches(beta, warned, tmp_path, caplog):
    base, tokenizer = build_tiny_model("text", seed=0)
    trainer = NaPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        args=NaPOConfig(output_dir=str(tmp_path), beta=beta, max_steps=3, saturation_warning_steps=3, **COMMON),
        train_dataset=preference_rows(12, vision=False, columns=("rejected", "rejected_language_bias")),
        processing_class=tokenizer,
    )
    with caplog.at_level(logging.WARNING, logger="napo.trainer"):
        trainer.train()
    margins = [abs(log["language_bias/rewards/margins"]) for log in trainer.state.log_history if "loss" in log]
    saturated = [m > 15 for m in margins]  # the logged mean |z| agrees with the warning's verdict
    assert all(saturated) == warned
    messages = [r.getMessage() for r in caplog.records if "beyond ±15" in r.getMessage()]
    assert (len(messages) >= 1) == warned
    if warned:
        assert any(m.startswith("rejected_language_bias:") for m in messages)


def test_saturation_warning_waits_for_n_batches(tmp_path, caplog):
    base, tokenizer = build_tiny_model("text", seed=0)
    trainer = NaPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        args=NaPOConfig(output_dir=str(tmp_path), beta=1e6, max_steps=2, saturation_warning_steps=3, **COMMON),
        train_dataset=preference_rows(8, vision=False),
        processing_class=tokenizer,
    )
    with caplog.at_level(logging.WARNING, logger="napo.trainer"):
        trainer.train()
    assert not [r for r in caplog.records if "beyond ±15" in r.getMessage()]


def test_train_loss_averages_only_the_batches_trained(tmp_path):
    # Two batches of 2 rows; the policy's embeddings turn NaN on the "frog" row, which is in the second batch only.
    # Skipped, that batch returns loss 0: train_loss must be the first batch's loss, not half of it.
    base, tokenizer = build_tiny_model("text", seed=0)
    rows = preference_rows(4, vision=False).select([0, 1, 2, 3])  # subjects banana, cat, frog, banana
    trainer = NaPOTrainer(
        model=base,
        args=NaPOConfig(
            output_dir=str(tmp_path),
            on_nonfinite="skip",
            max_steps=2,
            learning_rate=1e-2,
            **{**COMMON, "per_device_train_batch_size": 2},
        ),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    # The default sampler shuffles: keep the dataset order so that "frog" is in the second batch.
    trainer._get_train_sampler = lambda *args: torch.utils.data.SequentialSampler(trainer.train_dataset)
    frog = tokenizer.convert_tokens_to_ids("frog")
    assert frog != tokenizer.unk_token_id
    base.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output.masked_fill((args[0] == frog).any(dim=1)[:, None, None], float("nan"))
    )
    output = trainer.train()
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert [s["nonfinite/skipped"] for s in steps] == [0.0, 1.0]
    assert steps[0]["loss"] > 0 and steps[1]["loss"] == 0.0
    assert np.isclose(output.training_loss, steps[0]["loss"], rtol=1e-3)
    assert np.isclose(trainer.state.log_history[-1]["train_loss"], steps[0]["loss"], rtol=1e-3)
