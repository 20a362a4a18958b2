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
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import PreTrainedModel, Trainer

from napo.provenance import device_description, utc_now, versions, write_json_atomic
from napo.throughput import FlopCounter, set_levers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module, also when this file is loaded by path
from bench_train_setup import (  # noqa: E402
    LEVERS,
    NEGATIVE_COLUMNS,
    SIZES,
    Size,
    Variant,
    as_pairs,
    build_model,
    make_trainer,
    plan_variants,
    synthesise_rows,
)

# Datasheet dense bf16 peak of the accelerators MFU is reported against, in FLOP/s.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


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
    parser.add_argument(
        "--negatives",
        type=int,
        default=len(NEGATIVE_COLUMNS),
        choices=[len(NEGATIVE_COLUMNS)],
        help="negatives per row (K): the rows hold one answer per column of NEGATIVE_COLUMNS",
    )
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


@dataclass
class Contenders:
    """Every variant's trainer over one shared model, with the optimizers and batch streams they step."""

    variants: list[Variant]
    model: PreTrainedModel
    ref_model: PreTrainedModel | None  # the frozen copy every on-the-fly reference uses; None for LoRA
    counter: FlopCounter
    rows: Dataset
    trainers: dict[str, Trainer]
    setup_s: dict[str, float]  # trainer construction, per variant
    optimizers: dict[str, torch.optim.Optimizer]  # one per optimizer kind: Adam state is held once
    batches: dict[str, Iterator[dict]]

    def step(self, variant: Variant) -> dict[str, torch.Tensor]:
        """One optimizer step of `variant` (`train_step`); returns its batch."""
        return train_step(
            self.trainers[variant.name], self.batches[variant.name], self.optimizers[variant.optim], variant
        )


def build_contenders(args: argparse.Namespace, size: Size, device: torch.device, variants: list[Variant]) -> Contenders:
    """The model of `size`, the rows, and a trainer, an optimizer and a batch stream for each of `variants`."""
    model, processor = build_model(size, device, args.attn)
    # Full fine-tune: one frozen copy serves every variant that computes the reference on the fly (TRL too).
    ref_model = None if size.lora else copy.deepcopy(model).eval().requires_grad_(False)
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
    optimizers = {}
    for variant in variants:
        if variant.optim not in optimizers:
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainers[variant.name].args, model)
            optimizers[variant.optim] = cls(trainable, **kwargs)
    batches = {v.name: batches_of(trainers[v.name]) for v in variants}
    counter = FlopCounter.of(model)
    return Contenders(variants, model, ref_model, counter, rows, trainers, setup_s, optimizers, batches)


def time_rounds(bench: Contenders, args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, list]]:
    """Warm-up steps, then `args.repeats` interleaved rounds (order rotated each round) of `args.steps` timed steps
    per variant: per variant, one rate per round of rows/s, rows per CPU second, tokens/s and FLOP/s."""
    variants = bench.variants
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for variant in variants:
        for _ in range(args.warmup):
            bench.step(variant)
    rates = {v.name: {"rows": [], "rows_cpu": [], "tokens": [], "flops": []} for v in variants}
    for repeat in range(args.repeats):
        order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
        for variant in order:
            tokens = flops = 0.0
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                batch = bench.step(variant)
                tokens += float(batch["attention_mask"].sum())
                flops += bench.counter.step(batch, not variant.precompute, variant.images_once)
            sync()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            rates[variant.name]["rows"].append(args.steps * args.batch_rows / seconds)
            rates[variant.name]["rows_cpu"].append(args.steps * args.batch_rows / cpu_seconds)
            rates[variant.name]["tokens"].append(tokens / seconds)
            rates[variant.name]["flops"].append(flops / seconds)
            print(f"repeat {repeat} {variant.name:>28}: {rates[variant.name]['rows'][-1]:.3f} rows/s", flush=True)
    return rates


