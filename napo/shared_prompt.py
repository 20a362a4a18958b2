"""Shared-prompt scoring: a row's chosen answer and its K negatives read their common prompt once.

A preference batch of R rows holds N = Σ_r (1 + K_r) sequences, and every sequence of a row repeats the row's
prompt, image tokens included (LLaVA-1.5: 576 of them, against answers of tens of tokens). The padded path runs
the model over all N copies. Here the model runs over the R prompts once, with their key/value cache kept in the
autograd graph, and then over the N answers only, attending to their row's cached prompt:

    prompt pass:  (R, P) tokens (+ one image per row)  ->  KV cache (R, heads, P, d), last-position logits (R, V)
    answer pass:  (N, C) tokens + the cache gathered to (N, heads, P, d)  ->  logits (N, C, V)
    log π(y_s) = Σ_t log softmax(ℓ_{s,t−1})[y_{s,t}],  ℓ_{s,−1} = the prompt's last logits of s's row

Causal attention makes each answer token's logits the same as in the padded path (only the order of floating-point
sums changes), so log-probs and gradients are equal to rounding; the trainer checks this on its first batch
(`NaPOTrainer._verify_scoring`) and refuses a model for which it does not hold. Cost: the prompt's tokens (and the
vision tower) once per row instead of 1 + K times.

Scope: 1-D rotary positions with a plain causal mask (LLaVA-style VLMs, Idefics3, text-only LMs). Multimodal
rotary positions (Qwen2-VL's `get_rope_index`) and prefix-LM masks (PaliGemma's `token_type_ids`) are refused: their
answer positions are not `prompt length + t`. Media tensors must hold one entry per sequence along dim 0 (the
collators repeat a row's media for each of its sequences); each row's first entry is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napo.encoding import SEQUENCE_KEYS
from napo.models.families import rope_index_function

# What this module reads from a batch itself; every other entry is a model input (media, per-token inputs).
_HANDLED_KEYS = ("input_ids", "attention_mask", *SEQUENCE_KEYS)


def shared_prompt_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed completion log-probs of each of the batch's N sequences, shape (N,), float32, with gradients.

    `batch` is a collated preference batch (`MultiNegativeCollator` / `MultiNegativeVisionCollator`): input_ids,
    attention_mask, completion_mask (N, L), left-flushed (a sequence's prompt starts at position 0, its answer
    follows its prompt, padding at the right), sequence_row (N,), and the model's media tensors. All sequences of a
    row must share the row's prompt tokens (they do by construction; checked). Raises ValueError for inputs outside
    the scope of the module docstring, naming the entry.
    """
    _refuse_unsupported(model, batch)
    input_ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    rows = batch["sequence_row"]
    n_sequences = input_ids.size(0)
    prompt_lengths = (attention.bool() & ~completion.bool()).sum(dim=1)  # (N,): the prompt precedes the answer
    answer_lengths = completion.sum(dim=1)  # (N,)
    n_rows = int(rows.max()) + 1
    # The first sequence of each row carries the row's prompt (and media).
    first = torch.full((n_rows,), n_sequences, dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, rows, torch.arange(n_sequences, device=rows.device), reduce="amin")
    _check_shared_prompts(input_ids, prompt_lengths, rows, first)

    # Prompt pass: the R prompts left-padded to P, so every prompt ends at position P - 1.
    p_len = prompt_lengths[first]
    width = int(p_len.max())
    offsets = torch.arange(width, device=input_ids.device)
    start = (width - p_len).unsqueeze(1)  # (R, 1): left padding of each prompt
    source = (offsets.unsqueeze(0) - start).clamp(min=0)  # (R, P): which prompt token sits at each slot
    prompt_mask = (offsets.unsqueeze(0) >= start).long()
    prompt_ids = input_ids[first].gather(1, source).masked_fill(prompt_mask == 0, 0)
    prompt_positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    media = {}
    for key, value in batch.items():
        if key in _HANDLED_KEYS or value is None:
            continue
        if not torch.is_tensor(value) or value.size(0) != n_sequences:
            raise ValueError(
                f"share_prompt: `{key}` does not hold one entry per sequence along dim 0 "
                f"({tuple(value.shape) if torch.is_tensor(value) else type(value).__name__} for {n_sequences} "
                "sequences); set share_prompt=False for this model"
            )
        media[key] = value[first]
    prompt_out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=prompt_positions,
        use_cache=True,
        logits_to_keep=1,
        **media,
    )
    cache = prompt_out.past_key_values
    cache.reorder_cache(rows)  # (R, ...) -> (N, ...): index_select, so gradients flow back to each prompt once

    # Answer pass: the N answers right-padded to C, after their row's cached prompt.
    a_width = int(answer_lengths.max())
    a_offsets = torch.arange(a_width, device=input_ids.device)
    answer_mask = (a_offsets.unsqueeze(0) < answer_lengths.unsqueeze(1)).long()  # (N, C)
    a_source = (prompt_lengths.unsqueeze(1) + a_offsets.unsqueeze(0)).clamp(max=input_ids.size(1) - 1)
    answer_ids = input_ids.gather(1, a_source).masked_fill(answer_mask == 0, 0)
    answer_positions = prompt_lengths.unsqueeze(1) + a_offsets.unsqueeze(0)
    answer_out = model(
        input_ids=answer_ids,
        attention_mask=torch.cat((prompt_mask[rows], answer_mask), dim=1),
        position_ids=answer_positions,
        past_key_values=cache,
        use_cache=True,
    )
    # Token t of an answer is predicted by the answer's logits at t - 1, its first token by the prompt's last logits.
    logits = torch.cat((prompt_out.logits[:, -1:][rows], answer_out.logits[:, :-1]), dim=1).float()
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, answer_ids.unsqueeze(2)).squeeze(2)
    return (token_logps * answer_mask).sum(dim=1)


