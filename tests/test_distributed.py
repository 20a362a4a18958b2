"""`napo train` under `accelerate launch` with two CPU processes (gloo): the same q on every rank, and the weights
of a single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import CPU_TRAIN_ARGS
from safetensors.torch import load_file

from napo.cli import main
from napo.models import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ["yellow", "red", "green", "blue", "white", "brown"]
TRAINING = [
    "--max_steps",
    "3",
    "--save_strategy",
    "no",
    *CPU_TRAIN_ARGS,
    "--learning_rate",
    "1e-3",
]

# Runs `napo train` as is, recording on every rank the q that each step computes for each negative type.
Q_RECORDING_JOB = textwrap.dedent("""
    import json, os, sys
    from napo.cli import main
    from napo.trainer import NaPOTrainer
    compute_q = NaPOTrainer._q
    def recording_q(self, column, *args):
        q = compute_q(self, column, *args)
        record = {"rank": self.accelerator.process_index, "step": self.state.global_step, "column": column,
                  "q": float(q)}
        with open(os.path.join(os.environ["Q_LOG_DIR"], f"rank{self.accelerator.process_index}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\\n")
        return q
    NaPOTrainer._q = recording_q
    main(sys.argv[1:])
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_share_q_and_match_a_single_process_run(tmp_path: Path) -> None:
    model, tokenizer = build_tiny_model("text", seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    # Five of the twelve rows lack the vision-biased negative, so the ranks hold unequal numbers of pairs of that type:
    # the per-type loss must still average over the global batch's pairs, not over each rank's.
    rows = [
        {
            "prompt": [{"role": "user", "content": f"what colour is the {['banana', 'cat', 'frog'][i % 3]} ?"}],
            "chosen": COLOURS[i % 6],
            "rejected_language_bias": COLOURS[(i + 1) % 6],
            "rejected_vision_bias": None if i < 5 else f"{COLOURS[(i + 2) % 6]} cat",
        }
        for i in range(12)
    ]
    dataset = tmp_path / "pairs.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["train", "--dataset", str(dataset), "--model", str(tmp_path / "model"), *TRAINING]

    (tmp_path / "q").mkdir()
    (tmp_path / "job.py").write_text(Q_RECORDING_JOB)
    env = {**os.environ, "Q_LOG_DIR": str(tmp_path / "q"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"),
        "--main_process_port",
        str(free_port()),  # a free port: parallel test runs must not collide
        str(tmp_path / "job.py"),
    ]
    result = subprocess.run(
        [*launch, *common, "--per_device_train_batch_size", "2", "--output-dir", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    main([*common, "--per_device_train_batch_size", "4", "--output-dir", str(tmp_path / "one")])

    per_rank = [
        [json.loads(line) for line in (tmp_path / "q" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    assert len(per_rank[0]) == 3 * 2  # 3 steps x 2 negative types
    rank0, rank1 = ([(e["step"], e["column"], e["q"]) for e in records] for records in per_rank)
    assert rank0 == rank1
    assert len({e["q"] for e in per_rank[0]}) > 1  # q moved: the comparison is not between constants

    two, one = (json.loads((tmp_path / run / "log_history.json").read_text()) for run in ("two", "one"))
    for metric in ("loss", "language_bias/q", "vision_bias/q"):
        curve_two, curve_one = ([h[metric] for h in history if "loss" in h] for history in (two, one))
        assert curve_two == pytest.approx(curve_one, abs=1e-5)
    weights_two, weights_one = (load_file(tmp_path / run / "model.safetensors") for run in ("two", "one"))
    start = load_file(tmp_path / "model" / "model.safetensors")
    assert any((weights_one[name] - start[name]).abs().max() > 1e-4 for name in start)  # training moved the weights
    for name, weight in weights_one.items():
        torch.testing.assert_close(weights_two[name], weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("cpu-2proc", "MULTI_GPU"),
        ("ddp", "MULTI_GPU"),
        ("fsdp", "FSDP"),
        ("deepspeed-zero2", "DEEPSPEED"),
        ("deepspeed-zero3", "DEEPSPEED"),
    ],
)
def test_shipped_accelerate_configs_load(name: str, kind: str) -> None:
    """Every config is one accelerate reads (DeepSpeed itself is not installed here: its configs are not run)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type == kind
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
