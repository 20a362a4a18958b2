"""Padding-free batches (`padding_free=True`, `napo.fast.pack_sequences`) give the padded path's log-probs, loss and
gradients on every tiny model family, with no padding token left in the forward."""

import copy

import numpy as np
import pytest
import torch
from test_trainer import COMMON, fresh_rows, loss_and_grads, perturbed, preference_rows

from napo import NaPOConfig, NaPOTrainer
from napo.models import FAMILIES, build_tiny_model, family_record

COLUMNS = ("rejected_language_bias", "rejected_vision_bias")


def rows_for(family: str, vision: bool = True):
    if family == "qwen2_audio":
        rng = np.random.default_rng(0)
        dataset = preference_rows(4, vision=False, columns=("rejected_language_bias", "rejected_audio_bias"))
        # Clips of different lengths: different numbers of audio tokens per row, hence padding.
        return dataset.add_column(
            "audios", [[(0.1 * rng.standard_normal(8000 + 1600 * i)).astype(np.float32)] for i in range(4)]
        )
    return preference_rows(4, vision=vision and family != "text", columns=COLUMNS)


@pytest.mark.parametrize(
    "family,vision",
    # Prefix-LM families are refused (test below); text rows on a multimodal-rotary model too.
    [(f, True) for f in FAMILIES if not family_record(f).prefix_lm] + [("qwen2_vl", False)],
    ids=lambda value: {True: "", False: "text-rows"}.get(value, value) if isinstance(value, bool) else value,
)
def test_packed_batches_give_the_padded_log_probs_loss_and_gradients(family, vision, tmp_path):
    reference, processor = build_tiny_model(family, seed=0)
    reference.eval().requires_grad_(False)
    policy = perturbed(reference).requires_grad_(True)
    dataset = rows_for(family, vision)
    trainers = {}
    for padding_free in (False, True):
        args = NaPOConfig(output_dir=str(tmp_path / str(padding_free)), padding_free=padding_free, **COMMON)
        trainers[padding_free] = NaPOTrainer(
            model=copy.deepcopy(policy),
            ref_model=reference,
            args=args,
            train_dataset=dataset,
            processing_class=processor,
        )
    padded, packed = trainers[False], trainers[True]
    assert packed.padding_free and not padded.padding_free

    batch = packed._prepare_inputs(packed.data_collator(fresh_rows(packed, 4)))
    model_kwargs, labels, _ = packed._model_inputs(batch)
    real_tokens = int(batch["attention_mask"].sum())
    assert real_tokens < batch["attention_mask"].numel()  # the padded batch does hold padding
    assert model_kwargs["input_ids"].shape == (1, real_tokens) and "attention_mask" not in model_kwargs
    assert int((labels != -100).sum()) == int(batch["completion_mask"][:, 1:].sum())

    tables = {k: t.log_prob_table(t.train_dataset, batch_size=4, of="logratio") for k, t in trainers.items()}
    assert np.isfinite(tables[False][:, 0]).all() and np.nanmax(np.abs(tables[False])) > 1e-2  # margins are not all 0
    np.testing.assert_allclose(tables[True], tables[False], rtol=1e-4, atol=1e-4)

    padded_loss, padded_grads = loss_and_grads(padded, fresh_rows(padded, 4))
    packed_loss, packed_grads = loss_and_grads(packed, fresh_rows(packed, 4))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-4, atol=1e-6)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_prefix_lm_batches_are_refused(tmp_path):
    model, processor = build_tiny_model("paligemma", seed=0)
    trainer = NaPOTrainer(
        model=model,
        args=NaPOConfig(output_dir=str(tmp_path), padding_free=True, **COMMON),
        train_dataset=rows_for("paligemma"),
        processing_class=processor,
    )
    batch = trainer._prepare_inputs(trainer.data_collator(fresh_rows(trainer, 2)))
    with pytest.raises(ValueError, match="prefix-LM"):
        trainer._model_inputs(batch)


def test_a_sequence_is_never_scored_from_the_one_packed_before_it():
    """A sequence whose first token is an answer token (no prompt left after truncation) gets no log-prob for it:
    in the packed row that token would be predicted from the previous sequence's last token."""
    from napo.fast import pack_sequences

    input_ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    completion_mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    packed, labels, sequence_of_token = pack_sequences(
        {"input_ids": input_ids, "attention_mask": attention_mask}, completion_mask
    )
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert labels.tolist() == [[-100, 6, 7, -100, 9]]
    assert sequence_of_token.tolist() == [0, 0, 0, 1, 1]


def test_a_model_whose_attention_ignores_packing_is_refused(tmp_path):
    """An attention that applies only its causal mask (as some kernels do) keeps right-padded batches exact but lets
    packed sequences attend to each other: the check on the first packed batch refuses it instead of training on
    wrong log-probs."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        groups = module.num_key_value_groups
        return sdpa_attention_forward(
            module,
            query,
            repeat_kv(key, groups),
            repeat_kv(value, groups),
            None,
            is_causal=True,
            **{k: v for k, v in kwargs.items() if k != "is_causal"},
        )

    AttentionInterface.register("causal_only", causal_only)
    AttentionMaskInterface.register("causal_only", sdpa_mask)
    model, tokenizer = build_tiny_model("text", seed=0)
    model = perturbed(model)  # away from near-uniform initial predictions, where a leak barely shows
    model.set_attn_implementation("causal_only")
    trainer = NaPOTrainer(
        model=model,
        args=NaPOConfig(output_dir=str(tmp_path), padding_free=True, max_steps=1, **COMMON),
        train_dataset=rows_for("text"),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match=r"padding_free: this model \(llama, attention 'causal_only'\).*nats away"):
        trainer.train()
    trainer.padding_free, trainer._packing_verified = False, False
    trainer.model.set_attn_implementation("sdpa")
    trainer.padding_free = True
    trainer.train()  # sdpa keeps packed sequences apart: the check passes and training runs
