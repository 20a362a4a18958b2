"""The `napo` command as a TRL user drives it: --config files, TRL spellings, an eval split, resume checks, the
model card, and the error boundary (one message and a distinct exit code, never a traceback)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import CPU_TRAIN_ARGS
from PIL import Image
from safetensors.torch import load_file
from stalled_job import start_stalled, wait_for_stall  # scripts/stalled_job.py

from napo.cli import COMMANDS, EvalArguments, PairsJob, describe_failure, main, parse_command
from napo.config import NaPOConfig
from napo.jobs import LOCK_NAME, output_lock
from napo.pairs import PairsConfig
from napo.train import TrainArguments

COLOURS = ["yellow", "red", "green", "blue", "white", "brown"]
QUICK = [
    "--per_device_train_batch_size",
    "2",
    *CPU_TRAIN_ARGS,
    "--learning_rate",
    "1e-3",
]


def text_pairs(folder: Path, n: int = 8, name: str = "pairs.jsonl", shift: int = 0) -> Path:
    rows = [
        {
            "prompt": [{"role": "user", "content": f"what colour is the {['banana', 'cat', 'frog'][i % 3]} ?"}],
            "chosen": COLOURS[(i + shift) % 6],
            "rejected_language_bias": COLOURS[(i + 1) % 6],
            "rejected_vision_bias": f"{COLOURS[(i + 2) % 6]} cat",
        }
        for i in range(n)
    ]
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def image_source(folder: Path, n: int = 4) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
        content = [{"type": "image"}, {"type": "text", "text": "what colour?"}]
        lines.append(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": content}],
                    "images": [f"img/{i}.png"],
                    "chosen": f"colour {i}",
                    "answer": f"colour {i}",
                }
            )
        )
    path = folder / "source.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def failure(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run `napo ARGV` in-process, expecting it to fail: (exit code, stderr)."""
    with pytest.raises(SystemExit) as ended:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return ended.value.code, err


# ------------------------------------------------------------------------------------------- options and files
@pytest.mark.parametrize("spelling", ["--output_dir", "--output-dir"])
def test_output_dir_is_where_the_model_goes_under_either_spelling(
    saved_text_model, tmp_path, monkeypatch, capsys, spelling
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "here"
    main(
        [
            "train",
            "--dataset_name",
            str(text_pairs(tmp_path)),
            "--model_name_or_path",
            str(saved_text_model),
            spelling,
            str(out),
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
            *QUICK,
        ]
    )
    assert (out / "model.safetensors").exists() and (out / "log_history.json").exists()
    assert not (tmp_path / "outputs").exists()  # the old CLI wrote to outputs/napo-train whatever was asked
    printed = capsys.readouterr().out
    assert f"model: {out}" in printed and f"log_history: {out / 'log_history.json'}" in printed


def test_config_file_sets_any_field_and_the_command_line_overrides_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(f"""
        dataset_name: {tmp_path / "data.jsonl"}
        model_name_or_path: some/model
        output_dir: {tmp_path / "from-file"}
        learning_rate: 1e-3        # YAML reads this as a string: converted as the flag would be
        max_steps: 10
        objective: dpo
        beta: 0.5
        lr_scheduler_kwargs: {{min_lr: 0.0}}
        use_peft: true
        lora_r: 4
        lora_target_modules: [q_proj, v_proj]
        report_to: none
    """)
    )
    invocation = parse_command(["train", "--config", str(config), "--max_steps", "3", "--beta", "0.2"])
    job, training = invocation[TrainArguments], invocation[NaPOConfig]
    assert training.learning_rate == 1e-3 and training.objective == "dpo"
    assert training.lr_scheduler_kwargs == {"min_lr": 0.0}
    assert training.max_steps == 3 and training.beta == 0.2  # flags win
    assert training.output_dir == str(tmp_path / "from-file")
    assert job.dataset_name == str(tmp_path / "data.jsonl") and job.model_name_or_path == "some/model"
    assert job.use_peft and job.lora_r == 4 and sorted(job.peft_config().target_modules) == ["q_proj", "v_proj"]
    assert job.peft_config().lora_alpha == 8  # 2 × r

    pairs_config = tmp_path / "pairs.yaml"
    pairs_config.write_text(
        "source: s.jsonl\nmodel: m\noutput_dir: o\nbatch_size: 2\nnegatives: {rejected_language_bias: image.drop}\n"
    )
    invocation = parse_command(
        [
            "pairs",
            "--config",
            str(pairs_config),
            "--negative",
            "rejected_vision_bias=text.drop_question(prompt='a=b')",
            "--allow-pickle",
        ]
    )
    assert invocation[PairsConfig].negatives == {
        "rejected_language_bias": "image.drop",
        "rejected_vision_bias": "text.drop_question(prompt='a=b')",
    }
    assert invocation[PairsConfig].batch_size == 2 and invocation[PairsJob].allow_pickle
    assert parse_command(["eval", "--model_name_or_path", "m", "--dataset_name", "d"])[EvalArguments].dataset == "d"


