"""Batched answer generation for text, image and audio samples, shared by `napo pairs` and evaluation.

A sample is a preference-row-shaped dict (DESIGN.md): "prompt" (a string, or TRL messages), optional
"images" (list of PIL images), "audios" (list of 1-D float32 arrays) and "sampling_rate" (Hz).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from napo.encoding import encode_texts, render_prompt, to_model


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
    inputs = encode_texts(
        processing_class,
        [render_prompt(processing_class, sample) for sample in samples],
        images=[sample["images"] for sample in samples] if samples[0].get("images") else None,
        audios=[wave for sample in samples for wave in sample["audios"]] if samples[0].get("audios") else None,
        padding_side="left",
        add_special_tokens=isinstance(samples[0]["prompt"], str),  # a chat template already wrote <bos>
    )
    inputs = to_model(inputs, model)
    sampling = dict(do_sample=True, temperature=temperature) if do_sample else dict(do_sample=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    # Left padding puts every prompt's end at the same column: the new tokens start there.
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
