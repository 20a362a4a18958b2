"""The bias lab end to end: SFT a tiny LLaVA on the biased train split, build language-/vision-biased
pairs with it, train DPO and NaPO from the same SFT checkpoint, and measure every model's bias.

    lab = prepare_lab("out")                      # SFT checkpoint + pairs (cached in out/cache/)
    run = train_lab_model(lab["sft_dir"], lab["pairs_dir"], "out/napo-0", objective="napo", seed=0)
    metrics = evaluate_lab_model(run["model_dir"], lab)
    report = run_lab("benchmarks/lab")            # all of it, plus report.md / report.json / PNGs

The steps are separate functions so that `napo compare` can reuse the SFT checkpoint and pairs.
Every cached artifact lives under `<out>/cache/<key>/`, where key hashes the settings that produce
it: a rerun with the same settings reuses it, other settings get their own folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, PreTrainedModel, ProcessorMixin

from napo.evaluate import accuracy, answer_batch, chair, modality_metrics, pope_metrics, prior_following_rate
from napo.inference import generate
from napo.jobs import locks_output
from napo.lab.scenes import load_recipe, make_split, vocabulary
from napo.models import build_tiny_model, build_tokenizer, load_model
from napo.provenance import device_description, utc_now, versions, write_json_atomic, write_text_atomic

POPE_SPLITS = ("pope_random", "pope_popular", "pope_adversarial")
# The metrics the report's `models` table carries for every model (the list).
REPORT_METRICS = (
    "counterfactual_accuracy",
    "prior_consistent_accuracy",
    "no_prior_accuracy",
    "prior_following_rate",
    "blind_agreement",
    "question_blind_agreement",
    "image_share",
    "pope_f1",
    "pope_accuracy",
    "pope_yes_ratio",
    "chair_s",
    "chair_i",
)


@dataclass(frozen=True)
class LabSettings:
    """Sizes of one lab run. `full()` is the default lab (< 10 min on 2 CPU cores); `quick()` the CI variant.

    The model is the notes' prototype — a CLIP tower (64 px, hidden 64, 2 layers) under a Llama (hidden 128,
    2 layers) — except for the patch: 8 px (64 image tokens), not 16. With 16 px patches a 5-12 px object is a
    few percent of its patch and the model never learnt to read any colour (chance level after 400 steps even
    on clean single-object images); with 8 px it reads them within ~100 steps. SFT: AdamW, cosine schedule,
    loss on the answer tokens and EOS only.
    """

    n_train: int = 6000  # SFT rows of the biased train split
    sft_steps: int = 700
    sft_batch_size: int = 64
    sft_lr: float = 1e-3
    n_pairs: int = 1500  # source rows of the pair generator (held-out `pairs` split)
    n_counterfactual_pairs: int = 300  # extra source rows drawn like the counterfactual split (held-out seed)
    pref_steps: int = 120
    pref_batch_size: int = 32
    pref_lr: float = 1e-4
    beta: float = 0.1
    n_eval: int = 200  # rows per evaluation split
    text_hidden: int = 128
    text_layers: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    image_size: int = 64
    patch_size: int = 8
    # Negatives identical to chosen (a blind answer that is right because the prior is): kept, as the paper keeps
    # them (its noise is exactly such "negatives"). Such a pair has z ≡ 0 and no gradient, but it counts in its
    # type's means: it pulls ψ and ψ_Σ towards 0, so q towards 1 − σ(0) = 0.5 ('paper') / 1 ('official') and the
    # type's dynamic weight down, and it dilutes that type's mean loss by the fraction of ties.
    keep_identical: bool = True
    pair_temperature: float = 1.0  # the blind / question-less model's negatives are sampled (seeded), as the paper's

    @classmethod
    def full(cls) -> LabSettings:
        return cls()

    @classmethod
    def quick(cls) -> LabSettings:
        return cls(n_train=1024, sft_steps=80, n_pairs=96, n_counterfactual_pairs=32, pref_steps=10, n_eval=32)


# The SFT gate of lab v2 (issue 15): the model reads the image where no prior competes, follows the prior where it
# agrees with the image, and is torn where they disagree — as real VLMs are.
SFT_GATE = {
    "no_prior_accuracy": (0.9, 1.0),
    "counterfactual_accuracy": (0.3, 0.7),
    "prior_consistent_accuracy": (0.95, 1.0),
}
# Evaluation splits whose metrics are also reported per image-noise level: metric name -> split.
PER_NOISE_SPLITS = {
    "counterfactual_accuracy": "counterfactual",
    "prior_consistent_accuracy": "prior_consistent",
    "no_prior_accuracy": "no_prior",
}


def prepare_lab(
    out_dir: str | Path,
    *,
    recipe: str | dict | None = None,
    seed: int = 0,
    quick: bool = False,
    keep_identical: bool = True,
) -> dict[str, Any]:
    """SFT the lab model and build its preference pairs, reusing both when cached with the same settings.

    Args:
        out_dir: the lab's output folder; artifacts go to `<out_dir>/cache/<key>/{sft,pairs}`.
        recipe: a recipe path, an already loaded recipe, or None for the packaged default.
        seed: the replicate: seed of the model weights, of SFT batch order and of the sampled negatives and the
            general `rejected` answers (data splits use the recipe's seed).
        quick: the small CI variant (`LabSettings.quick()`).
        keep_identical: keep negatives identical to chosen (the paper's choice; see `LabSettings.keep_identical`).

    Returns a JSON-able dict: sft_dir (a `save_pretrained` folder: model + processor), pairs_dir (a
    `datasets.save_to_disk` folder of preference rows), pairs_stats (the pair generator's counts),
    recipe (the loaded recipe), settings (`LabSettings` as a dict), seed, sft_wall_time_s and
    pairs_wall_time_s (0 when cached). `evaluate_lab_model` needs only recipe and settings.
    """
    rec = recipe if isinstance(recipe, dict) else load_recipe(recipe)
    settings = replace(LabSettings.quick() if quick else LabSettings.full(), keep_identical=keep_identical)
    key = hashlib.sha256(json.dumps([rec, asdict(settings), seed], sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(out_dir) / "cache" / key
    sft_dir, sft_time = _sft(cache / "sft", rec, settings, seed)
    pairs_dir, stats, pairs_time = _pairs(cache / "pairs", sft_dir, rec, settings, seed)
    return {
        "sft_dir": str(sft_dir),
        "pairs_dir": str(pairs_dir),
        "pairs_stats": stats,
        "recipe": rec,
        "settings": asdict(settings),
        "seed": seed,
        "sft_wall_time_s": sft_time,
        "pairs_wall_time_s": pairs_time,
    }


def lab_training_config(out_dir: str | Path, *, objective: str, seed: int, **overrides: Any):
    """The lab's preference-training settings (`LabSettings.full()`'s β, learning rate, batch size and steps; CPU,
    fp32, cosine schedule, reference log-probs precomputed once), as a `NaPOConfig` with output folder
    `<out_dir>/trainer`.

    Args:
        out_dir: the run's folder (`train_lab_model` saves the model to `<out_dir>/model`).
        objective: a name of `napo.objectives.OBJECTIVES` ("napo", "dpo", ...).
        seed: the trainer's seed (batch order).
        overrides: any other `NaPOConfig` field (q, max_steps, beta, learning_rate, weight_*, ...); `max_steps=None`
            keeps the lab's `pref_steps`.
    """
    from napo.config import NaPOConfig  # trl is slow to import: only training needs it

    defaults = LabSettings.full()
    config = dict(
        output_dir=str(Path(out_dir) / "trainer"),
        objective=objective,
        q="paper",
        beta=defaults.beta,
        learning_rate=defaults.pref_lr,
        per_device_train_batch_size=defaults.pref_batch_size,
        max_steps=defaults.pref_steps,
        lr_scheduler_type="cosine",
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        precompute_ref_log_probs=True,  # one reference pass over the pairs instead of one per step
        # A row's 3-4 answers share its 74-token prompt (64 image tokens): run it once (2.5x faster steps, same loss).
        share_prompt=True,
    )
    if overrides.get("max_steps", 0) is None:
        del overrides["max_steps"]
    config.update(overrides)
    return NaPOConfig(**config)


def train_lab_model(
    sft_dir: str | Path,
    pairs: str | Path | datasets.Dataset,
    out_dir: str | Path,
    *,
    objective: str,
    seed: int,
    **config_overrides: Any,
) -> dict[str, Any]:
    """Train one preference objective from the SFT checkpoint with the lab's settings (`lab_training_config`)
    through `napo.training.train_preference`; save the model to `<out_dir>/model`.

    Args:
        sft_dir: the SFT checkpoint (`prepare_lab()["sft_dir"]`), also the frozen reference.
        pairs: preference rows (a `save_to_disk` folder or a Dataset), e.g. `prepare_lab()["pairs_dir"]`.
        objective, seed, config_overrides: as `lab_training_config`'s (q, max_steps, beta, learning_rate, ...).

    Returns model_dir, log_history (the trainer's logged dicts: loss, `language_bias/q`,
    `vision_bias/rewards/margins`, ...) and wall_time_s (training only).
    """
    from napo.training import train_preference

    dataset = pairs if isinstance(pairs, datasets.Dataset) else datasets.load_from_disk(str(pairs))
    model, processor = load_model(str(sft_dir))
    config = lab_training_config(out_dir, objective=objective, seed=seed, **config_overrides)
    run = train_preference(dataset, model, config, processing_class=processor, model_dir=Path(out_dir) / "model")
    return {"model_dir": run.model_dir, "log_history": run.log_history, "wall_time_s": run.wall_time_s}


def evaluate_lab_model(
    model_dir_or_model_and_processor: str | Path | tuple[PreTrainedModel, ProcessorMixin],
    lab: dict[str, Any],
    *,
    n: int | None = None,
) -> dict[str, float]:
    """The lab's bias metrics of one model, all in [0, 1].

    Args:
        model_dir_or_model_and_processor: a `save_pretrained` folder, or (model, processor).
        lab: `prepare_lab`'s dict (only "recipe" and "settings" are read) or `lab_spec(recipe)`.
        n: rows per evaluation split; None: the lab's `n_eval`.

    Returns counterfactual_accuracy, prior_consistent_accuracy, prior_following_rate (counterfactual
    rows answered with the prior colour), blind_agreement and question_blind_agreement (counterfactual
    rows: answer unchanged without the image / without the question), image_share (mean Shapley image
    share of the reference answer's log-prob, counterfactual rows), pope_f1 / pope_accuracy /
    pope_yes_ratio (means over the three POPE splits) and pope_<split>_<metric> for each split,
    chair_s and chair_i (captions).
    """
    return _evaluate(model_dir_or_model_and_processor, lab, n)[0]


def lab_spec(recipe: str | dict | None = None, *, quick: bool = False) -> dict[str, Any]:
    """What `evaluate_lab_model` needs without preparing a lab: the recipe and the settings."""
    rec = recipe if isinstance(recipe, dict) else load_recipe(recipe)
    return {"recipe": rec, "settings": asdict(LabSettings.quick() if quick else LabSettings.full())}


@locks_output(lambda arguments: arguments["out_dir"])
def run_lab(
    out_dir: str | Path = "benchmarks/lab",
    *,
    seeds: tuple[int, ...] = (0, 1, 2),
    recipe: str | None = None,
    quick: bool = False,
    command: str | None = None,
    log: Callable[[str], None] = print,
    keep_identical: bool = True,
) -> dict[str, Any]:
    """SFT, pairs, DPO and NaPO for every seed, evaluation, then report.md, report.json and PNG plots.

    The SFT checkpoint and the pairs are built once (replicate 0) and shared by every preference run, so the
    seeds vary only preference training (batch order) — the spread is that of DPO / NaPO themselves; replicates
    with their own SFT model and pairs are `napo compare`'s (unless `shared_sft`). `report["sft_gate"]` says whether
    the SFT model passes lab v2's gate (`SFT_GATE`).
    Returns the report dict (what report.json holds) with "outputs": the written paths.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f"[lab] preparing SFT model and pairs in {out / 'cache'}")
    lab = prepare_lab(out, recipe=recipe, quick=quick, keep_identical=keep_identical)
    log(
        f"[lab] SFT {lab['sft_wall_time_s']:.0f}s, pairs {lab['pairs_wall_time_s']:.0f}s: "
        f"{lab['pairs_stats']['rows_written']} pair rows"
    )
    metrics: dict[str, list[dict[str, float]]] = {"sft": [], "dpo": [], "napo": []}
    shares: dict[str, list[float]] = {"sft": [], "dpo": [], "napo": []}
    runs: list[dict[str, Any]] = []
    sft_metrics, sft_shares = _evaluate(lab["sft_dir"], lab, None)
    metrics["sft"].append(sft_metrics)
    shares["sft"] = sft_shares
    log(f"[lab] sft: {_summary(sft_metrics)}")
    steps = lab["settings"]["pref_steps"]
    for seed in seeds:
        for objective in ("dpo", "napo"):
            run = train_lab_model(
                lab["sft_dir"],
                lab["pairs_dir"],
                Path(lab["pairs_dir"]).parent / f"{objective}-{seed}",
                objective=objective,
                seed=seed,
                max_steps=steps,
            )
            m, s = _evaluate(run["model_dir"], lab, None)
            metrics[objective].append(m)
            shares[objective].extend(s)
            runs.append(
                {
                    "objective": objective,
                    "seed": seed,
                    "train_wall_time_s": run["wall_time_s"],
                    "metrics": m,
                    "final_log": _last_q_and_margins(run["log_history"]),
                }
            )
            log(f"[lab] {objective} seed {seed} ({run['wall_time_s']:.0f}s): {_summary(m)}")
    report = {
        "command": command or "napo lab" + (" --quick" if quick else ""),
        "date": utc_now(),
        "device": device_description("cpu"),  # the lab trains and evaluates on the CPU
        "versions": versions(),
        "seeds": list(seeds),
        "settings": lab["settings"],
        "pairs": {k: lab["pairs_stats"][k] for k in ("rows_written", "negatives", "dropped_no_negative")},
        "sft_gate": sft_gate(sft_metrics),
        "sft_wall_time_s": lab["sft_wall_time_s"],
        "pairs_wall_time_s": lab["pairs_wall_time_s"],
        "models": {name: _mean_std(rows) for name, rows in metrics.items()},
        "runs": runs,
        "image_share_histograms": {
            name: np.histogram(v, bins=10, range=(0, 1))[0].tolist() for name, v in shares.items()
        },
    }
    report["wall_time_s"] = time.perf_counter() - start  # before plotting: what the pipeline took
    # CPU seconds of this process (all threads): on a shared machine the wall time also counts other jobs' turns.
    report["cpu_time_s"] = time.process_time() - cpu_start
    outputs = _plots(out, report, shares)
    outputs["report.json"] = str(out / "report.json")
    outputs["report.md"] = str(out / "report.md")
    report["outputs"] = outputs
    write_json_atomic(out / "report.json", report, indent=2)
    write_text_atomic(out / "report.md", render_report(report))
    return report


def sft_gate(metrics: dict[str, float]) -> dict[str, Any]:
    """Whether the SFT model is the lab v2 wants (`SFT_GATE`): {metric: {"value", "range", "pass"}, "pass": all}."""
    checks = {
        name: {"value": metrics[name], "range": list(bounds), "pass": bounds[0] <= metrics[name] <= bounds[1]}
        for name, bounds in SFT_GATE.items()
    }
    return {**checks, "pass": all(c["pass"] for c in checks.values())}


def render_report(report: dict[str, Any]) -> str:
    """The markdown report of `run_lab`: the table of metrics per model (mean ± std over seeds) and what they say."""
    models = report["models"]
    lines = [
        "# napo bias lab",
        "",
        f"`{report['command']}` — {report['date']}, {report['device']}, "
        f"{report['wall_time_s']:.0f} s end to end, {report['cpu_time_s']:.0f} CPU-seconds "
        f"(SFT {_stage_time(report['sft_wall_time_s'])}, pairs {_stage_time(report['pairs_wall_time_s'])}).",
        f"Seeds {report['seeds']} (preference training; SFT and pairs are shared). "
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
        "",
        "| metric | " + " | ".join(models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    per_noise = sorted(k for k in models["sft"] if "@noise" in k)
    for metric in (*REPORT_METRICS, *per_noise):
        cells = [_cell(models[name][metric]) for name in models]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    if "sft_gate" in report:
        gate = report["sft_gate"]
        lines += [
            "",
            "SFT gate (lab v2): "
            + ", ".join(
                f"{name} {c['value']:.3f} in [{c['range'][0]}, {c['range'][1]}] {'✓' if c['pass'] else '✗'}"
                for name, c in gate.items()
                if name != "pass"
            )
            + (" — passed." if gate["pass"] else " — NOT passed."),
        ]
    pairs = report["pairs"]
    lines += [
        "",
        f"Pairs: {pairs['rows_written']} rows; "
        + "; ".join(
            f"{column} ({n['spec']}) {n['written']} written, {n['identical_to_chosen']} identical to chosen "
            + (
                "kept (ties: z ≡ 0, no gradient; they pull ψ and the type's dynamic weight towards 0)"
                if n.get("identical_kept")
                else "dropped"
            )
            for column, n in pairs["negatives"].items()
        )
        + ". Blind agreement, question-blind agreement, prior following and image share are measured on the "
        "counterfactual split; POPE values are means over random / popular / adversarial.",
        "",
        "![metrics per model](metrics.png)",
        "",
        "![image share](image_share.png)",
        "",
        "## What it shows",
        "",
    ]
    lines += _findings(report)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# steps


def _rows(recipe: dict[str, Any], split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Lab rows as samples: the question becomes a one-turn chat with the image before it."""
    rows = make_split(recipe, split, n, seed)
    for row in rows:
        row["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"]}]}]
    return rows


def _build_model(recipe: dict[str, Any], settings: LabSettings, seed: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A fresh lab LLaVA: the vision tower gets its own (smaller) width through a vision_config override."""
    vision = CLIPVisionConfig(
        hidden_size=settings.vision_hidden,
        intermediate_size=2 * settings.vision_hidden,
        num_hidden_layers=settings.vision_layers,
        num_attention_heads=4,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
    )
    return build_tiny_model(
        "llava",
        build_tokenizer(vocabulary(recipe)),
        hidden_size=settings.text_hidden,
        num_layers=settings.text_layers,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        seed=seed,
        vision_config=vision,
    )


def _sft(folder: Path, recipe: dict[str, Any], settings: LabSettings, seed: int) -> tuple[Path, float]:
    """The lab's SFT checkpoint, trained on the biased train split; cached in `folder`. Returns (folder, seconds)."""
    if (folder / "config.json").exists():
        return folder, 0.0
    start = time.perf_counter()
    model, processor = _build_model(recipe, settings, seed)
    rows = _rows(recipe, "train", settings.n_train, recipe["seed"])
    supervised_fine_tune(
        folder,
        model,
        processor,
        rows,
        steps=settings.sft_steps,
        batch_size=settings.sft_batch_size,
        lr=settings.sft_lr,
        seed=seed,
        log_prefix="[lab]",
        log_every=10,
    )
    return folder, time.perf_counter() - start


def supervised_fine_tune(
    folder: Path,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    rows: list[dict[str, Any]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_prefix: str,
    log_every: int,
) -> None:
    """SFT on prompt -> answer rows (loss on the answer tokens and EOS), then save model and processor to `folder`.

    AdamW at `lr` with a linear warm-up over 5% of `steps` and a cosine decay to 0; batches of `batch_size` rows
    in a seeded order, reshuffled each epoch; gradients clipped to norm 1. Saved atomically: a killed run leaves
    no half-written folder that would look cached. Progress: a bar with the ETA and the loss (renewed every `log_every`
    steps), labelled `log_prefix`.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = np.random.default_rng(seed)
    order = np.array([], dtype=int)
    model.train()
    bar = tqdm(range(steps), desc=f"{log_prefix} SFT", unit="step", mininterval=5)
    for step in bar:
        if len(order) < batch_size:  # a new epoch, reshuffled
            order = np.concatenate([order, rng.permutation(len(rows))])
        batch_idx, order = order[:batch_size], order[batch_size:]
        batch = [rows[i] for i in batch_idx]
        inputs, answer_mask = answer_batch(processor, batch, [r["answer"] for r in batch])
        loss = model(**inputs, labels=inputs["input_ids"].masked_fill(answer_mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, folder)


# Metadata the lab's pair rows carry from their source row: ground truth for the annotator noise and pair labels.
PAIR_METADATA = ("answer", "prior_answer", "kind", "target", "image_noise")


def _pairs(
    folder: Path, sft_dir: Path, recipe: dict[str, Any], settings: LabSettings, seed: int = 0
) -> tuple[Path, dict[str, Any], float]:
    """Preference rows as the paper builds them, from the SFT model on held-out prompts (`napo pairs`).

    Source rows: the `pairs` split (the train distribution) plus `n_counterfactual_pairs` rows drawn like the
    counterfactual split with another seed than evaluation's. chosen = the reference answer (an annotator that
    errs is `napo.lab.noise.annotator_noise`, applied per compare cell). Columns:
    - `rejected`: a general negative on every row, a wrong answer of the question's kind (`general_negative`),
      as RLAIF-V's rejected responses are: trained with DPO, it anchors typical colours where the image shows them;
    - `rejected_language_bias`: the SFT model's answer without the image (`image.drop`), sampled;
    - `rejected_vision_bias`: its answer to the image without the question (`text.drop_question`), sampled;
    - the source row's ground truth `PAIR_METADATA` (answer, prior_answer, kind, target, image_noise).
    Negatives identical to chosen are kept or set to None per `settings.keep_identical`.
    """
    from napo.pairs import PairsConfig, build_pairs

    stats_file = folder / "stats.json"
    if stats_file.exists():
        return folder / "dataset", json.loads(stats_file.read_text()), 0.0
    start = time.perf_counter()
    rows = _rows(recipe, "pairs", settings.n_pairs, recipe["seed"])
    if settings.n_counterfactual_pairs:
        rows += _rows(recipe, "counterfactual", settings.n_counterfactual_pairs, recipe["seed"] + 1)
    rng = np.random.default_rng([seed, 15])
    text = datasets.Value("string")
    source = datasets.Dataset.from_dict(
        {
            "prompt": [r["prompt"] for r in rows],
            "images": [r["images"] for r in rows],
            "chosen": [r["answer"] for r in rows],
            "rejected": [general_negative(recipe, r, rng) for r in rows],
            **{key: [r[key] for r in rows] for key in PAIR_METADATA},
        },
        features=datasets.Features(
            {
                "prompt": [{"role": text, "content": [{"type": text, "text": text}]}],
                "images": datasets.Sequence(datasets.Image()),
                "chosen": text,
                "rejected": text,
                **{key: text for key in PAIR_METADATA if key != "image_noise"},
                "image_noise": datasets.Value("float32"),
            }
        ),
    )
    source_dir = folder.parent / "pairs-source"
    source.save_to_disk(str(source_dir))
    model, processor = load_model(str(sft_dir))
    config = PairsConfig(
        source=str(source_dir),
        model=str(sft_dir),
        output_dir=str(folder),
        batch_size=64,
        max_new_tokens=16,
        do_sample=True,
        temperature=settings.pair_temperature,
        seed=seed,
        keep_identical=settings.keep_identical,
    )
    stats = build_pairs(config, model=model, processing_class=processor, progress=False)
    return folder / "dataset", stats, time.perf_counter() - start


def general_negative(recipe: dict[str, Any], row: dict[str, Any], rng: np.random.Generator) -> str | None:
    """A wrong answer of the row's question kind, uniformly: another colour, the other of yes/no, another count
    word of the recipe's counts; None for captions (no single wrong answer)."""
    from napo.lab.scenes import NUMBER_WORDS

    if row["kind"] == "attribute":
        options = list(recipe["colours"])
    elif row["kind"] in ("existence", "spatial"):
        options = ["yes", "no"]
    elif row["kind"] == "count":
        options = [NUMBER_WORDS[c] for c in recipe["scene"]["count_weights"]] + [
            NUMBER_WORDS[max(recipe["scene"]["count_weights"]) + 1]
        ]
    else:
        return None
    wrong = [o for o in options if o != row["answer"]]
    return wrong[int(rng.integers(len(wrong)))]


def _evaluate(
    model_or_dir: str | Path | tuple[PreTrainedModel, ProcessorMixin], lab: dict[str, Any], n: int | None
) -> tuple[dict[str, float], list[float]]:
    """`evaluate_lab_model`'s metrics and the per-row image shares of the counterfactual split."""
    model, processor = load_model(str(model_or_dir)) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    recipe = lab["recipe"]
    n = n or lab["settings"]["n_eval"]
    seed = recipe["seed"]
    counterfactual = _rows(recipe, "counterfactual", n, seed)
    mod = modality_metrics(model, processor, counterfactual, max_new_tokens=4)
    metrics = {
        "counterfactual_accuracy": mod["accuracy"],
        "prior_following_rate": prior_following_rate(mod["answers"], [r["prior_answer"] for r in counterfactual]),
        "blind_agreement": mod["blind_agreement"],
        "question_blind_agreement": mod["question_blind_agreement"],
        "image_share": mod["image_share"],
    }
    # The short-answer splits go through `generate` as one list: one run of full batches instead of a partial batch
    # per split (greedy decoding, so each row's answer does not depend on its batch-mates beyond rounding).
    short = {split: _rows(recipe, split, n, seed) for split in ("prior_consistent", "no_prior", *POPE_SPLITS)}
    answers = iter(
        generate(model, processor, [r for rows in short.values() for r in rows], batch_size=64, max_new_tokens=4)
    )
    answered = {"counterfactual": (counterfactual, mod["answers"])}
    answered.update({split: (rows, [next(answers) for _ in rows]) for split, rows in short.items()})
    metrics["prior_consistent_accuracy"] = accuracy(
        answered["prior_consistent"][1], [r["answer"] for r in answered["prior_consistent"][0]]
    )
    metrics["no_prior_accuracy"] = accuracy(answered["no_prior"][1], [r["answer"] for r in answered["no_prior"][0]])
    for metric, split in PER_NOISE_SPLITS.items():
        rows, answers = answered[split]
        for level in sorted({r["image_noise"] for r in rows}):
            at = [i for i, r in enumerate(rows) if r["image_noise"] == level]
            metrics[f"{metric}@noise{level:g}"] = accuracy([answers[i] for i in at], [rows[i]["answer"] for i in at])
            if split == "counterfactual":
                metrics[f"prior_following_rate@noise{level:g}"] = prior_following_rate(
                    [answers[i] for i in at], [rows[i]["prior_answer"] for i in at]
                )
    for split in POPE_SPLITS:
        rows, answers = answered[split]
        pope = pope_metrics(answers, [r["answer"] for r in rows])
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            metrics[f"{split}_{key}"] = pope[key]
    for key in ("f1", "accuracy", "yes_ratio"):
        metrics[f"pope_{key}"] = float(np.mean([metrics[f"{s}_{key}"] for s in POPE_SPLITS]))
    captions = _rows(recipe, "captions", n, seed)
    texts = generate(model, processor, captions, batch_size=64, max_new_tokens=16)
    objects = recipe["objects"]
    hallucination = chair(
        texts, [r["objects"] for r in captions], list(objects), {o["plural"]: name for name, o in objects.items()}
    )
    metrics["chair_s"], metrics["chair_i"] = hallucination["chair_s"], hallucination["chair_i"]
    return metrics, mod["image_shares"]


# ---------------------------------------------------------------------------------------------
# report


def _mean_std(rows: list[dict[str, float]]) -> dict[str, dict[str, float] | float]:
    """Per metric: {"mean", "std"} over seeds (population std; 0 for one seed)."""
    return {
        k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))} for k in rows[0]
    }


def _cell(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["std"] else f"{stat['mean']:.3f}"


def _stage_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds else "cached by an earlier run, not counted"


def _summary(m: dict[str, float]) -> str:
    keys = (
        "counterfactual_accuracy",
        "prior_consistent_accuracy",
        "blind_agreement",
        "image_share",
        "pope_f1",
        "chair_s",
    )
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys)


def _last_q_and_margins(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged q and reward margins of each negative type (what NaPO adapts on)."""
    last: dict[str, float] = {}
    for entry in log_history:
        last.update(
            {k: v for k, v in entry.items() if k.endswith("/q") or k.endswith("rewards/margins") or k == "loss"}
        )
    return last


def _findings(report: dict[str, Any]) -> list[str]:
    """Plain sentences on the numbers: the SFT bias, what DPO and NaPO changed, and which is better."""
    m = {name: {k: v["mean"] for k, v in stats.items()} for name, stats in report["models"].items()}
    s = {name: {k: v["std"] for k, v in stats.items()} for name, stats in report["models"].items()}
    sft = m["sft"]
    gap = sft["prior_consistent_accuracy"] - sft["counterfactual_accuracy"]
    lines = [
        f"- **Bias after SFT**: counterfactual accuracy {sft['counterfactual_accuracy']:.3f} vs prior-consistent "
        f"{sft['prior_consistent_accuracy']:.3f} (gap {gap:.3f}, {'above' if gap > 0.2 else 'NOT above'} the 0.2 "
        "the lab asks for); "
        f"{sft['prior_following_rate']:.3f} of counterfactual answers are the prior colour; blind agreement "
        f"{sft['blind_agreement']:.3f}; image share {sft['image_share']:.3f}.",
    ]
    for name in ("dpo", "napo"):
        d = m[name]
        lines.append(
            f"- **{name.upper()}** (n={len(report['seeds'])} seeds): counterfactual "
            f"{sft['counterfactual_accuracy']:.3f} → "
            f"{d['counterfactual_accuracy']:.3f} ± {s[name]['counterfactual_accuracy']:.3f}, while prior-consistent "
            f"{sft['prior_consistent_accuracy']:.3f} → {d['prior_consistent_accuracy']:.3f} ± "
            f"{s[name]['prior_consistent_accuracy']:.3f}; "
            f"blind agreement {sft['blind_agreement']:.3f} → {d['blind_agreement']:.3f}; image share "
            f"{sft['image_share']:.3f} → {d['image_share']:.3f}; POPE F1 {sft['pope_f1']:.3f} → {d['pope_f1']:.3f}; "
            f"CHAIRs {sft['chair_s']:.3f} → {d['chair_s']:.3f}."
        )
    if "sft_gate" in report:
        gate = report["sft_gate"]
        lines.append(
            "- **SFT gate** (no-prior ≥ 0.9, counterfactual in [0.3, 0.7], prior-consistent ≥ 0.95): "
            + (
                "passed"
                if gate["pass"]
                else "NOT passed: "
                + ", ".join(f"{k} {c['value']:.3f}" for k, c in gate.items() if k != "pass" and not c["pass"])
            )
            + "."
        )
    for name in ("dpo", "napo"):
        gain = m[name]["counterfactual_accuracy"] - sft["counterfactual_accuracy"]
        loss = sft["prior_consistent_accuracy"] - m[name]["prior_consistent_accuracy"]
        no_prior_loss = sft.get("no_prior_accuracy", 0.0) - m[name].get("no_prior_accuracy", 0.0)
        met = gain >= 0.15 and loss <= 0.03 and no_prior_loss <= 0.03
        lines.append(
            f"- **{name.upper()} on clean pairs** (issue 15 asks ≥ +0.15 counterfactual, ≤ 0.03 prior-consistent lost, "
            f"≤ 0.03 no-prior lost): {gain:+.3f} / {-loss:+.3f} / {-no_prior_loss:+.3f} — "
            + (
                "met."
                if met
                else "NOT met"
                + (
                    f" ({budget_note(report, name)})"
                    if gain < 0.15
                    else ": it trades prior-consistent or no-prior accuracy for the gain."
                )
            )
        )
        if loss > gain:
            lines.append(
                f"- **{name.upper()} trades more than it gains**: +{gain:.3f} counterfactual for -{loss:.3f} "
                "prior-consistent. "
                "The model learnt mostly to avoid the prior colour, not to read the image."
            )
    diff = m["napo"]["counterfactual_accuracy"] - m["dpo"]["counterfactual_accuracy"]
    noise = max(s["napo"]["counterfactual_accuracy"], s["dpo"]["counterfactual_accuracy"])
    if abs(diff) <= 2 * noise or abs(diff) < 0.01:
        verdict = (
            f"- **NaPO vs DPO**: counterfactual accuracy differs by {diff:+.3f}, within twice the seed spread "
            f"({noise:.3f}): on these clean pairs NaPO does not beat DPO. That is expected: NaPO's adaptive q only "
            "reweights pairs by how confidently they are already separated, which matters when labels are noisy "
            "(see `napo compare`); with clean labels both optimise nearly the same direction, and with β = 0.1 the "
            "margins stay near |z| ≈ 1 where σ(z)^q barely reweights."
        )
    else:
        better = "NaPO" if diff > 0 else "DPO"
        verdict = (
            f"- **NaPO vs DPO**: {better} is ahead on counterfactual accuracy by {abs(diff):.3f} "
            f"(seed spread {noise:.3f})."
        )
        if diff < 0:
            verdict += (
                " NaPO does not beat DPO here. Our reading: these labels are clean, so NaPO's robustness buys nothing, "
                "while its gradient dL/dz = −σ(z)^q·(1 − σ(z)) is DPO's scaled by σ(z)^q ≤ 1 "
                "(≈ 0.7 near z = 0 with q ≈ 0.5): "
                "at the same learning rate and step count NaPO moves the model a little less, in both directions (less "
                "counterfactual gain, slightly less prior-consistent loss)."
            )
    lines.append(verdict)
    return lines


def budget_note(report: dict[str, Any], name: str) -> str:
    """The facts behind a small gain: the preference budget, and counterfactual accuracy per image-noise level."""
    settings = report["settings"]
    sft, trained = report["models"]["sft"], report["models"][name]
    levels = sorted(k.split("@noise")[1] for k in sft if k.startswith("counterfactual_accuracy@noise"))
    per_level = ", ".join(
        f"{level}: {sft[f'counterfactual_accuracy@noise{level}']['mean']:.2f} → "
        f"{trained[f'counterfactual_accuracy@noise{level}']['mean']:.2f}"
        for level in levels
    )
    return (
        f"{settings['pref_steps']} steps of {settings['pref_batch_size']} rows at lr {settings['pref_lr']:g}, "
        f"β {settings['beta']:g}; counterfactual accuracy per image-noise level {per_level}"
    )


def _plots(out: Path, report: dict[str, Any], shares: dict[str, list[float]]) -> dict[str, str]:
    """metrics.png (bars with ±std per model) and image_share.png (histograms before and after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(names)
    x = np.arange(len(REPORT_METRICS))
    for i, name in enumerate(names):
        stats = report["models"][name]
        ax.bar(
            x + i * width,
            [stats[k]["mean"] for k in REPORT_METRICS],
            width,
            yerr=[stats[k]["std"] for k in REPORT_METRICS],
            capsize=2,
            label=name,
        )
    ax.set_xticks(x + width * (len(names) - 1) / 2, REPORT_METRICS, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("bias lab: metrics per model (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in names:
        ax.hist(shares[name], bins=20, range=(0, 1), histtype="step", density=True, linewidth=1.5, label=name)
    ax.set_xlabel("image share of the reference answer's log-prob (counterfactual rows)")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "image_share.png", dpi=110)
    plt.close(fig)
    return {"metrics.png": str(out / "metrics.png"), "image_share.png": str(out / "image_share.png")}
