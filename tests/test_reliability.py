"""Crash-safe, numerically safe, hostile-input-safe training: resume after kill -9, NaN/inf handling, bad rows
and files, long prompts with images, and the safe model-loading path of `napo train`."""

from __future__ import annotations

import io
import json
import signal
import struct
import subprocess
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import CPU_TRAIN_ARGS, TINY_TRAINING, wav_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file
from stalled_job import start_stalled, wait_for_stall  # scripts/stalled_job.py

import perturb
from napo import NaPOConfig, NaPOTrainer, adaptive_q
from napo.cli import main
from napo.data import SAMPLING_RATE, RowError, read_dataset, validate_preference_dataset
from napo.models import build_tiny_model
from napo.objectives import Q_MIN_DEFAULTS

COLOURS = ["yellow", "red", "green", "blue", "white", "brown"]
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)


def colour_pair_rows(n: int, *, subjects=("banana", "cat", "frog"), image_files: list[str] | None = None) -> list[dict]:
    """`n` chat rows "what colour is the <subject> ?" with a chosen colour and language- and vision-bias negatives (row
    i's image is `image_files[i]` when given). Not test_trainer's `preference_rows`, which builds a `Dataset`."""
    rows = []
    for i in range(n):
        row = {
            "prompt": [{"role": "user", "content": f"what colour is the {subjects[i % len(subjects)]} ?"}],
            "chosen": COLOURS[i % 6],
            "rejected_language_bias": COLOURS[(i + 1) % 6],
            "rejected_vision_bias": f"{COLOURS[(i + 2) % 6]} cat",
        }
        if image_files is not None:
            row["images"] = [image_files[i]]
        rows.append(row)
    return rows


def write_llava_jsonl(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in colour_pair_rows(n, image_files=names)))
    return path


@pytest.fixture(scope="module")
def text_trainer() -> NaPOTrainer:
    """A NaPO trainer on a tiny text model (batch 4, nothing run yet), for the per-type q and the loss."""
    model, tokenizer = build_tiny_model("text", seed=0)
    config = NaPOConfig(output_dir="unused", per_device_train_batch_size=4, max_steps=1, **TINY_TRAINING)
    return NaPOTrainer(
        model, args=config, train_dataset=Dataset.from_list(colour_pair_rows(4)), processing_class=tokenizer
    )


# ------------------------------------------------------------------------------------------------- resume
def losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_uninterrupted_loss_curve(saved_llava: Path, tmp_path: Path) -> None:
    # 6 rows in batches of 2 for 4 steps: the resumed run crosses an epoch boundary (reshuffled data order).
    dataset = write_llava_jsonl(tmp_path, 6)
    args = [
        "--dataset",
        str(dataset),
        "--model",
        str(saved_llava),
        "--max_steps",
        "4",
        "--save_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        *CPU_TRAIN_ARGS,
    ]
    # The job runs `napo train` itself and stalls from step 2 on, after checkpoint-2: kill -9 lands mid-run.
    stalled = tmp_path / "stalled"
    job = ["train", *args, "--output-dir", str(tmp_path / "killed")]
    process = start_stalled(stalled, *job, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # nothing reads them
    try:
        wait_for_stall(stalled, process)
        assert (tmp_path / "killed" / "checkpoint-2" / "trainer_state.json").exists()
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "log_history.json").exists()
    # A kill while saving leaves a checkpoint without trainer_state.json (written last): resume must pass it over.
    half_written = tmp_path / "killed" / "checkpoint-3"
    half_written.mkdir(exist_ok=True)
    (half_written / "model.safetensors").write_bytes(b"\0" * 10)

    main(["train", *args, "--output-dir", str(tmp_path / "killed"), "--resume"])
    main(["train", *args, "--output-dir", str(tmp_path / "uninterrupted")])

    resumed, uninterrupted = losses(tmp_path / "killed"), losses(tmp_path / "uninterrupted")
    assert sorted(resumed) == sorted(uninterrupted) == [1, 2, 3, 4]
    for step in uninterrupted:
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), f"step {step}"
    final = [load_file(tmp_path / run / "model.safetensors") for run in ("killed", "uninterrupted")]
    for name, weight in final[1].items():
        torch.testing.assert_close(final[0][name], weight, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- numerics
@given(
    psi=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=8),
    alpha=st.floats(1e-4, 1e3),
    variant=st.sampled_from(["paper", "official"]),
    q_min=st.floats(1e-6, 1.0),
)
@PROPERTY_SETTINGS
def test_adaptive_q_stays_in_its_range_for_any_margin(
    psi: list[float], alpha: float, variant: str, q_min: float
) -> None:
    q = adaptive_q(torch.tensor(psi), alpha, variant, q_min)
    assert torch.all((q >= q_min) & (q <= 1.0)), (psi, q)


