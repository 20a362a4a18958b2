"""Encoding: how a preference-row-shaped sample becomes the model's tokens, for training, scoring and generation.

A sample (DESIGN.md) has "prompt" (a string, or TRL messages), optional "images" (PIL images), "audios" (1-D float32
arrays) and "sampling_rate" (Hz). Its prompt is rendered to text (`render_prompt`: messages through the chat
template with the generation prompt, a string with its `<image>` / `<audio>` tags expanded to the model's own
placeholders); prompts and answers are then tokenized into one batch of sequences (`encode_sequences`):

    input_ids       (N, L)  prompt tokens (image / audio placeholders expanded by the processor), then answer tokens
    attention_mask  (N, L)  1 on real tokens; right padding (each sequence starts at position 0)
    completion_mask (N, L)  1 on the answer tokens: what `napo.scoring` scores
    + the per-token inputs of the family registry (`napo.models.families.PER_TOKEN_INPUTS`, e.g. Qwen2-VL's
      `mm_token_type_ids`, PaliGemma's `token_type_ids`), at the same width, and the processor's media tensors.

The trainer's collators (`napo.collators`), evaluation's `answer_batch` and generation (`napo.inference`) encode
through here, so a margin measured in evaluation is computed on the tokens training scores.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin
from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages

from napo.formats import MEDIA_TAGS
from napo.media import SAMPLING_RATE
from napo.models.families import MEDIA_FEATURES, PER_TOKEN_INPUTS, PROCESSOR_ONLY_OUTPUTS
from napo.trl_seam import _tokenize, common_prefix_length, flush_left

logger = logging.getLogger(__name__)

ProcessingClass = PreTrainedTokenizerBase | ProcessorMixin
# Column added to every dataset the trainer gets: each row's 0-based position, so errors can name source rows.
ROW_INDEX = "row_index"
# Entries of a collated batch that describe its sequences rather than feed the model.
SEQUENCE_KEYS = ("completion_mask", "sequence_row", "sequence_type", "ref_logps", ROW_INDEX)
# Row columns whose media a processor encodes with the text (rows with any are encoded on the fly, in the collator).
MEDIA_COLUMNS = ("image", "images", "audios")


def has_media(row: dict) -> bool:
    """Whether a row carries images or audio clips (`MEDIA_COLUMNS`)."""
    return any(row.get(k) is not None for k in MEDIA_COLUMNS)


def column_names(dataset: Dataset | IterableDataset) -> list[str]:
    """The columns of a dataset; of a stream whose features are unknown until read, those of its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)))


def with_row_index(dataset: Dataset | dict[str, Dataset] | None) -> Dataset | dict[str, Dataset] | None:
    """`dataset` (or each dataset of a dict) with a `row_index` column of its 0-based row numbers, unless it has one:
    rows dropped or reordered later (length filter, shuffling) keep the index of the dataset the user passed."""
    if isinstance(dataset, dict):
        return {name: with_row_index(d) for name, d in dataset.items()}
    if dataset is None or ROW_INDEX in column_names(dataset):
        return dataset
    if isinstance(dataset, IterableDataset):  # numbered as the rows stream past
        return dataset.map(lambda _, index: {ROW_INDEX: index}, with_indices=True)
    return dataset.add_column(ROW_INDEX, list(range(len(dataset))))


# ------------------------------------------------------------------------------------------------ rendering
def is_chat(prompt: str | list) -> bool:
    """Whether a prompt is TRL-style messages. Decided on the prompt alone: TRL's `is_conversational` looks at an
    arbitrary one of the row's keys, and napo rows keep chat prompts beside plain-string answers."""
    return is_conversational({"prompt": prompt})


def as_messages(answer: str | list) -> list[dict]:
    """An answer as an assistant turn: preference rows store answers as strings even with chat prompts."""
    return answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]


