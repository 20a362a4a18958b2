"""Sequence scoring: the summed completion log-probs of a collated batch of sequences, for training and evaluation.

A batch (`napo.collators`, or `napo.encoding.answer_batch` for evaluation) holds N sequences as `input_ids`,
`attention_mask` and `completion_mask` of shape (N, L), plus the model's media and per-token inputs. Each sequence s
is scored as

    log π(y_s | x_s) = Σ_{t ≥ 1, completion_mask[s, t] = 1} log softmax(ℓ_{s, t−1})[input_ids[s, t]]     (nats)

(the completion tokens, each predicted from the logits ℓ of the position before it) in one of three layouts that
give the same numbers to rounding:

- padded: the (N, L) batch as it is (`padded_inputs`);
- packed: the N sequences in one row of their real tokens (`packed_inputs`, `napo.fast.pack_sequences`);
- shared-prompt: each row's prompt read once (`napo.shared_prompt.shared_prompt_logps`).

The trainer (training loss, reference log-probs, `NaPOTrainer.log_prob_table`) and `napo.evaluate.answer_log_probs`
both score through `sequence_logps`, so an evaluation margin and a training margin of the same rows cannot disagree.
The trainer's models carry TRL's fused LM head (`fused_lm_head=True`: per-token log-probs without materialising the
(N, L, V) logits); a model scored outside a trainer has none, and its log-probs are taken from its logits
(`fused_lm_head=False`) — only at the completion positions, so the float32 log-softmax is (tokens, V), not (N, L, V).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from napo.encoding import SEQUENCE_KEYS
from napo.fast import pack_sequences
from napo.shared_prompt import shared_prompt_logps

# (model keyword arguments, labels (B, L): the scored token ids, -100 elsewhere, sum_per_sequence): what a padded or
# packed batch gives the model, and the map of its per-token log-probs (B, L-1) to each sequence's sum (N,).
ScoringInputs = tuple[dict, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def forward_kwargs(batch: dict) -> dict:
    """What the model takes from a collated batch (the entries describing the sequences left out)."""
    return {k: v for k, v in batch.items() if k not in SEQUENCE_KEYS}


def padded_inputs(batch: dict) -> ScoringInputs:
    """The padded layout of a batch of N sequences: model inputs (N, L), labels (N, L), and `sum_per_sequence`,
    which sums per-token log-probs (N, L-1) (or wider: prompt-learning PEFT prepends virtual tokens) over each row."""
    model_kwargs = {**forward_kwargs(batch), "use_cache": False}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    seq_len = labels.size(1) - 1

    def sum_per_sequence(log_probs: torch.Tensor) -> torch.Tensor:
        # The last seq_len positions: prompt-learning PEFT prepends virtual tokens to the model's outputs.
        return log_probs[:, -seq_len:].sum(dim=1)

    return model_kwargs, labels, sum_per_sequence


def packed_inputs(batch: dict, rope_index: Callable | None = None) -> ScoringInputs:
    """The packed layout (`napo.fast.pack_sequences`): model inputs and labels (1, T) of the batch's T real tokens,
    and `sum_per_sequence` mapping per-token log-probs (1, T-1) to each sequence's sum (N,). `rope_index`: the
    model's multimodal rotary position function (`napo.models.families.rope_index_function`), or None."""
    model_kwargs = {**forward_kwargs(batch), "use_cache": False}
    packed, labels, sequence_of_token = pack_sequences(model_kwargs, batch["completion_mask"], rope_index)
    n_sequences, seq_len = batch["input_ids"].size(0), labels.size(1) - 1

    def sum_per_sequence(log_probs: torch.Tensor) -> torch.Tensor:
        return log_probs.new_zeros(n_sequences).index_add(0, sequence_of_token[1:], log_probs[0, -seq_len:])

    return packed, labels, sum_per_sequence


