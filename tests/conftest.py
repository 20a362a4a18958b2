"""Test-wide settings: two CPU threads, no network, deterministic kernels."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import save_tiny_model  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory) -> Path:
    """A tiny LLaVA saved with its processor (seed 1), whose generations are at least 2 tokens (a random model may
    say <eos> first)."""
    return save_tiny_model("llava", tmp_path_factory.mktemp("llava"), seed=1, min_new_tokens=2)


@pytest.fixture(scope="module")
def saved_text_model(tmp_path_factory) -> Path:
    """A tiny text language model saved with its tokenizer (seed 0)."""
    return save_tiny_model("text", tmp_path_factory.mktemp("text-model"))


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
