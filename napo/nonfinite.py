"""What a NaN/inf does to training (`NaPOConfig.on_nonfinite`): stop with the dataset rows it came from, or skip.

Two places can turn non-finite: a batch's log-probabilities (checked by `NaPOTrainer` before its loss, since the loss
would carry the NaN into every weight), and an optimizer step's gradients behind a finite loss (an overflow in
backward, the gradient of sqrt at 0), checked by `NonFiniteGradientGuard`, a `TrainerCallback`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def stop_or_skip(on_nonfinite: str, message: str, unit: str) -> None:
    """Raise FloatingPointError about non-finite values (`on_nonfinite="stop"`), or log that the `unit` ("batch",
    "optimizer step") they came in is skipped (`"skip"`)."""
    if on_nonfinite == "stop":
        raise FloatingPointError(
            f"{message}: stopped before updating the model with them. Check those rows and the model's numerics "
            f"(dtype, learning rate), or pass --on_nonfinite skip to skip such a {unit}"
        )
    logger.warning(f"{message}: {unit} skipped (on_nonfinite='skip')")


class NonFiniteGradientGuard(TrainerCallback):
    """Stops or skips an optimizer step whose gradients are NaN/inf, at `on_pre_optimizer_step` (after clipping,
    before `optimizer.step()`).

    "stop" raises FloatingPointError naming the dataset rows of the step's micro-batches on this process; "skip"
    drops the step's gradients (torch optimizers leave a parameter without a gradient untouched, its state included;
    the learning-rate schedule still advances). Either way it records `nonfinite/skipped_steps` (1 for a skipped
    step, 0 otherwise) through `record_metric`: the fraction of optimizer steps skipped in the logging window.

    The decision is made on the gradient norm transformers computes before every optimizer step, identical on every
    process also with FSDP, which the callback API does not pass to callbacks: `TRLSeam._get_grad_norm` hands it
    over with `norm_computed`, with the model it was computed for (the wrapped one; the event's `model` is the
    unwrapped one). Recomputing it here instead would differ under sharding (each process sees its shard) or
    unscale fp16 gradients a second time. Under DeepSpeed the norm is None (DeepSpeed keeps it, and skips
    overflowing steps itself): nothing is checked or recorded.
    """

    def __init__(self, on_nonfinite: str, record_metric: Callable[[str, float], None]):
        self.on_nonfinite = on_nonfinite
        self.record_metric = record_metric
        self.rows_since_step: list[torch.Tensor] = []  # row_index (B,) of each micro-batch since the last step
        self._norm: tuple[torch.nn.Module, float | torch.Tensor | None] | None = None

    def record_rows(self, row_index: torch.Tensor) -> None:
        """Note the dataset rows of a training micro-batch (named in the error if its step's gradients are NaN/inf)."""
        self.rows_since_step.append(row_index)

    def norm_computed(self, model: torch.nn.Module, grad_norm: float | torch.Tensor | None) -> None:
        """The gradient norm of this optimizer step, and the (wrapped) model whose gradients it is of."""
        self._norm = (model, grad_norm)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        row_indices, self.rows_since_step = self.rows_since_step, []
        computed, self._norm = self._norm, None
        if computed is None or computed[1] is None:
            return
        model, grad_norm = computed
        finite = bool(np.isfinite(float(grad_norm)))
        self.record_metric("nonfinite/skipped_steps", float(not finite))
        if finite:
            return
        rows = sorted(set(torch.cat(row_indices).tolist())) if row_indices else []
        stop_or_skip(
            self.on_nonfinite,
            f"non-finite (NaN/inf) gradients behind a finite loss at step {state.global_step} (dataset rows {rows})",
            "optimizer step",
        )
        for parameter in model.parameters():
            parameter.grad = None
