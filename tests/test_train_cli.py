"""`napo train` end to end from paths: a tiny model saved to disk, a JSONL dataset with image files."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from napo.cli import main
from napo.models import load_model

TRAIN_ARGS = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--gradient_checkpointing",
    "false",
    "--use_cpu",
    "true",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--logging_steps",
    "1",
]


def write_jsonl(folder, *, missing_image_row=None):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        image = folder / f"img{i}.png"
        if i != missing_image_row:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
        rows.append(
            {
                "prompt": [{"role": "user", "content": "what colour is the cat ?"}],
                "images": [image.name],
                "chosen": "red",
                "rejected_language_bias": "yellow",
                "rejected_vision_bias": "a red cat",
            }
        )
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_napo_train_from_paths(saved_llava, tmp_path, capsys):
    dataset = write_jsonl(tmp_path)
    out = tmp_path / "out"
    main(
        [
            "train",
            "--dataset",
            str(dataset),
            "--model",
            str(saved_llava),
            "--output-dir",
            str(out),
            "--q",
            "official",
            "--learning_rate",
            "1e-3",
            *TRAIN_ARGS,
        ]
    )
    printed = capsys.readouterr().out
    assert f"model: {out}" in printed
    history = json.loads((out / "log_history.json").read_text())
    assert any("vision_bias/q" in h for h in history)
    trained, _ = load_model(str(out))
    original, _ = load_model(str(saved_llava))
    changed = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), original.state_dict().values())]
    assert any(changed)


def test_napo_train_lora_saves_an_adapter(saved_llava, tmp_path):
    out = tmp_path / "out"
    main(
        [
            "train",
            "--dataset",
            str(write_jsonl(tmp_path)),
            "--model",
            str(saved_llava),
            "--output-dir",
            str(out),
            "--lora-rank",
            "4",
            "--lora-target-modules",
            "q_proj,v_proj",
            *TRAIN_ARGS,
        ]
    )
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()


def test_missing_image_stops_before_training_naming_the_row(saved_llava, tmp_path):
    dataset = write_jsonl(tmp_path, missing_image_row=2)
    with pytest.raises(SystemExit) as error:
        main(
            [
                "train",
                "--dataset",
                str(dataset),
                "--model",
                str(saved_llava),
                "--output-dir",
                str(tmp_path / "o"),
                *TRAIN_ARGS,
            ]
        )
    message = str(error.value)
    assert message.startswith("napo train:") and "row 2" in message and "img2.png" in message
    assert not (tmp_path / "o").exists()


def test_bad_passthrough_argument_is_rejected(saved_llava, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "x", "--model", str(saved_llava), "--learning_rat", "1"])  # no abbreviations
    with pytest.raises(SystemExit, match="napo train: .*does not exist"):
        main(["train", "--dataset", str(tmp_path / "nothing.jsonl"), "--model", str(saved_llava)])
    with pytest.raises(SystemExit):
        main(["pairs", "--source", "s", "--model", "m", "--output-dir", "o", "--learning_rate", "1"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_attention_and_padding_free_options(saved_llava, tmp_path):
    model, _ = load_model(str(saved_llava), attn_implementation="eager")
    assert model.config.get_text_config()._attn_implementation == "eager"
    out = tmp_path / "out"
    main(
        [
            "train",
            "--dataset",
            str(write_jsonl(tmp_path)),
            "--model",
            str(saved_llava),
            "--output-dir",
            str(out),
            "--attn-implementation",
            "eager",
            "--padding_free",
            "true",
            *TRAIN_ARGS,
        ]
    )
    history = json.loads((out / "log_history.json").read_text())
    assert len([h for h in history if "loss" in h]) == 2
    if importlib.util.find_spec("xformers") is None:  # the gpu extra is absent: the error says how to get it
        with pytest.raises(SystemExit, match=r"napo train: .*napo\[gpu\]"):
            main(
                [
                    "train",
                    "--dataset",
                    str(write_jsonl(tmp_path)),
                    "--model",
                    str(saved_llava),
                    "--output-dir",
                    str(tmp_path / "x"),
                    "--attn-implementation",
                    "xformers",
                    *TRAIN_ARGS,
                ]
            )
