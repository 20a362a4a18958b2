"""Helpers shared by test files: tiny preference rows, a policy moved away from its reference, one batch's loss and
gradients, and saved tiny models and media files. Test files import from here, never from each other.

Pytest puts `tests/` on `sys.path` (it has no `__init__.py`), so `from helpers import ...` works in every test file.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import torch
from datasets import Dataset
from PIL import Image

# Trainer settings of every tiny training run: CPU, fp32, nothing saved or reported, a log every step.
TINY_TRAINING = dict(
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    use_cpu=True,
    logging_steps=1,
    seed=0,
    dataloader_drop_last=False,
    bf16=False,  # stock DPOConfig defaults to bf16 autocast even on CPU
)
# ... and batches of 4 rows, as the equivalence tests compare them.
COMMON = dict(per_device_train_batch_size=4, **TINY_TRAINING)
COLOURS = ["yellow", "red", "green", "blue", "white", "brown"]
# TINY_TRAINING's CPU settings as `napo train` options, for the tests that run the command line.
CPU_TRAIN_ARGS = [
    "--gradient_checkpointing",
    "false",
    "--use_cpu",
    "true",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--seed",
    "0",
]
# The two bias-type negatives most tests train on.
BIAS_COLUMNS = ("rejected_language_bias", "rejected_vision_bias")


def noise_image(seed: int, height: int = 32, width: int = 32) -> Image.Image:
    """A `height` x `width` RGB image of uniform random pixels in [0, 255], the same for the same seed."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def sample_snapshot(sample: dict) -> dict:
    """A comparable, independent copy of a perturb sample: images as (mode, size, bytes), audio arrays as (dtype,
    bytes), everything else deep-copied; equal snapshots mean equal samples."""
    out = copy.deepcopy({k: v for k, v in sample.items() if k not in ("images", "audios")})
    out["images"] = [(im.mode, im.size, im.tobytes()) for im in sample.get("images", [])]
    out["audios"] = [(a.dtype.str, a.tobytes()) for a in sample.get("audios", [])]
    return out


def comparable_rows(dataset: Dataset, columns: list[str] | None = None) -> list[dict]:
    """The rows of `dataset` (only `columns`, if given) as plain dicts with each image as (mode, nested pixel lists),
    so that two datasets compare equal with `==` exactly when their values and pixels are equal."""
    names = dataset.column_names if columns is None else columns
    return [
        {
            name: [(image.mode, np.asarray(image).tolist()) for image in row[name]] if name == "images" else row[name]
            for name in names
        }
        for row in dataset
    ]


def preference_rows(n: int, *, vision: bool, columns=("rejected",), conversational=True, seed=0) -> Dataset:
    """`n` colour-question rows: a chat (or, `conversational=False`, plain-string) prompt, a one-word `chosen`, and
    per column k of `columns` a (k+1)-word negative (missing, None, for k = 1 on every third row); with `vision`, one
    random 32x32 RGB image per row."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        question = f"what colour is the {['banana', 'cat', 'frog'][i % 3]} ?"
        row = {"prompt": [{"role": "user", "content": question}] if conversational else question + " "}
        row["chosen"] = COLOURS[i % len(COLOURS)]
        for k, column in enumerate(columns):
            # Multi-word negatives of different lengths, and a missing one, exercise padding and the pair index.
            row[column] = (
                None if (k == 1 and i % 3 == 0) else " ".join(COLOURS[(i + k + 1 + j) % 6] for j in range(k + 1))
            )
        if vision:
            row["images"] = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))]
        rows.append(row)
    return Dataset.from_list(rows)


def family_preference_rows(family: str, vision: bool = True) -> Dataset:
    """4 preference rows in the media `family` takes: audio clips of different lengths (so a different number of
    audio tokens per row, hence padding) for Qwen2-Audio with a language- and an audio-biased negative; otherwise
    `preference_rows` with the two bias columns, with images unless the family is `text` or `vision` is False."""
    if family == "qwen2_audio":
        rng = np.random.default_rng(0)
        dataset = preference_rows(4, vision=False, columns=("rejected_language_bias", "rejected_audio_bias"))
        return dataset.add_column(
            "audios", [[(0.1 * rng.standard_normal(8000 + 1600 * i)).astype(np.float32)] for i in range(4)]
        )
    return preference_rows(4, vision=vision and family != "text", columns=BIAS_COLUMNS)


def as_trl_pairs(dataset: Dataset) -> Dataset:
    """Stock TRL wants answers as assistant turns when the prompt is a conversation; napo also takes strings."""
    return dataset.map(lambda row: {c: [{"role": "assistant", "content": row[c]}] for c in ("chosen", "rejected")})


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A copy of `model` moved away from it, so that policy and reference differ and margins are not 0."""
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return policy


def loss_and_grads(trainer, rows: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one batch collated from `rows` (model in train mode) and the gradient of every parameter
    that gets one, by name."""
    trainer.model.train()
    trainer.model.zero_grad()
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def fresh_rows(trainer, n: int) -> list[dict]:
    """The first `n` rows of the trainer's dataset as new dicts: collators may mutate their examples (TRL's vision
    collator does)."""
    return [dict(trainer.train_dataset[i]) for i in range(n)]


def save_tiny_model(kind: str, folder, *, seed: int = 0, min_new_tokens: int | None = None):
    """Build napo's tiny `kind` model (`napo.models.build_tiny_model`), save it with its processor to `folder`, and
    return `folder`; `min_new_tokens` makes a random generator answer at least that many tokens."""
    from napo.models import build_tiny_model

    model, processor = build_tiny_model(kind, seed=seed)
    if min_new_tokens is not None:
        model.generation_config.min_new_tokens = min_new_tokens
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """A WAV file of `samples`, shape (frames,) mono or (frames, channels), at `rate` Hz."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV")
    return buffer.getvalue()
