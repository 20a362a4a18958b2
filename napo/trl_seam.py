"""The one place napo touches private parts of TRL and transformers (written against trl 1.16.0, transformers 5.23.0).

`NaPOTrainer` is a `trl.DPOTrainer` whose loss, tokenization, dataset columns and reference precomputation are napo's.
TRL has no public hook for them, so `TRLSeam` overrides TRL's private methods and forwards each to a NaPOTrainer
method with a name of its own; every other private function or attribute napo reads is imported or listed here.
`check_trl` runs when this module is imported (and so whenever napo trains): an upgrade of TRL or transformers that
renames or re-signs any of them fails at once with `TRLVersionError`, naming the installed versions and what is
missing, instead of training with TRL's own behaviour behind napo's back.

    private method overridden (its caller)                          forwarded to
    DPOTrainer._compute_loss (DPOTrainer.compute_loss)               preference_loss(model, inputs, return_outputs)
    DPOTrainer._prepare_dataset (DPOTrainer.__init__, .evaluate)     tokenize_dataset(dataset, processing_class, ...)
    DPOTrainer._set_signature_columns_if_needed (Trainer, column     dataset_columns() -> the columns batches keep
        pruning)
    DPOTrainer._precompute_ref_logps (DPOTrainer.evaluate)           precompute_reference(dataset, name, batch_size)
    Trainer._get_grad_norm (the training loop, before each           record_grad_norm(model, grad_norm), for the
        optimizer step)                                                  non-finite gradient guard (`napo.nonfinite`)
    Trainer._load_from_checkpoint (Trainer.train on resume)          here: full models load with `from_pretrained`

Settings switched off around `DPOTrainer.__init__` and restored after it: `precompute_ref_log_probs` (TRL refuses it
for vision data and would precompute with its two-sequence collator; napo precomputes itself) and `padding_free`
(TRL 1.16 turns it off with a warning; napo packs batches itself). Switching precomputation off also skips TRL's
refusal of `sync_ref_model` with precomputed reference log-probs, so `TRLSeam.__init__` refuses that combination
itself (as `NaPOConfig` does), with TRL's words.
"""

from __future__ import annotations

import importlib
import inspect

import torch
import transformers
import trl
from accelerate.utils import is_peft_model
from transformers import PreTrainedModel
from trl import DPOTrainer

# Private or internal functions napo calls; imported through here only.
from trl.data_utils import _tokenize, common_prefix_length  # noqa: F401
from trl.models.utils import disable_gradient_checkpointing  # noqa: F401
from trl.trainer.utils import flush_left, hash_module, pad, use_adapter  # noqa: F401

# module, attribute (dotted below a class), and for a method napo overrides or calls: the parameters it is written
# against. The fused LM head (`add_fused_lm_head`, installed by DPOTrainer.__init__) is what makes
# `model(..., fused_lm_head=True)` return `log_probs` and `log_sum_sq_probs`.
REQUIRED: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("trl.data_utils", "_tokenize", None),
    ("trl.data_utils", "common_prefix_length", None),
    ("trl.models.utils", "disable_gradient_checkpointing", None),
    ("trl.trainer.utils", "flush_left", None),
    ("trl.trainer.utils", "hash_module", None),
    ("trl.trainer.utils", "pad", None),
    ("trl.trainer.utils", "use_adapter", None),
    ("trl.trainer.utils", "add_fused_lm_head", None),
    # Class attributes TRL's model card reads; NaPOTrainer sets its own.
    ("trl", "DPOTrainer._tag_names", None),
    ("trl", "DPOTrainer._name", None),
    ("trl", "DPOTrainer._paper", None),
    ("trl", "DPOTrainer._compute_loss", ("self", "model", "inputs", "return_outputs")),
    ("trl", "DPOTrainer._prepare_dataset", ("self", "dataset", "processing_class", "args", "dataset_name")),
    ("trl", "DPOTrainer._set_signature_columns_if_needed", ("self",)),
    ("trl", "DPOTrainer._precompute_ref_logps", ("self", "dataset", "name", "batch_size")),
    ("transformers", "Trainer._get_grad_norm", ("self", "model", "grad_norm")),
    ("transformers", "Trainer._load_from_checkpoint", ("self", "resume_from_checkpoint", "model")),
    ("transformers", "Trainer._prepare_inputs", ("self", "inputs")),
)
MODEL_CARD_ATTRIBUTES = ("_tag_names", "_name", "_paper")
# Attributes of a built DPOTrainer that napo reads (set by DPOTrainer.__init__ / Trainer.__init__).
REQUIRED_ATTRIBUTES = (
    "_metrics",
    "_tokenizer",
    "_is_vision_dataset",
    "_signature_columns",
    "aux_loss_enabled",
    "router_aux_loss_coef",
    "beta",
    "is_fsdp_enabled",
    "is_deepspeed_enabled",
)
# TRL's refusal (trl 1.16 DPOTrainer.__init__), which switching precompute_ref_log_probs off would skip.
SYNC_REF_MODEL_REFUSAL = (
    "You cannot use `sync_ref_model=True` together with `precompute_ref_log_probs=True`. "
    "`precompute_ref_log_probs=True` assumes a fixed reference model, but with `sync_ref_model=True` "
    "the reference model is periodically updated during training, making any precomputed reference "
    "log-probs stale. Set `precompute_ref_log_probs=False` or disable `sync_ref_model`."
)


