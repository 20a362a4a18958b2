"""NaPOTrainer against stock trl.DPOTrainer on the same batch, and its training behaviour on tiny models."""

import copy
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import COMMON, as_trl_pairs, fresh_rows, loss_and_grads, perturbed, preference_rows
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from napo import NaPOConfig, NaPOTrainer
from napo.data import RowError
from napo.models import build_tiny_model


@pytest.mark.parametrize("family", ["text", "llava"])
def test_dpo_objective_equals_stock_trl(family, tmp_path):
    base, processing = build_tiny_model(family, seed=0)
    dataset = preference_rows(6, vision=family != "text")
    napo = NaPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        args=NaPOConfig(output_dir=str(tmp_path / "napo"), objective="dpo", **COMMON),
        train_dataset=dataset,
        processing_class=processing,
    )
    stock = DPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), loss_type="sigmoid", **COMMON),
        train_dataset=as_trl_pairs(dataset),
        processing_class=processing,
    )
    napo_loss, napo_grads = loss_and_grads(napo, fresh_rows(napo, 6))
    trl_loss, trl_grads = loss_and_grads(stock, fresh_rows(stock, 6))
    assert abs(float(napo_loss) - float(trl_loss)) < 1e-5
    assert abs(float(napo_loss) - np.log(2)) > 1e-3  # margins are not all zero: the check has teeth
    assert napo_grads.keys() == trl_grads.keys()
    for name in trl_grads:
        torch.testing.assert_close(napo_grads[name], trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("weights", ["fixed", "dynamic"])
def test_multi_negative_loss_is_weighted_sum_of_stock_trl_pairs(weights, tmp_path):
    # One NaPO forward over [chosen, 3 negatives] per row must equal Σ_t γ_t · DPO(chosen, rejected_t) computed by
    # stock TRL on separate pair datasets (rows missing a negative left out of that type's dataset). γ: the fixed
    # weights renormalised, or Eq. 13 truncated to [0.01, 1] (§4.1) by hand from stock TRL's mean margin of each type.
    columns = ("rejected", "rejected_language_bias", "rejected_vision_bias")
    base, tokenizer = build_tiny_model("text", seed=0)
    dataset = preference_rows(6, vision=False, columns=columns)
    args = NaPOConfig(
        output_dir=str(tmp_path / "napo"),
        objective="dpo",
        per_device_train_batch_size=6,
        weights=weights,
        **{k: v for k, v in COMMON.items() if k != "per_device_train_batch_size"},
    )
    napo = NaPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    napo_loss, napo_grads = loss_and_grads(napo, fresh_rows(napo, 6))

    stock_losses, stock_grads, stock_margins = {}, {}, {}
    for column in columns:
        pairs = dataset.filter(lambda row, c=column: row[c] is not None).map(lambda row, c=column: {"rejected": row[c]})
        pairs = as_trl_pairs(pairs.select_columns(["prompt", "chosen", "rejected"]))
        stock = DPOTrainer(
            model=perturbed(base),
            ref_model=copy.deepcopy(base),
            args=DPOConfig(output_dir=str(tmp_path / column), loss_type="sigmoid", **COMMON),
            train_dataset=pairs,
            processing_class=tokenizer,
        )
        stock_losses[column], stock_grads[column] = loss_and_grads(stock, fresh_rows(stock, len(pairs)))
        stock_margins[column] = stock._metrics["train"]["rewards/margins"][-1]
    if weights == "fixed":
        fixed = {c: args.negative_type_settings(c)[0] for c in columns}
        gamma = {c: fixed[c] / sum(fixed.values()) for c in columns}
    else:
        total = sum(stock_margins.values())
        assert total > 0  # the perturbed policy prefers chosen on average: Eq. 13's ratio is defined
        gamma = {c: min(1.0, max(0.01, stock_margins[c] / total)) for c in columns}
        assert len({round(g, 3) for g in gamma.values()}) == 3  # the three types really get different weights
    logged = napo._metrics["train"]
    for column, prefix in zip(columns, ("", "language_bias/", "vision_bias/")):
        assert logged[f"{prefix}weight"][-1] == pytest.approx(gamma[column], abs=1e-5)
    expected_loss = sum(gamma[c] * float(stock_losses[c]) for c in columns)
    assert abs(float(napo_loss) - expected_loss) < 1e-5
    for name in stock_grads["rejected"]:
        expected = sum(gamma[c] * stock_grads[c][name] for c in columns)
        torch.testing.assert_close(napo_grads[name], expected, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_adaptive_q_reads_the_variants_margin(variant, tmp_path):
    """q of a summed-margin type from the logged mean margin m = mean β·(Δ_w − Δ_l): 'paper' (Eq. 12) feeds ψ = m,
    'official' (released code) ψ = m/β, without β, and clips at its own 0.001."""
    columns = ("rejected_language_bias", "rejected_vision_bias")
    base, tokenizer = build_tiny_model("text", seed=0)
    alpha = 0.3
    args = NaPOConfig(output_dir=str(tmp_path), q=variant, alpha_vision_bias=alpha, beta=0.5, **COMMON)
    napo = NaPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        args=args,
        train_dataset=preference_rows(4, vision=False, columns=columns),
        processing_class=tokenizer,
    )
    loss_and_grads(napo, fresh_rows(napo, 4))
    logged = napo._metrics["train"]
    margin = logged["vision_bias/rewards/margins"][-1]
    assert abs(margin) > 0.5  # large enough that β in or out of ψ changes q
    psi = margin if variant == "paper" else margin / 0.5
    scale, q_min = (1, 0.01) if variant == "paper" else (2, 0.001)
    expected = min(1.0, max(q_min, scale * (1 - 1 / (1 + np.exp(-alpha * psi)))))
    assert logged["vision_bias/q"][-1] == pytest.approx(expected, abs=1e-5)


def eval_loss(trainer, rows):
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator(rows))))


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_napo_steps_lower_loss_and_move_q(use_lora, tmp_path):
    model, processor = build_tiny_model("llava", seed=0)
    dataset = preference_rows(8, vision=True, columns=("rejected_language_bias", "rejected_vision_bias"))
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) if use_lora else None
    trainer = NaPOTrainer(
        model=model,
        args=NaPOConfig(
            output_dir=str(tmp_path),
            max_steps=12,
            learning_rate=5e-3 if use_lora else 2e-3,
            **{**COMMON, "per_device_train_batch_size": 8},
        ),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
    )
    assert (trainer.ref_model is None) == use_lora  # LoRA: the reference is the model with its adapter disabled
    before = eval_loss(trainer, fresh_rows(trainer, 8))
    trainer.train()
    after = eval_loss(trainer, fresh_rows(trainer, 8))
    assert after < before - 0.02
    logs = [h for h in trainer.state.log_history if "language_bias/q" in h]
    first, last = logs[0], logs[-1]
    assert first["language_bias/q"] == pytest.approx(0.5)  # ψ = 0 at the start: q = 1 − σ(0)
    for kind in ("language_bias", "vision_bias"):
        assert last[f"{kind}/rewards/margins"] > first[f"{kind}/rewards/margins"]
    # Margins grew, so the paper's q = 1 − σ(α·ψ) fell.
    assert last["language_bias/q"] < first["language_bias/q"] - 1e-3


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_precomputed_reference_gives_the_same_losses(use_lora, tmp_path):
    dataset = preference_rows(8, vision=True, columns=("rejected", "rejected_language_bias", "rejected_vision_bias"))
    histories = {}
    for precompute in (False, True):
        model, processor = build_tiny_model("llava", seed=0)
        trainer = NaPOTrainer(
            model=model,
            args=NaPOConfig(
                output_dir=str(tmp_path / str(precompute)),
                max_steps=3,
                learning_rate=2e-3,
                precompute_ref_log_probs=precompute,
                **COMMON,
            ),
            train_dataset=dataset,
            processing_class=processor,
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if use_lora else None,
        )
        if precompute:
            assert trainer.ref_model is None  # nothing but the cached log-probs is kept
            cached = os.listdir(tmp_path / "True" / "ref_logps")
            assert len(cached) == 1 and cached[0].startswith("train-")
        trainer.train()
        histories[precompute] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(histories[True]) == 3
    np.testing.assert_allclose(histories[True], histories[False], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "paligemma"])
