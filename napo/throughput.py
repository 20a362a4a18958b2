"""Throughput accounting and switches: the FLOPs of a training step (`FlopCounter`) and one call that puts a trainer's
models in a set of throughput levers (`set_levers`), as `scripts/bench_train.py` measures them.

The levers themselves (images encoded once, padding-free packing) are `napo.fast`; the attention implementations are
transformers' own plus `napo.attention`'s xformers adapter. Every lever changes how a model computes, not what: each
is tested against the plain path (tests/test_throughput_equivalence.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel, Trainer

from napo.fast import encode_images_once, image_chunks, unique_images
from napo.models.families import media_projector, media_tower, unwrap_peft
from napo.trainer import NaPOTrainer


class Levers(Protocol):
    """The throughput settings `set_levers` applies (the benchmark's `Variant` has them)."""

    attn: str  # transformers attn_implementation: "sdpa", "eager", "flash_attention_2", "xformers"
    gradient_checkpointing: bool
    images_once: bool  # napo.fast.encode_images_once
    padding_free: bool  # NaPOConfig.padding_free: the batch's sequences packed into one row
    share_prompt: bool  # NaPOConfig.share_prompt: a row's prompt once, its answers on the prompt's KV cache


def set_levers(trainer: Trainer, levers: Levers) -> None:
    """Put the trainer's policy in `levers`' attention implementation, gradient checkpointing and image encoding, and
    its separate reference model, if any, in the same attention and image encoding; a NaPOTrainer in `levers`'
    padding-free and shared-prompt settings. Several trainers can share one policy: each call switches it to that
    trainer's levers."""
    if isinstance(trainer, NaPOTrainer):
        trainer.padding_free = levers.padding_free
        trainer.args.share_prompt = levers.share_prompt
    for model in (trainer.model, trainer.ref_model):
        if model is not None:
            base = unwrap_peft(model)
            if base.config._attn_implementation != levers.attn:
                base.set_attn_implementation(levers.attn)
            encode_images_once(model, levers.images_once)
    base = unwrap_peft(trainer.model)
    if base.is_activation_checkpointing != levers.gradient_checkpointing:
        if levers.gradient_checkpointing:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.activation_checkpointing_disable()


@dataclass(frozen=True)
class FlopCounter:
    """Parameter counts and attention widths that turn a batch into FLOPs (model FLOPs: recomputation by gradient
    checkpointing is not counted).

    Forward FLOPs of a batch = 2·lm_params·T + 4·lm_layers·lm_width·Σ s²        (language model, T = Σ s tokens)
                             + 2·vision_params·P + 4·vision_layers·vision_width·Σ p²   (vision tower, p patches
                               per image, attention within each image)
                             + 2·projector_params·I                              (I image tokens)
    Training multiplies the forward by 3 (full fine-tune: forward + backward) or, with LoRA, the language model by
    2 (the backward needs the input gradients through the frozen weights, not their weight gradients) and the frozen
    vision tower by 1; an on-the-fly reference adds one forward.
    """

    lm_params: int  # applied to every token: decoder layers, final norm, LM head (not the embedding lookup)
    lm_layers: int
    lm_width: int  # attention heads × head dim
    vision_params: int  # applied to every patch
    vision_layers: int
    vision_width: int
    projector_params: int  # applied to every image token
    patch_size: int  # pixels
    lora: bool

    @classmethod
    def of(cls, model: PreTrainedModel) -> FlopCounter:
        """The counts of a vision-language model (or a PEFT model around one) whose family has a record in
        `napo.models.families` with a tower and a projector; image layouts as `forward` handles them."""
        base = unwrap_peft(model)
        text, vision = base.config.get_text_config(), base.config.vision_config
        tower, projector = media_tower(base), media_projector(base)
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        lm = count(base.get_decoder()) - base.get_input_embeddings().weight.numel()
        return cls(
            lm_params=lm + base.get_output_embeddings().weight.numel(),
            lm_layers=text.num_hidden_layers,
            lm_width=text.num_attention_heads * head_dim,
            vision_params=count(tower) - (count(projector) if projector in tower.modules() else 0),
            vision_layers=getattr(vision, "depth", None) or vision.num_hidden_layers,
            vision_width=getattr(vision, "embed_dim", None) or vision.hidden_size,
            projector_params=count(projector),
            patch_size=vision.patch_size,
            lora=hasattr(model, "get_base_model"),
        )

    def forward(self, batch: dict[str, torch.Tensor], images_once: bool = False) -> tuple[float, float]:
        """(language-model FLOPs, vision FLOPs) of one forward over `batch` (a collator's output); with
        `images_once`, the vision tower and projector count each distinct image of the batch once.

        Image layouts: Qwen2-VL's packed patches with `image_grid_thw` (2×2 patches merge into one token), or one
        (3, H, W) tensor per image with a CLS patch and one token per patch (LLaVA's CLIP tower)."""
        lengths = batch["attention_mask"].sum(dim=1).double()
        grid_thw = batch.get("image_grid_thw")
        images = unique_images(image_chunks(batch["pixel_values"], grid_thw))[0] if images_once else None
        if grid_thw is not None:  # Qwen2-VL: patches per image; 2×2 patches merge into one token
            patches = grid_thw[images if images is not None else slice(None)].prod(dim=-1).double()
            image_tokens = patches.sum() / 4
        else:  # LLaVA: one token per patch, plus the CLS patch the tower also encodes
            n_images, _, height, _ = batch["pixel_values"].shape
            n_images = len(images) if images is not None else n_images
            grid = (height // self.patch_size) ** 2
            patches = torch.full((n_images,), grid + 1.0, dtype=torch.float64)
            image_tokens = torch.tensor(float(n_images * grid))
        lm = 2 * self.lm_params * lengths.sum() + 4 * self.lm_layers * self.lm_width * (lengths**2).sum()
        vision = (
            2 * self.vision_params * patches.sum()
            + 4 * self.vision_layers * self.vision_width * (patches**2).sum()
            + 2 * self.projector_params * image_tokens
        )
        return float(lm), float(vision)

    def step(self, batch: dict[str, torch.Tensor], reference: bool, images_once: bool = False) -> float:
        """FLOPs of one training step over `batch`, plus one reference forward when `reference`."""
        lm, vision = self.forward(batch, images_once)
        flops = (2 * lm + vision) if self.lora else 3 * (lm + vision)
        return flops + (lm + vision if reference else 0.0)
