"""Padding-free batches (`padding_free=True`, `napo.fast.pack_sequences`): what packing refuses and the special cases
of its layout. That packed batches give the padded path's log-probs, loss and gradients on every supported family:
tests/test_throughput_equivalence.py."""

import pytest
import torch
from helpers import COMMON, family_preference_rows, fresh_rows, perturbed

from napo import NaPOConfig, NaPOTrainer
from napo.models import build_tiny_model


def test_prefix_lm_batches_are_refused(tmp_path):
    model, processor = build_tiny_model("paligemma", seed=0)
    trainer = NaPOTrainer(
        model=model,
        args=NaPOConfig(output_dir=str(tmp_path), padding_free=True, **COMMON),
        train_dataset=family_preference_rows("paligemma"),
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
        train_dataset=family_preference_rows("text"),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match=r"padding_free: this model \(llama, attention 'causal_only'\).*nats away"):
        trainer.train()
    trainer.padding_free, trainer._packing_verified = False, False
    trainer.model.set_attn_implementation("sdpa")
    trainer.padding_free = True
    trainer.train()  # sdpa keeps packed sequences apart: the check passes and training runs