def test_other_vision_families_train(family, tmp_path):
    model, processor = build_tiny_model(family, seed=0)
    dataset = preference_rows(4, vision=True, columns=("rejected_language_bias", "rejected_vision_bias"))
    trainer = NaPOTrainer(
        model=model,
        args=NaPOConfig(
            output_dir=str(tmp_path), max_steps=2, learning_rate=1e-3, precompute_ref_log_probs=True, **COMMON
        ),
        train_dataset=dataset,
        processing_class=processor,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any("vision_bias/q" in h for h in trainer.state.log_history)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda rows: [{k: v for k, v in r.items() if k != "chosen"} for r in rows], "'chosen' column"),
        (lambda rows: [{k: v for k, v in r.items() if k != "rejected"} for r in rows], "none of the rejected"),
        (lambda rows: [{**r, "chosen": "" if i == 2 else r["chosen"]} for i, r in enumerate(rows)], "row 2"),
    ],
    ids=["no-chosen", "no-rejected", "empty-answer"],
)
def test_bad_input_fails_before_training(breakage, message, tmp_path):
    model, tokenizer = build_tiny_model("text", seed=0)
    rows = breakage(preference_rows(4, vision=False).to_list())
    with pytest.raises(ValueError, match=message) as error:
        NaPOTrainer(
            model=model,
            args=NaPOConfig(output_dir=str(tmp_path), **COMMON),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    if "row" in message:
        assert isinstance(error.value, RowError) and "chosen" in str(error.value)


def test_standard_string_rows_and_config_validation(tmp_path):
    model, tokenizer = build_tiny_model("text", seed=0)
    dataset = preference_rows(4, vision=False, conversational=False, columns=("rejected", "rejected_language_bias"))
    trainer = NaPOTrainer(
        model=model,
        args=NaPOConfig(output_dir=str(tmp_path), max_steps=1, **COMMON),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    # The original pair keeps DPO beside a bias-type negative; the bias type uses NaPO.
    assert trainer._type_objectives == {"rejected": "dpo", "rejected_language_bias": "napo"}
    assert sum(trainer._type_weights.values()) == pytest.approx(1.0)
    trainer.train()
    with pytest.raises(ValueError, match="objective"):
        NaPOConfig(output_dir=str(tmp_path), objective="simpo")
    with pytest.raises(ValueError, match="q must be"):
        NaPOConfig(output_dir=str(tmp_path), q="adaptive")
    with pytest.raises(ValueError, match=r"fixed q must be in \(0, 1\]"):
        NaPOConfig(output_dir=str(tmp_path), q="1.5")
    assert NaPOConfig(output_dir=str(tmp_path), q="0.3").q == 0.3


def test_audio_language_model_trains_with_precomputed_reference(tmp_path):
    # Qwen2-Audio rows: the collator inserts the audio placeholder, repeats the clip for every sequence of its row
    # and passes the clips to the processor; precomputed and on-the-fly reference give the same losses.
    rng = np.random.default_rng(0)
    dataset = preference_rows(4, vision=False, columns=("rejected_language_bias", "rejected_audio_bias"))
    dataset = dataset.add_column(
        "audios", [[(0.1 * rng.standard_normal(8000 + 800 * i)).astype(np.float32)] for i in range(4)]
    )
    histories = {}
    for precompute in (False, True):
        model, processor = build_tiny_model("qwen2_audio", seed=0)
        trainer = NaPOTrainer(
            model=model,
            args=NaPOConfig(
                output_dir=str(tmp_path / str(precompute)),
                max_steps=2,
                learning_rate=1e-3,
                precompute_ref_log_probs=precompute,
                **COMMON,
            ),
            train_dataset=dataset,
            processing_class=processor,
        )
        batch = trainer.data_collator(fresh_rows(trainer, 2))
        audio_token = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
        # 3 sequences per row here (chosen, 2 negatives; row 0 lacks the second): every one carries its clip.
        assert batch["input_features"].shape[0] == len(batch["sequence_row"]) == 5
        assert ((batch["input_ids"] == audio_token).sum(1) > 0).all()
        trainer.train()
        histories[precompute] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert any("audio_bias/q" in h for h in trainer.state.log_history)
    np.testing.assert_allclose(histories[True], histories[False], rtol=1e-5, atol=1e-6)


def test_sft_weight_adds_the_chosen_nll_as_stock_trls_sft_loss_does(tmp_path):
    # Stock TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, λ] adds λ · the mean NLL per chosen token; napo's
    # sft_weight adds λ' · the mean over rows of the summed chosen NLL. With every chosen answer T tokens long the two
    # agree at λ' = λ / T, loss and gradients; and the same term enters NaPO's loss unchanged.
    base, processing = build_tiny_model("text", seed=0)
    dataset = preference_rows(6, vision=False)
    stock = DPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"), loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], **COMMON
        ),
        train_dataset=as_trl_pairs(dataset),
        processing_class=processing,
    )
    batch = stock.data_collator(fresh_rows(stock, 6))
    chosen_tokens = batch["completion_mask"][:6].sum(dim=1)
    assert (chosen_tokens == chosen_tokens[0]).all(), "the check needs chosen answers of one length"
    trl_loss, trl_grads = loss_and_grads(stock, fresh_rows(stock, 6))

    def napo_loss(objective, sft_weight):
        trainer = NaPOTrainer(
            model=perturbed(base),
            ref_model=copy.deepcopy(base),
            args=NaPOConfig(
                output_dir=str(tmp_path / f"{objective}{sft_weight}"),
                objective=objective,
                sft_weight=sft_weight,
                **COMMON,
            ),
            train_dataset=dataset,
            processing_class=processing,
        )
        return loss_and_grads(trainer, fresh_rows(trainer, 6))

    loss, grads = napo_loss("dpo", 0.7 / float(chosen_tokens[0]))
    assert abs(float(loss) - float(trl_loss)) < 1e-5
    for name in trl_grads:
        torch.testing.assert_close(grads[name], trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    term = float(loss) - float(napo_loss("dpo", 0.0)[0])
    assert term > 0.1  # the NLL term is there and not negligible: the comparison above has teeth
    napo_with, napo_without = napo_loss("napo", 0.7 / float(chosen_tokens[0]))[0], napo_loss("napo", 0.0)[0]
    assert float(napo_with) - float(napo_without) == pytest.approx(term, abs=1e-5)
    # objective 'sft': the NLL term alone, as stock TRL's loss_type ["sft"]
    sft_only = DPOTrainer(
        model=perturbed(base),
        ref_model=copy.deepcopy(base),
        args=DPOConfig(output_dir=str(tmp_path / "trl-sft"), loss_type=["sft"], loss_weights=[0.7], **COMMON),
        train_dataset=as_trl_pairs(dataset),
        processing_class=processing,
    )
    trl_sft_loss, trl_sft_grads = loss_and_grads(sft_only, fresh_rows(sft_only, 6))
    loss, grads = napo_loss("sft", 0.7 / float(chosen_tokens[0]))
    assert abs(float(loss) - float(trl_sft_loss)) < 1e-5 and abs(float(loss) - term) < 1e-5
    for name in trl_sft_grads:
        torch.testing.assert_close(grads[name], trl_sft_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="objective='sft'"):
        NaPOConfig(output_dir=str(tmp_path / "bad"), objective="sft", **COMMON)
    with pytest.raises(ValueError, match="sft_weight"):
        NaPOConfig(output_dir=str(tmp_path / "bad"), sft_weight=-1.0, **COMMON)
