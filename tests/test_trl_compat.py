"""NaPOTrainer as a drop-in for trl.DPOTrainer: TRL's settings honoured (checked against stock TRL on the same batch)
or refused, streams, evaluation with precomputed reference log-probs, MoE auxiliary loss, TRL's error texts."""

import copy

import numpy as np
import pytest
import torch
from datasets import DatasetDict, IterableDatasetDict
from helpers import COMMON, as_trl_pairs, fresh_rows, loss_and_grads, perturbed, preference_rows
from trl import DPOConfig, DPOTrainer

from napo import NaPOConfig, NaPOTrainer
from napo.models import build_tiny_model


def _pair(tmp_path, base, tokenizer, dataset, napo_args: dict, trl_args: dict):
    napo = NaPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        args=NaPOConfig(output_dir=str(tmp_path / "napo"), **COMMON, **napo_args),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    stock = DPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), **COMMON, **trl_args),
        train_dataset=as_trl_pairs(dataset),
        processing_class=tokenizer,
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
        {"loss_type": ["sigmoid_norm"], "use_weighting": True},  # TRL breaks hinge + WPO (in-place on relu)
        {"loss_type": ["ipo"], "use_weighting": True},
        {"ld_alpha": 0.5},
        {"loss_type": ["ipo", "aot"], "ld_alpha": 0.0},  # (TRL breaks sft + WPO: in-place on an expanded tensor)
    ],
    ids=lambda s: (
        "+".join(s.get("loss_type", ["sigmoid"]))
        + "".join(f"-{k}={v}" for k, v in s.items() if k in ("f_divergence_type", "use_weighting", "ld_alpha"))
    ),
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
    ipo_loss, dpo_loss = (float(loss_and_grads(t, fresh_rows(t, 6))[0]) for t in (ipo, dpo))
    assert abs(ipo_loss - dpo_loss) > 1


