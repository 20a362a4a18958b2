"""What every cell of a `napo compare` grid shares: the SFT model and the pairs it trains from (the bias lab's, or
the user's dataset split into training pairs and a clean held-out set), optionally with the reference's log-probs
of every answer; built once and cached under the grid's output folder (`lab/cache/<hash>`, `data/<hash>`).

The context `prepare_sources` returns is a plain dict of paths and settings: it is sent to worker processes and
Ray tasks as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from napo.compare.grid import CompareConfig
from napo.provenance import write_text_atomic


def prepare_sources(config: CompareConfig, out: Path) -> dict[str, Any]:
    """Build (or reuse) what every cell shares; a plain dict of paths and settings, sent to worker processes."""
    context = {
        "source": config.source,
        "source_dir": None,
        "out": str(out),
        "beta": config.beta,
        "max_steps": config.max_steps,
        "eval_n": config.eval_n,
        "eval": config.eval,
        "keep_models": config.keep_models,
        "train": dict(config.train),
        "noise_kind": config.noise_kind,
    }
    if config.source == "lab":
        from napo.lab.engine import prepare_lab

        def replicate(lab_seed: int) -> dict[str, Any]:
            lab = prepare_lab(
                str(out / "lab"), recipe=config.lab_recipe, seed=lab_seed, quick=config.quick, task=config.lab_task
            )
            pairs = lab["pairs_dir"]
            if config.share_reference:
                pairs = with_reference_logps(
                    pairs, lab["sft_dir"], Path(lab["sft_dir"]).parent / "pairs_reference", config.train
                )
            return {
                "lab": lab,
                "sft_dir": lab["sft_dir"],
                "pairs": pairs,
                # The lab's cache folder names a hash of its recipe, settings and seed: a changed lab is another source.
                "source_dir": str(Path(lab["sft_dir"]).parent),
                # What the folder holds: a cache rebuilt elsewhere (another session, machine or code) counts only
                # when its SFT weights and pairs are the very same.
                "source_digest": source_digest(lab["sft_dir"], lab["pairs_dir"]),
                "sft_metrics": sft_metrics(Path(lab["sft_dir"]).parent / "sft_metrics.json", lab, config.eval_n),
            }

        replicates = {} if config.shared_sft else {seed: replicate(config.lab_seed + seed) for seed in config.seeds}
        shared = dict(replicates[config.seeds[0]]) if replicates else replicate(config.lab_seed)
        steps = config.max_steps or shared["lab"]["settings"]["pref_steps"]  # quick mode trains fewer steps
        if replicates:  # the report's SFT row: the mean over the replicates' SFT models
            names = shared["sft_metrics"]
            shared["sft_metrics"] = {
                k: float(np.mean([r["sft_metrics"][k] for r in replicates.values()])) for k in names
            }
        return {**context, **shared, "max_steps": steps, "replicates": replicates}
    # Keyed like the lab's cache: another dataset, model or split is another source, whose cells all run anew.
    source = [
        os.path.abspath(config.dataset),
        config.model,
        config.holdout,
        config.lab_seed,
        dataclasses.asdict(config.data),
    ]
    key = hashlib.sha256(json.dumps(source).encode()).hexdigest()[:12]
    data_dir = out / "data" / key
    splits = split_dataset(config, data_dir)
    if config.share_reference:
        splits = {
            name: with_reference_logps(path, config.model, data_dir / f"{name}_reference", config.train)
            for name, path in splits.items()
        }
    return {**context, "source_dir": str(data_dir), "sft_dir": config.model, **splits}


def with_reference_logps(pairs_dir: str, sft_dir: str, target: Path, train: dict[str, Any]) -> str:
    """Save the pairs at `pairs_dir` with the SFT reference's log-probs of every answer (`ref_chosen_logps`,
    `ref_<column>_logps`, NaN where a row lacks the negative) at `target`, once; return `target`.

    Scored by the cells' own trainer (NaPOTrainer's reference precomputation with the grid's `train` settings, so
    tokenization and truncation are the cells'), then joined back to the pairs by row index: rows the trainer drops
    (a prompt that fills max_length) get NaN, and every cell drops them too.
    """
    import datasets
    import torch

    from napo import NaPOConfig, NaPOTrainer
    from napo.collators import ROW_INDEX, _ref_column
    from napo.models import load_model

    key = hashlib.sha256(json.dumps(train, sort_keys=True, default=str).encode()).hexdigest()[:12]
    target = target.with_name(f"{target.name}-{key}")  # other train settings, other tokenization: another table
    if (target / "dataset_info.json").exists():
        return str(target)
    pairs = datasets.load_from_disk(pairs_dir)
    model, processing_class = load_model(sft_dir)
    args = NaPOConfig(
        **{
            **train,
            "output_dir": str(target) + ".work",
            "report_to": "none",
            "precompute_ref_log_probs": True,
            "use_cpu": not torch.cuda.is_available(),
            "gradient_checkpointing": False,
        }
    )
    trainer = NaPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=processing_class)
    scored = trainer.train_dataset
    for column in ("chosen", *trainer.negative_columns):
        values = np.full(len(pairs), np.nan)
        values[np.asarray(scored[ROW_INDEX])] = scored[_ref_column(column)]
        pairs = pairs.add_column(_ref_column(column), values.tolist())
    pairs.save_to_disk(str(target) + ".tmp")
    os.replace(str(target) + ".tmp", target)  # renamed last: a complete table or none
    shutil.rmtree(str(target) + ".work", ignore_errors=True)
    return str(target)


def source_ids(context: dict, seeds: list[int]) -> dict[int, dict[str, str | None]]:
    """The source each seed's cells train from: {seed: {"dir": its folder, "digest": `source_digest` (lab) or
    None}}."""
    replicates = context.get("replicates") or {}
    sources = {seed: replicates.get(seed, context) for seed in seeds}
    return {seed: {"dir": s["source_dir"], "digest": s.get("source_digest")} for seed, s in sources.items()}


def source_digest(sft_dir: str | Path, pairs_dir: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of an SFT model's weights (`*.safetensors`, by name) and its pairs' rows
    (`napo.resume.dataset_fingerprint`): equal only for the same weights and the same pair rows."""
    import datasets

    from napo.resume import dataset_fingerprint

    digest = hashlib.sha256()
    for path in sorted(Path(sft_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(dataset_fingerprint(datasets.load_from_disk(str(pairs_dir))).encode())
    return digest.hexdigest()[:16]


def sft_metrics(path: Path, lab: dict, n: int | None) -> dict[str, float]:
    """The lab's metrics of the SFT model itself (every cell's starting point), computed once per `n`."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("n") == n and saved.get("sft_dir") == lab["sft_dir"]:
        return saved["metrics"]
    from napo.lab.engine import evaluate_lab_model

    metrics = evaluate_lab_model(lab["sft_dir"], lab, n=n)
    write_text_atomic(path, json.dumps({"n": n, "sft_dir": lab["sft_dir"], "metrics": metrics}) + "\n")
    return metrics


def split_dataset(config: CompareConfig, data_dir: Path) -> dict[str, str]:
    """Hold out a clean split of the user's pairs once (seeded by lab_seed) and save both halves."""
    train_dir, heldout_dir = data_dir / "train", data_dir / "heldout"
    if not heldout_dir.exists():
        from napo.data import read_dataset, validate_preference_dataset

        dataset, _ = read_dataset(config.dataset, config.data)
        validate_preference_dataset(dataset)
        if "noisy" in dataset.column_names:  # the user's pairs count as clean: only injected flips are "noisy"
            dataset = dataset.remove_columns("noisy")
        split = dataset.train_test_split(test_size=config.holdout, seed=config.lab_seed)
        split["train"].save_to_disk(str(train_dir))
        split["test"].save_to_disk(str(heldout_dir) + ".tmp")
        os.replace(str(heldout_dir) + ".tmp", heldout_dir)  # written last: its presence marks the split done
    return {"pairs": str(train_dir), "heldout": str(heldout_dir)}
