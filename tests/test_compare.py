"""`napo compare`: grids end to end (user dataset and bias lab), resuming, retrying, and the report's numbers."""

import copy
import csv
import dataclasses
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

import napo.compare as compare
from napo.cli import main
from napo.compare import CompareConfig, objective_settings, pair_margins, read_results, run_compare
from napo.models import build_tiny_model

COLOURS = ["yellow", "red", "green", "blue", "white", "brown"]
OBJECTS = ["banana", "cat", "frog", "tomato"]


def colour_pairs(n: int) -> Dataset:
    """Text preference rows: chosen = the object's colour, rejected = another colour."""
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"what colour is the {OBJECTS[i % len(OBJECTS)]} ?"}]
        rows.append({"prompt": prompt, "chosen": COLOURS[i % 4], "rejected": COLOURS[(i % 4) + 2]})
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def user_setup(tmp_path_factory):
    """A tiny text model saved like a user's model, and a 40-row preference dataset saved like a user's."""
    root = tmp_path_factory.mktemp("user")
    model, tokenizer = build_tiny_model("text", seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    colour_pairs(40).save_to_disk(str(root / "pairs"))
    return str(root / "pairs"), str(root / "model")


def user_config(user_setup, out, **overrides) -> CompareConfig:
    dataset, model = user_setup
    settings = dict(
        output_dir=str(out),
        objectives=["dpo", "napo-paper"],
        noise_rates=[0.0, 0.4],
        seeds=[0],
        dataset=dataset,
        model=model,
        holdout=0.25,
        max_steps=3,
        workers=1,
        train={"per_device_train_batch_size": 8, "logging_steps": 1, "learning_rate": 1e-3},
    )
    settings.update(overrides)
    return CompareConfig(**settings)


@pytest.fixture
def count_cells(monkeypatch):
    """Counts the cells actually trained (in this process: workers=1)."""
    import napo.compare.cell as cell

    calls = []
    real = cell.run_cell

    def counted(context, objective, noise_rate, seed):
        calls.append(compare.cell_key(objective, noise_rate, seed))
        return real(context, objective, noise_rate, seed)

    monkeypatch.setattr(cell, "run_cell", counted)
    return calls


def recompute_from_jsonl(path) -> dict[tuple, tuple[float, float, int]]:
    """(objective, noise_rate, metric) -> (mean, ddof-1 std or NaN, n), straight from results.jsonl."""
    groups = defaultdict(list)
    for line in open(path):
        row = json.loads(line)
        values = dict(row["metrics"], train_wall_s=row["train_wall_s"])
        for name in ("clean_mean", "flipped_mean", "clean_fitted", "flipped_fitted"):
            if row["margins"][name] is not None:
                values[f"margin_{name}"] = row["margins"][name]
        for metric, value in values.items():
            groups[(row["objective"], row["noise_rate"], metric)].append(value)
    return {
        key: (
            sum(v) / len(v),
            math.sqrt(sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan,
            len(v),
        )
        for key, v in groups.items()
    }


def assert_csv_matches(summary_csv, expected):
    with open(summary_csv) as f:
        table = {(r["objective"], float(r["noise_rate"]), r["metric"]): r for r in csv.DictReader(f)}
    assert set(table) == set(expected)
    for key, (mean, std, n) in expected.items():
        row = table[key]
        assert float(row["mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-12)
        assert (math.isnan(std) and math.isnan(float(row["std"]))) or float(row["std"]) == pytest.approx(std, rel=1e-9)
        assert int(row["n"]) == n


# ------------------------------------------------------------------------------------------ user dataset
@pytest.mark.slow
def test_user_dataset_grid_runs_resumes_and_reports(user_setup, tmp_path, count_cells):
    config = user_config(user_setup, tmp_path / "run")
    stats = run_compare(config, progress=False)
    assert stats["cells_run"] == 4 and stats["cells_failed"] == 0
    rows = read_results(tmp_path / "run" / "results.jsonl")
    assert sorted(r["key"] for r in rows) == sorted(count_cells)
    for row in rows:
        assert {"objective", "noise_rate", "seed", "metrics", "train_wall_s", "margins", "q_trajectory"} <= set(row)
        assert 0 <= row["metrics"]["heldout_reward_accuracy"] <= 1
        n_flipped = row["margins"]["n_flipped"]
        assert n_flipped == round(row["noise_rate"] * 30)  # 40 rows, 25% held out: 30 training rows, one negative each
        if row["noise_rate"] == 0:
            assert row["margins"]["flipped_mean"] is None
        else:
            assert 0 <= row["margins"]["flipped_fitted"] <= 1
        # q is logged every step for NaPO (logging_steps=1) and never for DPO.
        assert (len(row["q_trajectory"].get("rejected", [])) == 3) == row["objective"].startswith("napo")
    for name in ("summary", "report", "metrics_vs_noise", "q_trajectory", "margins_clean_vs_flipped"):
        assert (tmp_path / "run" / stats["outputs"][name].split("/")[-1]).stat().st_size > 0
    report = (tmp_path / "run" / "README.md").read_text()
    assert "Does NaPO beat DPO" in report and "heldout_reward_accuracy" in report
    assert not (tmp_path / "run" / "cells").exists() or not any((tmp_path / "run" / "cells").iterdir())

    # The report's numbers are the JSONL's, recomputed independently.
    assert_csv_matches(tmp_path / "run" / "summary.csv", recompute_from_jsonl(tmp_path / "run" / "results.jsonl"))

    # A rerun trains nothing and leaves results.jsonl byte for byte as it was.
    before = (tmp_path / "run" / "results.jsonl").read_bytes()
    count_cells.clear()
    again = run_compare(config, progress=False)
    assert count_cells == [] and again["cells_run"] == 0
    assert (tmp_path / "run" / "results.jsonl").read_bytes() == before

    # --report-only on a larger grid trains none of its missing cells and reports what is there.
    wider = user_config(user_setup, tmp_path / "run", objectives=["dpo", "napo-paper", "ipo"], report_only=True)
    run_compare(wider, progress=False)
    assert count_cells == [] and "cells finished: 4 of 6" in (tmp_path / "run" / "README.md").read_text()

    # Other training settings in the same folder: the old rows are not results of this grid, so one cell reruns
    # (a one-cell grid keeps this cheap) and the report holds that cell alone.
    train = dict(config.train, learning_rate=5e-4)
    other = user_config(user_setup, tmp_path / "run", objectives=["dpo"], noise_rates=[0.0], train=train)
    assert run_compare(other, progress=False)["cells_run"] == 1 and count_cells == ["dpo/noise=0/seed=0"]
    assert "cells finished: 1 of 1" in (tmp_path / "run" / "README.md").read_text()
    assert len({row["settings"] for row in read_results(tmp_path / "run" / "results.jsonl")}) == 2


@pytest.mark.slow
def test_failed_cell_is_recorded_and_retried(user_setup, tmp_path, monkeypatch, count_cells):
    import napo.training as training

    real_train = training.train_preference

    def fails_for_napo(dataset, model, config, *args, **kwargs):
        if config.objective == "napo" and config.q == "paper":
            raise RuntimeError("simulated out-of-memory")
        return real_train(dataset, model, config, *args, **kwargs)

    config = user_config(user_setup, tmp_path / "run", noise_rates=[0.4])
    monkeypatch.setattr(training, "train_preference", fails_for_napo)
    stats = run_compare(config, progress=False)
    assert stats["cells_run"] == 1 and stats["cells_failed"] == 1
    assert [r["key"] for r in read_results(tmp_path / "run" / "results.jsonl")] == ["dpo/noise=0.4/seed=0"]
    errors = read_results(tmp_path / "run" / "errors.jsonl")
    assert [e["key"] for e in errors] == ["napo-paper/noise=0.4/seed=0"]
    assert "simulated out-of-memory" in errors[0]["error"]

    monkeypatch.setattr(training, "train_preference", real_train)
    count_cells.clear()
    stats = run_compare(config, progress=False)
    assert count_cells == ["napo-paper/noise=0.4/seed=0"] and stats["cells_failed"] == 0
    assert sorted(r["key"] for r in read_results(tmp_path / "run" / "results.jsonl")) == [
        "dpo/noise=0.4/seed=0",
        "napo-paper/noise=0.4/seed=0",
    ]


def test_user_dataset_cells_train_with_the_users_settings(user_setup, tmp_path):
    """`napo compare --dataset --model` trains as `napo train` would: NaPOConfig's (TRL's) defaults under what the
    user passes in `train` (--set), never the lab's learning rate, step count or use_cpu (issue 16)."""
    from napo import NaPOConfig

    train = {"per_device_train_batch_size": 8, "num_train_epochs": 1, "logging_steps": 1}
    train |= {"lr_scheduler_type": "constant", "gradient_checkpointing": False}
    config = user_config(
        user_setup, tmp_path / "run", objectives=["napo-paper"], noise_rates=[0.0], max_steps=None, train=train
    )
    run_compare(dataclasses.replace(config, keep_models=True), progress=False)
    (row,) = read_results(tmp_path / "run" / "results.jsonl")
    # 30 training rows (40, a quarter held out), 8 per step, one epoch: 4 steps, q logged at each (the lab: 120).
    assert [step for step, _ in row["q_trajectory"]["rejected"]] == [1, 2, 3, 4]
    args = torch.load(
        tmp_path / "run" / "cells" / "napo-paper_noise=0_seed=0" / "model" / "training_args.bin", weights_only=False
    )
    defaults = NaPOConfig(output_dir="unused")
    for name in ("learning_rate", "use_cpu", "bf16", "warmup_steps", "precompute_ref_log_probs", "max_steps"):
        assert getattr(args, name) == getattr(defaults, name), name
    for name, value in train.items():
        assert getattr(args, name) == value, name
    assert (args.objective, args.q, args.seed, args.beta) == ("napo", "paper", 0, config.beta)


def test_pair_margins_match_the_trainer(tmp_path):
    """The scored margins average to the trainer's own `rewards/margins` on the same rows; zero for the reference."""
    from napo import NaPOConfig, NaPOTrainer
    from napo.pairs import inject_label_noise

    reference, tokenizer = build_tiny_model("text", seed=0)
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    pairs, flipped = inject_label_noise(colour_pairs(12), 0.25, seed=3)

    same = pair_margins(reference, copy.deepcopy(reference), tokenizer, pairs, beta=0.1)
    assert np.allclose(same["margin"], 0.0, atol=1e-5)
    scored = pair_margins(
        copy.deepcopy(policy),
        copy.deepcopy(reference),
        tokenizer,
        pairs,
        beta=0.1,
        batch_size=5,
    )
    assert scored["margin"].shape == (12,) and sorted(np.flatnonzero(scored["noisy"]).tolist()) == flipped

    args = NaPOConfig(
        output_dir=str(tmp_path / "t"),
        objective="dpo",
        beta=0.1,
        report_to="none",
        use_cpu=True,
        gradient_checkpointing=False,
    )
    trainer = NaPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    trainer.model.eval()
    batch = trainer._prepare_inputs(trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(12)]))
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    assert float(np.mean(scored["margin"])) == pytest.approx(trainer._metrics["eval"]["rewards/margins"][-1], abs=1e-5)


# ------------------------------------------------------------------------------------------------ lab
@pytest.mark.slow
def test_lab_quick_grid_end_to_end(tmp_path):
    """2 objectives x annotator noise 0.3 x 2 replicates on the quick bias lab, each replicate with its own SFT model
    and pairs, with its bias metrics and ground-truth pair labels; two worker processes."""
    config = CompareConfig(
        output_dir=str(tmp_path / "lab"),
        objectives=["dpo", "napo-paper"],
        noise_rates=[0.3],
        seeds=[0, 1],
        noise_kind="annotator",
        quick=True,
        eval_n=16,
        workers=2,
    )
    stats = run_compare(config, progress=False)
    assert stats["cells_run"] == 4 and stats["cells_failed"] == 0, (tmp_path / "lab" / "errors.jsonl").read_text()
    rows = read_results(tmp_path / "lab" / "results.jsonl")
    sources = {row["replicate"]: row["source_dir"] for row in rows}
    assert len(set(sources.values())) == 2  # each replicate trained from its own SFT model and pairs
    for row in rows:
        assert row["noise_kind"] == "annotator" and row["noise_rate"] == 0.3 and row["replicate"] == row["seed"]
        assert row["key"] == compare.cell_key(row["objective"], 0.3, row["seed"], "annotator")
        for metric in ("counterfactual_accuracy", "prior_consistent_accuracy", "no_prior_accuracy", "pope_f1"):
            assert 0 <= row["metrics"][metric] <= 1
        assert row["margins"]["n_flipped"] > 0  # the misannotated rows
        labels = row["pair_labels"]["pair_label_rejected"]
        # chosen wrong on ~30% of rows: its general-`rejected` pairs are ties (both wrong) or inverted
        assert labels["clean"] < sum(labels.values()) and labels.get("tie", 0) + labels.get("inverted", 0) > 0
    assert_csv_matches(tmp_path / "lab" / "summary.csv", recompute_from_jsonl(tmp_path / "lab" / "results.jsonl"))
    report = (tmp_path / "lab" / "README.md").read_text()
    assert "| counterfactual_accuracy | napo-paper | 0.3 |" in report and "*SFT (start)*" in report
    assert "noise: annotator" in report and "95% interval" in report
    assert "source: the vision bias lab (quick mode)" in report and "SFT gate per replicate: " in report
    assert "seed 0 " in report.split("SFT gate per replicate: ")[1].splitlines()[0]  # each replicate named


def test_audio_lab_cell_with_annotator_noise_resumes_by_content(tmp_path, count_cells):
    """`--lab-task audio`: the audio lab's SFT model and pairs are the source, its annotator errs on clips, its
    metrics fill the row. The finished cell counts in a copy of the folder (same weights and pairs elsewhere: a
    cache rebuilt in another session), and not once its row names other content."""
    config = CompareConfig(
        output_dir=str(tmp_path / "audio"),
        lab_task="audio",
        objectives=["napo-paper"],
        noise_rates=[0.3],
        seeds=[0],
        noise_kind="annotator",
        quick=True,
        eval_n=8,
        workers=1,
    )
    stats = run_compare(config, progress=False)
    assert stats["cells_failed"] == 0, (tmp_path / "audio" / "errors.jsonl").read_text()
    (row,) = read_results(tmp_path / "audio" / "results.jsonl")
    assert "/cache/audio-" in row["source_dir"]
    assert {"audio_share", "no_prior_accuracy", "counterfactual_accuracy@noise1.413"} <= set(row["metrics"])
    assert "image_share" not in row["metrics"]
    labels = row["pair_labels"]["pair_label_rejected"]  # chosen wrong on 30% of the clips: ties or inverted
    assert labels.get("tie", 0) + labels.get("inverted", 0) > 0 and row["margins"]["n_flipped"] > 0
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "audio", moved)
    config.output_dir = str(moved)
    count_cells.clear()
    assert run_compare(config, progress=False)["cells_run"] == 0 and count_cells == []
    (moved / "results.jsonl").write_text(json.dumps({**row, "source_digest": "0" * 16}) + "\n")
    assert run_compare(config, progress=False)["cells_run"] == 1
    (rerun,) = [r for r in read_results(moved / "results.jsonl") if r["source_digest"] != "0" * 16]
    assert rerun["source_digest"] == row["source_digest"] and rerun["source_dir"] != row["source_dir"]
    with pytest.raises(ValueError, match="lab_task='speech'"):
        CompareConfig(lab_task="speech")
    with pytest.raises(ValueError, match="--lab-task"):
        CompareConfig(dataset="x", model="m", lab_task="audio")


# ------------------------------------------------------------------------------------------ small parts
def test_objective_names_and_label_smoothing():
    assert objective_settings("dpo", 0.2) == {"objective": "dpo"}
    assert objective_settings("napo-q0.3", 0.0) == {"objective": "napo", "q": "0.3"}
    assert objective_settings("napo-official", 0.0) == {"objective": "napo", "q": "official"}
    assert [objective_settings("cdpo", r)["label_smoothing"] for r in (0.0, 0.1, 0.4, 0.6)] == [0.05, 0.1, 0.4, 0.45]
    for bad in ("napo-q0", "napo-q1.5", "dpo2", "napo"):
        with pytest.raises(ValueError, match="objective"):
            objective_settings(bad, 0.0)
    with pytest.raises(ValueError, match="noise rate"):
        CompareConfig(noise_rates=[1.0])
    with pytest.raises(ValueError, match="--dataset and --model"):
        CompareConfig(dataset="x")
    with pytest.raises(ValueError, match="--beta"):
        CompareConfig(train={"beta": 0.2})


def test_objective_names_come_from_the_registry(monkeypatch):
    """A loss registered in napo.objectives is a grid name at once: by its name, or with its q when it takes one."""
    from napo.objectives import OBJECTIVES

    monkeypatch.setitem(OBJECTIVES, "squared", lambda margins: (1 - margins) ** 2)
    monkeypatch.setitem(OBJECTIVES, "soft", lambda margins, q, label_smoothing: margins * q * label_smoothing)
    assert objective_settings("squared", 0.3) == {"objective": "squared"}
    assert objective_settings("soft-official", 0.3) == {"objective": "soft", "q": "official", "label_smoothing": 0.3}
    assert objective_settings("soft-q0.5", 0.0)["q"] == "0.5"
    for bad in ("soft", "squared-paper", "soft-q2"):
        with pytest.raises(ValueError, match="objective"):
            objective_settings(bad, 0.0)
    assert "squared" in compare.objective_grammar() and "soft-q<" in compare.objective_grammar()


def test_cell_settings_by_source(tmp_path):
    """A lab cell trains with the lab's settings; a cell on a user's dataset with NaPOConfig's defaults; both under
    the grid's objective, seed, beta, steps and `train`."""
    from napo import NaPOConfig
    from napo.compare.cell import cell_training_config
    from napo.lab.pipeline import LabSettings

    grid = {"beta": 0.2, "max_steps": None, "train": {"warmup_steps": 3}}
    settings = objective_settings("napo-q0.3", 0.1)
    lab = cell_training_config({**grid, "source": "lab"}, tmp_path, 4, settings)
    user = cell_training_config({**grid, "source": "dataset", "max_steps": 7}, tmp_path, 4, settings)
    lab_defaults, defaults = LabSettings.full(), NaPOConfig(output_dir="unused")
    assert (lab.learning_rate, lab.max_steps, lab.use_cpu) == (lab_defaults.pref_lr, lab_defaults.pref_steps, True)
    assert (user.learning_rate, user.max_steps, user.use_cpu) == (defaults.learning_rate, 7, defaults.use_cpu)
    for config in (lab, user):
        assert (config.objective, config.q, config.seed, config.beta, config.warmup_steps) == ("napo", 0.3, 4, 0.2, 3)


def test_noise_kinds_keys_and_intervals():
    assert compare.cell_key("dpo", 0.2, 1) == "dpo/noise=0.2/seed=1"  # flips keep the earlier keys
    assert compare.cell_key("dpo", 0.15, 1, "annotator") == "dpo/annotator=0.15/seed=1"
    with pytest.raises(ValueError, match="noise_kind"):
        CompareConfig(noise_kind="swap")
    with pytest.raises(ValueError, match="annotator"):
        CompareConfig(noise_kind="annotator", dataset="pairs", model="m")
    # Student t, two-sided 95%: tabulated values; a df between rows takes the row below (wider interval).
    assert compare.t_quantile_975(1) == 12.706 and compare.t_quantile_975(4) == 2.776
    assert compare.t_quantile_975(12) == 2.228 and compare.t_quantile_975(100) == 1.96
    with pytest.raises(ValueError):
        compare.t_quantile_975(0)


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c", "metr')
    assert [r["key"] for r in read_results(path)] == ["a", "b"]


def test_q_trajectory_per_type():
    history = [
        {"step": 10, "language_bias/q": 0.5, "vision_bias/q": 0.9, "loss": 1.0},
        {"step": 20, "language_bias/q": 0.4},
        {"step": 20, "train_runtime": 3.0},
    ]
    assert compare.q_trajectory(history) == {"language_bias": [[10, 0.5], [20, 0.4]], "vision_bias": [[10, 0.9]]}


def test_cli_recipe_and_flags(tmp_path, monkeypatch):
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(
        "objectives: [dpo, napo-paper]\nnoise_rates: [0.0, 0.1]\nseeds: [0, 1, 2]\ntrain: {learning_rate: 0.001}\n"
    )
    seen = {}

    def fake_run(config, *, command, progress):
        seen["config"] = config
        return {"cells_run": 0, "cells_failed": 0, "cells_total": 0, "outputs": {"report": "r.md"}}

    monkeypatch.setattr(compare, "run_compare", fake_run)
    main(
        [
            "compare",
            "--recipe",
            str(recipe),
            "--seeds",
            "5",
            "--set",
            "warmup_steps=2",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    config = seen["config"]
    assert config.objectives == ["dpo", "napo-paper"] and config.noise_rates == [0.0, 0.1]
    assert config.seeds == [5] and config.workers == 1
    assert config.train == {"learning_rate": 0.001, "warmup_steps": 2}
    assert config.output_dir == "napo-compare"


@pytest.mark.parametrize(
    "recipe", sorted((Path(__file__).parents[1] / "data" / "recipes").glob("compare*.yaml")), ids=lambda p: p.stem
)
def test_committed_recipe_through_the_cli_trains_its_cells_with_the_labs_settings(recipe, tmp_path):
    """`napo compare --recipe R` as a user types it, no mock: every committed recipe (none given --set; such a recipe
    once failed to parse) becomes the grid its YAML says, and each of its objectives, at its highest noise rate, a lab
    cell NaPOConfig with the lab's learning rate, its steps (or the recipe's `max_steps`) and CPU under the recipe's
    β, and the recipe's `train:`."""
    import yaml

    from napo.cli import parse_command
    from napo.compare.cell import cell_training_config
    from napo.lab.pipeline import LabSettings

    written = yaml.safe_load(recipe.read_text())
    config = parse_command(["compare", "--recipe", str(recipe), "--no-progress"])[CompareConfig]
    assert config.train == written.get("train", {}) and config.source == "lab"
    assert (config.objectives, config.noise_rates, config.seeds, config.beta) == (
        written["objectives"],
        written["noise_rates"],
        written["seeds"],
        written["beta"],
    )
    assert config.noise_kind == written.get("noise_kind", "flip") and config.output_dir == written["output_dir"]
    lab = LabSettings.full()
    grid = {"beta": config.beta, "max_steps": config.max_steps, "train": config.train, "source": config.source}
    for objective in config.objectives:
        settings = objective_settings(objective, max(config.noise_rates))
        cell = cell_training_config(grid, tmp_path, config.seeds[-1], settings)
        steps = written.get("max_steps", lab.pref_steps)  # a recipe may train longer than the lab's preference runs
        assert (cell.learning_rate, cell.max_steps, cell.use_cpu) == (lab.pref_lr, steps, True), objective
        assert (cell.objective, cell.beta, cell.seed) == (settings["objective"], written["beta"], written["seeds"][-1])
        assert {name: getattr(cell, name) for name in config.train} == config.train, objective


def test_default_recipe_builds_every_cell_the_readme_promises(tmp_path):
    """The committed grid, through napo: its 120 cell keys (10 objectives x 4 flip rates x 3 seeds, the names
    results.jsonl resumes by) and, per objective and rate, the NaPOConfig a lab cell trains with: the objective, its
    fixed or adaptive q and cDPO/rDPO's ε = the rate clipped to [0.05, 0.45], all written out by hand here."""
    from napo.compare.cell import cell_training_config
    from napo.compare.grid import grid_keys

    recipe = compare.load_recipe(str(Path(__file__).parents[1] / "data" / "recipes" / "compare.yaml"))
    config = CompareConfig(**recipe)
    # objective name -> (NaPOConfig.objective, q or None where the loss takes none, reads ε)
    expected = {
        "dpo": ("dpo", None, False),
        "cdpo": ("cdpo", None, True),
        "rdpo": ("rdpo", None, True),
        "ipo": ("ipo", None, False),
        "hinge": ("hinge", None, False),
        "napo-q0.3": ("napo", 0.3, False),
        "napo-q0.7": ("napo", 0.7, False),
        "napo-q1.0": ("napo", 1.0, False),
        "napo-paper": ("napo", "paper", False),
        "napo-official": ("napo", "official", False),
    }
    epsilon = {0.0: 0.05, 0.1: 0.1, 0.2: 0.2, 0.4: 0.4}
    keys = {f"{o}/noise={r}/seed={s}" for o in expected for r in ("0", "0.1", "0.2", "0.4") for s in (0, 1, 2)}
    assert grid_keys(config) == keys and len(keys) == 120
    grid = {"beta": config.beta, "max_steps": config.max_steps, "train": config.train, "source": config.source}
    for name, (objective, q, reads_epsilon) in expected.items():
        for rate, eps in epsilon.items():
            cell = cell_training_config(grid, tmp_path, 2, objective_settings(name, rate))
            assert (cell.objective, cell.seed, cell.beta) == (objective, 2, 0.1), (name, rate)
            assert q is None or cell.q == q, (name, rate, cell.q)
            assert cell.label_smoothing == (eps if reads_epsilon else 0.0), (name, rate, cell.label_smoothing)


def test_threads_per_worker(monkeypatch):
    import napo.compare.run as run

    monkeypatch.setattr(run, "available_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [run._threads_per_worker(w) for w in (1, 4, 32)] == [16, 4, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert run._threads_per_worker(1) == 2


@pytest.mark.slow
def test_other_data_is_another_source(user_setup, tmp_path, count_cells):
    """Cells trained from other pairs never count as done: the same output folder with another dataset retrains."""
    config = user_config(user_setup, tmp_path / "run", objectives=["dpo"], noise_rates=[0.0])
    run_compare(config, progress=False)
    other = tmp_path / "other_pairs"
    colour_pairs(24).save_to_disk(str(other))
    count_cells.clear()
    stats = run_compare(
        user_config((str(other), user_setup[1]), tmp_path / "run", objectives=["dpo"], noise_rates=[0.0]),
        progress=False,
    )
    assert count_cells == ["dpo/noise=0/seed=0"] and stats["cells_run"] == 1
    rows = read_results(tmp_path / "run" / "results.jsonl")
    assert len(rows) == 2 and rows[0]["source_dir"] != rows[1]["source_dir"]


def test_eval_benchmarks_enter_every_cell_and_the_tables(user_setup, tmp_path):
    """--eval pope=FILE: each cell answers the POPE file (text-only questions here: a text model) and its metrics are
    in results.jsonl and the report, equal to scoring the cell's saved answer file with --predictions."""
    from napo.benchmarks import BenchmarkSpec, evaluate

    questions = tmp_path / "coco_pope_random.json"
    questions.write_text(
        "".join(
            json.dumps(
                {"question_id": i, "image": None, "text": f"is there a {o} ?", "label": "yes" if i % 2 else "no"}
            )
            + "\n"
            for i, o in enumerate(OBJECTS)
        )
    )
    config = user_config(user_setup, tmp_path / "grid", objectives=["dpo"], noise_rates=[0.0], eval=f"pope={questions}")
    run_compare(config, progress=False)
    (row,) = [json.loads(line) for line in open(tmp_path / "grid" / "results.jsonl")]
    answers = tmp_path / "grid" / "benchmarks" / "dpo_noise=0_seed=0" / "pope.answers.jsonl"
    rescored = evaluate(
        BenchmarkSpec("pope", data=[str(questions)]), out=tmp_path / "re.json", predictions=[str(answers)]
    )
    for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert row["metrics"][f"pope/{metric}"] == pytest.approx(rescored[metric])
    assert "## pope/f1" in (tmp_path / "grid" / "README.md").read_text()
    with pytest.raises(ValueError, match="benchmark 'popes'"):
        user_config(user_setup, tmp_path / "bad", eval=f"popes={questions}")


def _claim_rows(gains: dict[float, list[float]], costs: dict[float, list[float]]) -> list[dict]:
    """Result rows where DPO sits at 0.5 / 0.9 and NaPO-paper at 0.5 + gain / 0.9 + cost, per rate and seed."""
    rows = []
    for rate, seed_gains in gains.items():
        for seed, (gain, cost) in enumerate(zip(seed_gains, costs[rate], strict=True)):
            for objective, (cf, pc) in {"dpo": (0.5, 0.9), "napo-paper": (0.5 + gain, 0.9 + cost)}.items():
                rows.append(
                    {
                        "objective": objective,
                        "noise_rate": rate,
                        "seed": seed,
                        "metrics": {"counterfactual_accuracy": cf, "prior_consistent_accuracy": pc},
                        "margins": {},
                        "train_wall_s": 1.0,
                    }
                )
    return rows


def test_claim_verdict_follows_issue_15s_rule():
    gain = [0.06, 0.08, 0.07, 0.09, 0.10]  # mean 0.08, sd 0.0158: 95% interval 0.08 ± 2.776·0.0158/√5 = [0.060, 0.100]
    flat = [0.01, -0.01, 0.0, 0.02, -0.02]  # cost interval straddles 0: not significantly worse
    bad_at_zero = [-0.3] * 5  # ε = 0 is outside the rule
    rows = _claim_rows({0.0: bad_at_zero, 0.15: gain, 0.3: gain}, {0.0: bad_at_zero, 0.15: flat, 0.3: flat})
    decided = compare.claim_verdict(rows)
    assert decided["verdict"] == "confirmed", decided
    assert [r["noise_rate"] for r in decided["rates"]] == [0.15, 0.3]
    low = 0.08 - 2.776 * float(np.std(gain, ddof=1)) / math.sqrt(5)
    assert decided["rates"][0]["gain"]["low"] == pytest.approx(low)

    small = [g - 0.04 for g in gain]  # mean 0.04 < 0.05 at one rate: refuted
    assert compare.claim_verdict(_claim_rows({0.15: gain, 0.3: small}, {0.15: flat, 0.3: flat}))["verdict"] == "refuted"
    worse = [-0.05, -0.04, -0.06, -0.05, -0.05]  # prior-consistent significantly lower: refuted
    decided = compare.claim_verdict(_claim_rows({0.15: gain}, {0.15: worse}))
    assert decided["verdict"] == "refuted" and "prior_consistent_accuracy -0.050" in decided["reasons"][0]
    noisy = [0.3, -0.2, 0.25, -0.1, 0.15]  # mean 0.08 but the interval includes 0: refuted
    assert compare.claim_verdict(_claim_rows({0.15: noisy}, {0.15: flat}))["verdict"] == "refuted"
    three = compare.claim_verdict(_claim_rows({0.15: gain[:3]}, {0.15: flat[:3]}))
    assert three["verdict"] == "undecided" and "3 paired replicates" in three["reasons"][0]
    assert compare.claim_verdict(_claim_rows({0.0: gain}, {0.0: flat}))["verdict"] == "undecided"
    # Three replicates whose interval already lies below +0.05 (0.0 ± 4.303·0.01/√3 = ±0.025): refuted.
    none = compare.claim_verdict(_claim_rows({0.15: [-0.01, 0.0, 0.01]}, {0.15: flat[:3]}))
    assert none["verdict"] == "refuted" and "lies below the required +0.05" in none["reasons"][0]


def test_clean_pair_gains_are_paired_with_each_replicates_own_sft_model():
    """Issue 15's first item, by hand: d_s = cell − SFT model of replicate s, mean ± t_{0.975,2}·sd/√3; an objective
    meets the bounds when its mean gain is ≥ +0.15 and its mean losses ≤ 0.03."""
    from napo.compare.report import _clean_pair_lines

    sft = {s: {"counterfactual_accuracy": cf, "prior_consistent_accuracy": 0.99, "no_prior_accuracy": 0.95}
           for s, cf in enumerate([0.50, 0.65, 0.55])}  # fmt: skip
    cells = {  # objective: per replicate (counterfactual, prior-consistent, no-prior)
        "dpo": [(0.70, 0.97, 0.95), (0.80, 0.96, 0.95), (0.75, 0.98, 0.95)],  # +0.183, −0.02, 0: meets
        "ipo": [(0.64, 0.99, 0.95), (0.79, 0.99, 0.95), (0.69, 0.99, 0.95)],  # +0.14: gain short
        "napo-paper": [(0.70, 0.95, 0.95), (0.85, 0.95, 0.95), (0.75, 0.95, 0.95)],  # −0.04 prior-consistent
    }
    metrics = ("counterfactual_accuracy", "prior_consistent_accuracy", "no_prior_accuracy")
    rows = [
        {"objective": o, "noise_rate": 0.0, "replicate": s, "metrics": dict(zip(metrics, values))}
        for o, per_seed in cells.items()
        for s, values in enumerate(per_seed)
    ]
    rows.append({"objective": "dpo", "noise_rate": 0.3, "replicate": 0, "metrics": dict(zip(metrics, (0, 0, 0)))})
    rows.append({"objective": "dpo", "noise_rate": 0.0, "replicate": 9, "metrics": dict(zip(metrics, (0, 0, 0)))})
    gains = {(g["objective"], g["metric"]): g for g in compare.gains_over_sft(rows, sft, metrics, 0.0)}
    dpo = gains[("dpo", "counterfactual_accuracy")]
    diffs = [0.20, 0.15, 0.20]  # the noise-0.3 row and replicate 9 (no SFT metrics) are left out
    half = 4.303 * float(np.std(diffs, ddof=1)) / math.sqrt(3)
    assert dpo["n"] == 3 and dpo["mean"] == pytest.approx(np.mean(diffs))
    assert (dpo["low"], dpo["high"]) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half))
    assert gains[("napo-paper", "prior_consistent_accuracy")]["mean"] == pytest.approx(-0.04)
    assert compare.clean_pair_check(list(gains.values())) == {"dpo": True, "ipo": False, "napo-paper": False}
    at_bound = [  # 0.99 − 0.96 > 0.03 in floating point, yet 6 of 200 rows: on the bound, met
        {"objective": "x", "metric": "counterfactual_accuracy", "mean": 0.15},
        {"objective": "x", "metric": "prior_consistent_accuracy", "mean": 0.96 - 0.99},
        {"objective": "x", "metric": "no_prior_accuracy", "mean": -0.031},
    ]
    assert compare.clean_pair_check(at_bound[:2] + [{**at_bound[2], "mean": 0.0}]) == {"x": True}
    assert compare.clean_pair_check(at_bound) == {"x": False}  # a no-prior loss over 0.03
    assert compare.clean_pair_check(at_bound[:2]) == {"x": False}  # a metric the rule needs is missing
    lines = _clean_pair_lines(rows, sft, ["dpo", "napo-paper", "ipo"])
    assert lines[-3].startswith("| dpo | +0.183 [") and lines[-3].endswith("| 3 | yes |")
    assert lines[-2].startswith("| napo-paper |") and lines[-1].endswith("| 3 | no |")
    assert _clean_pair_lines([r for r in rows if r["noise_rate"] > 0], sft, ["dpo"]) == []


def test_every_objective_against_dpo_is_paired_by_replicate():
    """IPO − DPO per replicate [+0.02, +0.03, +0.04] on no-prior accuracy: mean +0.03 ± 4.303·0.01/√3, an interval
    above 0 ('ipo better'); the noise-0 cells are not in the table, the NaPO-only verdict table leaves IPO out."""
    from napo.compare.report import _against_dpo_lines

    metrics = ("counterfactual_accuracy", "prior_consistent_accuracy", "no_prior_accuracy")
    rows = [
        {"objective": o, "noise_rate": rate, "seed": s, "metrics": dict(zip(metrics, (0.7, 0.95, v))), "margins": {}}
        for rate in (0.0, 0.3)
        for s, (dpo, ipo) in enumerate([(0.90, 0.92), (0.91, 0.94), (0.92, 0.96)])
        for o, v in (("dpo", dpo), ("ipo", ipo))
    ]
    for row in rows:
        row["train_wall_s"] = 1.0
    (ipo,) = [d for d in compare.paired_differences(rows, metrics[2:], [0.3], ["dpo", "ipo"], napo_only=False)]
    half = 4.303 * 0.01 / math.sqrt(3)
    assert ipo["mean"] == pytest.approx(0.03) and ipo["low"] == pytest.approx(0.03 - half)
    assert ipo["call"] == "ipo better"
    assert compare.paired_differences(rows, metrics, [0.3], ["dpo", "ipo"]) == []
    lines = _against_dpo_lines(rows, [0.0, 0.3], ["dpo", "ipo"])
    assert lines[-1].startswith("| ipo | 0.3 | +0.000 [") and lines[-1].endswith(
        f"+0.030 [{0.03 - half:+.3f}, {0.03 + half:+.3f}] |"
    )
    assert len([line for line in lines if line.startswith("| ipo")]) == 1
    assert _against_dpo_lines([r for r in rows if r["noise_rate"] == 0], [0.0], ["dpo", "ipo"]) == []