def test_trl_model_and_lora_spellings_reach_the_adapter(saved_text_model, tmp_path):
    out = tmp_path / "lora"
    main(
        [
            "train",
            "--dataset",
            str(text_pairs(tmp_path)),
            "--model",
            str(saved_text_model),
            "--output_dir",
            str(out),
            "--use_peft",
            "--lora_r",
            "4",
            "--lora_alpha",
            "16",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
            *QUICK,
        ]
    )
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 16
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("q_proj" in name or "v_proj" in name for name in weights)


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("lerning_rate: 1e-3\n", "lerning_rate (did you mean learning_rate?)"),
        ("max_steps: ten\n", "max_steps"),
        ("lr_scheduler_type: sometimes\n", "lr_scheduler_type"),
        ("- a list\n", "expected a mapping"),
        ("a: [unclosed\n", "not valid YAML"),
    ],
)
def test_a_bad_config_file_is_exit_2_naming_the_key(tmp_path, capsys, bad, expected):
    config = tmp_path / "run.yaml"
    config.write_text(bad)
    code, err = failure(["train", "--config", str(config), "--dataset", "d", "--model", "m"], capsys)
    assert code == 2 and expected in err and str(config) in err
    code, err = failure(["train", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "no such file" in err


def test_bad_options_are_exit_2(tmp_path, capsys):
    code, err = failure(["train", "--dataset", "d", "--model", "m", "--lora_alpha", "8"], capsys)
    assert code == 2 and "--use_peft" in err  # a LoRA option alone would otherwise be ignored
    code, err = failure(["train", "--dataset", "d", "--model", "m", "--eval_split", "1.5"], capsys)
    assert code == 2 and "(0, 1)" in err
    code, err = failure(["train", "--dataset", "d", "--model", "m", "--objective", "dpoo"], capsys)
    assert code == 2 and "objective" in err
    code, err = failure(["pairs", "--source", "s", "--model", "m", "--output_dir", "o", "--learning_rate", "1"], capsys)
    assert code == 2 and "unrecognized arguments" in err
    code, err = failure(["pairs", "--source", "s", "--model", "m", "--output_dir", "o", "--negative", "x"], capsys)
    assert code == 2 and "KEY=VALUE" in err
    code, err = failure(["trian"], capsys)
    assert code == 2 and "did you mean train" in err


def test_every_option_of_every_command_has_a_help_line_and_a_default(capsys):
    for name, command in COMMANDS.items():
        parser = command.build_parser().parser
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"napo {name} {action.option_strings}: no help line"
            shown = parser._get_formatter()._get_help_string(action)
            assert any(word in shown for word in ("(default: ", "(required)", "None:", "default")), (
                f"napo {name} {action.option_strings}: no default shown in {shown!r}"
            )
        parser.format_help()  # a '%' in a help line would raise here


# ------------------------------------------------------------------------------------------ evaluation split
def test_eval_split_makes_eval_strategy_steps_work(saved_text_model, tmp_path, capsys):
    out = tmp_path / "eval"
    main(
        [
            "train",
            "--dataset",
            str(text_pairs(tmp_path, n=8)),
            "--model",
            str(saved_text_model),
            "--output_dir",
            str(out),
            "--eval_split",
            "0.25",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "1",
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
            *QUICK,
        ]
    )
    history = json.loads((out / "log_history.json").read_text())
    evaluated = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evaluated] == [1, 2]
    assert any("eval_language_bias/rewards/margins" in h for h in evaluated)  # napo's per-type metrics on eval rows
    metrics = json.loads((out / "eval_results.json").read_text())
    assert np.isfinite(metrics["eval_loss"])
    assert f"eval_metrics: {out / 'eval_results.json'}" in capsys.readouterr().out

    separate = tmp_path / "separate"
    main(
        [
            "train",
            "--dataset",
            str(text_pairs(tmp_path, n=6)),
            "--model",
            str(saved_text_model),
            "--output_dir",
            str(separate),
            "--eval_dataset",
            str(text_pairs(tmp_path, n=2, name="eval.jsonl")),
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "1",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
            *QUICK,
        ]
    )
    assert (separate / "eval_results.json").exists()

    code, err = failure(
        [
            "train",
            "--dataset",
            str(text_pairs(tmp_path)),
            "--model",
            str(saved_text_model),
            "--output_dir",
            str(tmp_path / "none"),
            "--eval_strategy",
            "steps",
            *QUICK,
        ],
        capsys,
    )
    assert code == 3 and "--eval_dataset" in err and "--eval_split" in err
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------------------------------------ resume check
def test_resume_refuses_another_dataset_or_learning_rate_unless_told(saved_text_model, tmp_path, capsys):
    data = text_pairs(tmp_path, n=8)
    out = tmp_path / "run"
    common = ["train", "--model", str(saved_text_model), "--output_dir", str(out), "--save_steps", "1", *QUICK]
    main([*common, "--dataset", str(data), "--max_steps", "2"])
    assert (out / "checkpoint-2" / "napo_job.json").exists()

    code, err = failure(
        [*common, "--dataset", str(data), "--max_steps", "2", "--resume", "--learning_rate", "5e-4"], capsys
    )
    assert code == 3 and "learning_rate: 0.001 -> 0.0005" in err and "--resume-anyway" in err
    other = text_pairs(tmp_path, n=8, name="other.jsonl", shift=1)
    code, err = failure([*common, "--dataset", str(other), "--max_steps", "2", "--resume"], capsys)
    assert code == 3 and "dataset:" in err and "other.jsonl" in err
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # nothing was trained by the refused runs

    # The same job resumes (TRL's spelling, from an earlier checkpoint); then a changed one, when told to.
    main([*common, "--dataset", str(data), "--max_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-1")])
    main([*common, "--dataset", str(data), "--max_steps", "3", "--resume-anyway"])
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert json.loads((out / "checkpoint-3" / "napo_job.json").read_text())["settings"]["max_steps"] == 3


