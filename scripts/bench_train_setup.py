"""What `scripts/bench_train.py` times: model sizes (`SIZES`) and their random-weight models, synthetic
multi-negative preference rows with images (as napo and as stock TRL take them), and the contenders (`Variant`,
`plan_variants`) with their trainers (`make_trainer`).

A sibling of bench_train.py rather than part of napo: none of it is product code (napo's tiny test models are
`napo.models.tiny`; the FLOP count and levers the benchmark measures are `napo.throughput`).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin, Trainer
from trl import DPOConfig, DPOTrainer

from napo import NaPOConfig, NaPOTrainer
from napo.attention import register_xformers_attention
from napo.models import DEFAULT_WORDS, build_tiny_model
from napo.models.families import family_record

NEGATIVE_COLUMNS = ("rejected", "rejected_language_bias", "rejected_vision_bias")


@dataclass(frozen=True)
class Size:
    """Shapes of a benchmark model and of its rows.

    `text` / `vision` override the language / vision sub-configs of the family's tiny model; `image_size` and
    `patch_size` are pixels; `*_words` are words of the built-in word-level tokenizer, one token each.
    """

    family: str
    text: dict
    vision: dict
    image_size: int
    patch_size: int
    prompt_words: int
    answer_words: int
    lora: bool = False


def _llama_text(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,  # the tiny config's own head dim would otherwise stay
        vocab_size=vocab,
    )


def _qwen2_vl_text(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> dict:
    half = hidden // heads // 2
    # mrope splits the rotary half-dimension over (time, height, width) as Qwen2-VL does (16, 24, 24 of 64).
    mrope = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    return dict(
        _llama_text(hidden, layers, intermediate, heads, kv_heads, vocab),
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e6},
    )


# Image tokens : text tokens is 2 : 1 for every size (a 448 px image is 256 Qwen2-VL tokens; a 336 px one, 576 LLaVA
# tokens; prompt and answers as in RLAIF-V-style preference data).
SIZES: dict[str, Size] = {
    # Qwen2-VL-2B-Instruct's config.
    "2b": Size(
        "qwen2_vl",
        _qwen2_vl_text(1536, 28, 8960, 12, 2, 151936),
        dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
        image_size=448,
        patch_size=14,
        prompt_words=32,
        answer_words=96,
    ),
    # LLaVA-1.5-7B's config (CLIP ViT-L/14-336 + Vicuna-7B), LoRA r=128 on the language model as in its recipe.
    "7b-lora": Size(
        "llava",
        _llama_text(4096, 32, 11008, 32, 32, 32064),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        image_size=336,
        patch_size=14,
        prompt_words=96,
        answer_words=192,
        lora=True,
    ),
    # Qwen2-VL-2B scaled to ~48 M parameters (same ratios of widths, head dim 64, tied embeddings) and its rows to
    # 16 image tokens (112 px), so that a step fits a shared 2-core CPU.
    "cpu-50m": Size(
        "qwen2_vl",
        _qwen2_vl_text(384, 10, 2240, 6, 2, 16384),
        dict(depth=8, embed_dim=320, hidden_size=384, num_heads=5, mlp_ratio=4),
        image_size=112,
        patch_size=14,
        prompt_words=2,
        answer_words=6,
    ),
    # For the tests: seconds per run.
    "tiny": Size(
        "qwen2_vl",
        _qwen2_vl_text(64, 2, 128, 4, 2, 256),
        dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=4),
        image_size=32,
        patch_size=8,
        prompt_words=4,
        answer_words=6,
    ),
}


def build_model(size: Size, device: torch.device, attn: str) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model of `size` with random weights on `device`, and the family's processor.

    Full fine-tuning keeps fp32 weights (bf16 comes from autocast); LoRA keeps the frozen base in bf16 on CUDA
    and puts fp32 adapters of rank 128 on every linear layer of the language model.
    """
    tiny, processor = build_tiny_model(size.family, image_size=size.image_size, patch_size=size.patch_size)
    model_class, config = type(tiny), copy.deepcopy(tiny.config)
    del tiny
    text_config, vision_config = config.get_text_config(), config.vision_config
    for key, value in size.text.items():
        setattr(text_config, key, value)
    if getattr(text_config, "layer_types", None):  # derived from the layer count when the config was built
        text_config.layer_types = text_config.layer_types[:1] * text_config.num_hidden_layers
    for key, value in size.vision.items():
        setattr(vision_config, key, value)
    if size.family == "llava":
        config.vision_feature_layer = -2  # LLaVA-1.5 reads the penultimate CLIP layer
    config.tie_word_embeddings = text_config.tie_word_embeddings
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 7B model built on the host takes minutes
        model = model_class._from_config(config, attn_implementation=attn)
    if size.lora:
        if device.type == "cuda":
            model.to(torch.bfloat16)
        lora = LoraConfig(
            r=128,
            lora_alpha=256,
            lora_dropout=0.0,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        )
        model = get_peft_model(model, lora)
    return model, processor


