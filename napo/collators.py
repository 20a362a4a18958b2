"""Collators of `NaPOTrainer`: preference rows with any number of negative columns -> one batch of sequences.

A batch of B rows whose dataset has K negative columns becomes the sequences

    [prompt+chosen, prompt+negative_1, ..., prompt+negative_K]   for every row (missing negatives left out)

with `sequence_row` (the row of each sequence) and `sequence_type` (0 chosen, k the k-th negative column).
`MultiNegativeCollator` pads tokenized text rows; `MultiNegativeVisionCollator` renders, tokenizes and pads raw
image/audio rows on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from napo.encoding import ROW_INDEX, encode_sequences, render_training_answer
from napo.models.families import PER_TOKEN_INPUTS
from napo.rows import RowError
from napo.trl_seam import pad


def _ref_column(column: str) -> str:
    return f"ref_{column}_logps"


def _row_index(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """{"row_index": (B,) tensor} of the batch's dataset rows, or {} when the examples carry no row index."""
    if not examples or any(example.get(ROW_INDEX) is None for example in examples):
        return {}
    return {ROW_INDEX: torch.tensor([example[ROW_INDEX] for example in examples])}


@dataclass
class MultiNegativeCollator:
    """Pads tokenized rows into one batch of chosen and negative sequences (text datasets).

    Each example holds `prompt_ids`, `chosen_ids` and `<column>_ids` for every negative column (an empty list
    where the row has no such negative), optionally `ref_chosen_logps` and `ref_<column>_logps`.

    Returns input_ids / attention_mask / completion_mask of shape (N, L) for the N sequences of the batch
    (right-padded), `sequence_row` (N,) the row each sequence belongs to, `sequence_type` (N,) 0 for chosen and
    k for the k-th negative column, and `ref_logps` (N,) when the rows carry precomputed reference log-probs.
    """

    pad_token_id: int
    negative_columns: tuple[str, ...]
    max_length: int | None = None
    truncation_mode: str = "keep_start"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, masks, rows, types, refs = [], [], [], [], []
        for row, example in enumerate(examples):
            prompt = list(example["prompt_ids"])
            for kind, column in enumerate(("chosen", *self.negative_columns)):
                completion = list(example[f"{column}_ids"])
                if not completion:
                    continue
                ids.append(prompt + completion)
                masks.append([0] * len(prompt) + [1] * len(completion))
                rows.append(row)
                types.append(kind)
                refs.append(example.get(_ref_column(column)))
        if self.max_length is not None:
            cut = (
                slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            )
            ids, masks = [s[cut] for s in ids], [m[cut] for m in masks]
        batch = {
            "input_ids": pad([torch.tensor(s) for s in ids], padding_value=self.pad_token_id, padding_side="right"),
            "attention_mask": pad([torch.ones(len(s), dtype=torch.long) for s in ids], 0, padding_side="right"),
            "completion_mask": pad([torch.tensor(m, dtype=torch.long) for m in masks], 0, padding_side="right"),
            "sequence_row": torch.tensor(rows),
            "sequence_type": torch.tensor(types),
        }
        if refs and refs[0] is not None:
            batch["ref_logps"] = torch.tensor(refs, dtype=torch.float32)
        batch.update(_row_index(examples))
        return batch


@dataclass
class MultiNegativeVisionCollator:
    """Renders, tokenizes and pads raw multimodal rows into one batch of chosen and negative sequences.

    Like TRL's `DataCollatorForVisionPreference` (processing happens on the fly, images and audio clips are
    repeated for every sequence of their row) but with any number of negatives per row, and audio rows
    (`audios`: 1-D float32 arrays at `sampling_rate` Hz, default 16000) besides image rows. Every negative is
    scored with the row's full prompt, images and audio. Output as `MultiNegativeCollator`, plus the processor's
    media tensors (`pixel_values`, `image_grid_thw`, `input_features`, ...).
    """

    processor: ProcessorMixin
    negative_columns: tuple[str, ...]
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts, completions, images, audios, rows, types, refs = [], [], [], [], [], [], []
        sampling_rates = {example.get("sampling_rate") or 16000 for example in examples}
        if len(sampling_rates) > 1:
            raise ValueError(f"one batch mixes audio sampling rates {sorted(sampling_rates)}: resample to one rate")
        for row, example in enumerate(examples):
            row_images = example.get("images")
            if row_images is None:
                row_images = [example["image"]] if example.get("image") is not None else []
            row_audios = [np.asarray(a, dtype=np.float32) for a in example.get("audios") or []]
            for kind, column in enumerate(("chosen", *self.negative_columns)):
                answer = example.get(column)
                if answer is None:
                    continue
                prompt, completion = render_training_answer(self.processor, example, answer, row_images)
                prompts.append(prompt)
                completions.append(completion)
                images.append(row_images)
                audios.extend(row_audios)  # the processor takes one flat list: a clip per audio placeholder
                rows.append(row)
                types.append(kind)
                refs.append(example.get(_ref_column(column)))

        batch = encode_sequences(
            self.processor,
            prompts,
            completions,
            images=images,
            audios=audios,
            sampling_rate=sampling_rates.pop(),
            add_special_tokens=False,  # the chat template already wrote BOS
        )
        prompt_lengths = batch.pop("prompt_lengths")
        if self.max_length is not None:
            self._check_prompts_fit(prompt_lengths, rows, examples)
            # keep_start only: cutting the start would separate image tokens from their image features.
            for key in ("input_ids", "attention_mask", "completion_mask", *PER_TOKEN_INPUTS):
                if key in batch:
                    batch[key] = batch[key][:, : self.max_length]
        batch["sequence_row"] = torch.tensor(rows)
        batch["sequence_type"] = torch.tensor(types)
        if refs and refs[0] is not None:
            batch["ref_logps"] = torch.tensor(refs, dtype=torch.float32)
        batch.update(_row_index(examples))
        return batch

    def _check_prompts_fit(self, prompt_lengths: torch.Tensor, rows: list[int], examples: list[dict]) -> None:
        """Raise `RowError` for a row whose prompt (image/audio tokens included; `prompt_lengths` in tokens, shape
        (N,) per sequence) leaves no answer token within `max_length`: cutting it would separate image tokens from
        their image features, which crashes the model ("Image features and image tokens do not match")."""
        for length, row in zip(prompt_lengths.tolist(), rows):
            if length >= self.max_length:
                raise RowError(
                    examples[row].get(ROW_INDEX, row),
                    "prompt",
                    f"takes {length} tokens with its image/audio tokens, which leaves no answer token within "
                    f"max_length={self.max_length}: raise --max_length, use smaller images or drop the row",
                )


def preference_collator(
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    negative_columns: tuple[str, ...],
    *,
    multimodal: bool,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> MultiNegativeCollator | MultiNegativeVisionCollator:
    """The collator of a preference dataset: raw rows encoded on the fly when they carry media (`multimodal`),
    otherwise rows tokenized by `napo.encoding.tokenize_text_dataset` padded."""
    if multimodal:
        return MultiNegativeVisionCollator(processing_class, negative_columns, max_length)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    return MultiNegativeCollator(tokenizer.pad_token_id, negative_columns, max_length, truncation_mode)
