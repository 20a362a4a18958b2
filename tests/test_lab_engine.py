"""The lab engine's pieces that the end-to-end labs (tests/test_lab.py, tests/test_audio.py) do not pin down: the task
registry, the run bar's ETA bookkeeping, and preference runs that never print raw metric dicts."""

from __future__ import annotations

from dataclasses import fields

import pytest

from napo.lab.progress import StageBar, stage_costs
from napo.lab.tasks import TASK_MODULES, as_chat, lab_task

SETTINGS_FIELDS = {
    "n_train",
    "text_only_fraction",
    "sft_steps",
    "sft_batch_size",
    "sft_lr",
    "n_pairs",
    "n_counterfactual_pairs",
    "pref_steps",
    "pref_batch_size",
    "pref_lr",
    "beta",
    "sft_weight",
    "keep_identical",
    "pair_temperature",
    "n_eval",
}


def test_every_task_record_has_what_the_engine_reads() -> None:
    for name in TASK_MODULES:
        task = lab_task(name)
        assert task.name == name
        for settings in (task.settings.full(), task.settings.quick()):
            assert SETTINGS_FIELDS <= {f.name for f in fields(settings)}, name
        recipe = task.load_recipe(None)
        (row,) = task.rows(recipe, "counterfactual", 1, 0)
        assert row["prompt"][0]["content"][0] == {"type": task.modality}
        assert row[task.hardness] > 0  # the annotator's errors fall on rows in proportion to it
        alike = task.confusable(recipe, row["answer"])  # another answer of the attribute question
        assert isinstance(alike, str) and alike != row["answer"]
        assert set(task.gate) <= set(task.report_metrics) and set(task.summary_metrics) <= set(task.report_metrics)
    with pytest.raises(ValueError, match=r"unknown lab task 'speech'.*'audio', 'vision'"):
        lab_task("speech")


def test_as_chat_puts_the_media_part_before_the_question() -> None:
    rows = as_chat([{"prompt": "what note?"}], "audio")
    assert rows[0]["prompt"] == [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "what note?"}]}
    ]


@pytest.mark.parametrize("task_name", sorted(TASK_MODULES))
def test_text_only_rows_drop_the_media_of_a_seeded_share_and_keep_the_answers(task_name: str) -> None:
    from napo.lab.sft import text_only_rows

    task = lab_task(task_name)
    recipe = task.load_recipe(None)
    media = "images" if task.modality == "image" else "audios"
    rows = task.rows(recipe, "train", 8, 0)
    blind = {seed: text_only_rows(rows, task.modality, 0.25, seed) for seed in (0, 1)}
    for out in blind.values():
        dropped = [i for i, (row, new) in enumerate(zip(rows, out)) if new is not row]
        assert len(dropped) == 2  # round(0.25 * 8)
        for i in dropped:
            assert out[i][media] == [] and out[i]["answer"] == rows[i]["answer"]
            assert out[i]["prompt"][0]["content"] == rows[i]["prompt"][0]["content"][1:]  # the question alone
            assert rows[i][media]  # the input rows are left as they were
    assert text_only_rows(rows, task.modality, 0.25, 0) == blind[0]  # the replicate seed fixes the subset
    assert [r is s for r, s in zip(blind[0], rows)] != [r is s for r, s in zip(blind[1], rows)]
    assert text_only_rows(rows, task.modality, 0.0, 0) is rows


def test_sft_loss_of_a_batch_mixing_text_only_rows_is_the_mean_over_all_answer_tokens() -> None:
    """Reference: every row alone through the model, its summed answer-token cross-entropy, over the batch's count."""
    import torch

    from napo.evaluate import answer_batch
    from napo.lab.sft import _batch_loss, text_only_rows

    task = lab_task("vision")
    recipe = task.load_recipe(None)
    rows = text_only_rows(task.rows(recipe, "train", 6, 0), "image", 1 / 3, 0)  # groups of 4 and 2 rows
    model, processor = task.build_model(recipe, task.settings.quick(), 0)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            inputs, mask = answer_batch(processor, [row], [row["answer"]])
            labels = inputs["input_ids"].masked_fill(mask == 0, -100)
            total += model(**inputs, labels=labels).loss.item() * int(mask.sum())
            count += int(mask.sum())
        mixed = _batch_loss(model, processor, rows).item()
    assert mixed == pytest.approx(total / count, rel=1e-5)


def test_stage_bar_eta_counts_only_the_stages_that_ran() -> None:
    """A cached stage leaves the bar's total (else the rest would look faster than it is); a stage run fills it."""
    bar = StageBar({"SFT": 100.0, "pairs": 10.0, "dpo seed 0": 30.0}, desc="test", enabled=False)
    bar.end("SFT", cached=True)
    assert (bar.total, bar.done) == (40.0, 0.0)
    bar.end("pairs")
    bar.end("dpo seed 0")
    assert bar.done == bar.total == 40.0
    bar.close()


def test_stage_costs_rank_the_full_vision_lab_stages() -> None:
    """The default vision lab: SFT (700 steps of 64 rows) costs more than one preference run (120 x 32), which costs
    more than one evaluation (200 rows per split), as measured on the quick lab scaled up (138 s for 80 SFT steps,
    16 s for 10 preference steps, 9 s for an evaluation of 32 rows per split)."""
    from dataclasses import asdict

    task = lab_task("vision")
    cost = stage_costs(asdict(task.settings.full()), task.eval_passes)
    assert cost["sft"] == 700 * 64 * 3 and cost["preference"] == 120 * 32 * 6
    assert cost["sft"] > cost["preference"] > cost["evaluation"]


def test_preference_runs_print_no_raw_metric_dicts(colour_grid_source, tmp_path, capsys) -> None:
    """transformers prints every log as a dict (`PrinterCallback` with disable_tqdm, `ProgressCallback` without):
    stock `train_preference` does; the lab's runs show a bar with the loss instead, or nothing."""
    import datasets

    from napo.lab.engine import lab_training_config, train_lab_model
    from napo.models import load_model
    from napo.training import train_preference

    short = dict(max_steps=2, logging_steps=1, per_device_train_batch_size=4, share_prompt=False)
    pairs = datasets.load_from_disk(colour_grid_source["dataset"])
    model, tokenizer = load_model(colour_grid_source["model"])
    stock = lab_training_config(tmp_path / "stock", objective="dpo", seed=0, **short)
    train_preference(pairs, model, stock, processing_class=tokenizer)
    assert "'loss'" in capsys.readouterr().out  # what the lab used to print, and stock transformers still does

    train_lab_model(colour_grid_source["model"], pairs, tmp_path / "quiet", objective="dpo", seed=0, **short)
    quiet = capsys.readouterr()
    assert "'loss'" not in quiet.out + quiet.err and "lab run" not in quiet.err

    run = train_lab_model(
        colour_grid_source["model"], pairs, tmp_path / "bar", objective="napo", seed=0, progress="lab run", **short
    )
    shown = capsys.readouterr()
    assert "'loss'" not in shown.out + shown.err and "lab run" in shown.err
    assert [entry["step"] for entry in run["log_history"] if "loss" in entry] == [1, 2]  # logged, only not printed