def test_loss_type_applies_to_rejected_beside_napo_bias_types(tmp_path):
    # objective="napo" with bias columns: `rejected` is the DPO pair of the paper, so it takes loss_type; the bias
    # types keep NaPO. Reference: the same loss with loss_type left out differs only by the rejected pair's term.
    columns = ("rejected", "rejected_language_bias")
    base, tokenizer = build_tiny_model("text", seed=0)
    dataset = preference_rows(6, vision=False, columns=columns)
    losses = {}
    for loss_type in ("sigmoid", "hinge"):
        trainer = NaPOTrainer(
            model=perturbed(base),
            ref_model=copy.deepcopy(base),
            args=NaPOConfig(
                output_dir=str(tmp_path / loss_type),
                objective="napo",
                loss_type=loss_type,
                q=0.5,
                weights="fixed",
                **COMMON,
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        losses[loss_type] = float(loss_and_grads(trainer, fresh_rows(trainer, 4))[0])
    stock_pairs = as_trl_pairs(dataset.select(range(4)).remove_columns("rejected_language_bias"))
    margins = {}
    for loss_type in ("sigmoid", "hinge"):
        stock = DPOTrainer(
            model=perturbed(base),
            ref_model=copy.deepcopy(base),
            args=DPOConfig(output_dir=str(tmp_path / f"trl-{loss_type}"), loss_type=loss_type, **COMMON),
            train_dataset=stock_pairs,
            processing_class=tokenizer,
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
        ({"ld_alpha": 0.5, "precompute_ref_log_probs": True}, "ld_alpha=0.5 is not supported"),
        ({"ld_alpha": 1.5}, r"ld_alpha must be in \[0, 1\]"),
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
            model=base,
            args=NaPOConfig(output_dir=str(tmp_path), objective="napo", loss_type="ipo", **COMMON),
            train_dataset=preference_rows(4, vision=False),
            processing_class=tokenizer,
        )


def test_default_objective_stays_napo_and_honoured_settings_pass(tmp_path):
    assert NaPOConfig(output_dir=str(tmp_path), **COMMON).objective == "napo"
    args = NaPOConfig(output_dir=str(tmp_path), objective="cdpo", label_smoothing=0.1, **COMMON)
    assert args.objective == "cdpo"
    assert NaPOConfig(output_dir=str(tmp_path), loss_type="robust", label_smoothing=0.1, **COMMON).objective == "dpo"


def _tiny_moe(model_type: str, vocab_size: int) -> torch.nn.Module:
    """A 2-layer mixture-of-experts causal LM built from its config (random weights, offline), router logits on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.5,
    )
    if model_type == "qwen3_moe":
        sizes.update(num_experts=4, moe_intermediate_size=16, decoder_sparse_step=1)
    else:  # gpt_oss
        sizes.update(num_local_experts=4, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes)).float()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_moe_router_aux_loss_is_added_as_stock_trl_adds_it(model_type, tmp_path):
    _, tokenizer = build_tiny_model("text", seed=0)
    base = _tiny_moe(model_type, len(tokenizer))
    dataset = preference_rows(6, vision=False)
    napo, stock = _pair(tmp_path, base, tokenizer, dataset, {"objective": "dpo"}, {})
    assert napo.aux_loss_enabled and napo.router_aux_loss_coef == 0.5
    napo_loss, napo_grads = loss_and_grads(napo, fresh_rows(napo, 6))
    trl_loss, trl_grads = loss_and_grads(stock, fresh_rows(stock, 6))
    torch.testing.assert_close(napo_loss, trl_loss, atol=1e-5, rtol=1e-5)
    for name in trl_grads:
        torch.testing.assert_close(napo_grads[name], trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert napo._metrics["train"]["aux_loss"] and napo._metrics["train"]["aux_loss"][-1] > 0
    # Without the router term (coefficient 0) the losses part by exactly 0.5 · aux_loss.
    off, _ = _pair(tmp_path / "off", base, tokenizer, dataset, {"objective": "dpo", "router_aux_loss_coef": 0.0}, {})
    assert not off.aux_loss_enabled
    off_loss, _ = loss_and_grads(off, fresh_rows(off, 6))
    assert abs(float(napo_loss - off_loss) - 0.5 * napo._metrics["train"]["aux_loss"][-1]) < 1e-5


def test_share_prompt_with_a_moe_router_loss_is_refused_when_the_trainer_is_built(tmp_path):
    _, tokenizer = build_tiny_model("text", seed=0)
    with pytest.raises(ValueError, match="share_prompt: MoE router losses need the padded forward"):
        NaPOTrainer(
            model=_tiny_moe("qwen3_moe", len(tokenizer)),
            args=_args(tmp_path, share_prompt=True),
            train_dataset=preference_rows(2, vision=False),
            processing_class=tokenizer,
        )


def _args(tmp_path, **settings) -> NaPOConfig:
    return NaPOConfig(output_dir=str(tmp_path), **{**COMMON, **settings})


@pytest.mark.parametrize("eval_kind", ["stream", "dict_of_streams", "none"])
def test_iterable_datasets_train_and_evaluate(eval_kind, tmp_path):
    base, tokenizer = build_tiny_model("text", seed=0)
    train = preference_rows(8, vision=False, columns=("rejected", "rejected_language_bias")).to_iterable_dataset()
    stream = preference_rows(4, vision=False, seed=1).to_iterable_dataset()
    eval_dataset = {"stream": stream, "dict_of_streams": {"a": stream, "b": stream}, "none": None}[eval_kind]
    trainer = NaPOTrainer(
        model=base,
        args=_args(tmp_path, max_steps=3, eval_strategy="steps" if eval_dataset else "no", eval_steps=2),
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 3
    assert any(not torch.equal(p, trainer.model.get_parameter(n)) for n, p in before.items())
    assert "language_bias/q" in trainer.state.log_history[0]  # both negative columns streamed through
    logged = set().union(*trainer.state.log_history)
    if eval_kind == "stream":
        assert "eval_loss" in logged
    elif eval_kind == "dict_of_streams":
        assert {"eval_a_loss", "eval_b_loss"} <= logged
    metrics = trainer.evaluate(IterableDatasetDict({"late": stream}))
    assert np.isfinite(metrics["eval_late_loss"])


@pytest.mark.parametrize("where", ["train", "eval"])
def test_precomputation_is_refused_for_streams_with_trls_message(where, tmp_path):
    base, tokenizer = build_tiny_model("text", seed=0)
    rows = preference_rows(4, vision=False)
    train = rows.to_iterable_dataset() if where == "train" else rows
    eval_dataset = rows.to_iterable_dataset() if where == "eval" else None
    with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
        NaPOTrainer(
            model=base,
            args=_args(tmp_path, max_steps=1, precompute_ref_log_probs=True),
            train_dataset=train,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("eval_kind", ["dataset", "dataset_dict", "dict_of_datasets"])
def test_evaluation_with_precomputed_reference_equals_live_reference(eval_kind, tmp_path):
    # Every split's reference log-probs are precomputed before the frozen copy is freed: evaluation during and after
    # training reads them. Reference: the same trainer with the live reference model gives the same eval losses.
    base, tokenizer = build_tiny_model("text", seed=0)
    split = preference_rows(4, vision=False, seed=1)
    eval_dataset = {
        "dataset": split,
        "dataset_dict": DatasetDict({"a": split, "b": split}),
        "dict_of_datasets": {"a": split, "b": split},
    }[eval_kind]
    losses = {}
    for precompute in (False, True):
        trainer = NaPOTrainer(
            model=perturbed(base),
            ref_model=copy.deepcopy(base),
            args=_args(
                tmp_path / str(precompute),
                max_steps=2,
                eval_strategy="steps",
                eval_steps=1,
                precompute_ref_log_probs=precompute,
                learning_rate=1e-3,
            ),
            train_dataset=preference_rows(8, vision=False),
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        losses[precompute] = [
            v
            for log in trainer.state.log_history
            for k, v in sorted(log.items())
            if k.startswith("eval_") and k.endswith("_loss") or k == "eval_loss"
        ]
        losses[precompute] += list(trainer.evaluate().values())[:1]
    assert len(losses[True]) >= 3
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_evaluating_a_new_dataset_after_training_with_precomputation_gives_trls_refusal(tmp_path):
    base, tokenizer = build_tiny_model("text", seed=0)
    trainer = NaPOTrainer(
        model=base,
        args=_args(tmp_path, max_steps=1, precompute_ref_log_probs=True),
        train_dataset=preference_rows(4, vision=False),
        processing_class=tokenizer,
    )
    late = preference_rows(4, vision=False, seed=3)
    assert np.isfinite(trainer.evaluate(late)["eval_loss"])  # before training the model is the reference
    trainer.train()
    with pytest.raises(ValueError, match="Cannot compute reference log-probs for a dataset passed to"):
        trainer.evaluate(late)


def test_trls_error_texts_are_kept(tmp_path):
    base, tokenizer = build_tiny_model("text", seed=0)
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        NaPOTrainer(model=base, args=_args(tmp_path), processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"text tokenizer.*The dataset appears to be vision-related"):
        NaPOTrainer(
            model=base, args=_args(tmp_path), train_dataset=preference_rows(4, vision=True), processing_class=tokenizer
        )


def test_ld_alpha_weighs_each_pair_by_its_own_shorter_answer(tmp_path):
    # Negatives of 1, 2 and 3 words in one forward: each pair's tail is weighed past its own shorter answer. Reference:
    # stock TRL on each type's pairs as a separate one-rejected dataset, combined with napo's γ̂ (as in test_trainer).
    columns = ("rejected", "rejected_language_bias", "rejected_vision_bias")
    base, tokenizer = build_tiny_model("text", seed=0)
    dataset = preference_rows(6, vision=False, columns=columns)
    args = NaPOConfig(
        output_dir=str(tmp_path / "napo"),
        objective="dpo",
        ld_alpha=0.3,
        weights="fixed",
        **{**COMMON, "per_device_train_batch_size": 6},
    )
    napo = NaPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    napo_loss, _ = loss_and_grads(napo, fresh_rows(napo, 6))
    weights = {c: args.negative_type_settings(c)[0] for c in columns}
    expected = 0.0
    for column in columns:
        pairs = dataset.filter(lambda row, column=column: row[column] is not None).select_columns(
            ["prompt", "chosen", column]
        )
        pairs = as_trl_pairs(pairs.rename_column(column, "rejected") if column != "rejected" else pairs)
        stock = DPOTrainer(
            model=perturbed(base),
            ref_model=copy.deepcopy(base),
            args=DPOConfig(
                output_dir=str(tmp_path / column), ld_alpha=0.3, **{**COMMON, "per_device_train_batch_size": len(pairs)}
            ),
            train_dataset=pairs,
            processing_class=tokenizer,
        )
        stock_loss = float(loss_and_grads(stock, fresh_rows(stock, len(pairs)))[0])
        expected += weights[column] / sum(weights.values()) * stock_loss
    assert abs(float(napo_loss) - expected) < 1e-5
