"""Throughput of `napo pairs` against a plain batched `model.generate` loop doing the same generation.

Both sides use the same tiny LLaVA (built with `build_tiny_model`, saved and loaded by path), the same rows,
the same negatives (VISION_NEGATIVES), batch size and number of new tokens (`min_new_tokens = max_new_tokens`,
so every answer costs the same). The plain loop gets its degraded inputs prepared outside the timer: it
measures the generation alone. `napo pairs` is timed whole: reading and decoding the JSONL + images,
perturbing, generating, writing shards, the dataset, the parquet copy and the stats.

    python scripts/bench_pairs.py --rows 300 --name tiny_llava_cpu

writes benchmarks/pairs/<name>.json and .md: rows/s of both, `ratio_vs_generate` (target >= 0.8), device,
library versions, date and this command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import perturb
from napo.models import build_tiny_model, load_model
from napo.pairs import VISION_NEGATIVES, PairsConfig, build_pairs
from napo.provenance import provenance, write_json_atomic, write_text_atomic

OBJECTS = ["bear", "banana", "apple", "lemon", "sky", "grass", "snow", "car", "bird", "frog"]


def write_source(folder: Path, rows: int, image_size: int) -> str:
    """`rows` JSONL rows (messages prompt with one image placeholder, one random PNG, chosen) under `folder`."""
    (folder / "img").mkdir(parents=True)
    lines = []
    for i in range(rows):
        pixels = np.random.default_rng(i).integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
        question = f"what colour is the {OBJECTS[i % len(OBJECTS)]}?"
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        lines.append(json.dumps({"prompt": prompt, "images": [f"img/{i}.png"], "chosen": "white"}))
    (folder / "source.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "source.jsonl")


@torch.inference_mode()
def plain_generate_loop(model, processor, degraded: list[list[dict]], batch_size: int, max_new_tokens: int) -> float:
    """Seconds to answer every degraded sample (one list per negative) with processor -> generate -> decode."""
    start = time.perf_counter()
    for samples in degraded:
        for i in range(0, len(samples), batch_size):
            batch = samples[i : i + batch_size]
            texts = [
                processor.apply_chat_template(s["prompt"], tokenize=False, add_generation_prompt=True) for s in batch
            ]
            images = [s["images"] for s in batch] if batch[0]["images"] else None
            inputs = processor(
                text=texts,
                images=images,
                padding=True,
                padding_side="left",
                add_special_tokens=False,
                return_tensors="pt",
            )
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300, help="source rows (default: 300)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="samples per generate call, both sides (default: 16)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per answer, both sides (default: 16)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the source PNGs in pixels (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side; the fastest counts (default: 5)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 is steadiest on a shared CPU (default: 1)"
    )
    parser.add_argument(
        "--name", default="tiny_llava_cpu", help="result file name under benchmarks/pairs/ (default: tiny_llava_cpu)"
    )
    return parser.parse_args()


def time_both(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Seconds of the plain generate loop and of `napo pairs` per repeat, back to back, on the same model and rows
    (saved and loaded by path, as a user's model), after one untimed warm-up batch of the plain loop."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, processor = build_tiny_model("llava", seed=0)
        model.generation_config.min_new_tokens = args.max_new_tokens  # every answer is max_new_tokens long
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        model, processor = load_model(str(tmp / "model"))
        source = write_source(tmp / "data", args.rows, args.image_size)

        rows = [
            {
                "prompt": json.loads(line)["prompt"],
                "images": [Image.open(tmp / "data" / "img" / f"{i}.png").convert("RGB")],
            }
            for i, line in enumerate(Path(source).read_text().splitlines())
        ]
        degraded = [[perturb.apply(spec, row) for row in rows] for spec in VISION_NEGATIVES.values()]
        plain_generate_loop(
            model, processor, [d[: args.batch_size] for d in degraded], args.batch_size, args.max_new_tokens
        )  # warm-up

        plain_s, pairs_s = [], []
        for repeat in range(args.repeats):
            plain_s.append(plain_generate_loop(model, processor, degraded, args.batch_size, args.max_new_tokens))
            config = PairsConfig(
                source,
                str(tmp / "model"),
                str(tmp / f"out{repeat}"),
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
            )
            start = time.perf_counter()
            stats = build_pairs(config, model=model, processing_class=processor, progress=False)
            pairs_s.append(time.perf_counter() - start)
            assert stats["rows_written"] == args.rows, stats
    return plain_s, pairs_s


def write_result(args: argparse.Namespace, plain_s: list[float], pairs_s: list[float]) -> dict:
    """benchmarks/pairs/<name>.json and .md from the timings (the fastest run of each side counts)."""
    result = {
        "name": args.name,
        "rows": args.rows,
        "negatives": VISION_NEGATIVES,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "image_size": args.image_size,
        "pairs_rows_per_s": args.rows / min(pairs_s),
        "generate_rows_per_s": args.rows / min(plain_s),
        "ratio_vs_generate": min(plain_s) / min(pairs_s),
        # Each repeat times both sides back to back: on a shared machine their ratio is steadier than either time.
        "paired_ratios": [p / q for p, q in zip(plain_s, pairs_s)],
        "target_ratio": 0.8,
        "pairs_seconds": pairs_s,
        "generate_seconds": plain_s,
        "model": "build_tiny_model('llava', seed=0): hidden 64, 2 layers, 32 px images, 16 image tokens",
        **provenance("cpu"),
        "command": " ".join(
            shlex.quote(a) for a in [f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", "python", *sys.argv]
        ),
    }
    out = Path(__file__).resolve().parent.parent / "benchmarks" / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{args.name}.json", result, indent=2)
    write_text_atomic(
        out / f"{args.name}.md",
        f"# napo pairs throughput: {args.name}\n\n"
        f"{args.rows} rows x {len(VISION_NEGATIVES)} negatives, batch {args.batch_size}, "
        f"{args.max_new_tokens} new tokens, "
        f"{result['device']}, {result['date']}.\n\n"
        "| | rows/s |\n|---|---|\n"
        f"| `napo pairs` (read, perturb, generate, write) | {result['pairs_rows_per_s']:.1f} |\n"
        f"| plain batched `model.generate` loop | {result['generate_rows_per_s']:.1f} |\n"
        f"| ratio (target >= 0.8) | {result['ratio_vs_generate']:.2f} |\n\n"
        f"Fastest of {args.repeats} interleaved runs per side; "
        f"per-run ratios {', '.join(f'{r:.2f}' for r in result['paired_ratios'])}.\n\n"
        f"Command: `{result['command']}`\n",
    )
    return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    result = write_result(args, *time_both(args))
    print(json.dumps({k: result[k] for k in ("pairs_rows_per_s", "generate_rows_per_s", "ratio_vs_generate")}))


if __name__ == "__main__":
    main()
