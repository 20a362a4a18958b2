"""Throughput levers that change how a model computes, not what: each is off by default and tested against the
plain path (tests/test_throughput_equivalence.py).

`encode_images_once`: a preference batch holds every row's images once per sequence of the row (NaPOTrainer: the
chosen and K negatives, K+1 copies; TRL: 2 per pair), and the vision tower encodes every copy. With this lever
identical images of a batch go through the tower once and their features are shared by index, so autograd adds the
gradients of all the copies, as if each had been encoded: same loss and gradients, (K+1)× fewer vision FLOPs.

`pack_sequences` (padding-free batches): the N sequences of a padded batch become one row of their T real tokens,
with positions restarting at every sequence. transformers then builds a block-diagonal causal mask (SDPA/eager) or
variable-length kernels (flash-attention, CUDA: not run here) from the positions, so no FLOP is spent on padding: a
preference batch pads every sequence to the longest answer of the batch, and a row's K negatives often differ in
length by several×.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from napo.models.families import PER_TOKEN_INPUTS


def image_chunks(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None) -> list[torch.Tensor] | None:
    """The pixels of each image: Qwen2-VL packs patches of all images in one (patches, dim) tensor, split by grid;
    fixed-size towers (LLaVA, ...) take (images, channels, height, width). None for layouts not handled."""
    if image_grid_thw is not None:
        return list(torch.split(pixel_values, image_grid_thw.prod(dim=-1).tolist()))
    if pixel_values.dim() == 4:
        return list(pixel_values)
    return None


def unique_images(chunks: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """(index of the first copy of each distinct image, position in that list of every image).

    Candidates are matched on shape and pixel sum (read back in one transfer), then confirmed with `torch.equal`,
    so only exact copies are merged."""
    sums = torch.stack([c.double().sum() for c in chunks]).tolist()
    first: list[int] = []
    inverse: list[int] = []
    for i, chunk in enumerate(chunks):
        match = next(
            (
                u
                for u, j in enumerate(first)
                if chunks[j].shape == chunk.shape and sums[j] == sums[i] and torch.equal(chunks[j], chunk)
            ),
            None,
        )
        if match is None:
            match = len(first)
            first.append(i)
        inverse.append(match)
    return first, inverse


def encode_images_once(model: PreTrainedModel, enabled: bool = True) -> None:
    """Switch the lever on (or off) for `model` (a transformers VLM, or a PEFT model around one).

    Wraps the inner model's `get_image_features` once; the wrapper encodes each distinct image of the batch once
    when `enabled`, and calls the original otherwise. Handles Qwen2-VL-style packed patches (`image_grid_thw`) and
    fixed-size image tensors (LLaVA, PaliGemma); other layouts (Idefics3's tiled images with their pixel mask,
    LLaVA-NeXT's image sizes) go through the original unchanged.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model
    if not hasattr(inner, "_napo_plain_get_image_features"):
        inner._napo_plain_get_image_features = plain = inner.get_image_features
        signature = inspect.signature(plain)

        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            # By name: the second positional argument is image_grid_thw for Qwen2-VL but pixel_attention_mask for
            # Idefics3.
            call = signature.bind(*args, **kwargs)
            pixel_values, grid = call.arguments["pixel_values"], call.arguments.get("image_grid_thw")
            # Another per-image tensor (image_sizes, pixel_attention_mask, ...) would need the same de-duplication:
            # such calls keep the plain path.
            other_tensors = any(
                isinstance(value, torch.Tensor)
                for name, value in call.arguments.items()
                if name not in ("pixel_values", "image_grid_thw")
            )
            chunks = None
            if inner._napo_encode_images_once and not other_tensors:
                chunks = image_chunks(pixel_values, grid)
            if chunks is None:
                return plain(*args, **kwargs)
            first, inverse = unique_images(chunks)
            call.arguments["pixel_values"] = (
                torch.cat([chunks[i] for i in first]) if grid is not None else pixel_values[first]
            )
            if grid is not None:
                call.arguments["image_grid_thw"] = grid[first]
            # All by keyword: decorators of get_image_features (config defaults) fill in arguments by name.
            extra = {
                k: v for k, v in call.arguments.items() if signature.parameters[k].kind is inspect.Parameter.VAR_KEYWORD
            }
            named = {k: v for k, v in call.arguments.items() if k not in extra}
            outputs = plain(**named, **{k: v for values in extra.values() for k, v in values.items()})
            features = outputs.pooler_output
            if isinstance(features, torch.Tensor):  # one (tokens, dim) slice per image (LLaVA, PaliGemma)
                outputs.pooler_output = features[torch.tensor(inverse, device=features.device)]
            else:  # a sequence of per-image features (Qwen2-VL: images differ in token count)
                outputs.pooler_output = tuple(features[u] for u in inverse)
            return outputs

        inner.get_image_features = get_image_features
    inner._napo_encode_images_once = enabled


# Per-token model inputs that packing flattens like `input_ids` (the families' registry says which); every other
# input (pixels, grids, audio features) describes media in sequence order and is kept as it is.
_PACKED_PER_TOKEN = ("input_ids", *(name for name, spec in PER_TOKEN_INPUTS.items() if spec.packable))
_UNPACKABLE = {name: spec for name, spec in PER_TOKEN_INPUTS.items() if not spec.packable}


def pack_sequences(
    model_kwargs: dict[str, Any],
    completion_mask: torch.Tensor,
    rope_index: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Packs a padded batch of N sequences into one row of its T real tokens.

    `model_kwargs` holds `input_ids` and `attention_mask` of shape (N, L) (any padding side) and the model's other
    inputs; `completion_mask` (N, L) marks the answer tokens whose log-probs are scored. `rope_index`, given for
    multimodal rotary models (Qwen2-VL's `get_rope_index`), gives the (3, N, L) positions of a padded batch with
    images, which are packed too and preceded by the 1-D text positions that tell transformers where sequences start.

    Raises ValueError for a batch with a per-token input that cannot be packed exactly (`PerTokenInput.packable`:
    prefix-LM `token_type_ids`, PaliGemma).

    Returns the packed model inputs (`input_ids` (1, T), `position_ids` (1, T) or (4, 1, T), no `attention_mask`),
    labels (1, T) — the answer tokens, -100 elsewhere and at the first token of every sequence, so no sequence is
    scored from the end of the one packed before it — and `sequence_of_token` (T,), the sequence each token is from.
    """
    for name, spec in _UNPACKABLE.items():
        if name in model_kwargs:
            raise ValueError(f"padding_free does not support {spec.why}: set padding_free=False")
    attention_mask = model_kwargs["attention_mask"]
    real = attention_mask.bool()
    packed = {key: value for key, value in model_kwargs.items() if key != "attention_mask"}
    for key in _PACKED_PER_TOKEN:
        if key in packed:
            packed[key] = model_kwargs[key][real].unsqueeze(0)
    padded_positions = attention_mask.long().cumsum(dim=1) - 1  # (N, L): 0, 1, ... along each sequence's tokens
    text_positions = padded_positions[real].unsqueeze(0)
    positions = text_positions
    if rope_index is not None:
        # The model takes (4, 1, T) positions: 1-D text positions (where sequences start), then its 3 rotary rows,
        # which are the text positions again for a batch without images or videos. Given (1, T) positions instead,
        # Qwen2-VL would not see the packing and let the sequences attend to each other.
        if model_kwargs.get("image_grid_thw") is None and model_kwargs.get("video_grid_thw") is None:
            rope_positions = padded_positions.expand(3, -1, -1)
        else:
            rope_positions, _ = rope_index(
                model_kwargs["input_ids"],
                mm_token_type_ids=model_kwargs.get("mm_token_type_ids"),
                image_grid_thw=model_kwargs.get("image_grid_thw"),
                video_grid_thw=model_kwargs.get("video_grid_thw"),
                attention_mask=attention_mask,
            )
        positions = torch.cat((text_positions.unsqueeze(0), rope_positions[:, real].unsqueeze(1)))
    packed["position_ids"] = positions
    labels = model_kwargs["input_ids"].masked_fill(completion_mask == 0, -100)[real].unsqueeze(0)
    labels[text_positions == 0] = -100  # the padded path never scores a sequence's first token either
    sequence_of_token = torch.arange(real.size(0), device=real.device).unsqueeze(1).expand_as(real)[real]
    return packed, labels, sequence_of_token
