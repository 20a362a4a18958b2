"""The bias lab end to end (`napo lab --quick`), `napo eval` on its model, and the committed full report."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from napo.cli import main
from napo.lab.pipeline import PAIR_METADATA, REPORT_METRICS, SFT_GATE, _rows, lab_spec

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "lab" / "report.json"
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


@pytest.mark.slow
def test_napo_eval_on_the_lab_and_on_a_user_dataset(
    quick_lab: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (sft,) = quick_lab.glob("cache/*/sft")
    out = tmp_path / "metrics.json"
    main(["eval", "--model", str(sft), "--n", "6", "--out", str(out)])
    metrics = json.loads(out.read_text())
    for metric in (
        "counterfactual_accuracy",
        "prior_consistent_accuracy",
        "blind_agreement",
        "image_share",
        "pope_f1",
        "chair_s",
    ):
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


def test_committed_full_report_shows_the_sft_gate_and_what_preference_training_did() -> None:
    """The lab v2 report the repository publishes (benchmarks/lab/report.json; how it was run: RUN.md there)."""
    report = json.loads(REPORT.read_text())
    _check_report(report, report["seeds"])
    assert report["command"].startswith("napo lab")
    sft = report["models"]["sft"]
    gate = report["sft_gate"]
    for metric, (low, high) in SFT_GATE.items():
        assert gate[metric]["value"] == sft[metric]["mean"]
        assert gate[metric]["pass"] == (low <= sft[metric]["mean"] <= high)
        # per image-noise level: the levels' rows make up the split, so the split's value lies among theirs
        levels = [sft[k]["mean"] for k in sft if k.startswith(metric + "@noise")]
        assert len(levels) == 4 and min(levels) - 1e-9 <= sft[metric]["mean"] <= max(levels) + 1e-9
    # Lab v2's point: the SFT model reads the image where no prior competes and follows the prior where it agrees,
    # and the noisier the image the more often the prior wins where they disagree.
    assert sft["no_prior_accuracy"]["mean"] >= 0.9 and sft["prior_consistent_accuracy"]["mean"] >= 0.95
    assert sft["counterfactual_accuracy@noise0.1"]["mean"] > sft["counterfactual_accuracy@noise0.4"]["mean"]
    text = (REPORT.parent / "report.md").read_text()
    assert "SFT gate" in text and "DPO on clean pairs" in text and "NAPO on clean pairs" in text