@given(
    z=st.lists(st.floats(-1e30, 1e30) | st.sampled_from([float("inf"), -float("inf")]), min_size=1, max_size=6),
    column=st.sampled_from(["rejected_language_bias", "rejected_vision_bias"]),
    variant=st.sampled_from(["paper", "official"]),
)
@PROPERTY_SETTINGS
def test_trainer_q_stays_in_its_range_for_any_batch(
    text_trainer: NaPOTrainer, z: list[float], column: str, variant: str
) -> None:
    """One row or several, margins of any size and sign, ±inf included: q of the type stays in [q_min, 1]."""
    margins = torch.tensor(z)
    text_trainer.args.q = variant
    q = text_trainer._q(column, margins / text_trainer.beta, margins / text_trainer.beta / 3)
    assert np.float32(Q_MIN_DEFAULTS[variant]) <= float(q) <= 1.0  # q is float32: q_min = 0.01 is 0.0099999998


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_extreme_margins_give_finite_loss_gradients_and_q(text_trainer: NaPOTrainer, sign: float, variant: str) -> None:
    """Reference log-probs of ±1e5 nats make every margin z = β·Δ about ±1e4 (β = 0.1)."""
    batch = text_trainer._prepare_inputs(next(iter(text_trainer.get_train_dataloader())))
    is_chosen = batch["sequence_type"] == 0
    batch["ref_logps"] = torch.where(is_chosen, -sign * 1e5, sign * 1e5)
    text_trainer.args.q = variant
    text_trainer.model.train().zero_grad()
    text_trainer._metrics["train"].clear()
    loss = text_trainer.compute_loss(text_trainer.model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in text_trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    margins = text_trainer._metrics["train"]["language_bias/rewards/margins"]
    assert abs(margins[0]) > 1e4 * 0.99 and np.sign(margins[0]) == sign
    for column in ("language_bias", "vision_bias"):
        (q,) = text_trainer._metrics["train"][f"{column}/q"]
        assert np.float32(Q_MIN_DEFAULTS[variant]) <= q <= 1.0


def nan_trainer(on_nonfinite: str, tmp_path: Path, where: str = "log_probs") -> tuple[NaPOTrainer, dict]:
    """A 4-row dataset on a tiny text model, poisoned `where`:

    - "log_probs": 4 rows in one batch; the policy's embeddings turn NaN for the sequences of row 2 (the only "frog"
      row);
    - "gradients": 2 rows per batch; the loss stays finite but backward turns the embedding's gradient NaN (as an
      overflow in backward would).

    Returns the trainer and the initial weights."""
    model, tokenizer = build_tiny_model("text", seed=0)
    config = NaPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4 if where == "log_probs" else 2,
        max_steps=1,
        on_nonfinite=on_nonfinite,
        learning_rate=1e-2,
        **TINY_TRAINING,
    )
    rows = colour_pair_rows(4, subjects=("banana", "cat", "frog", "cat"))
    trainer = NaPOTrainer(model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    embeddings = model.get_input_embeddings()
    if where == "log_probs":
        frog = tokenizer.convert_tokens_to_ids("frog")
        assert frog != tokenizer.unk_token_id
        embeddings.register_forward_hook(
            lambda module, args, output: output.masked_fill((args[0] == frog).any(dim=1)[:, None, None], float("nan"))
        )
    else:
        embeddings.weight.register_hook(lambda grad: grad * float("nan"))
    return trainer, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_nan_from_the_model_stops_the_job_naming_the_row(tmp_path: Path) -> None:
    trainer, before = nan_trainer("stop", tmp_path)
    with pytest.raises(FloatingPointError, match=r"dataset rows \[2\].*--on_nonfinite skip"):
        trainer.train()
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())


