"""Collators of `NaPOTrainer`: preference rows with any number of negative columns -> one batch of sequences.

A batch of B rows whose dataset has K negative columns becomes the sequences

    [prompt+chosen, prompt+negative_1, ..., prompt+negative_K]   for every row (missing negatives left out)

with `sequence_row` (the row of each sequence) and `sequence_type` (0 chosen, k the k-th negative column).
`MultiNegativeCollator` pads tokenized text rows; `MultiNegativeVisionCollator` renders, tokenizes and pads raw
image/audio rows on the fly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import ProcessorMixin
from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages

from napo.data import RowError
from napo.inference import expand_media_tags
from napo.trl_seam import flush_left, pad

# Column added to every dataset the trainer gets: each row's 0-based position, so errors can name source rows.
ROW_INDEX = "row_index"


def _as_messages(answer: str | list) -> list[dict]:
    """An answer as an assistant turn: preference rows store answers as strings even with chat prompts."""
    return answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]


def _is_chat(prompt: str | list) -> bool:
    """Whether a prompt is TRL-style messages. Decided on the prompt alone: TRL's `is_conversational` looks at an
    arbitrary one of the row's keys, and napo rows keep chat prompts beside plain-string answers."""
    return is_conversational({"prompt": prompt})


def _with_audio_parts(messages: list[dict], n_audios: int) -> list[dict]:
    """Messages whose first user turn starts with `n_audios` {"type": "audio"} parts, unless the messages
    already place their audio parts (content already structured by `prepare_multimodal_messages`)."""
    if n_audios == 0 or any(part.get("type") == "audio" for m in messages for part in m["content"]):
        return messages
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    audio_parts = [{"type": "audio"} for _ in range(n_audios)]
    messages = list(messages)
    messages[first_user] = {**messages[first_user], "content": audio_parts + list(messages[first_user]["content"])}
    return messages


def _template_kwargs(example: dict[str, Any]) -> dict[str, Any]:
    """The row's `tools` (a list, or its JSON string) and `chat_template_kwargs`, as TRL passes them to the template."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools or None, **(example.get("chat_template_kwargs") or {})}


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
                if _is_chat(example["prompt"]):
                    prompt_messages = prepare_multimodal_messages(example["prompt"], images=row_images)
                    template = _template_kwargs(example)
                    rendered = apply_chat_template(
                        {
                            "prompt": _with_audio_parts(prompt_messages, len(row_audios)),
                            "completion": prepare_multimodal_messages(_as_messages(answer)),
                            "chat_template_kwargs": {k: v for k, v in template.items() if k != "tools"},
                        },
                        self.processor,
                        tools=template["tools"],
                    )
                    prompt, completion = rendered["prompt"], rendered["completion"]
                else:  # a string prompt: its <image>/<audio> tags become the model's placeholders
                    prompt, completion = expand_media_tags(self.processor, example["prompt"]), answer
                prompts.append(prompt)
                completions.append(completion)
                images.append(row_images)
                audios.extend(row_audios)  # the processor takes one flat list: a clip per audio placeholder
                rows.append(row)
                types.append(kind)
                refs.append(example.get(_ref_column(column)))

        # Media arguments only when present: processors refuse an all-empty image batch, and image-only processors
        # take no audio argument.
        media = {"images": images} if any(images) else {}
        if audios:
            media.update(audio=audios, sampling_rate=sampling_rates.pop())
        processed = self.processor(
            **media,
            text=prompts,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=False,  # the chat template already wrote BOS
        )
        processed_completions = self.processor(
            text=completions, padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False
        )
        prompt_mask = processed["attention_mask"]
        completion_mask = processed_completions["attention_mask"]
        input_ids = torch.cat((processed["input_ids"], processed_completions["input_ids"]), dim=1)
        attention_mask = torch.cat((prompt_mask, completion_mask), dim=1)
        completion_mask = torch.cat((torch.zeros_like(prompt_mask), completion_mask), dim=1)
        extra_names, extras = [], []
        if "token_type_ids" in processed:  # PaliGemma / Gemma: prefix-LM attention over the prompt
            extra_names.append("token_type_ids")
            extras.append(torch.cat((processed["token_type_ids"], processed_completions["token_type_ids"]), dim=1))
        if "mm_token_type_ids" in processed:  # Qwen2.5-VL family: which tokens are image tokens
            extra_names.append("mm_token_type_ids")
            completion_zeros = torch.zeros_like(processed_completions["input_ids"])
            extras.append(torch.cat((processed["mm_token_type_ids"], completion_zeros), dim=1))
        attention_mask, input_ids, completion_mask, *extras = flush_left(
            attention_mask, input_ids, completion_mask, *extras
        )
        batch = dict(processed)
        batch.pop("labels", None)  # PaliGemma's processor makes prompt labels; the trainer derives its own
        batch.update(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)
        batch.update(zip(extra_names, extras, strict=True))
        if self.max_length is not None:
            self._check_prompts_fit(prompt_mask.sum(dim=1), rows, examples)
            # keep_start only: cutting the start would separate image tokens from their image features.
            for key in ("input_ids", "attention_mask", "completion_mask", *extra_names):
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