def template_kwargs(example: dict[str, Any]) -> dict[str, Any]:
    """The row's `tools` (a list, or its JSON string) and `chat_template_kwargs`, as TRL passes them to the template."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools or None, **(example.get("chat_template_kwargs") or {})}


def render_prompt(processing_class: ProcessingClass, sample: dict) -> str:
    """The model's input text for one sample: a string prompt with its media tags expanded (`expand_media_tags`),
    messages through the chat template with the generation prompt, one {"type": "image"/"audio"} part per image /
    clip put first in the first user turn when the messages place none (TRL's `prepare_multimodal_messages`
    convention)."""
    prompt = sample["prompt"]
    if isinstance(prompt, str):
        return expand_media_tags(processing_class, prompt)
    messages = _with_placeholders(prompt, "image", len(sample.get("images") or []))
    messages = _with_placeholders(messages, "audio", len(sample.get("audios") or []))
    return processing_class.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_training_answer(
    processor: ProcessorMixin, example: dict, answer: str | list, images: list
) -> tuple[str, str]:
    """(prompt text, answer text) of one training sequence of a multimodal row, as TRL's vision collator renders it:
    messages through `trl.data_utils.apply_chat_template` (the answer is what the template writes after the
    prompt, end-of-turn included), a string prompt with its media tags expanded and the answer as it is."""
    if not is_chat(example["prompt"]):
        return expand_media_tags(processor, example["prompt"]), answer
    prompt_messages = prepare_multimodal_messages(example["prompt"], images=images)
    template = template_kwargs(example)
    rendered = apply_chat_template(
        {
            "prompt": _with_placeholders(prompt_messages, "audio", len(example.get("audios") or [])),
            "completion": prepare_multimodal_messages(as_messages(answer)),
            "chat_template_kwargs": {k: v for k, v in template.items() if k != "tools"},
        },
        processor,
        tools=template["tools"],
    )
    return rendered["prompt"], rendered["completion"]


def _with_placeholders(messages: list[dict], kind: str, count: int) -> list[dict]:
    """Put `count` {"type": kind} parts first in the first user message when the messages have none of that kind."""
    has_kind = any(
        isinstance(m["content"], list) and any(part.get("type") == kind for part in m["content"]) for m in messages
    )
    if count == 0 or has_kind:
        return messages
    out, done = [], False
    for message in messages:
        if message["role"] == "user" and not done:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            message = {**message, "content": [{"type": kind}] * count + parts}
            done = True
        out.append(message)
    return out


_PLACEHOLDER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MARK = "\x00napo\x00"


def media_placeholders(processing_class: ProcessingClass) -> dict[str, str]:
    """{"<image>": the model's image placeholder, "<audio>": its audio placeholder}, read from its chat template.

    The template renders a user turn with and without a {"type": kind} part before the same text; what the first
    adds before the text is the placeholder (LLaVA: "<image>", Qwen2-VL: "<|vision_start|><|image_pad|><|vision_end|>").
    A template that does not render such parts leaves the tag as it is.
    """
    try:
        return _PLACEHOLDER_CACHE[processing_class]
    except (KeyError, TypeError):
        pass
    found = {}
    for tag, kind in MEDIA_TAGS.items():
        found[tag] = tag
        try:
            with_part, without = (
                processing_class.apply_chat_template(
                    [{"role": "user", "content": [*parts, {"type": "text", "text": _MARK}]}], tokenize=False
                ).split(_MARK)[0]
                for parts in ([{"type": kind}], [])
            )
        except Exception:  # no chat template, or one that refuses the part: keep the data's tag
            continue
        if with_part.startswith(without) and with_part[len(without) :].strip():
            found[tag] = with_part[len(without) :]
    try:
        _PLACEHOLDER_CACHE[processing_class] = found
    except TypeError:
        pass
    return found


def expand_media_tags(processing_class: ProcessingClass, text: str) -> str:
    """`text` with every `<image>` / `<audio>` tag (the LLaVA / LLaMA-Factory convention of string prompts) replaced
    by the model's own placeholder (`media_placeholders`); unchanged where the model's placeholder is the tag."""
    for tag, placeholder in media_placeholders(processing_class).items():
        if tag in text and placeholder.strip() != tag:
            text = text.replace(tag, placeholder)
    return text


# ------------------------------------------------------------------------------------------------ tokenizing
def tokenize_text_row(
    processing_class: ProcessingClass, example: dict, answer_columns: Sequence[str], eos: str
) -> dict[str, list[int]]:
    """A text row's `prompt_ids` and `<column>_ids` for every answer column (empty where the row has none), by TRL's
    rules: a string row gets `eos` appended to every answer; a conversational row is rendered through the chat
    template with its `tools` and `chat_template_kwargs` (prompt with the generation prompt, prompt + the answer as an
    assistant turn), and its completion starts where the two diverge (the common prefix of all its answers)."""
    prompt = example["prompt"]
    if is_chat(prompt):
        template = template_kwargs(example)  # tools and chat_template_kwargs, as TRL passes them
        prompt_ids = _tokenize(processing_class, prompt, add_generation_prompt=True, **template)["input_ids"]
        full = {
            c: _tokenize(processing_class, prompt + as_messages(example[c]), **template)["input_ids"]
            for c in answer_columns
            if example.get(c) is not None  # an eval set may lack a negative column of the training set
        }
    else:
        prompt_ids = _tokenize(processing_class, prompt)["input_ids"]
        full = {
            c: _tokenize(processing_class, prompt + (a if a.endswith(eos) else a + eos))["input_ids"]
            for c in answer_columns
            if (a := example.get(c)) is not None
        }
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full.values())
    output = {"prompt_ids": prompt_ids[:prompt_len]}
    for column in answer_columns:
        output[f"{column}_ids"] = full[column][prompt_len:] if column in full else []
    return output


def tokenize_text_dataset(
    dataset: Dataset | IterableDataset,
    processing_class: ProcessingClass,
    answer_columns: Sequence[str],
    *,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    num_proc: int | None = None,
    name: str = "train",
) -> Dataset | IterableDataset:
    """Text rows tokenized into `prompt_ids` and `<column>_ids` (`tokenize_text_row`; a dataset that has
    `prompt_ids` is returned as it is). With `max_length` and `truncation_mode="keep_start"`, rows whose prompt fills
    `max_length` tokens are dropped (no answer token would be left to score), with a warning naming their
    `row_index` (`name` labels the dataset in it and in the progress bar)."""
    if "prompt_ids" in column_names(dataset):
        return dataset
    eos = getattr(processing_class, "tokenizer", processing_class).eos_token

    def tokenize(example):
        return tokenize_text_row(processing_class, example, answer_columns, eos)

    def fits(example) -> bool:
        return len(example["prompt_ids"]) < max_length

    filtered = max_length is not None and truncation_mode == "keep_start"
    if isinstance(dataset, IterableDataset):  # tokenized lazily as rows stream; `map` takes no desc / num_proc
        dataset = dataset.map(tokenize)
        return dataset.filter(fits) if filtered else dataset
    dataset = dataset.map(tokenize, desc=f"Tokenizing {name} dataset", num_proc=num_proc)
    if not filtered:
        return dataset
    dataset = with_row_index(dataset)  # a no-op, except for a dataset first seen by `evaluate()`
    kept = dataset.filter(fits, num_proc=num_proc)
    if len(kept) < len(dataset):
        dropped = sorted(set(dataset[ROW_INDEX]) - set(kept[ROW_INDEX]))
        logger.warning(
            f"{name} dataset: dropped rows {dropped}: their prompt fills max_length={max_length} "
            f"tokens and leaves no answer token to learn from (raise --max_length to keep them)"
        )
    return kept


def encode_texts(
    processing_class: ProcessingClass,
    texts: list[str],
    *,
    images: list[list] | None = None,
    audios: list[np.ndarray] | None = None,
    sampling_rate: int = SAMPLING_RATE,
    padding_side: str = "right",
    add_special_tokens: bool = True,
) -> BatchFeature:
    """The processing class's padded encoding of `texts` (B,) with their media: `images` one list per text, `audios`
    one flat list with a clip per audio placeholder (as processors take them). Media arguments are passed only when
    present (processors refuse an all-empty image batch; image-only processors take no audio argument); processor
    outputs that are not forward inputs (`PROCESSOR_ONLY_OUTPUTS`, PaliGemma's prompt `labels`) are dropped."""
    kwargs: dict[str, Any] = dict(
        padding=True, padding_side=padding_side, return_tensors="pt", add_special_tokens=add_special_tokens
    )
    if images and any(images):
        kwargs["images"] = images
    if audios:
        kwargs.update(audio=audios, sampling_rate=sampling_rate)
    encoded = processing_class(text=texts, **kwargs)
    for name in PROCESSOR_ONLY_OUTPUTS:
        encoded.pop(name, None)
    return encoded


def encode_sequences(
    processing_class: ProcessingClass,
    prompts: list[str],
    answers: list[str],
    *,
    images: list[list] | None = None,
    audios: list[np.ndarray] | None = None,
    sampling_rate: int = SAMPLING_RATE,
    add_special_tokens: bool = False,
) -> dict[str, torch.Tensor]:
    """One batch of the N sequences prompt_i + answer_i (module docstring: input_ids, attention_mask, completion_mask
    (N, L), right-padded, the registry's per-token inputs at width L, and the prompts' media tensors).

    `prompts`, `answers`: rendered texts (`render_prompt`, `render_training_answer`); `images`, `audios`: as
    `encode_texts`; `add_special_tokens` applies to the prompts (False where a chat template wrote BOS); answers get
    none. A per-token input's answer part is the processor's encoding of the answer text or its registry's
    `answer_value` (`napo.models.families.PerTokenInput`)."""
    encoded = encode_texts(
        processing_class,
        prompts,
        images=images,
        audios=audios,
        sampling_rate=sampling_rate,
        padding_side="left",
        add_special_tokens=add_special_tokens,
    )
    answer_encoded = encode_texts(processing_class, answers, padding_side="right", add_special_tokens=False)
    prompt_mask, answer_mask = encoded["attention_mask"], answer_encoded["attention_mask"]
    input_ids = torch.cat((encoded["input_ids"], answer_encoded["input_ids"]), dim=1)
    attention_mask = torch.cat((prompt_mask, answer_mask), dim=1)
    completion_mask = torch.cat((torch.zeros_like(prompt_mask), answer_mask), dim=1)
    per_token = {}
    for name, spec in PER_TOKEN_INPUTS.items():
        if name not in encoded:
            continue
        if spec.answer_value is None:
            answer_part = answer_encoded[name]
        else:
            answer_part = torch.full_like(answer_encoded["input_ids"], spec.answer_value)
        per_token[name] = torch.cat((encoded[name], answer_part), dim=1)
    # Left-padded prompts + right-padded answers, flushed left: each sequence starts at position 0, as unbatched.
    attention_mask, input_ids, completion_mask, *extras = flush_left(
        attention_mask, input_ids, completion_mask, *per_token.values()
    )
    batch = dict(encoded)
    batch.update(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)
    batch.update(zip(per_token, extras, strict=True))
    batch["prompt_lengths"] = prompt_mask.sum(dim=1)
    return batch


def to_model(batch: dict, model: torch.nn.Module) -> dict:
    """`batch`'s tensors on the model's device, its floating media features (`MEDIA_FEATURES`: pixels, audio
    features) in the model's dtype (bf16 models); every other tensor keeps its dtype."""
    moved = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    for name in MEDIA_FEATURES:
        if name in moved and moved[name].is_floating_point():
            moved[name] = moved[name].to(model.dtype)
    return moved


def answer_batch(
    processing_class: ProcessingClass, samples: Sequence[dict], answers: Sequence[str]
) -> tuple[BatchFeature, torch.Tensor]:
    """Encode prompt + answer + EOS of every sample into one right-padded batch (`encode_sequences`).

    The prompt is rendered as `napo.inference.generate` renders it (`render_prompt`), so the answer tokens follow
    exactly the context the model generates from. Every sample must have images, or none may, and the same for
    audios (processors refuse a batch where only some texts carry media); audio clips are at `SAMPLING_RATE`.

    Returns the model inputs (input_ids, attention_mask of shape (B, L), the registry's per-token inputs at width L,
    the processor's image or audio tensors) and answer_mask (B, L): 1 on the answer's tokens and its closing EOS, 0
    on prompt and padding. Right padding keeps every token at the position it has in an unbatched forward.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    with_images, with_audio = bool(samples[0].get("images")), bool(samples[0].get("audios"))
    if any(bool(s.get("images")) != with_images or bool(s.get("audios")) != with_audio for s in samples):
        raise ValueError("answer_batch: some samples have images (or audios) and some have none; batch them separately")
    batch = encode_sequences(
        processing_class,
        [render_prompt(processing_class, sample) for sample in samples],
        [a + tokenizer.eos_token for a in answers],
        images=[s["images"] for s in samples] if with_images else None,
        audios=[wave for s in samples for wave in s["audios"]] if with_audio else None,
        add_special_tokens=isinstance(samples[0]["prompt"], str),  # a chat template already wrote <bos>
    )
    answer_mask = batch.pop("completion_mask")
    batch.pop("prompt_lengths")
    return BatchFeature(batch), answer_mask
