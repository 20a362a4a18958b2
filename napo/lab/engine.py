"""The one bias-lab engine: SFT a tiny model on a task's biased train split, build language- and modality-biased
pairs with it, train DPO and NaPO from the same SFT checkpoint, measure every model's bias and write the report.
What differs between the vision and the audio lab is a `napo.lab.tasks.LabTask` record; this module runs any.

    lab = prepare_lab("out")                      # SFT checkpoint + pairs (cached in out/cache/)
    run = train_lab_model(lab["sft_dir"], lab["pairs_dir"], "out/napo-0", objective="napo", seed=0)
    metrics = evaluate_lab_model(run["model_dir"], lab)
    report = run_lab("benchmarks/lab")            # all of it, plus report.md / report.json / PNGs
    report = run_lab("benchmarks/lab", task="audio")   # the audio lab: audio_report.md / audio_report.json

The steps are separate functions so that `napo compare` can reuse the SFT checkpoint and pairs. Every cached
artifact lives under `<out>/cache/<prefix><key>/`, where key hashes the recipe, the settings and the seed that
produce it: a rerun with the same settings reuses it, other settings get their own folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedModel, ProcessorMixin

from napo.jobs import locks_output
from napo.lab.progress import StageBar, TrainingBar, stage_costs
from napo.lab.report import last_q_and_margins, mean_std
from napo.lab.sft import supervised_fine_tune, text_only_rows
from napo.lab.tasks import LabTask, lab_task, sft_gate
from napo.models import load_model
from napo.provenance import device_description, utc_now, versions, write_json_atomic, write_text_atomic

OBJECTIVES = ("dpo", "napo")  # what `run_lab` trains from the SFT checkpoint, for every seed


def lab_settings(task: LabTask, *, quick: bool = False, keep_identical: bool = True) -> Any:
    """The task's settings (`quick()` or `full()`) with `keep_identical` (keep negatives identical to chosen)."""
    return replace(task.settings.quick() if quick else task.settings.full(), keep_identical=keep_identical)