class TRLVersionError(ImportError):
    """The installed TRL / transformers lack a private function, method or attribute napo relies on."""


def _versions() -> str:
    return f"trl {trl.__version__}, transformers {transformers.__version__}"


def _incompatible(what: str) -> TRLVersionError:
    return TRLVersionError(
        f"napo needs {what}, which the installed {_versions()} do not have: napo relies on private parts of TRL "
        "(napo/trl_seam.py) written against trl 1.16.0 and transformers 5.23.0; install those "
        "(pip install trl==1.16.0 transformers==5.23.0) or a napo release made for your TRL"
    )


def check_trl() -> None:
    """Raise `TRLVersionError` unless every entry of `REQUIRED` exists with the parameters napo is written against."""
    for module_name, dotted, parameters in REQUIRED:
        value = importlib.import_module(module_name)
        for part in dotted.split("."):
            value = getattr(value, part, None)
            if value is None:
                raise _incompatible(f"{module_name}.{dotted}")
        if parameters is not None:
            found = tuple(inspect.signature(value).parameters)
            if found != parameters:
                raise _incompatible(f"{module_name}.{dotted}{parameters} (found {found})")


check_trl()


class TRLSeam(DPOTrainer):
    """`trl.DPOTrainer` with its private methods forwarded to napo's (module docstring). Subclasses implement
    `preference_loss`, `tokenize_dataset`, `dataset_columns`, `precompute_reference` and `record_grad_norm`."""

    def __init__(self, *, args, **kwargs):
        precompute, padding_free = args.precompute_ref_log_probs, args.padding_free
        if precompute and args.sync_ref_model:  # NaPOConfig refuses it too; args may have changed since
            raise ValueError(SYNC_REF_MODEL_REFUSAL)
        args.precompute_ref_log_probs = args.padding_free = False
        try:
            super().__init__(args=args, **kwargs)
        finally:
            args.precompute_ref_log_probs, args.padding_free = precompute, padding_free
        # DPOTrainer keeps its own copies, read by its `evaluate`; napo's precomputation and packing honour them.
        self.precompute_ref_logps, self.padding_free = precompute, padding_free
        missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(self, name)]
        if missing:
            raise _incompatible(f"the DPOTrainer attributes {missing}")

    def logged_metrics(self, mode: str) -> dict[str, list[float]]:
        """The lists of values DPOTrainer averages into the next log, by metric name; mode 'train' or 'eval'."""
        return self._metrics[mode]

    @property
    def tokenizer_of_processor(self):
        """The text tokenizer (the processor's for a multimodal model)."""
        return self._tokenizer

    @property
    def is_vision_dataset(self) -> bool:
        """Whether DPOTrainer found an `image`/`images` column in the training rows."""
        return self._is_vision_dataset

    def prepare_batch(self, batch: dict) -> dict:
        """A collated batch moved to the device as training moves it (`Trainer._prepare_inputs`)."""
        return self._prepare_inputs(batch)

    # ------------------------------------------------------------------------------------------ overrides
    def _compute_loss(self, model, inputs, return_outputs):
        return self.preference_loss(model, inputs, return_outputs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return self.tokenize_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = self.dataset_columns()

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return self.precompute_reference(dataset, name, batch_size)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self.record_grad_norm(model, grad_norm)
        return grad_norm

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Load a checkpoint's full-model weights with `from_pretrained`, which applies the model's key conversion.

        transformers' Trainer loads the raw safetensors keys, but `save_pretrained` writes some families in their
        legacy layout (LLaVA: `language_model.model.*` for `model.language_model.*`): every key is then reported
        missing in a warning, the model silently keeps its initial weights and the resumed loss curve diverges.
        PEFT adapters, FSDP and DeepSpeed checkpoints keep transformers' own loading.
        """
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        if (
            not isinstance(unwrapped, PreTrainedModel)
            or is_peft_model(unwrapped)
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
        ):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(unwrapped).from_pretrained(resume_from_checkpoint, dtype=unwrapped.dtype, use_safetensors=True)
        unwrapped.load_state_dict(saved.state_dict())  # strict: a key that does not match is an error, not a warning
