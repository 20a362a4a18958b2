"""`attn_implementation="xformers"` (napo.attention) gives SDPA's loss and gradients.

xformers runs on CUDA only. On a CPU the adapter is checked with `ReferenceOps`, xformers' documented contract
written in plain torch (inputs (B, M, H, K), `scale` default K^-½, `LowerTriangularMask` = causal, a tensor bias
added to the scores): that checks what napo owns — layouts, grouped-query heads, scaling, and turning transformers'
masks (padded and packed batches) into biases. With CUDA and xformers installed, the real kernels are checked too.
"""

import functools
import importlib.util

import pytest
import torch
from helpers import COMMON, fresh_rows, loss_and_grads, perturbed, preference_rows
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from napo import NaPOConfig, NaPOTrainer
from napo.attention import ATTN_IMPLEMENTATION, register_xformers_attention, xformers_attention_forward
from napo.models import build_tiny_model


class ReferenceOps:
    """`xformers.ops` as documented, in torch: the reference the adapter is checked against on a CPU."""

    class LowerTriangularMask:
        pass

    @staticmethod
    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        assert p == 0.0
        query, key, value = (t.transpose(1, 2).float() for t in (query, key, value))  # (B, H, M, K)
        scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scale is None else scale)
        if isinstance(attn_bias, ReferenceOps.LowerTriangularMask):
            scores = scores + torch.full(scores.shape[-2:], float("-inf")).triu(1)
        elif attn_bias is not None:
            scores = scores + attn_bias
        return (scores.softmax(dim=-1) @ value).transpose(1, 2)


def register(ops=None):
    forward = xformers_attention_forward if ops is None else functools.partial(xformers_attention_forward, ops=ops)
    AttentionInterface.register(ATTN_IMPLEMENTATION, forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def losses_by_attention(family, tmp_path, padding_free, device="cpu"):
    reference, processor = build_tiny_model(family, seed=0)
    reference.to(device).eval().requires_grad_(False)
    policy = perturbed(reference).requires_grad_(True)
    dataset = preference_rows(4, vision=family != "text", columns=("rejected_language_bias", "rejected_vision_bias"))
    common = {**COMMON, "use_cpu": device == "cpu"}
    trainer = NaPOTrainer(
        model=policy,
        ref_model=reference,
        train_dataset=dataset,
        processing_class=processor,
        args=NaPOConfig(output_dir=str(tmp_path), padding_free=padding_free, **common),
    )
    results = {}
    for attn in ("sdpa", ATTN_IMPLEMENTATION):
        for model in (trainer.model, trainer.ref_model):
            model.set_attn_implementation(attn)
        results[attn] = loss_and_grads(trainer, fresh_rows(trainer, 4))
    return results


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("family", ["text", "llava"])
def test_adapter_gives_the_sdpa_loss_and_gradients(family, padding_free, tmp_path):
    register(ReferenceOps)
    results = losses_by_attention(family, tmp_path, padding_free)
    (sdpa_loss, sdpa_grads), (loss, grads) = results["sdpa"], results[ATTN_IMPLEMENTATION]
    torch.testing.assert_close(loss, sdpa_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == sdpa_grads.keys() and grads
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_padding_becomes_minus_infinity_in_an_aligned_bias():
    """A padded key is masked, the bias rows are 8-element aligned, and grouped-query heads are repeated."""
    seen = {}

    class Recorder(ReferenceOps):
        @staticmethod
        def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
            seen.update(query=query.shape, key=key.shape, bias=attn_bias)
            return ReferenceOps.memory_efficient_attention(query, key, value, attn_bias, p, scale)

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    query, key = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    mask = torch.tensor([[True, False, False], [True, True, False], [True, True, False]]).view(1, 1, 3, 3)
    output, _ = xformers_attention_forward(module, query, key, key, mask, ops=Recorder)
    assert seen["query"] == seen["key"] == (1, 3, 4, 8) and output.shape == (1, 3, 4, 8)
    bias = seen["bias"]
    assert bias.shape == (1, 4, 3, 3) and bias.stride(-2) % 8 == 0
    assert torch.equal(bias[0, 0] == 0, mask[0, 0]) and torch.isinf(bias[0, 0, 2, 2])


def test_registration_names_the_install_command_without_xformers(monkeypatch):
    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    with pytest.raises(ImportError, match=r"napo\[gpu\]"):
        register_xformers_attention()


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("xformers") is None,
    reason="xformers kernels need CUDA and the gpu extra",
)
def test_xformers_kernels_give_the_sdpa_loss_on_cuda(tmp_path):  # pragma: no cover - GPU only
    register_xformers_attention()
    results = losses_by_attention("llava", tmp_path, padding_free=False, device="cuda")
    torch.testing.assert_close(results[ATTN_IMPLEMENTATION][0], results["sdpa"][0], rtol=1e-3, atol=1e-4)