# ----------------------------------------------------------------------------------------- model card, trackers
def test_model_card_names_the_base_model_paper_objective_negatives_and_dataset(saved_text_model, tmp_path):
    data = text_pairs(tmp_path)
    out = tmp_path / "card"
    main(
        [
            "train",
            "--dataset",
            str(data),
            "--model",
            str(saved_text_model),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
            "--objective",
            "napo",
            "--q",
            "official",
            *QUICK,
        ]
    )
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert f"base_model: {saved_text_model}" in front and "napo" in front
    assert "2503.17928" in card and "@inproceedings{zhang2025napo" in card and "Noise-Aware Preference" in card
    assert "Direct Preference Optimization: Your Language Model" not in card  # not DPO's paper
    assert "objective: `napo`, q = `official`" in card and str(data) in card and "8 rows" in card
    # weights 0.49 / 0.49 over the two columns present, renormalised: 0.5 each
    assert "`rejected_language_bias` 0.5, `rejected_vision_bias` 0.5" in card


def test_a_missing_tracker_is_a_message_before_anything_is_loaded(saved_text_model, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    code, err = failure(
        [
            "train",
            "--dataset",
            str(text_pairs(tmp_path)),
            "--model",
            str(saved_text_model),
            "--output_dir",
            str(tmp_path / "tb"),
            "--max_steps",
            "1",
            *QUICK,
            "--report_to",
            "tensorboard",
        ],
        capsys,
    )
    assert code == 3 and "napo[track]" in err and "--report_to none" in err
    assert not (tmp_path / "tb").exists()


def test_model_init_kwargs_are_applied_or_refused(saved_text_model, tmp_path, capsys):
    # napo loads the model itself, so TRL's model_init_kwargs must reach that load, not be dropped.
    out = tmp_path / "half"
    main(
        [
            "train",
            "--dataset",
            str(text_pairs(tmp_path)),
            "--model",
            str(saved_text_model),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
            *QUICK,
            "--model_init_kwargs",
            '{"dtype": "float64"}',
        ]
    )
    from transformers import AutoConfig

    assert str(AutoConfig.from_pretrained(out).dtype) in ("float64", "torch.float64")
    code, err = failure(
        [
            "train",
            "--dataset",
            str(text_pairs(tmp_path)),
            "--model",
            str(saved_text_model),
            "--output_dir",
            str(tmp_path / "bad"),
            "--max_steps",
            "1",
            *QUICK,
            "--model_init_kwargs",
            '{"low_cpu_mem_usage": true}',
        ],
        capsys,
    )
    assert code == 3 and "low_cpu_mem_usage" in err


# ---------------------------------------------------------------------------------------------- error boundary
def test_an_unmakeable_output_folder_is_exit_4(saved_text_model, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, err = failure(
        [
            "train",
            "--dataset",
            str(text_pairs(tmp_path)),
            "--model",
            str(saved_text_model),
            "--output_dir",
            str(tmp_path / "file" / "out"),
            *QUICK,
        ],
        capsys,
    )
    assert code == 4 and "a file of that name is in the way" in err


def test_a_busy_output_folder_is_exit_5_naming_the_holder(saved_text_model, tmp_path, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom napo.jobs import output_lock\n"
            "with output_lock(sys.argv[1], command='napo pairs (first job)'):\n"
            "    print('locked', flush=True); sys.stdin.read()",
            str(tmp_path / "out"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = failure(
            [
                "train",
                "--dataset",
                str(text_pairs(tmp_path)),
                "--model",
                str(saved_text_model),
                "--output_dir",
                str(tmp_path / "out"),
                *QUICK,
            ],
            capsys,
        )
        assert code == 5 and f"pid {holder.pid}" in err and "first job" in err
        code, err = failure(
            [
                "pairs",
                "--source",
                "s.jsonl",
                "--model",
                "m",
                "--output_dir",
                str(tmp_path / "out"),
                "--overwrite",
                "--batch_size",
                "1",
            ],
            capsys,
        )
        assert code == 5 and f"pid {holder.pid}" in err
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not list((tmp_path / "out").glob("*.json"))  # the refused jobs wrote nothing


def test_full_disk_in_pairs_is_exit_4_leaves_no_temp_file_and_resumes(saved_llava, tmp_path, capsys, monkeypatch):
    source = image_source(tmp_path)
    out = tmp_path / "pairs"
    args = [
        "pairs",
        "--source",
        str(source),
        "--model",
        str(saved_llava),
        "--output_dir",
        str(out),
        "--max_new_tokens",
        "3",
        "--shard_size",
        "2",
        "--no_progress",
    ]
    real_to_parquet = datasets.Dataset.to_parquet

    def disk_fills_up(self, path, *a, **k):  # the disk fills up half-way through the final parquet write
        Path(path).write_bytes(b"PAR1 half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(datasets.Dataset, "to_parquet", disk_fills_up)
    code, err = failure(args, capsys)
    assert code == 4 and "the disk is full" in err and "rerun the same command to resume" in err
    assert not list(out.rglob("*.tmp-*")) and not (out / LOCK_NAME).exists()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000", "00000.json", "00001", "00001.json"]

    monkeypatch.setattr(datasets.Dataset, "to_parquet", real_to_parquet)
    main(args)
    assert len(datasets.Dataset.from_parquet(str(out / "data.parquet"))) == 4


def test_pairs_accepts_the_allow_pickle_it_suggests(saved_llava, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for item in saved_llava.iterdir():
        if item.suffix != ".safetensors":
            (pickled / item.name).write_bytes(item.read_bytes())
    torch.save(load_file(saved_llava / "model.safetensors"), pickled / "pytorch_model.bin")
    args = [
        "pairs",
        "--source",
        str(image_source(tmp_path, n=2)),
        "--model",
        str(pickled),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_new_tokens",
        "2",
        "--no_progress",
    ]
    code, err = failure(args, capsys)
    assert code == 3 and "--allow-pickle" in err and "pairs" in err
    main([*args, "--allow-pickle"])
    assert (tmp_path / "out" / "data.parquet").exists()


def test_unexpected_errors_are_exit_1_and_point_to_debug():
    code, message = describe_failure(COMMANDS["train"], KeyError("x"))
    assert code == 1 and "--debug" in message and "KeyError" in message
    code, message = describe_failure(COMMANDS["pairs"], KeyboardInterrupt())
    assert code == 130 and "rerun the same command to resume" in message


@pytest.mark.slow
def test_ctrl_c_is_exit_130_with_a_resume_hint_and_the_rerun_finishes(saved_llava, tmp_path, capsys):
    source = image_source(tmp_path)
    out = tmp_path / "pairs"
    args = [
        "pairs",
        "--source",
        str(source),
        "--model",
        str(saved_llava),
        "--output_dir",
        str(out),
        "--max_new_tokens",
        "3",
        "--shard_size",
        "2",
        "--no_progress",
    ]
    for debug in ([], ["--debug"]):
        stalled = tmp_path / f"stalled{len(debug)}"  # created once the generator stalls after the first shard
        process = start_stalled(stalled, *args, *debug)
        wait_for_stall(stalled, process, timeout=240)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 130, err
        assert "napo pairs: interrupted (Ctrl-C)" in err and "rerun the same command to resume" in err
        assert ("Traceback" in err) == bool(debug)
        assert not (out / LOCK_NAME).exists() and not list(out.rglob("*.tmp-*"))
    main(args)
    assert len(datasets.load_from_disk(str(out / "dataset"))) == 4
    assert "4 of 4 rows written" in capsys.readouterr().out


def test_napo_eval_shows_progress_and_reports_bad_input_cleanly(saved_llava, tmp_path, capsys):
    source = image_source(tmp_path, n=3)
    main(
        [
            "eval",
            "--model",
            str(saved_llava),
            "--dataset",
            str(source),
            "--out",
            str(tmp_path / "m" / "metrics.json"),
            "--max_new_tokens",
            "2",
            "--batch_size",
            "2",
        ]
    )
    captured = capsys.readouterr()
    assert "21/21" in captured.err  # 7 passes over 3 rows
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert set(metrics) == {"accuracy", "blind_agreement", "question_blind_agreement", "image_share"}
    assert f"metrics: {tmp_path / 'm' / 'metrics.json'}" in captured.out

    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"prompt": "hi", "chosen": "x"}) + "\n")
    code, err = failure(["eval", "--model", str(tmp_path / "no-model"), "--dataset", str(no_answer)], capsys)
    assert code == 3 and "'answer'" in err  # the data is checked before the (missing) model is loaded
    code, err = failure(["eval", "--model", str(tmp_path / "no-model"), "--dataset", str(source)], capsys)
    assert code in (3, 4) and "no-model" in err
    code, err = failure(["eval", "--model", str(saved_llava), "--dataset", str(tmp_path / "nothing.jsonl")], capsys)
    assert code == 4 and "does not exist" in err
    code, err = failure(["eval", "--model", str(saved_llava), "--n", "0"], capsys)
    assert code == 2 and "--n 0" in err


def test_a_failed_first_run_leaves_no_output_folder(saved_text_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": 42, "rejected": "a"}) + "\n")
    code, _ = failure(
        ["train", "--dataset", str(bad), "--model", str(saved_text_model), "--output_dir", str(tmp_path / "o"), *QUICK],
        capsys,
    )
    assert code == 3 and not (tmp_path / "o").exists()
    os.makedirs(tmp_path / "kept")
    with output_lock(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").exists()  # a folder that existed before is never removed