def variant_results(
    bench: Contenders, rates: dict[str, dict[str, list]], device: torch.device, peak_tflops: float | None
) -> dict[str, dict]:
    """Per variant: its rates (mean ± std over rounds), MFU, and memory (resident + one more step's transient peak;
    the frozen reference copy counts for the variants that use it, those that do not precompute)."""
    params_bytes = tensor_bytes(bench.model.parameters())
    ref_bytes = tensor_bytes(bench.ref_model.parameters()) if bench.ref_model is not None else 0
    results = {}
    for variant in bench.variants:
        transient = transient_peak_bytes(lambda variant=variant: bench.step(variant), device)
        optimizer_bytes = tensor_bytes(t for s in bench.optimizers[variant.optim].state.values() for t in s.values())
        resident = params_bytes + optimizer_bytes + (0 if variant.precompute else ref_bytes)
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
            "setup_s": bench.setup_s[variant.name],
        }
    return results


def comparisons(variants: list[Variant], rates: dict[str, dict[str, list]], results: dict[str, dict]) -> dict:
    """The record's ratios: every variant against TRL (rows/s, rows per CPU second, peak memory; per round, then
    mean ± std), and each lever's effect against the variant it flips."""

    def paired_ratio(name: str, other: str, rate: str = "rows") -> dict:
        return mean_std([a / b for a, b in zip(rates[name][rate], rates[other][rate], strict=True)])

    def memory_ratio(name: str, other: str) -> float:
        return results[name]["peak_mem_bytes"] / results[other]["peak_mem_bytes"]

    lever_effects = {
        "chosen forwarded once per row (napo vs trl)": ("napo", "trl"),
        "reference precomputed (napo-precomputed vs napo)": ("napo-precomputed", "napo"),
        **{f"{v.name} vs napo": (v.name, "napo") for v in variants[3:]},
    }
    others = [name for name in results if name != "trl"]
    return {
        "speedup_vs_trl": {name: paired_ratio(name, "trl") for name in others},
        "speedup_vs_trl_cpu_time": {name: paired_ratio(name, "trl", "rows_cpu") for name in others},
        "peak_mem_ratio_vs_trl": {name: memory_ratio(name, "trl") for name in others},
        "levers": {
            label: {
                "rows_per_s_ratio": paired_ratio(a, b),
                "rows_per_cpu_s_ratio": paired_ratio(a, b, "rows_cpu"),
                "peak_mem_ratio": memory_ratio(a, b),
            }
            for label, (a, b) in lever_effects.items()
        },
    }


def measured_notes(device: torch.device, peak_tflops: float | None, n_rows: int) -> dict[str, str]:
    """What each number of the record measures, in words (the record's "measured")."""
    return {
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
        f"{n_rows} rows",
    }


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and writes its JSON to `--out`; returns the same record."""
    args = parse_args(argv)
    size = SIZES[args.model_size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = Variant("base", "napo", False, args.gradient_checkpointing == "on", args.attn, args.optim)
    variants, skipped = plan_variants(base, [lever for lever in args.levers.split(",") if lever], device, size.family)
    bench = build_contenders(args, size, device, variants)
    rates = time_rounds(bench, args, device)
    peak_tflops = args.peak_tflops or next(
        (v / 1e12 for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda" and k in device_description(device)),
        None,
    )
    results = variant_results(bench, rates, device, peak_tflops)
    napo_batch = next(bench.batches["napo"])
    lm_flops, vision_flops = bench.counter.forward(napo_batch)
    settings = ("steps", "warmup", "repeats", "batch_rows", "attn", "gradient_checkpointing", "optim")
    record = {
        "model_size": args.model_size,
        "model": {
            "family": size.family,
            "params": sum(p.numel() for p in bench.model.parameters()),
            "params_trainable": sum(p.numel() for p in bench.model.parameters() if p.requires_grad),
            "lora": size.lora,
            "flop_counter": asdict(bench.counter),
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
        "settings": {k: getattr(args, k) for k in (*settings, "dataloader_workers")},
        **comparisons(variants, rates, results),
        "levers_skipped": skipped,
        "variants": results,
        "measured": measured_notes(device, peak_tflops, len(bench.rows)),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record, indent=2)
    summary = {
        "speedup_vs_trl": {k: round(v["mean"], 3) for k, v in record["speedup_vs_trl"].items()},
        "peak_mem_ratio_vs_trl": {k: round(v, 3) for k, v in record["peak_mem_ratio_vs_trl"].items()},
    }
    print(json.dumps(summary, indent=1))
    return record


if __name__ == "__main__":
    main()