def test_nan_from_the_model_skips_the_step_when_asked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer, before = nan_trainer("skip", tmp_path)
    trainer.train()
    assert "dataset rows [2]" in caplog.text
    (step,) = [h for h in trainer.state.log_history if "loss" in h]
    assert step["loss"] == 0.0 and step["nonfinite/skipped"] == 1.0
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())


def test_nan_gradients_behind_a_finite_loss_stop_the_job(tmp_path: Path) -> None:
    trainer, before = nan_trainer("stop", tmp_path, where="gradients")
    with pytest.raises(
        FloatingPointError, match=r"gradients behind a finite loss at step 0 \(dataset rows \[\d, \d\]\)"
    ):
        trainer.train()
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())


def test_nan_gradients_skip_the_optimizer_step_when_asked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer, before = nan_trainer("skip", tmp_path, where="gradients")
    trainer.train()
    assert "optimizer step skipped" in caplog.text
    (step,) = [h for h in trainer.state.log_history if "loss" in h]
    assert np.isfinite(step["loss"]) and step["nonfinite/skipped_steps"] == 1.0
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    assert not trainer.optimizer.state  # AdamW never saw a gradient: its moments were not started


# ------------------------------------------------------------------------------------------ hostile inputs
def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing width×height RGB pixels, with no pixel data (a few dozen bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD_IMAGE = png_bytes(np.zeros((8, 8, 3), np.uint8))
# Each kind of row: (files it needs, how the row differs from a good one, the field a RowError must name or None).
ROW_KINDS: dict[str, tuple[dict[str, bytes], dict, str | None]] = {
    "rgb": ({"a.png": GOOD_IMAGE}, {"images": ["a.png"]}, None),
    "rgba": ({"a.png": png_bytes(np.full((8, 8, 4), 200, np.uint8), "RGBA")}, {"images": ["a.png"]}, None),
    "grayscale": ({"a.png": png_bytes(np.full((8, 8), 100, np.uint8), "L")}, {"images": ["a.png"]}, None),
    "16-bit": ({"a.png": png_bytes(np.full((8, 8), 40000, np.uint16))}, {"images": ["a.png"]}, None),
    "0-byte image": ({"a.png": b""}, {"images": ["a.png"]}, "images"),
    "truncated image": ({"a.png": GOOD_IMAGE[:40]}, {"images": ["a.png"]}, "images"),
    "huge image": ({"a.png": header_only_png(20_000, 20_000)}, {"images": ["a.png"]}, "images"),
    "missing image": ({}, {"images": ["nowhere.png"]}, "images"),
    "image is a number": ({}, {"images": 5}, "images"),
    "mono 16 kHz": ({"a.wav": wav_bytes(np.zeros(1600, np.float32), 16_000)}, {"audios": ["a.wav"]}, None),
    "stereo 16 kHz": ({"a.wav": wav_bytes(np.zeros((1600, 2), np.float32), 16_000)}, {"audios": ["a.wav"]}, None),
    "mono 8 kHz": ({"a.wav": wav_bytes(np.zeros(800, np.float32), 8_000)}, {"audios": ["a.wav"]}, None),
    "0-byte audio": ({"a.wav": b""}, {"audios": ["a.wav"]}, "audios"),
    "prompt is a number": ({}, {"prompt": 7}, "prompt"),
    "chosen is a list": ({}, {"chosen": ["red"]}, "chosen"),
    "empty prompt": ({}, {"prompt": ""}, "prompt"),
    "empty chosen": ({}, {"chosen": "  "}, "chosen"),
    "no negative": ({}, {"rejected": None}, "rejected"),
    "not UTF-8": ({}, {}, "<json>"),
}


@given(kinds=st.lists(st.sampled_from(sorted(ROW_KINDS)), min_size=1, max_size=4))
@settings(max_examples=60, deadline=None)
def test_hostile_rows_give_a_clean_dataset_or_an_error_naming_the_row(kinds: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        check_hostile_rows(kinds, Path(folder))


def check_hostile_rows(kinds: list[str], folder: Path) -> None:
    lines = []
    for index, kind in enumerate(kinds):
        files, changes, _ = ROW_KINDS[kind]
        row = {"prompt": "what colour ?", "chosen": "red", "rejected": "blue"}
        for name, data in files.items():
            (folder / f"{index}-{name}").write_bytes(data)
        for field, value in changes.items():
            row[field] = [f"{index}-{v}" for v in value] if field in ("images", "audios") and files else value
        lines.append(json.dumps(row).encode() if kind != "not UTF-8" else b'{"prompt": "caf\xe9 ?", "chosen": "red"}')
    path = folder / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    bad = {index: ROW_KINDS[kind][2] for index, kind in enumerate(kinds) if ROW_KINDS[kind][2] is not None}
    try:
        dataset, _ = read_dataset(str(path))
        validate_preference_dataset(dataset)
    except RowError as error:
        assert bad.get(error.row) in error.field, (kinds, str(error))  # the row and the field, e.g. "rejected"
        return
    assert not bad, f"{kinds}: accepted rows {sorted(bad)}"
    for row in dataset:
        assert all(image.mode == "RGB" for image in row.get("images") or [])
        for audio in row.get("audios") or []:
            assert np.asarray(audio).ndim == 1 and row["sampling_rate"] == SAMPLING_RATE
    if any(kind == "mono 8 kHz" for kind in kinds):  # 0.1 s at 8 kHz comes back as 0.1 s at 16 kHz
        assert len(dataset[kinds.index("mono 8 kHz")]["audios"][0]) == 1600


@pytest.mark.parametrize("side", [20_000, 10_000])  # 1.2 GB / 300 MB of RGB pixels; PIL only warns for the second
def test_huge_image_header_is_refused_without_allocating_its_pixels(tmp_path: Path, side: int) -> None:
    assert Image.MAX_IMAGE_PIXELS is not None, "PIL's decompression-bomb protection is off"
    (tmp_path / "huge.png").write_bytes(header_only_png(side, side))
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "images": ["huge.png"]}) + "\n"
    )
    tracemalloc.start()
    with pytest.raises(RowError, match="row 0, field 'images'.*decompression bomb"):
        read_dataset(str(tmp_path / "rows.jsonl"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50e6


@given(
    spec=st.sampled_from(
        [
            "image.drop",
            "image.blur(radius=2)",
            "image.patch_mask(ratio=0.5)",
            "audio.noise(snr_db=0)",
            "text.drop_question",
            "image.diffusion(t=500)+audio.drop",
        ]
    ),
    field=st.sampled_from(["images", "audios", "prompt", "sampling_rate"]),
    value=st.sampled_from([None, 3, "a path.png", [b"bytes"], [[0.1, 0.2]], [np.zeros((2, 100), np.float32)], {}]),
)
@settings(max_examples=60, deadline=None)
def test_perturb_wrong_typed_samples_raise_a_clear_error(spec: str, field: str, value: object) -> None:
    """A sample field of the wrong type (a stereo array, a path instead of an image, ...) either works or raises a
    TypeError/ValueError that names the field."""
    sample = {
        "prompt": "what colour is the cat ?",
        "images": [Image.new("RGB", (8, 8))],
        "audios": [np.zeros(100, np.float32)],
        field: value,
    }
    try:
        perturb.apply(spec, sample)
    except (TypeError, ValueError) as error:
        assert field in str(error) or "sample" in str(error), str(error)


def test_prompt_with_image_tokens_longer_than_max_length_names_the_row(saved_llava: Path, tmp_path: Path) -> None:
    """Cutting a prompt inside its image tokens makes LLaVA fail with "Image features and image tokens do not
    match": the collator refuses the row, naming it, before the model sees it."""
    from napo.models import load_model

    model, processor = load_model(str(saved_llava))
    dataset, _ = read_dataset(str(write_llava_jsonl(tmp_path, 4)))
    long_prompt = {"role": "user", "content": "what colour is the cat ? " * 6}
    dataset = Dataset.from_list([{**row, "prompt": [long_prompt]} if i == 3 else row for i, row in enumerate(dataset)])
    config = NaPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, max_length=40, **TINY_TRAINING
    )
    trainer = NaPOTrainer(model, args=config, train_dataset=dataset, processing_class=processor)
    with pytest.raises(RowError, match=r"row 3, field 'prompt'.*max_length=40"):
        trainer.train()
    config.max_length = 200  # every prompt fits: the same rows train
    trainer = NaPOTrainer(model, args=config, train_dataset=dataset, processing_class=processor)
    trainer.train()


def test_text_prompt_longer_than_max_length_is_dropped_with_a_logged_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, tokenizer = build_tiny_model("text", seed=0)
    rows = colour_pair_rows(4)
    rows[1]["prompt"] = [{"role": "user", "content": "what colour is the cat ? " * 10}]
    config = NaPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, max_length=30, **TINY_TRAINING
    )
    trainer = NaPOTrainer(model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert trainer.train_dataset["row_index"] == [0, 2, 3]
    assert "dropped rows [1]" in caplog.text and "max_length=30" in caplog.text


# ---------------------------------------------------------------------------------------------- security
def copy_model_folder(source: Path, target: Path, *, weights: bool) -> None:
    target.mkdir()
    for item in source.iterdir():
        if weights or item.suffix != ".safetensors":
            (target / item.name).write_bytes(item.read_bytes())


def test_napo_train_refuses_pickled_weights_and_says_how_to_allow_them(saved_llava: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    copy_model_folder(saved_llava, pickled, weights=False)
    torch.save(load_file(saved_llava / "model.safetensors"), pickled / "pytorch_model.bin")
    dataset = write_llava_jsonl(tmp_path, 2)
    with pytest.raises(SystemExit, match="napo train: .*pickled weights.*--allow-pickle"):
        main(["train", "--dataset", str(dataset), "--model", str(pickled), "--output-dir", str(tmp_path / "o")])
    main(
        [
            "train",
            "--dataset",
            str(dataset),
            "--model",
            str(pickled),
            "--output-dir",
            str(tmp_path / "o"),
            "--allow-pickle",
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--save_strategy",
            "no",
            *CPU_TRAIN_ARGS,
        ]
    )
    assert (tmp_path / "o" / "model.safetensors").exists()  # what napo writes is safetensors again


def test_napo_train_never_runs_model_code_unless_trusted(saved_llava: Path, tmp_path: Path) -> None:
    """A model folder that ships Python code (`auto_map`) trains with the built-in class; its code runs only with
    --trust-remote-code."""
    model = tmp_path / "remote"
    copy_model_folder(saved_llava, model, weights=True)
    marker = tmp_path / "code-ran"
    # A subclass, not LlavaConfig itself: loading remote code registers the class for auto-saving, which would
    # otherwise make every later LLaVA save_pretrained in this process try to copy transformers' own source files.
    (model / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlavaConfig\n"
        "class EvilConfig(LlavaConfig):\n    pass\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    args = [
        "train",
        "--dataset",
        str(write_llava_jsonl(tmp_path, 2)),
        "--model",
        str(model),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--save_strategy",
        "no",
        *CPU_TRAIN_ARGS,
    ]
    main([*args, "--output-dir", str(tmp_path / "safe")])
    assert not marker.exists()
    try:
        main([*args, "--output-dir", str(tmp_path / "trusted"), "--trust-remote-code"])
    except SystemExit:
        pass  # the shipped config class is not registered with a model class: what matters is that it was run
    assert marker.exists()
