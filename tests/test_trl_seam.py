"""napo's one seam with TRL's private API (`napo.trl_seam`): the startup check and what the seam must keep doing."""

import copy

import pytest
import transformers
import trl
import trl.data_utils
from datasets import Dataset
from trl import DPOTrainer

from napo import NaPOConfig, NaPOTrainer
from napo.models import build_tiny_model
from napo.trl_seam import MODEL_CARD_ATTRIBUTES, TRLSeam, TRLVersionError, check_trl


def test_the_installed_trl_has_what_napo_needs():
    check_trl()


@pytest.mark.parametrize(
    "owner, name, expected",
    [
        (DPOTrainer, "_compute_loss", "trl.DPOTrainer._compute_loss"),
        (transformers.Trainer, "_get_grad_norm", "transformers.Trainer._get_grad_norm"),
        (trl.data_utils, "_tokenize", "trl.data_utils._tokenize"),
    ],
)
def test_a_missing_private_attribute_is_named_with_the_installed_versions(monkeypatch, owner, name, expected):
    monkeypatch.delattr(owner, name)
    with pytest.raises(TRLVersionError, match=rf"napo needs {expected}, which the installed trl {trl.__version__}"):
        check_trl()


def test_a_changed_signature_is_named(monkeypatch):
    monkeypatch.setattr(DPOTrainer, "_prepare_dataset", lambda self, dataset, processing_class, args: dataset)
    with pytest.raises(TRLVersionError, match=r"_prepare_dataset\(.*dataset_name.*found .*'args'\)"):
        check_trl()


def test_napo_trainer_overrides_no_private_method_outside_the_seam():
    """Every private method or attribute of DPOTrainer/Trainer that napo replaces is in `TRLSeam` (the model card's
    class attributes excepted: they are NaPO's data)."""
    overridden = [
        name
        for name in vars(NaPOTrainer)
        if name.startswith("_") and not name.startswith("__") and hasattr(DPOTrainer, name)
    ]
    assert sorted(overridden) == sorted(MODEL_CARD_ATTRIBUTES)
    assert issubclass(NaPOTrainer, TRLSeam)


def text_rows(n: int) -> Dataset:
    colours = ["red", "green", "blue"]
    return Dataset.from_list(
        [
            {"prompt": f"what colour is the ball {i} ?", "chosen": colours[i % 3], "rejected": colours[(i + 1) % 3]}
            for i in range(n)
        ]
    )


def test_sync_ref_model_with_precomputed_reference_is_still_refused_by_the_trainer(tmp_path):
    """The seam switches precompute_ref_log_probs off around DPOTrainer.__init__, which skips TRL's own refusal;
    NaPOConfig refuses the pair (tests/test_trl_compat.py) and so does the trainer for args changed since."""
    model, tokenizer = build_tiny_model("text", seed=0)
    args = NaPOConfig(
        output_dir=str(tmp_path), precompute_ref_log_probs=True, report_to="none", use_cpu=True, bf16=False
    )
    args.sync_ref_model = True
    with pytest.raises(
        ValueError, match="You cannot use `sync_ref_model=True` together with `precompute_ref_log_probs"
    ):
        NaPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model),
            args=args,
            train_dataset=text_rows(4),
            processing_class=tokenizer,
        )
    assert args.precompute_ref_log_probs and not args.padding_free  # the settings the user gave are left as they were