def synthesise_rows(size: Size, n: int, seed: int = 0, length_spread: float = 0.5) -> Dataset:
    """`n` preference rows: a chat prompt of `size.prompt_words` random words with one random-noise image of
    `size.image_size` px, a `chosen` answer and one answer per `NEGATIVE_COLUMNS` (strings, as napo takes them).

    Each answer has a word count drawn uniformly from size.answer_words · [1 − length_spread, 1 + length_spread]: in
    real preference data a row's answers differ in length (a language-biased negative is often a few words, a
    hallucinated caption long), which is the padding a padded batch pays for."""
    rng = np.random.default_rng(seed)
    words = np.array(DEFAULT_WORDS)
    rows = []
    for _ in range(n):
        pixels = rng.integers(0, 256, (size.image_size, size.image_size, 3), dtype=np.uint8)
        row = {
            "prompt": [{"role": "user", "content": " ".join(rng.choice(words, size.prompt_words))}],
            "images": [Image.fromarray(pixels)],
        }
        low, high = round(size.answer_words * (1 - length_spread)), round(size.answer_words * (1 + length_spread))
        for column in ("chosen", *NEGATIVE_COLUMNS):
            row[column] = " ".join(rng.choice(words, max(1, int(rng.integers(low, high + 1)))))
        rows.append(row)
    return Dataset.from_list(rows)


def as_pairs(rows: Dataset) -> Dataset:
    """The rows as stock TRL takes them: K separate (chosen, rejected) pairs per row, answers as assistant turns."""
    pairs = []
    for row in rows:
        chosen = [{"role": "assistant", "content": row["chosen"]}]
        for column in NEGATIVE_COLUMNS:
            rejected = [{"role": "assistant", "content": row[column]}]
            pairs.append({"prompt": row["prompt"], "images": row["images"], "chosen": chosen, "rejected": rejected})
    return Dataset.from_list(pairs)


@dataclass(frozen=True)
class Variant:
    """One contender: which trainer, where its reference log-probs come from, and its levers."""

    name: str
    trainer: str  # "napo" or "trl"
    precompute: bool
    gradient_checkpointing: bool
    attn: str  # transformers attn_implementation
    optim: str  # transformers optim name
    images_once: bool = False  # napo.fast.encode_images_once
    padding_free: bool = False  # NaPOConfig.padding_free: the batch's sequences packed into one row
    share_prompt: bool = False  # NaPOConfig.share_prompt: a row's prompt once, its answers on the prompt's KV cache


