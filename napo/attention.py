"""xformers' memory-efficient attention as a transformers attention implementation, `attn_implementation="xformers"`.

`register_xformers_attention()` adds it to transformers' `AttentionInterface` (and SDPA's mask builder to its
`AttentionMaskInterface`), after which any model loads or switches to it by name:

    register_xformers_attention()
    model.set_attn_implementation("xformers")       # or from_pretrained(..., attn_implementation="xformers")

For every layer it computes, per batch b and head h (shapes: query (B, H, Lq, D), key/value (B, H_kv, Lk, D)),

    out[b, :, h] = softmax(scaling · Q_bh K_bhᵀ + bias_b) V_bh       →  (B, Lq, H, D), as transformers expects

with bias = a causal mask handled inside the kernel when the batch has no padding (transformers then passes no
mask), else 0 where transformers' boolean mask allows attention and −inf elsewhere (padded and packed batches).
Grouped-query heads are repeated to H. xformers is CUDA-only and optional (`pip install napo[gpu]`); on a CPU the
function raises, and `register_xformers_attention` refuses when xformers cannot be imported.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "xformers"


def _aligned_bias(mask: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias (B, heads, Lq, Lk) from a boolean mask (B, 1|heads, Lq, Lk): 0 where True, −inf elsewhere.

    xformers' kernels read the bias with strides aligned to 8 elements, so it is a view into a buffer whose last
    dimension is rounded up to a multiple of 8."""
    batch, _, q_length, kv_length = mask.shape
    buffer = torch.empty(batch, heads, q_length, math.ceil(kv_length / 8) * 8, dtype=dtype, device=mask.device)
    bias = buffer[..., :kv_length]
    bias.copy_(torch.where(mask, 0.0, float("-inf")).to(dtype).expand_as(bias))
    return bias


def xformers_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    ops: ModuleType | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """One attention layer through `xformers.ops.memory_efficient_attention` (or `ops`, anything with the same
    `memory_efficient_attention` and `LowerTriangularMask`). Returns (output (B, Lq, H, D), None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("xformers attention does not support logit soft-capping: use eager attention")
    if ops is None:
        import xformers.ops as ops
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # transformers: (B, heads, L, D); xformers: (B, L, heads, D).
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is None:
        bias = ops.LowerTriangularMask() if is_causal and query.shape[1] > 1 else None
    else:
        if attention_mask.dtype != torch.bool:  # already additive (a model's own float mask)
            attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        bias = _aligned_bias(attention_mask, query.shape[2], query.dtype)
    output = ops.memory_efficient_attention(
        query, key, value, attn_bias=bias, p=dropout if module.training else 0.0, scale=scaling
    )
    return output, None


def register_xformers_attention() -> str:
    """Registers `attn_implementation="xformers"` with transformers; returns its name. Raises ImportError naming the
    install command when xformers is not importable (it is the optional `gpu` extra, CUDA-only)."""
    try:
        import xformers.ops  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "attn_implementation='xformers' needs xformers, a CUDA-only optional dependency: pip install 'napo[gpu]'"
        ) from error
    AttentionInterface.register(ATTN_IMPLEMENTATION, xformers_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