def prepare_lab(
    out_dir: str | Path,
    *,
    recipe: str | dict | None = None,
    seed: int = 0,
    quick: bool = False,
    keep_identical: bool = True,
    task: str = "vision",
    stages: StageBar | None = None,
) -> dict[str, Any]:
    """SFT the lab model and build its preference pairs, reusing both when cached with the same settings.

    Args:
        out_dir: the lab's output folder; artifacts go to `<out_dir>/cache/<prefix><key>/{sft,pairs}`, key the first
            12 hex digits of the SHA-256 of `json.dumps([recipe, settings, seed], sort_keys=True)`, prefix the task's
            `cache_prefix` ("" for vision, "audio-" for audio).
        recipe: a recipe path, an already loaded recipe, or None for the task's packaged default.
        seed: the replicate: seed of the model weights, of SFT batch order and of the sampled negatives and the
            general `rejected` answers (data splits use the recipe's seed).
        quick: the small CI variant (the task's `settings.quick()`).
        keep_identical: keep negatives identical to chosen (the paper's choice; see `LabSettings.keep_identical`).
        task: a name of `napo.lab.tasks.TASK_MODULES`.
        stages: `run_lab`'s progress bar (its "SFT" and "pairs" stages), or None: no run bar, SFT's own bar shown.

    Returns a JSON-able dict: task, sft_dir (a `save_pretrained` folder: model + processor), pairs_dir (a
    `datasets.save_to_disk` folder of preference rows), pairs_stats (the pair generator's counts), recipe (the
    loaded recipe), settings (the settings as a dict), seed, sft_wall_time_s and pairs_wall_time_s (0 when
    cached). `evaluate_lab_model` needs only task, recipe and settings.
    """
    spec = lab_task(task)
    rec = spec.recipe(recipe)
    settings = lab_settings(spec, quick=quick, keep_identical=keep_identical)
    key = hashlib.sha256(json.dumps([rec, asdict(settings), seed], sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(out_dir) / "cache" / f"{spec.cache_prefix}{key}"
    sft_dir, sft_time = _sft(cache / "sft", spec, rec, settings, seed, stages)
    pairs_dir, stats, pairs_time = _pairs(cache / "pairs", sft_dir, spec, rec, settings, seed, stages)
    return {
        "task": spec.name,
        "sft_dir": str(sft_dir),
        "pairs_dir": str(pairs_dir),
        "pairs_stats": stats,
        "recipe": rec,
        "settings": asdict(settings),
        "seed": seed,
        "sft_wall_time_s": sft_time,
        "pairs_wall_time_s": pairs_time,
    }


def _sft(
    folder: Path, spec: LabTask, recipe: dict, settings: Any, seed: int, stages: StageBar | None
) -> tuple[Path, float]:
    """The task's SFT checkpoint, trained on the biased train split; cached in `folder`. Returns (folder, seconds)."""
    if stages is not None:
        stages.begin("SFT")
    if (folder / "config.json").exists():
        if stages is not None:
            stages.end("SFT", cached=True)
        return folder, 0.0
    start = time.perf_counter()
    model, processor = spec.build_model(recipe, settings, seed)
    rows = spec.rows(recipe, "train", settings.n_train, recipe["seed"])
    rows = text_only_rows(rows, spec.modality, settings.text_only_fraction, seed)
    supervised_fine_tune(
        folder,
        model,
        processor,
        rows,
        steps=settings.sft_steps,
        batch_size=settings.sft_batch_size,
        lr=settings.sft_lr,
        seed=seed,
        log_prefix=spec.log_prefix,
        log_every=10,
        progress=stages is None or not stages.bar.disable,
    )
    if stages is not None:
        stages.end("SFT")
    return folder, time.perf_counter() - start


def _pairs(
    folder: Path, sft_dir: Path, spec: LabTask, recipe: dict, settings: Any, seed: int, stages: StageBar | None
) -> tuple[Path, dict[str, Any], float]:
    """Preference rows from the SFT model on held-out prompts (`napo pairs`), as the task's `pair_source` and
    `pair_options` say. Source rows: the `pairs` split (the train distribution) plus `n_counterfactual_pairs` rows
    drawn like the counterfactual split with another seed than evaluation's (the train distribution alone holds
    ~5% of them). Returns (the dataset folder, the generator's stats, seconds; 0 when cached)."""
    from napo.pairs import PairsConfig, build_pairs

    if stages is not None:
        stages.begin("pairs")
    stats_file = folder / "stats.json"
    if stats_file.exists():
        if stages is not None:
            stages.end("pairs", cached=True)
        return folder / "dataset", json.loads(stats_file.read_text()), 0.0
    start = time.perf_counter()
    rows = spec.rows(recipe, "pairs", settings.n_pairs, recipe["seed"])
    if settings.n_counterfactual_pairs:
        rows += spec.rows(recipe, "counterfactual", settings.n_counterfactual_pairs, recipe["seed"] + 1)
    source_dir = folder.parent / "pairs-source"
    spec.pair_source(rows, recipe, settings, seed).save_to_disk(str(source_dir))
    model, processor = load_model(str(sft_dir))
    config = PairsConfig(
        source=str(source_dir),
        model=str(sft_dir),
        output_dir=str(folder),
        batch_size=64,
        **spec.pair_options(settings, seed),
    )
    stats = build_pairs(config, model=model, processing_class=processor, progress=False)
    if stages is not None:
        stages.end("pairs")
    return folder / "dataset", stats, time.perf_counter() - start


def lab_training_config(
    out_dir: str | Path, *, objective: str, seed: int, settings: dict[str, Any] | None = None, **overrides: Any
):
    """The lab's preference-training settings (`settings`' β, learning rate, batch size, steps and sft_weight, default
    `LabSettings.full()`'s; CPU, fp32, cosine schedule, reference log-probs precomputed once), as a `NaPOConfig`
    with output folder `<out_dir>/trainer`.

    Args:
        out_dir: the run's folder (`train_lab_model` saves the model to `<out_dir>/model`).
        objective: a name of `napo.objectives.OBJECTIVES` ("napo", "dpo", ...).
        seed: the trainer's seed (batch order).
        settings: a lab's settings as a dict (`prepare_lab()["settings"]`); None: the vision lab's full settings.
        overrides: any other `NaPOConfig` field (q, max_steps, beta, learning_rate, weight_*, ...); `max_steps=None`
            keeps the settings' `pref_steps`.
    """
    from napo.config import NaPOConfig  # trl is slow to import: only training needs it

    if settings is None:
        settings = asdict(lab_task("vision").settings.full())
    config = dict(
        output_dir=str(Path(out_dir) / "trainer"),
        objective=objective,
        q="paper",
        beta=settings["beta"],
        learning_rate=settings["pref_lr"],
        per_device_train_batch_size=settings["pref_batch_size"],
        max_steps=settings["pref_steps"],
        sft_weight=settings["sft_weight"],
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
    progress: str | None = None,
    **config_overrides: Any,
) -> dict[str, Any]:
    """Train one preference objective from the SFT checkpoint with the lab's settings (`lab_training_config`)
    through `napo.training.train_preference`; save the model to `<out_dir>/model`.

    Args:
        sft_dir: the SFT checkpoint (`prepare_lab()["sft_dir"]`), also the frozen reference.
        pairs: preference rows (a `save_to_disk` folder or a Dataset), e.g. `prepare_lab()["pairs_dir"]`.
        progress: the label of a progress bar over the training steps (TRL's, with the loss; and the reference
            pass's); None: no bar. Logs never print as raw dicts (`napo.lab.progress.TrainingBar`).
        objective, seed, config_overrides: as `lab_training_config`'s (settings, q, max_steps, beta, ...).

    Returns model_dir, log_history (the trainer's logged dicts: loss, `language_bias/q`,
    `vision_bias/rewards/margins`, ...) and wall_time_s (training only).
    """
    from napo.training import train_preference

    dataset = pairs if isinstance(pairs, datasets.Dataset) else datasets.load_from_disk(str(pairs))
    model, processor = load_model(str(sft_dir))
    config_overrides.setdefault("disable_tqdm", progress is None)
    config = lab_training_config(out_dir, objective=objective, seed=seed, **config_overrides)
    run = train_preference(
        dataset,
        model,
        config,
        processing_class=processor,
        model_dir=Path(out_dir) / "model",
        progress_callback=TrainingBar(progress or "", enabled=progress is not None),
    )
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
        lab: `prepare_lab`'s dict (only "task", "recipe" and "settings" are read; no "task": the vision lab) or
            `lab_spec(recipe)`.
        n: rows per evaluation split; None: the lab's `n_eval`.

    Vision: counterfactual_accuracy, prior_consistent_accuracy, no_prior_accuracy (each also per image-noise level,
    `<metric>@noise<level>`), prior_following_rate (counterfactual rows answered with the prior colour),
    blind_agreement and question_blind_agreement (counterfactual rows: answer unchanged without the image / without
    the question), image_share (mean Shapley image share of the reference answer's log-prob, counterfactual rows),
    pope_f1 / pope_accuracy / pope_yes_ratio (means over the three POPE splits) and pope_<split>_<metric> for each
    split, chair_s and chair_i (captions). Audio: `napo.lab.audio.evaluate`'s.
    """
    return _evaluate(lab_task(lab.get("task", "vision")), model_dir_or_model_and_processor, lab, n)[0]


def _evaluate(
    spec: LabTask, model_or_dir: str | Path | tuple[PreTrainedModel, ProcessorMixin], lab: dict, n: int | None
) -> tuple[dict[str, float], list[float]]:
    """The task's metrics of one model and its per-row modality shares on the counterfactual split."""
    model, processor = load_model(str(model_or_dir)) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    return spec.evaluate(model, processor, lab["recipe"], n or lab["settings"]["n_eval"])


def lab_spec(recipe: str | dict | None = None, *, quick: bool = False, task: str = "vision") -> dict[str, Any]:
    """What `evaluate_lab_model` needs without preparing a lab: the task, the recipe and the settings."""
    spec = lab_task(task)
    return {"task": spec.name, "recipe": spec.recipe(recipe), "settings": asdict(lab_settings(spec, quick=quick))}


@locks_output(lambda arguments: arguments["out_dir"])
def run_lab(
    out_dir: str | Path = "benchmarks/lab",
    *,
    seeds: tuple[int, ...] = (0, 1, 2),
    recipe: str | None = None,
    quick: bool = False,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    keep_identical: bool = True,
    task: str = "vision",
    progress: bool = True,
) -> dict[str, Any]:
    """SFT, pairs, DPO and NaPO for every seed, evaluation, then the task's report (JSON, markdown, plots).

    The SFT checkpoint and the pairs are built once (replicate 0) and shared by every preference run, so the
    seeds vary only preference training (batch order) — the spread is that of DPO / NaPO themselves; replicates
    with their own SFT model and pairs are `napo compare`'s (unless `shared_sft`). `report["sft_gate"]` says whether
    the SFT model passes lab v2's gate (the task's `gate`).

    Progress (unless `progress` is False): a bar over the stages (SFT, pairs, each preference run, each evaluation)
    weighted by their cost, with the ETA, the running stage's own bar under it, and one summary line per model
    (through `log`, default: printed above the bars). Returns the report dict (what the JSON holds) with "outputs":
    the written paths.
    """
    spec = lab_task(task)
    start, cpu_start = time.perf_counter(), time.process_time()
    code = versions()  # at the start: the checkout may move on while the lab runs, the report names what ran
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = asdict(lab_settings(spec, quick=quick, keep_identical=keep_identical))
    runs_order = [(objective, seed) for seed in seeds for objective in OBJECTIVES]
    stages = StageBar(_stage_costs(spec, settings, runs_order), desc=f"{spec.log_prefix} run", enabled=progress)
    say = log or stages.write
    try:
        lab = prepare_lab(out, recipe=recipe, quick=quick, keep_identical=keep_identical, task=task, stages=stages)
        say(
            f"{spec.log_prefix} SFT {lab['sft_wall_time_s']:.0f}s, pairs {lab['pairs_wall_time_s']:.0f}s: "
            f"{lab['pairs_stats']['rows_written']} pair rows"
        )
        metrics: dict[str, list[dict[str, float]]] = {"sft": [], **{o: [] for o in OBJECTIVES}}
        shares: dict[str, list[float]] = {name: [] for name in metrics}
        sft_metrics, shares["sft"] = _evaluate_stage(spec, lab["sft_dir"], lab, stages, "evaluation sft")
        metrics["sft"].append(sft_metrics)
        say(f"{spec.log_prefix} sft: {_summary(spec, sft_metrics)}")
        runs = []
        for objective, seed in runs_order:
            runs.append(_preference_run(spec, lab, objective, seed, stages, progress))
            metrics[objective].append(runs[-1]["metrics"])
            shares[objective].extend(runs[-1].pop("shares"))
            say(
                f"{spec.log_prefix} {objective} seed {seed} ({runs[-1]['train_wall_time_s']:.0f}s): "
                f"{_summary(spec, runs[-1]['metrics'])}"
            )
    finally:
        stages.close()
    report = _report(spec, lab, seeds, metrics, shares, runs, recipe=recipe, quick=quick, command=command, code=code)
    report["wall_time_s"] = time.perf_counter() - start  # before plotting: what the pipeline took
    # CPU seconds of this process (all threads): on a shared machine the wall time also counts other jobs' turns.
    report["cpu_time_s"] = time.process_time() - cpu_start
    outputs = spec.plots(out, report, shares) if spec.plots else {}
    outputs.update({f"{spec.report_name}.{ext}": str(out / f"{spec.report_name}.{ext}") for ext in ("json", "md")})
    report["outputs"] = outputs
    write_json_atomic(out / f"{spec.report_name}.json", report, indent=2)
    write_text_atomic(out / f"{spec.report_name}.md", spec.render_report(report))
    return report


def _stage_costs(spec: LabTask, settings: dict, runs: list[tuple[str, int]]) -> dict[str, float]:
    """`run_lab`'s stages in order with their costs (`napo.lab.progress.stage_costs`)."""
    cost = stage_costs(settings, spec.eval_passes)
    stages = {"SFT": cost["sft"], "pairs": cost["pairs"], "evaluation sft": cost["evaluation"]}
    for objective, seed in runs:
        stages[f"{objective} seed {seed}"] = cost["preference"]
        stages[f"evaluation {objective} seed {seed}"] = cost["evaluation"]
    return stages


def _evaluate_stage(
    spec: LabTask, model_dir: str, lab: dict, stages: StageBar, stage: str
) -> tuple[dict[str, float], list[float]]:
    stages.begin(stage)
    result = _evaluate(spec, model_dir, lab, None)
    stages.end(stage)
    return result


def _preference_run(
    spec: LabTask, lab: dict, objective: str, seed: int, stages: StageBar, progress: bool
) -> dict[str, Any]:
    """Train `objective` with `seed` from the lab's SFT checkpoint on its pairs (the lab's settings: steps, β,
    learning rate, batch size), evaluate it; the report's run entry, with the per-row shares under "shares"."""
    stage = f"{objective} seed {seed}"
    stages.begin(stage)
    settings = lab["settings"]
    run = train_lab_model(
        lab["sft_dir"],
        lab["pairs_dir"],
        Path(lab["pairs_dir"]).parent / f"{objective}-{seed}",
        objective=objective,
        seed=seed,
        settings=settings,
        logging_steps=spec.logging_steps,
        progress=f"{spec.log_prefix} {stage}" if progress else None,
    )
    stages.end(stage)
    metrics, shares = _evaluate_stage(spec, run["model_dir"], lab, stages, f"evaluation {stage}")
    return {
        "objective": objective,
        "seed": seed,
        "train_wall_time_s": run["wall_time_s"],
        "metrics": metrics,
        "final_log": last_q_and_margins(run["log_history"]),
        "shares": shares,
    }


def _report(
    spec: LabTask, lab: dict, seeds, metrics, shares, runs, *, recipe, quick, command, code: dict[str, str]
) -> dict[str, Any]:
    """The report dict of `run_lab` (without times and outputs); `code`: `versions()` when the run started."""
    task_flag = "" if spec.name == "vision" else f" --task {spec.name}"
    report = {
        "command": command or "napo lab" + task_flag + (" --quick" if quick else ""),
        "date": utc_now(),
        "device": device_description("cpu"),  # the lab trains and evaluates on the CPU
        "versions": code,
        "task": spec.name,
        "recipe": spec.default_recipe if recipe is None else str(recipe),
        "seeds": list(seeds),
        "settings": lab["settings"],
        "pairs": {k: lab["pairs_stats"][k] for k in ("rows_written", "negatives", "dropped_no_negative")},
        "sft_gate": sft_gate(metrics["sft"][0], spec.gate),
        "sft_wall_time_s": lab["sft_wall_time_s"],
        "pairs_wall_time_s": lab["pairs_wall_time_s"],
        "models": {name: mean_std(rows) for name, rows in metrics.items()},
        "runs": runs,
        f"{spec.modality}_share_histograms": {
            name: np.histogram(v, bins=10, range=(0, 1))[0].tolist() for name, v in shares.items()
        },
    }
    if spec.report_extras:
        report.update(spec.report_extras(lab))
    return report


def _summary(spec: LabTask, m: dict[str, float]) -> str:
    return ", ".join(f"{k} {m[k]:.3f}" for k in spec.summary_metrics)
