"""Throughput levers that change how a model computes, not what: each is off by default and tested against the
plain path (tests/test_bench_train.py).

`encode_images_once`: a preference batch holds every row's images once per sequence of the row (NaPOTrainer: the
chosen and K negatives, K+1 copies; TRL: 2 per pair), and the vision tower encodes every copy. With this lever
identical images of a batch go through the tower once and their features are shared by index, so autograd adds the
gradients of all the copies, as if each had been encoded: same loss and gradients, (K+1)× fewer vision FLOPs.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel


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
            (u for u, j in enumerate(first)
             if chunks[j].shape == chunk.shape and sums[j] == sums[i] and torch.equal(chunks[j], chunk)),
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
    fixed-size image tensors (LLaVA); other layouts go through the original unchanged.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model
    if not hasattr(inner, "_napo_plain_get_image_features"):
        inner._napo_plain_get_image_features = plain = inner.get_image_features

        def get_image_features(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            grid = args[0] if args else kwargs.get("image_grid_thw")
            chunks = None
            if inner._napo_encode_images_once and kwargs.get("image_sizes") is None:
                chunks = image_chunks(pixel_values, grid)
            if chunks is None:
                return plain(pixel_values, *args, **kwargs)
            first, inverse = unique_images(chunks)
            pixels = torch.cat([chunks[i] for i in first]) if grid is not None else pixel_values[first]
            if grid is not None:
                args, kwargs = (), {**kwargs, "image_grid_thw": grid[first]}
            outputs = plain(pixels, *args, **kwargs)
            features = outputs.pooler_output
            outputs.pooler_output = tuple(features[u] for u in inverse)
            return outputs

        inner.get_image_features = get_image_features
    inner._napo_encode_images_once = enabled
