"""Training throughput of NaPOTrainer against stock `trl.DPOTrainer` on the same multi-negative rows.

Every contender ("variant") trains the same model object on rows synthesised with images at realistic token
counts, in one process, interleaved round by round (the order rotated each round), so machine noise hits all of
them alike. A row holds one chosen answer and K negatives:

    napo              NaPOTrainer, K negatives per row in one forward, reference log-probs on the fly
    napo-precomputed  NaPOTrainer, reference log-probs computed once before training (cost reported apart)
    trl               trl.DPOTrainer on the same rows as K separate pairs (2K sequences per row), reference on the fly
    napo+<lever>      `napo` with one lever flipped: gc (gradient checkpointing), eager / sdpa (attention),
                      fused (AdamW `adamw_torch_fused`), images-once (`napo.fast.encode_images_once`: each row's
                      image through the vision tower once, not once per sequence), packed (`padding_free`: the
                      batch's sequences in one row of their real tokens, no padding), shared-prompt
                      (`share_prompt`: a row's prompt and image once, its answers on the prompt's KV cache; FLOPs
                      and MFU are still counted for the padded batch, so they read as effective FLOPs), flash
                      (flash_attention_2, CUDA only), xformers (`napo.attention`, CUDA only)

One step of every variant covers `--batch-rows` rows (TRL gets K·rows pairs per step), so all variants take the
same number of optimizer steps per row. Throughput is rows/s; `speedup_vs_trl` is the per-round ratio of a
variant's rows/s to TRL's in the same round, mean ± std over rounds.

On a CPU (no GPU lent; one thread, since OpenMP spin-waiting distorts shared machines):
    OMP_NUM_THREADS=1 python scripts/bench_train.py --model-size cpu-50m --steps 1 --warmup 1 --repeats 5 \
        --batch-rows 1 --out benchmarks/gpu/cpu-50m.json
On a GPU (benchmarks/gpu/README.md has the 7b-lora command and the memory estimate behind the batch size):
    python scripts/bench_train.py --model-size 2b --batch-rows 2 --steps 10 --warmup 3 --repeats 3 \
        --dataloader-workers 4 --levers gc,eager,fused,images-once,packed,flash,xformers --out benchmarks/gpu/2b.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import PreTrainedModel, ProcessorMixin, Trainer
from trl import DPOConfig, DPOTrainer

from napo import NaPOConfig, NaPOTrainer
from napo.attention import register_xformers_attention
from napo.models import DEFAULT_WORDS, build_tiny_model
from napo.models.families import family_record
from napo.provenance import device_description, utc_now, versions, write_json_atomic
from napo.throughput import FlopCounter, set_levers

NEGATIVE_COLUMNS = ("rejected", "rejected_language_bias", "rejected_vision_bias")
# Datasheet dense bf16 peak of the accelerators MFU is reported against, in FLOP/s.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


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


def batches_of(trainer: Trainer) -> Iterator[dict[str, torch.Tensor]]:
    """The trainer's own training batches (its collator, its sampler), endlessly: collation stays in every step."""
    while True:
        yield from trainer.get_train_dataloader()


def train_step(
    trainer: Trainer, batches: Iterator[dict], optimizer: torch.optim.Optimizer, variant: Variant
) -> dict[str, torch.Tensor]:
    """One optimizer step of `variant` (collate, forward, backward, clip to norm 1, AdamW); returns the batch.

    bf16 autocast on CUDA, fp32 on CPU (bf16 autocast is several times slower there), the same for every variant.
    """
    model = trainer.model
    set_levers(trainer, variant)
    model.train()
    batch = trainer._prepare_inputs(next(batches))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if batch["input_ids"].is_cuda else nullcontext()
    with autocast:
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # gradients are then part of every step's transient memory
    return batch


