"""The bias lab end to end (`napo lab --quick`), `napo eval` on its model, and the report's gate and sentences."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pytest

from napo.cli import main
from napo.lab.pipeline import PAIR_METADATA, REPORT_METRICS, SFT_GATE, _rows, lab_spec, render_report, sft_gate

FIELDS = ("wall_time_s", "command", "date", "device", "versions", "seeds", "models")


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lab")
    main(["lab", "--quick", "--out", str(out), "--seeds", "0"])
    return out


def _check_report(report: dict, seeds: list[int]) -> None:
    for field in FIELDS:
        assert field in report, field
    assert report["seeds"] == seeds
    assert set(report["models"]) == {"sft", "dpo", "napo"}
    for name, metrics in report["models"].items():
        for metric in REPORT_METRICS:
            stat = metrics[metric]
            assert 0.0 <= stat["mean"] <= 1.0, (name, metric, stat)
            assert stat["std"] >= 0.0
    for package in ("torch", "transformers", "trl"):
        assert report["versions"][package]


@pytest.mark.slow
def test_quick_lab_writes_a_complete_report_and_sft_is_biased(quick_lab: Path) -> None:
    report = json.loads((quick_lab / "report.json").read_text())
    _check_report(report, [0])
    gate = report["sft_gate"]
    for metric, (low, high) in SFT_GATE.items():
        value = report["models"]["sft"][metric]["mean"]
        assert gate[metric]["value"] == value and gate[metric]["pass"] == (low <= value <= high)
    assert gate["pass"] == all(gate[m]["pass"] for m in SFT_GATE)
    # every gate metric also per image-noise level, each level's rows a part of the split
    for metric in SFT_GATE:
        levels = [k for k in report["models"]["sft"] if k.startswith(metric + "@noise")]
        assert len(levels) >= 2, (metric, levels)
    for name in ("report.md", "metrics.png", "image_share.png"):
        assert (quick_lab / name).stat().st_size > 0
    sft = report["models"]["sft"]
    # Even the quick SFT model has learnt the prior: it reads prior-consistent colours far better.
    assert sft["prior_consistent_accuracy"]["mean"] - sft["counterfactual_accuracy"]["mean"] > 0.2
    # Both objectives trained from the same SFT model and logged per negative type; NaPO logged its q.
    runs = {r["objective"]: r for r in report["runs"]}
    assert "language_bias/q" in runs["napo"]["final_log"] and "language_bias/q" not in runs["dpo"]["final_log"]
    assert "vision_bias/rewards/margins" in runs["dpo"]["final_log"]
    assert "| counterfactual_accuracy |" in (quick_lab / "report.md").read_text()


@pytest.mark.slow
def test_quick_lab_pairs_follow_the_design(quick_lab: Path) -> None:
    """Pairs as the paper makes them: a general wrong `rejected` on every row, the blind and question-less model's
    sampled negatives, identical negatives kept (and counted), the ground truth carried for the noise."""
    (pairs,) = quick_lab.glob("cache/*/pairs/dataset")
    rows = datasets.load_from_disk(str(pairs))
    stats = json.loads((pairs.parent / "stats.json").read_text())
    assert set(PAIR_METADATA) <= set(rows.column_names)
    for row in rows:
        assert row["chosen"] == row["answer"]  # clean pairs: the annotator's errors are added per compare cell
        assert row["rejected"] is not None and row["rejected"] != row["answer"]
        assert len(row["images"]) == 1  # negatives are scored with the full input
    for column in ("rejected_language_bias", "rejected_vision_bias"):
        identical = sum(row[column] == row["chosen"] for row in rows)
        assert (
            identical == stats["negatives"][column]["identical_to_chosen"]
            and stats["negatives"][column]["identical_kept"]
        )
    # The blind model follows the prior: on rows whose object has one, its answer is mostly the prior colour.
    prior_rows = [r for r in rows if r["kind"] == "attribute" and r["prior_answer"]]
    assert sum(r["rejected_language_bias"] == r["prior_answer"] for r in prior_rows) > 0.5 * len(prior_rows)


@pytest.mark.slow
def test_rerun_reuses_the_cached_sft_model_and_pairs(quick_lab: Path) -> None:
    from napo.lab.pipeline import prepare_lab

    lab = prepare_lab(quick_lab, quick=True)
    assert lab["sft_wall_time_s"] == 0.0 and lab["pairs_wall_time_s"] == 0.0
    assert Path(lab["sft_dir"], "config.json").exists()
    # The cache key every earlier run used (so their SFT models are still found): recipe, settings and seed hashed.
    from dataclasses import asdict

    from napo.lab.pipeline import LabSettings

    spec = json.dumps([lab_spec()["recipe"], asdict(LabSettings.quick()), 0], sort_keys=True)
    assert Path(lab["sft_dir"]).parent.name == hashlib.sha256(spec.encode()).hexdigest()[:12]


@pytest.mark.slow
def test_napo_eval_on_the_lab_and_on_a_user_dataset(
    quick_lab: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (sft,) = quick_lab.glob("cache/*/sft")
    out = tmp_path / "metrics.json"
    main(["eval", "--model", str(sft), "--n", "6", "--out", str(out)])
    metrics = json.loads(out.read_text())
    for metric in REPORT_METRICS:
        assert 0.0 <= metrics[metric] <= 1.0

    rows = _rows(lab_spec()["recipe"], "counterfactual", 5, 7)
    user = datasets.Dataset.from_dict(
        {
            "prompt": [r["prompt"] for r in rows],
            "images": [r["images"] for r in rows],
            "answer": [r["answer"] for r in rows],
        }
    )
    user.save_to_disk(str(tmp_path / "user"))
    main(["eval", "--model", str(sft), "--dataset", str(tmp_path / "user"), "--out", str(tmp_path / "user.json")])
    user_metrics = json.loads((tmp_path / "user.json").read_text())
    assert set(user_metrics) == {"accuracy", "blind_agreement", "question_blind_agreement", "image_share"}
    assert "metrics:" in capsys.readouterr().out


def test_sft_gate_and_report_say_what_the_numbers_are_on_a_hand_made_report() -> None:
    """What benchmarks/lab/report.md states, computed by napo on hand-chosen numbers: the SFT gate's ranges are
    inclusive ([0.9, 1], [0.3, 0.7], [0.95, 1]) and fail a model on one metric outside them; the report prints the
    gate with each metric's mark, the per-noise-level rows, and each objective's gain / prior-consistent / no-prior
    change against issue 15's +0.15 / 0.03 / 0.03, with the budget behind a gain that falls short."""
    on_the_bounds = sft_gate(
        {"no_prior_accuracy": 0.9, "counterfactual_accuracy": 0.7, "prior_consistent_accuracy": 0.95}
    )
    assert on_the_bounds["pass"] and all(on_the_bounds[m]["pass"] for m in SFT_GATE)
    below = sft_gate({"no_prior_accuracy": 0.9, "counterfactual_accuracy": 0.29, "prior_consistent_accuracy": 1.0})
    assert not below["pass"] and not below["counterfactual_accuracy"]["pass"] and below["no_prior_accuracy"]["pass"]
    sft = {metric: 0.5 for metric in REPORT_METRICS}
    sft.update(no_prior_accuracy=0.95, counterfactual_accuracy=0.71, prior_consistent_accuracy=0.97)
    sft.update({"counterfactual_accuracy@noise0.1": 0.8, "counterfactual_accuracy@noise0.4": 0.6})
    # DPO: +0.20 counterfactual, -0.01 prior-consistent, -0.01 no-prior: met. NaPO: +0.04, -0.07, +0.01: not met.
    dpo = {**sft, "counterfactual_accuracy": 0.91, "prior_consistent_accuracy": 0.96, "no_prior_accuracy": 0.94}
    dpo["counterfactual_accuracy@noise0.4"] = 0.9
    napo = {**sft, "counterfactual_accuracy": 0.75, "prior_consistent_accuracy": 0.9, "no_prior_accuracy": 0.96}
    gate = sft_gate({metric: sft[metric] for metric in SFT_GATE})
    assert (gate["counterfactual_accuracy"], gate["pass"]) == (
        {"value": 0.71, "range": [0.3, 0.7], "pass": False},
        False,
    )
    assert gate["no_prior_accuracy"]["pass"] and gate["prior_consistent_accuracy"]["pass"]
    report = {
        "command": "napo lab",
        "date": "2026-01-01",
        "device": "cpu",
        "wall_time_s": 60.0,
        "cpu_time_s": 120.0,
        "sft_wall_time_s": 0.0,
        "pairs_wall_time_s": 5.0,
        "seeds": [0],
        "versions": {"torch": "0"},
        "models": {
            name: {metric: {"mean": value, "std": 0.0} for metric, value in means.items()}
            for name, means in (("sft", sft), ("dpo", dpo), ("napo", napo))
        },
        "sft_gate": gate,
        "pairs": {
            "rows_written": 4,
            "negatives": {"rejected_vision_bias": {"spec": "image.drop", "written": 4, "identical_to_chosen": 1}},
        },
        "settings": {"pref_steps": 10, "pref_batch_size": 4, "pref_lr": 1e-4, "beta": 0.1},
    }
    text = render_report(report)
    assert (
        "SFT gate (lab v2): no_prior_accuracy 0.950 in [0.9, 1.0] ✓, counterfactual_accuracy 0.710 in [0.3, 0.7] ✗, "
        "prior_consistent_accuracy 0.970 in [0.95, 1.0] ✓ — NOT passed." in text
    )
    assert "NOT passed: counterfactual_accuracy 0.710." in text
    assert "| counterfactual_accuracy@noise0.4 | 0.600 | 0.900 | 0.600 |" in text
    assert "**DPO on clean pairs**" in text and "+0.200 / -0.010 / -0.010 — met." in text
    assert "**NAPO on clean pairs**" in text and (
        "+0.040 / -0.070 / +0.010 — NOT met (10 steps of 4 rows at lr 0.0001, β 0.1; counterfactual accuracy per "
        "image-noise level 0.1: 0.80 → 0.80, 0.4: 0.60 → 0.60)" in text
    )
    assert "**NAPO trades more than it gains**: +0.040 counterfactual for -0.070 prior-consistent." in text
    assert "rejected_vision_bias (image.drop) 4 written, 1 identical to chosen dropped" in text
    # A gain bought with no-prior accuracy (+0.19, -0.01, -0.05) is not met either, and says so.
    napo.update(counterfactual_accuracy=0.9, prior_consistent_accuracy=0.96, no_prior_accuracy=0.9)
    report["models"]["napo"] = {metric: {"mean": value, "std": 0.0} for metric, value in napo.items()}
    assert (
        "+0.190 / -0.010 / -0.050 — NOT met: it trades prior-consistent or no-prior accuracy for the gain."
        in render_report(report)
    )
    # Exactly at the bound (6 of 200 rows lost) is met.
    napo.update(prior_consistent_accuracy=0.94, no_prior_accuracy=0.95)  # 0.97 − 0.94 > 0.03 in floating point
    report["models"]["napo"] = {metric: {"mean": value, "std": 0.0} for metric, value in napo.items()}
    assert "+0.190 / -0.030 / +0.000 — met." in render_report(report)
    # NaPO level with DPO: the verdict names where NaPO's runs ended (means of their last logged margins and q).
    napo.update(counterfactual_accuracy=dpo["counterfactual_accuracy"])
    report["models"]["napo"] = {metric: {"mean": value, "std": 0.0} for metric, value in napo.items()}
    assert "within twice the seed spread" in render_report(report) and "NaPO runs end" not in render_report(report)
    report["runs"] = [
        {"objective": "napo", "seed": 0, "final_log": {"rewards/margins": 0.14, "language_bias/q": 0.495}},
        {"objective": "napo", "seed": 1, "final_log": {"rewards/margins": 0.10, "language_bias/q": 0.505}},
        {"objective": "dpo", "seed": 0, "final_log": {"rewards/margins": 9.0}},
    ]
    assert "the NaPO runs end with reward margins 0.12 and language-biased q 0.50 (means over seeds)" in render_report(
        report
    )
