"""Test-wide settings: two CPU threads, no network, deterministic kernels."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


@pytest.fixture(scope="module")
def colour_grid_source(tmp_path_factory) -> dict[str, str]:
    """A `napo compare --dataset/--model` source: a tiny text model and 40 one-`rejected` colour preference rows,
    saved as a user's would be."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("grid-source")
    save_tiny_model("text", root / "model")
    colours = ["yellow", "red", "green", "blue", "white", "brown"]
    rows = [
        {
            "prompt": [{"role": "user", "content": f"what colour is thing {i % 5} ?"}],
            "chosen": colours[i % 4],
            "rejected": colours[i % 4 + 2],
        }
        for i in range(40)
    ]
    Dataset.from_list(rows).save_to_disk(str(root / "pairs"))
    return {"dataset": str(root / "pairs"), "model": str(root / "model")}