def transient_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by `fn` at its peak, above what was allocated when it started.

    CUDA: the caching allocator's `max_memory_allocated`. CPU: the torch allocations and frees that the profiler
    records (`profile_memory=True`), replayed in time order; Python objects and allocator slack are not counted.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes held by `tensors`, each counted once."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def mean_std(values: list[float]) -> dict[str, float | list[float]]:
    """Mean and sample standard deviation (0 for one value) of `values`, with the values themselves."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "per_repeat": [float(v) for v in array]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", choices=sorted(SIZES), required=True)
    parser.add_argument("--steps", type=int, default=2, help="timed steps of each variant per repeat")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant before the repeats")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; spread is over these")
    parser.add_argument("--batch-rows", type=int, default=2, help="rows per step (TRL: K·rows pairs)")
    parser.add_argument("--negatives", type=int, default=3, choices=[3], help="negatives per row (K)")
    parser.add_argument("--attn", default="sdpa", help="base attention implementation: sdpa or eager")
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="off")
    parser.add_argument("--optim", default="adamw_torch", help="base optimizer (a transformers optim name)")
    parser.add_argument(
        "--levers",
        default="gc,eager,fused,images-once,packed,shared-prompt,flash,xformers",
        help=f"comma-separated levers flipped on `napo`, each a variant: {', '.join(LEVERS)}",
    )
    parser.add_argument(
        "--answer-length-spread",
        type=float,
        default=0.5,
        help="answer lengths are uniform in answer_words·[1−s, 1+s] (0: every answer equally long)",
    )
    parser.add_argument("--dataloader-workers", type=int, default=0)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak of the accelerator for MFU (default: datasheet value for H100/H200/A100)",
    )
    parser.add_argument("--out", required=True, help="JSON file to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and writes its JSON to `--out`; returns the same record."""
    args = parse_args(argv)
    size = SIZES[args.model_size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = Variant("base", "napo", False, args.gradient_checkpointing == "on", args.attn, args.optim)
    variants, skipped = plan_variants(base, [lever for lever in args.levers.split(",") if lever], device, size.family)

    model, processor = build_model(size, device, args.attn)
    # Full fine-tune: one frozen copy serves every variant that computes the reference on the fly (TRL too).
    ref_model = None if size.lora else copy.deepcopy(model).eval().requires_grad_(False)
    counter = FlopCounter.of(model)
    rows = synthesise_rows(size, 4 * args.batch_rows, length_spread=args.answer_length_spread)
    pairs = as_pairs(rows)
    workdir = tempfile.mkdtemp(prefix="bench_train-")  # fresh: precomputed reference log-probs are not reused

    trainers, setup_s = {}, {}
    for variant in variants:
        start = time.perf_counter()
        trainers[variant.name] = make_trainer(
            variant, model, ref_model, processor, rows, pairs, args.batch_rows, workdir, args.dataloader_workers
        )
        setup_s[variant.name] = time.perf_counter() - start
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizers = {}  # one per optimizer kind, shared by the variants that use it: Adam state is held once
    for variant in variants:
        if variant.optim not in optimizers:
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainers[variant.name].args, model)
            optimizers[variant.optim] = cls(trainable, **kwargs)
    batches = {v.name: batches_of(trainers[v.name]) for v in variants}

    def step(variant: Variant) -> dict[str, torch.Tensor]:
        return train_step(trainers[variant.name], batches[variant.name], optimizers[variant.optim], variant)

    def uses_reference_model(variant: Variant) -> bool:
        return not variant.precompute

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for variant in variants:
        for _ in range(args.warmup):
            step(variant)
    rates: dict[str, dict[str, list[float]]] = {
        v.name: {"rows": [], "rows_cpu": [], "tokens": [], "flops": []} for v in variants
    }
    for repeat in range(args.repeats):
        order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
        for variant in order:
            tokens = flops = 0.0
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                batch = step(variant)
                tokens += float(batch["attention_mask"].sum())
                flops += counter.step(batch, uses_reference_model(variant), variant.images_once)
            sync()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            rates[variant.name]["rows"].append(args.steps * args.batch_rows / seconds)
            rates[variant.name]["rows_cpu"].append(args.steps * args.batch_rows / cpu_seconds)
            rates[variant.name]["tokens"].append(tokens / seconds)
            rates[variant.name]["flops"].append(flops / seconds)
            print(f"repeat {repeat} {variant.name:>28}: {rates[variant.name]['rows'][-1]:.3f} rows/s", flush=True)

    params_bytes = tensor_bytes(model.parameters())
    ref_bytes = tensor_bytes(ref_model.parameters()) if ref_model is not None else 0
    peak_tflops = args.peak_tflops or next(
        (v / 1e12 for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda" and k in device_description(device)),
        None,
    )
    results = {}
    for variant in variants:
        transient = transient_peak_bytes(lambda variant=variant: step(variant), device)
        optimizer_bytes = tensor_bytes(t for s in optimizers[variant.optim].state.values() for t in s.values())
        resident = params_bytes + optimizer_bytes + (ref_bytes if uses_reference_model(variant) else 0)
        flops = mean_std(rates[variant.name]["flops"])
        results[variant.name] = {
            "variant": asdict(variant),
            "rows_per_s": mean_std(rates[variant.name]["rows"]),
            "rows_per_cpu_s": mean_std(rates[variant.name]["rows_cpu"]),
            "tokens_per_s": mean_std(rates[variant.name]["tokens"]),
            "flops_per_s": flops,
            "mfu": None if peak_tflops is None else flops["mean"] / (peak_tflops * 1e12),
            "peak_mem_bytes": resident + transient,
            "resident_bytes": resident,
            "transient_peak_bytes": transient,
            "setup_s": setup_s[variant.name],
        }

    def paired_ratio(name: str, other: str, rate: str = "rows") -> dict:
        return mean_std([a / b for a, b in zip(rates[name][rate], rates[other][rate], strict=True)])

    def memory_ratio(name: str, other: str) -> float:
        return results[name]["peak_mem_bytes"] / results[other]["peak_mem_bytes"]

    lever_effects = {
        "chosen forwarded once per row (napo vs trl)": ("napo", "trl"),
        "reference precomputed (napo-precomputed vs napo)": ("napo-precomputed", "napo"),
        **{f"{v.name} vs napo": (v.name, "napo") for v in variants[3:]},
    }
    napo_batch = next(batches["napo"])
    lm_flops, vision_flops = counter.forward(napo_batch)
    record = {
        "model_size": args.model_size,
        "model": {
            "family": size.family,
            "params": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in trainable),
            "lora": size.lora,
            "flop_counter": asdict(counter),
        },
        "rows": {
            "negatives_per_row": args.negatives,
            "prompt_words": size.prompt_words,
            "answer_words": size.answer_words,
            "answer_length_spread": args.answer_length_spread,
            "image_px": size.image_size,
            "tokens_per_napo_sequence": float(napo_batch["attention_mask"].sum(1).double().mean()),
            # What the packed lever removes: padding tokens in napo's padded batches.
            "padding_share_of_napo_batch": 1 - float(napo_batch["attention_mask"].double().mean()),
            "vision_share_of_forward_flops": vision_flops / (lm_flops + vision_flops),
        },
        "device": device_description(device),
        "dtype": "fp32 weights, bf16 autocast" if device.type == "cuda" else "fp32",
        "versions": versions(),
        "command": "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
        + "python scripts/bench_train.py "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "date": utc_now(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "steps",
                "warmup",
                "repeats",
                "batch_rows",
                "attn",
                "gradient_checkpointing",
                "optim",
                "dataloader_workers",
            )
        },
        "speedup_vs_trl": {name: paired_ratio(name, "trl") for name in results if name != "trl"},
        "speedup_vs_trl_cpu_time": {name: paired_ratio(name, "trl", "rows_cpu") for name in results if name != "trl"},
        "peak_mem_ratio_vs_trl": {name: memory_ratio(name, "trl") for name in results if name != "trl"},
        "levers": {
            label: {
                "rows_per_s_ratio": paired_ratio(a, b),
                "rows_per_cpu_s_ratio": paired_ratio(a, b, "rows_cpu"),
                "peak_mem_ratio": memory_ratio(a, b),
            }
            for label, (a, b) in lever_effects.items()
        },
        "levers_skipped": skipped,
        "variants": results,
        "measured": {
            "rows_per_s": "rows (one chosen + K negatives each) per second of wall time over `steps` consecutive "
            "optimizer steps (collation, forward, backward, clipping, AdamW), variants interleaved per repeat; "
            "mean ± sample std over repeats. Ratios are per repeat, then mean ± std.",
            "rows_per_cpu_s": "the same rows over the process CPU time (all threads, time.process_time) of those "
            "steps: on a shared CPU, where other processes take most of the wall time, this measures the work; "
            "meaningless on a GPU, where the host mostly waits",
            "tokens_per_s": "tokens forwarded through the policy (image tokens included, padding not) per second; "
            "TRL forwards more tokens for the same rows",
            "flops": FlopCounter.__doc__.split("\n\n", 1)[1].strip(),
            "mfu": "achieved FLOP/s over the dense bf16 peak"
            if peak_tflops
            else "not meaningful on CPU (fp32, no bf16 peak): see flops_per_s for achieved FLOP/s",
            "peak_mem_bytes": "resident (parameters + AdamW state + the frozen reference copy when the variant "
            "uses it) + transient peak of one step above its start (gradients, activations, batch), "
            + (
                "from torch.cuda.max_memory_allocated"
                if device.type == "cuda"
                else "from the torch CPU allocations recorded by torch.profiler (profile_memory=True); not RSS"
            ),
            "setup_s": "trainer construction; for napo-precomputed it includes the one reference pass over all "
            f"{len(rows)} rows",
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record, indent=2)
    print(
        json.dumps(
            {
                "speedup_vs_trl": {k: round(v["mean"], 3) for k, v in record["speedup_vs_trl"].items()},
                "peak_mem_ratio_vs_trl": {k: round(v, 3) for k, v in record["peak_mem_ratio_vs_trl"].items()},
            },
            indent=1,
        )
    )
    return record


if __name__ == "__main__":
    main()