def _refuse_unsupported(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Raise ValueError for a model with multimodal rotary positions or a batch with a per-token input other than
    the ones this module splits itself: shared-prompt scoring would give them wrong positions or masks."""
    input_ids = batch["input_ids"]
    if rope_index_function(model) is not None:
        raise ValueError(
            f"share_prompt: {model.config.model_type} computes multimodal rotary positions (get_rope_index), so an "
            "answer's positions are not prompt length + t; set share_prompt=False for this model"
        )
    for key, value in batch.items():
        # A per-token input (PaliGemma's prefix-LM `token_type_ids`, Qwen2.5-VL's `mm_token_type_ids`, positions)
        # would have to be split into prompt and answer the model's own way.
        if key not in _HANDLED_KEYS and torch.is_tensor(value) and value.shape[:2] == input_ids.shape:
            raise ValueError(
                f"share_prompt: the batch has the per-token input `{key}` (e.g. a prefix-LM mask), which shared-prompt "
                "scoring cannot split between prompt and answer; set share_prompt=False for this model"
            )


def _check_shared_prompts(
    input_ids: torch.Tensor, prompt_lengths: torch.Tensor, rows: torch.Tensor, first: torch.Tensor
) -> None:
    """Raise ValueError when a sequence's prompt differs from its row's first sequence's prompt (length or tokens)."""
    leader = first[rows]
    if not torch.equal(prompt_lengths, prompt_lengths[leader]):
        raise ValueError("share_prompt: the sequences of a row have prompts of different lengths")
    width = input_ids.size(1)
    in_prompt = torch.arange(width, device=input_ids.device).unsqueeze(0) < prompt_lengths.unsqueeze(1)
    if not torch.equal(input_ids.masked_fill(~in_prompt, 0), input_ids[leader].masked_fill(~in_prompt, 0)):
        raise ValueError("share_prompt: the sequences of a row do not share their prompt tokens")
