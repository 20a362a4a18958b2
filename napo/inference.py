"""Batched answer generation for text, image and audio samples, shared by `napo pairs` and evaluation.

A sample is a preference-row-shaped dict (DESIGN.md): "prompt" (a string, or TRL messages), optional
"images" (list of PIL images), "audios" (list of 1-D float32 arrays) and "sampling_rate" (Hz).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from napo.data import SAMPLING_RATE
from napo.formats import MEDIA_TAGS
from napo.models.families import MEDIA_FEATURES, PROCESSOR_ONLY_OUTPUTS


def generate(
    model: PreTrainedModel,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    samples: list[dict],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Answer every sample; return the decoded new tokens only (special tokens removed, stripped), in input order.

    Messages prompts are rendered with the processor's chat template (with the generation prompt); a string
    prompt is passed to the processor as is, as TRL does for non-conversational data. When messages hold no
    image / audio placeholder but the sample has images / audios, one placeholder per item is put before the
    first user message's text (TRL's `prepare_multimodal_messages` convention).

    Samples are grouped by modality (text-only, with images, with audio, with both) before batching:
    processors refuse a batch where only some texts carry media. Batches are left-padded.

    Args:
        batch_size: samples per `model.generate` call.
        max_new_tokens: the longest answer, in tokens.
        do_sample: sample with `temperature` instead of greedy decoding; the sampling is seeded with
            `torch.manual_seed(seed)` once, so the same samples, batch size and seed give the same answers.
        on_batch: called with the number of samples of each finished batch (for progress bars).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if do_sample:
        torch.manual_seed(seed)
    groups: dict[tuple[bool, bool], list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault((bool(sample.get("images")), bool(sample.get("audios"))), []).append(index)
    answers: list[str] = [""] * len(samples)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            texts = _generate_batch(
                model, processing_class, [samples[i] for i in batch], max_new_tokens, do_sample, temperature
            )
            for i, text in zip(batch, texts):
                answers[i] = text
            if on_batch is not None:
                on_batch(len(batch))
    return answers


@torch.inference_mode()
def _generate_batch(
    model: PreTrainedModel,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    samples: list[dict],
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
) -> list[str]:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    texts = [render_prompt(processing_class, sample) for sample in samples]
    chat = not isinstance(samples[0]["prompt"], str)
    kwargs: dict = dict(padding=True, padding_side="left", return_tensors="pt")
    if chat:
        kwargs["add_special_tokens"] = False  # the chat template already wrote <bos>: don't add a second one
    if samples[0].get("images"):
        kwargs["images"] = [sample["images"] for sample in samples]
    if samples[0].get("audios"):
        kwargs["audio"] = [wave for sample in samples for wave in sample["audios"]]
        kwargs["sampling_rate"] = SAMPLING_RATE
    if processing_class is tokenizer:
        inputs = tokenizer(texts, **kwargs)
    else:
        inputs = processing_class(text=texts, **kwargs)
    for name in PROCESSOR_ONLY_OUTPUTS:  # PaliGemma's processor adds labels; generate must not get them
        inputs.pop(name, None)
    inputs = inputs.to(model.device)
    for name in MEDIA_FEATURES:  # image / audio features in the model's dtype (bf16 models)
        if name in inputs and inputs[name].is_floating_point():
            inputs[name] = inputs[name].to(model.dtype)
    sampling = dict(do_sample=True, temperature=temperature) if do_sample else dict(do_sample=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    # Left padding puts every prompt's end at the same column: the new tokens start there.
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def render_prompt(processing_class: PreTrainedTokenizerBase | ProcessorMixin, sample: dict) -> str:
    """The model's input text for one sample: a string prompt with its media tags expanded (`expand_media_tags`),
    messages through the chat template."""
    prompt = sample["prompt"]
    if isinstance(prompt, str):
        return expand_media_tags(processing_class, prompt)
    messages = _with_placeholders(prompt, "image", len(sample.get("images") or []))
    messages = _with_placeholders(messages, "audio", len(sample.get("audios") or []))
    return processing_class.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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


def media_placeholders(processing_class: PreTrainedTokenizerBase | ProcessorMixin) -> dict[str, str]:
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


def expand_media_tags(processing_class: PreTrainedTokenizerBase | ProcessorMixin, text: str) -> str:
    """`text` with every `<image>` / `<audio>` tag (the LLaVA / LLaMA-Factory convention of string prompts) replaced
    by the model's own placeholder (`media_placeholders`); unchanged where the model's placeholder is the tag."""
    for tag, placeholder in media_placeholders(processing_class).items():
        if tag in text and placeholder.strip() != tag:
            text = text.replace(tag, placeholder)
    return text
