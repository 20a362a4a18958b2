"""What a sample is: validation and copying, shared by the image, text and audio ops.

A sample is a dict with optional keys:

- ``prompt``: a str, or TRL conversational messages ``[{"role": str, "content": str | [part, ...]}]``
  where a part is ``{"type": "text", "text": str}`` or a placeholder such as ``{"type": "image"}``;
- ``images``: list of PIL images (any mode);
- ``audios``: list of mono waveforms, 1-D real arrays (float32 after `copy_sample`);
- ``sampling_rate``: int Hz, shared by all audios, default 16000.

A key whose value is None counts as absent. Any other key is carried over as is.
"""

from __future__ import annotations

import copy

import numpy as np
from PIL import Image

DEFAULT_SAMPLING_RATE = 16000

Prompt = str | list[dict]


def _check_prompt(prompt: object) -> None:
    expected = "a str or a list of {'role': str, 'content': str | list of {'type': ...} parts}"
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list):
        raise ValueError(f"sample['prompt']: expected {expected}, got {type(prompt).__name__}")
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"sample['prompt'][{i}]: expected a dict with a str 'role'; expected {expected}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(f"sample['prompt'][{i}]['content']: expected a str or a list of parts, got {type(content).__name__}")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"sample['prompt'][{i}]['content'][{j}]: expected a dict with a str 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"sample['prompt'][{i}]['content'][{j}]: a text part needs a str 'text'")


def _copy_images(images: object) -> list[Image.Image]:
    if not isinstance(images, list | tuple):
        raise ValueError(f"sample['images']: expected a list of PIL images, got {type(images).__name__}")
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise ValueError(f"sample['images'][{i}]: expected a PIL image, got {type(img).__name__}")
    return [img.copy() for img in images]


def _copy_audios(audios: object) -> list[np.ndarray]:
    if not isinstance(audios, list | tuple):
        raise ValueError(f"sample['audios']: expected a list of 1-D float32 arrays, got {type(audios).__name__}")
    out = []
    for i, wave in enumerate(audios):
        array = np.asarray(wave)
        if array.dtype.kind not in "iuf":
            raise ValueError(f"sample['audios'][{i}]: expected a 1-D real numeric array, got dtype {array.dtype}")
        if array.ndim != 1:
            # (channels, samples) vs (samples, channels) is ambiguous across libraries: refuse
            # rather than guess and silently average the wrong axis.
            raise ValueError(
                f"sample['audios'][{i}]: expected a 1-D mono waveform, got shape {array.shape}; "
                "convert to mono first, e.g. librosa.to_mono(y) for (channels, samples) "
                "or y.mean(axis=1) for (samples, channels)"
            )
        out.append(np.array(array, dtype=np.float32))  # always a copy
    return out


def copy_sample(sample: dict) -> dict:
    """Validate `sample` and return a copy that ops may modify freely.

    Images are ``Image.copy()``-ed, audios become new float32 arrays (values kept, integers are
    not rescaled), the prompt is deep-copied. Raises ValueError naming the malformed key.
    """
    if not isinstance(sample, dict):
        raise ValueError(f"a sample is a dict with optional keys prompt/images/audios/sampling_rate, got {type(sample).__name__}")
    out = dict(sample)
    if sample.get("prompt") is not None:
        _check_prompt(sample["prompt"])
        out["prompt"] = copy.deepcopy(sample["prompt"])
    if sample.get("images") is not None:
        out["images"] = _copy_images(sample["images"])
    if sample.get("audios") is not None:
        out["audios"] = _copy_audios(sample["audios"])
    if sample.get("sampling_rate") is not None:
        rate = sample["sampling_rate"]
        if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate <= 0:
            raise ValueError(f"sample['sampling_rate']: expected a positive int (Hz), got {rate!r}")
    return out


def sampling_rate(sample: dict) -> int:
    """The sample's audio rate in Hz (default 16000)."""
    rate = sample.get("sampling_rate")
    return DEFAULT_SAMPLING_RATE if rate is None else int(rate)


MEDIA_TAGS = {"image": "<image>", "audio": "<audio>"}  # the tags of string prompts (LLaVA / LLaMA-Factory data)


def remove_placeholders(prompt: Prompt, part_type: str) -> Prompt:
    """Drop every ``{"type": part_type}`` part from conversational messages, and every ``<image>`` / ``<audio>``
    tag of that type (with the newline that usually follows it) from string prompts and string contents."""
    tag = MEDIA_TAGS.get(part_type)

    def untagged(text: str) -> str:
        return text.replace(tag + "\n", "").replace(tag, "") if tag else text

    if isinstance(prompt, str):
        return untagged(prompt)
    return [
        {**m, "content": [p for p in m["content"] if p["type"] != part_type]} if isinstance(m["content"], list)
        else {**m, "content": untagged(m["content"])}
        for m in prompt
    ]
