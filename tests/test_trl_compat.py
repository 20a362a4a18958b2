"""NaPOTrainer as a drop-in for trl.DPOTrainer: TRL's settings honoured (checked against stock TRL on the same batch)
or refused, streams, evaluation with precomputed reference log-probs, MoE auxiliary loss, TRL's error texts."""

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, IterableDataset
from test_trainer import COMMON, as_trl_pairs, fresh_rows, loss_and_grads, perturbed, preference_rows
from trl import DPOConfig, DPOTrainer

from napo import NaPOConfig, NaPOTrainer
from napo.models import build_tiny_model


def _pair(tmp_path, base, tokenizer, dataset, napo_args: dict, trl_args: dict):
    napo = NaPOTrainer(
        model=perturbed(base), ref_model=copy.deepcopy(base),
        args=NaPOConfig(output_dir=str(tmp_path / "napo"), **COMMON, **napo_args),
        train_dataset=dataset, processing_class=tokenizer,
    )
    stock = DPOTrainer(
        model=perturbed(base), ref_model=copy.deepcopy(base),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), **COMMON, **trl_args),
        train_dataset=as_trl_pairs(dataset), processing_class=tokenizer,
    )
    return napo, stock


@pytest.mark.parametrize(
    "settings",
    [
        {"loss_type": ["ipo"]},
        {"loss_type": ["hinge"]},
        {"loss_type": ["robust"], "label_smoothing": 0.2},
        {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
        {"loss_type": ["nca_pair"]},
        {"loss_type": ["bco_pair"]},
        {"loss_type": ["sppo_hard"]},
        {"loss_type": ["aot"]},
        {"loss_type": ["aot_unpaired"]},
        {"loss_type": ["apo_zero"]},
        {"loss_type": ["apo_down"]},
        {"loss_type": ["discopop"]},
        {"loss_type": ["sigmoid_norm"]},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]},
        {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
        {"loss_type": ["hinge"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    ],
    ids=lambda s: "+".join(s["loss_type"]) + (f"-{s['f_divergence_type']}" if "f_divergence_type" in s else ""),
)
def test_trl_loss_type_equals_stock_trl_on_one_rejected_column(settings, tmp_path):
    # A TRL user's config with only the imports changed: objective is left unset and follows loss_type.
    base, tokenizer = build_tiny_model("text", seed=0)
    dataset = preference_rows(6, vision=False)
    napo, stock = _pair(tmp_path, base, tokenizer, dataset, settings, settings)
    assert napo.args.objective == "dpo"
    napo_loss, napo_grads = loss_and_grads(napo, fresh_rows(napo, 6))
    trl_loss, trl_grads = loss_and_grads(stock, fresh_rows(stock, 6))
    torch.testing.assert_close(napo_loss, trl_loss, atol=1e-5, rtol=1e-5)
    assert napo_grads.keys() == trl_grads.keys()
    for name in trl_grads:
        torch.testing.assert_close(napo_grads[name], trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_ipo_loss_type_is_not_sigmoid_dpo(tmp_path):
    # The bug this replaces: `--loss_type ipo` trained plain sigmoid DPO.
    base, tokenizer = build_tiny_model("text", seed=0)
    dataset = preference_rows(6, vision=False)
    ipo, _ = _pair(tmp_path / "ipo", base, tokenizer, dataset, {"loss_type": "ipo"}, {})
    dpo, _ = _pair(tmp_path / "dpo", base, tokenizer, dataset, {"objective": "dpo"}, {})
    assert abs(float(loss_and_grads(ipo, fresh_rows(ipo, 6))[0]) - float(loss_and_grads(dpo, fresh_rows(dpo, 6))[0])) > 1


def test_loss_type_applies_to_rejected_beside_napo_bias_types(tmp_path):
    # objective="napo" with bias columns: `rejected` is the DPO pair of the paper, so it takes loss_type; the bias
    # types keep NaPO. Reference: the same loss with loss_type left out differs only by the rejected pair's term.
    columns = ("rejected", "rejected_language_bias")
    base, tokenizer = build_tiny_model("text", seed=0)
    dataset = preference_rows(6, vision=False, columns=columns)
    losses = {}
    for loss_type in ("sigmoid", "hinge"):
        trainer = NaPOTrainer(
            model=perturbed(base), ref_model=copy.deepcopy(base),
            args=NaPOConfig(output_dir=str(tmp_path / loss_type), objective="napo", loss_type=loss_type, q=0.5,
                            **COMMON),
            train_dataset=dataset, processing_class=tokenizer,
        )
        losses[loss_type] = float(loss_and_grads(trainer, fresh_rows(trainer, 4))[0])
    stock_pairs = as_trl_pairs(dataset.select(range(4)).remove_columns("rejected_language_bias"))
    margins = {}
    for loss_type in ("sigmoid", "hinge"):
        stock = DPOTrainer(
            model=perturbed(base), ref_model=copy.deepcopy(base),
            args=DPOConfig(output_dir=str(tmp_path / f"trl-{loss_type}"), loss_type=loss_type, **COMMON),
            train_dataset=stock_pairs, processing_class=tokenizer,
        )
        margins[loss_type] = float(loss_and_grads(stock, fresh_rows(stock, 4))[0])
    gamma_rejected = 0.02 / (0.02 + 0.49)
    expected = gamma_rejected * (margins["hinge"] - margins["sigmoid"])
    assert abs((losses["hinge"] - losses["sigmoid"]) - expected) < 1e-5
    assert abs(expected) > 1e-4


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"objective": "ipo", "loss_type": "hinge"}, "trains no pair with DPO"),
        ({"loss_type": "nope"}, "not one of TRL's"),
        ({"ld_alpha": 0.5}, "ld_alpha=0.5 is not supported"),
        ({"use_weighting": True}, "use_weighting=True is not supported"),
        ({"pad_to_multiple_of": 8}, "pad_to_multiple_of=8 is not supported"),
        ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "sync_ref_model=True is not supported"),
        ({"label_smoothing": 0.1}, "label_smoothing=0.1 is read only by"),
        ({"objective": "dpo", "label_smoothing": 0.1}, "would ignore it"),
    ],
)
def test_settings_napo_would_ignore_are_refused(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        NaPOConfig(output_dir=str(tmp_path), **COMMON, **settings)


def test_loss_type_with_napo_on_every_pair_is_refused(tmp_path):
    base, tokenizer = build_tiny_model("text", seed=0)
    with pytest.raises(ValueError, match="every pair is trained with NaPO"):
        NaPOTrainer(
            model=base, args=NaPOConfig(output_dir=str(tmp_path), objective="napo", loss_type="ipo", **COMMON),
            train_dataset=preference_rows(4, vision=False), processing_class=tokenizer,
        )


def test_default_objective_stays_napo_and_honoured_settings_pass(tmp_path):
    assert NaPOConfig(output_dir=str(tmp_path), **COMMON).objective == "napo"
    args = NaPOConfig(output_dir=str(tmp_path), objective="cdpo", label_smoothing=0.1, **COMMON)
    assert args.objective == "cdpo"
    assert NaPOConfig(output_dir=str(tmp_path), loss_type="robust", label_smoothing=0.1, **COMMON).objective == "dpo"