def token_logps(
    model: torch.nn.Module, model_kwargs: dict, labels: torch.Tensor, fused_lm_head: bool = True
) -> torch.Tensor:
    """Per-token log-probs (B, L-1) of `labels[:, 1:]` (0 where the label is -100), the token at t predicted from
    position t − 1: from TRL's fused LM head (`fused_lm_head`, a trainer's model) or from the model's logits."""
    if fused_lm_head:
        return model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs
    logits = model(**model_kwargs).logits[:, -labels.size(1) :]  # prompt-learning PEFT: virtual tokens first
    targets = labels[:, 1:]
    scored = targets != -100
    # Only the scored positions go through the float32 log-softmax: (tokens, V) instead of (B, L, V).
    selected = torch.log_softmax(logits[:, :-1][scored].float(), dim=-1)
    out = torch.zeros(targets.shape, dtype=selected.dtype, device=selected.device)
    out[scored] = selected.gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
    return out


def summed_logps(model: torch.nn.Module, inputs: ScoringInputs, fused_lm_head: bool = True) -> torch.Tensor:
    """Summed completion log-probs (N,) of a batch in its padded or packed layout (`padded_inputs`, `packed_inputs`)."""
    model_kwargs, labels, sum_per_sequence = inputs
    return sum_per_sequence(token_logps(model, model_kwargs, labels, fused_lm_head))


def sequence_logps(
    model: torch.nn.Module,
    batch: dict,
    *,
    packed: bool = False,
    shared_prompt: bool = False,
    rope_index: Callable | None = None,
    fused_lm_head: bool = True,
) -> torch.Tensor:
    """log π(y_s | x_s) of each of the batch's N sequences (module docstring), shape (N,), in nats, with gradients
    unless called under `torch.no_grad`. Layout: padded, `packed` (with `rope_index` for multimodal rotary models) or
    `shared_prompt` (which computes its own logits: `fused_lm_head` does not apply)."""
    if packed and shared_prompt:
        raise ValueError("sequence_logps: packed and shared_prompt are two layouts; choose one")
    if shared_prompt:
        return shared_prompt_logps(model, batch)
    inputs = packed_inputs(batch, rope_index) if packed else padded_inputs(batch)
    return summed_logps(model, inputs, fused_lm_head)


def check_same_logps(option: str, model: torch.nn.Module, fast: Callable, padded: Callable) -> None:
    """Raise ValueError unless `fast()` and `padded()` — summed log-probs (N,) of one batch by `option`'s layout and
    by the padded one — agree (two forwards without gradients, in eval mode so dropout does not differ).
    Tolerance: 0.1 nats + 1% per sequence, far above bf16 rounding, far below what a leak between sequences (or a
    wrong position) changes. `model` may be wrapped (DDP, PEFT): its config is read from the innermost model."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logps = [padded().float(), fast().float()]
    finally:
        model.train(was_training)
    difference = (logps[0] - logps[1]).abs()
    if (difference > 0.1 + 0.01 * logps[0].abs()).any():
        config = getattr(model, "module", model).config
        raise ValueError(
            f"{option}: this model ({config.model_type}, attention {config._attn_implementation!r}) gives "
            f"log-probs up to {float(difference.max()):.3g} nats away from the padded batch's: its attention or "
            f"positions do not fit {option}'s batch layout; set {option}=False"
        )


def answer_table(
    batches: Iterable[dict], score: Callable[[dict], torch.Tensor], n_rows: int, n_answers: int
) -> np.ndarray:
    """A float32 table (n_rows, n_answers) of `score(batch)` (N,) for the collated batches of a dataset's rows in
    order: the sequence of row r (`sequence_row`, counted from the batch's first row) and answer k (`sequence_type`:
    0 chosen, k the k-th negative column) at [r, k]; NaN where a row has no such answer."""
    table = np.full((n_rows, n_answers), np.nan, dtype=np.float32)
    first_row = 0
    for batch in batches:
        values = score(batch)
        rows = batch["sequence_row"].cpu().numpy() + first_row
        table[rows, batch["sequence_type"].cpu().numpy()] = values.float().cpu().numpy()
        first_row += int((batch["sequence_type"] == 0).sum())  # every row has exactly one chosen sequence
    return table