def plan_variants(
    base: Variant, levers: list[str], device: torch.device, family: str
) -> tuple[list[Variant], dict[str, str]]:
    """The contenders for `base` levers: napo, napo-precomputed, trl, then `napo` with each lever of `levers` flipped.

    Returns the variants and, for each requested lever that cannot run here, why (also printed).
    """
    napo = replace(base, name="napo", trainer="napo", precompute=False)
    variants = [napo, replace(napo, name="napo-precomputed", precompute=True), replace(napo, name="trl", trainer="trl")]
    skipped: dict[str, str] = {}
    for lever in levers:
        if lever == "gc":
            variants.append(
                replace(
                    napo,
                    name=f"napo+gc={'off' if base.gradient_checkpointing else 'on'}",
                    gradient_checkpointing=not base.gradient_checkpointing,
                )
            )
        elif lever in ("eager", "sdpa", "flash"):
            attn = "flash_attention_2" if lever == "flash" else lever
            if attn == base.attn:
                skipped[lever] = f"the base attention is already {attn}"
            elif lever == "flash" and device.type != "cuda":
                skipped[lever] = "flash-attention is CUDA-only"
            elif lever == "flash" and importlib.util.find_spec("flash_attn") is None:
                skipped[lever] = "the flash_attn package is not installed"
            else:
                variants.append(replace(napo, name=f"napo+{lever}", attn=attn))
        elif lever == "images-once":
            variants.append(replace(napo, name="napo+images-once", images_once=True))
            variants.append(replace(napo, name="napo-precomputed+images-once", precompute=True, images_once=True))
        elif lever == "packed":
            variants.append(replace(napo, name="napo+packed", padding_free=True))
            variants.append(replace(napo, name="napo-precomputed+packed", precompute=True, padding_free=True))
        elif lever == "shared-prompt":
            record = family_record(family)
            if base.gradient_checkpointing:
                skipped[lever] = "shared-prompt scoring needs the KV cache, which gradient checkpointing turns off"
            elif record.rope_index or record.prefix_lm:
                skipped[lever] = f"{family}'s positions or prefix-LM mask cannot be split between prompt and answer"
            else:
                variants.append(replace(napo, name="napo+shared-prompt", share_prompt=True))
                variants.append(
                    replace(napo, name="napo-precomputed+shared-prompt", precompute=True, share_prompt=True)
                )
        elif lever == "fused":
            if base.optim == "adamw_torch_fused":
                skipped[lever] = "the base optimizer is already adamw_torch_fused"
            else:
                variants.append(replace(napo, name="napo+fused", optim="adamw_torch_fused"))
        elif lever == "xformers":
            if device.type != "cuda":
                skipped[lever] = "xformers is CUDA-only"
            elif importlib.util.find_spec("xformers") is None:
                skipped[lever] = "the xformers package is not installed (pip install 'napo[gpu]')"
            else:
                variants.append(replace(napo, name="napo+xformers", attn=register_xformers_attention()))
        else:
            raise ValueError(f"unknown lever {lever!r}: expected some of {', '.join(LEVERS)}")
    for lever, reason in skipped.items():
        print(f"lever {lever} skipped: {reason}", flush=True)
    return variants, skipped


LEVERS = ("gc", "eager", "sdpa", "fused", "images-once", "packed", "shared-prompt", "flash", "xformers")


def make_trainer(
    variant: Variant,
    model: PreTrainedModel,
    ref_model: PreTrainedModel | None,
    processor: ProcessorMixin,
    rows: Dataset,
    pairs: Dataset,
    batch_rows: int,
    output_dir: str,
    workers: int,
) -> Trainer:
    """The trainer of `variant` over the shared `model` (and `ref_model`, None for LoRA: adapters disabled).

    Mixed precision is left to `train_step` (one autocast for every variant), so bf16/fp16 are off here.
    """
    common = dict(
        output_dir=os.path.join(output_dir, variant.name),
        report_to="none",
        save_strategy="no",
        bf16=False,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=variant.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim=variant.optim,
        max_length=None,  # no truncation: every sequence of every variant is forwarded whole
        dataloader_num_workers=workers,
        beta=0.1,
        seed=0,
    )
    if variant.trainer == "trl":
        args = DPOConfig(**common, per_device_train_batch_size=len(NEGATIVE_COLUMNS) * batch_rows)
        return DPOTrainer(model, ref_model, args=args, train_dataset=pairs, processing_class=processor)
    args = NaPOConfig(
        **common,
        per_device_train_batch_size=batch_rows,
        precompute_ref_log_probs=variant.precompute,
        precompute_ref_batch_size=batch_rows,
    )
    return NaPOTrainer(model, ref_model, args=args, train_dataset=rows, processing_class=processor)
