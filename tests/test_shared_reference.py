"""Grid cells share one reference pass: the SFT model's log-probs of every answer are computed once per grid, follow
their answers through a label flip, and give the per-cell path's training and scores."""

from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from napo.compare import CompareConfig, read_results, run_compare
from napo.pairs import inject_label_noise


def test_flips_move_reference_log_probs_with_their_answers():
    rows = [
        {
            "prompt": f"q{i}",
            "chosen": f"c{i}",
            "rejected_language_bias": f"lang{i}" * (1 + i % 3),
            "rejected_vision_bias": None if i % 4 == 0 else f"vis{i}" * (2 + i % 2),
        }
        for i in range(40)
    ]

    def score(text):  # an answer's "reference log-prob": any function of the text alone
        return np.nan if text is None else -float(len(text)) - 0.5 * text.count("v")

    answers = ("chosen", "rejected_language_bias", "rejected_vision_bias")
    for row in rows:
        row.update({f"ref_{c}_logps": score(row[c]) for c in answers})
    flipped_data, flipped = inject_label_noise(Dataset.from_list(rows), 0.5, seed=1)
    assert len(flipped) == 20
    for i, row in enumerate(flipped_data):
        for column in answers:
            expected = score(row[column])
            assert (np.isnan(expected) and np.isnan(row[f"ref_{column}_logps"])) or row[
                f"ref_{column}_logps"
            ] == expected
        texts = [row[c] for c in answers]
        assert row["noisy"] == (i in flipped)
        assert (texts[0] != rows[i]["chosen"]) if i in flipped else texts == [rows[i][c] for c in answers]

    partial = Dataset.from_list([{k: v for k, v in r.items() if k != "ref_rejected_vision_bias_logps"} for r in rows])
    with pytest.raises(ValueError, match="cover only some"):
        inject_label_noise(partial, 0.5, seed=1)


@pytest.mark.slow
def test_shared_reference_gives_the_per_cell_results(colour_grid_source, tmp_path):
    def grid(out: Path, share: bool) -> CompareConfig:
        return CompareConfig(
            output_dir=str(out),
            objectives=["dpo", "napo-paper"],
            noise_rates=[0.0, 0.4],
            seeds=[0],
            holdout=0.25,
            max_steps=3,
            workers=1,
            keep_models=True,
            share_reference=share,
            # A user's cells train with the user's settings: precomputing makes the per-cell path's reference pass
            # one per cell (an .npy in its trainer folder) rather than one per step.
            train={"per_device_train_batch_size": 8, "learning_rate": 1e-3, "precompute_ref_log_probs": True},
            **colour_grid_source,
        )

    run_compare(grid(tmp_path / "per-cell", False), progress=False)
    run_compare(grid(tmp_path / "shared", True), progress=False)
    per_cell = {r["key"]: r for r in read_results(tmp_path / "per-cell" / "results.jsonl")}
    shared = {r["key"]: r for r in read_results(tmp_path / "shared" / "results.jsonl")}
    assert set(per_cell) == set(shared) and len(shared) == 4
    for key, row in per_cell.items():
        assert shared[key]["metrics"] == pytest.approx(row["metrics"], abs=1e-5), key
        for name, value in row["margins"].items():
            assert shared[key]["margins"][name] == pytest.approx(value, abs=1e-5), (key, name)
    # Only the per-cell path ran a reference pass inside a cell.
    for out, passes in (("per-cell", 4), ("shared", 0)):
        assert len(list((tmp_path / out / "cells").glob("*/trainer/ref_logps/*.npy"))) == passes, out
