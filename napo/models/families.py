"""Model families: one record per family holds everything napo knows about it, looked up by name or `model_type`.

A record says what the family's processor expands per image / audio clip (its placeholders), which of its inputs run
along the tokens (concatenated, padded, truncated and packed like `input_ids`), which are media (pixels, grids,
features), whether its prompt is a bidirectional prefix (prefix-LM), where its multimodal rotary position function,
its vision / audio tower and its projector live, and which function builds its tiny offline model.

The trainer's collators, packing (`napo.fast`), generation (`napo.inference`), the audio lab and the FLOP counter
(`napo.throughput`) read these records instead of testing family names. **Adding a family = one `Family` record in
`FAMILY_RECORDS` below (and the tiny builder it names, in `napo.models.tiny`).** Families whose `model_type` has no
record (a user's checkpoint of another architecture) still train: the lookups fall back to what the inputs show.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from napo.models import tiny
from napo.models.tokenizer import AUDIO_TOKEN, DEFAULT_WORDS, IMAGE_TOKEN, build_tokenizer, chat_template


@dataclass(frozen=True)
class PerTokenInput:
    """A model input of shape (N, L) that runs along the tokens like `input_ids` (a processor output).

    A collator builds it for prompt + answer as it builds `input_ids`: the prompt part from the processor's prompt
    encoding, the answer part from the processor's encoding of the answer text (`answer_value` None) or filled with
    `answer_value`; then pads, flushes and truncates it with `input_ids`. Packing (`napo.fast.pack_sequences`)
    flattens it with `input_ids`, unless `packable` is False (then a packed batch is refused, with `why`).
    """

    name: str
    answer_value: int | None
    packable: bool
    why: str


@dataclass(frozen=True)
class Family:
    """What napo needs to know about one model family.

    `model_types`: the transformers `config.model_type` values these facts hold for. Placeholders: the text the
    family's processor expands into an image's / an audio clip's tokens (None: the family takes no such media; the
    tiny chat template then writes the generic `<image>` / `<audio>`). `media_features`: floating media inputs,
    cast to the model's dtype; `media_layout`: other media inputs (grids, masks), passed as they are.
    `processor_only`: processor outputs that are not forward inputs (dropped before a forward). Attribute paths
    (`rope_index`, `tower`, `projector`) are read from the inner model (`model.model` of a transformers 5 model,
    under any PEFT wrapper). `build_tiny(tokenizer, chat_template, shape) -> (config, model class, processor)`.
    """

    name: str
    model_types: tuple[str, ...]
    build_tiny: Callable[[PreTrainedTokenizerFast, str, tiny.TinyShape], tiny.TinyParts]
    image_placeholder: str | None = None
    audio_placeholder: str | None = None
    per_token_inputs: tuple[PerTokenInput, ...] = ()
    media_features: tuple[str, ...] = ()
    media_layout: tuple[str, ...] = ()
    processor_only: tuple[str, ...] = ()
    prefix_lm: bool = False
    rope_index: str | None = None  # multimodal rotary positions: (3, N, L) from input_ids and image grids
    tower: str | None = None  # the vision or audio encoder
    projector: str | None = None  # encoder features -> language-model embeddings


# Qwen2-VL's processor marks image (1) and video (2) tokens; answers hold none.
MM_TOKEN_TYPES = PerTokenInput("mm_token_type_ids", answer_value=0, packable=True, why="")
# PaliGemma: 0 = prompt (one bidirectional block), 1 = answer (causal). napo's PaliGemma processor encodes answer
# text alone as type 1.
PREFIX_TOKEN_TYPES = PerTokenInput(
    "token_type_ids",
    answer_value=None,
    packable=False,
    why="prefix-LM models (PaliGemma: the batch carries token_type_ids), whose bidirectional prompt block would join "
    "the prompts of the packed sequences",
)

FAMILY_RECORDS: tuple[Family, ...] = (
    Family("text", ("llama", "qwen2"), tiny.tiny_text),
    Family(
        "llava",
        ("llava",),
        tiny.tiny_llava,
        image_placeholder=IMAGE_TOKEN,
        media_features=("pixel_values",),
        tower="vision_tower",
        projector="multi_modal_projector",
    ),
    Family(
        "qwen2_vl",
        ("qwen2_vl",),
        tiny.tiny_qwen2_vl,
        image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
        per_token_inputs=(MM_TOKEN_TYPES,),
        media_features=("pixel_values",),  # flat patches (n_patches, 3 * 2 * patch^2)
        media_layout=("image_grid_thw",),  # (images, 3): patches in time, height, width per image
        rope_index="get_rope_index",
        tower="visual",
        projector="visual.merger",  # inside the tower
    ),
    Family(
        "idefics3",
        ("idefics3",),
        tiny.tiny_idefics3,
        image_placeholder=IMAGE_TOKEN,  # the processor wraps it in <fake_token_around_image><global-img>...
        media_features=("pixel_values",),  # (batch, images, 3, H, W)
        media_layout=("pixel_attention_mask",),
        tower="vision_model",
        projector="connector",
    ),
    Family(
        "paligemma",
        ("paligemma",),
        tiny.tiny_paligemma,
        image_placeholder=IMAGE_TOKEN,
        per_token_inputs=(PREFIX_TOKEN_TYPES,),
        media_features=("pixel_values",),
        processor_only=("labels",),  # its processor makes prompt labels; the trainer derives its own
        prefix_lm=True,
        tower="vision_tower",
        projector="multi_modal_projector",
    ),
    Family(
        "qwen2_audio",
        ("qwen2_audio",),
        tiny.tiny_qwen2_audio,
        audio_placeholder="<|audio_bos|><|AUDIO|><|audio_eos|>",
        media_features=("input_features",),  # (clips, 80 mel, frames)
        media_layout=("feature_attention_mask",),
        tower="audio_tower",
        projector="multi_modal_projector",
    ),
)

_BY_NAME: dict[str, Family] = {record.name: record for record in FAMILY_RECORDS}
_BY_MODEL_TYPE: dict[str, Family] = {t: record for record in FAMILY_RECORDS for t in record.model_types}
FAMILIES: tuple[str, ...] = tuple(_BY_NAME)

# What the collators and packing look for in a processor's output, over every family (a user's model of a family
# without a record still gets the inputs its processor returns handled).
PER_TOKEN_INPUTS: dict[str, PerTokenInput] = {i.name: i for record in FAMILY_RECORDS for i in record.per_token_inputs}
MEDIA_FEATURES: tuple[str, ...] = tuple(dict.fromkeys(f for record in FAMILY_RECORDS for f in record.media_features))
PROCESSOR_ONLY_OUTPUTS: tuple[str, ...] = tuple(
    dict.fromkeys(name for record in FAMILY_RECORDS for name in record.processor_only)
)


def family_record(name: str) -> Family:
    """The record of napo's family `name` (one of `FAMILIES`); ValueError naming the choices otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"family={name!r}: expected one of {FAMILIES}") from None


def unwrap_peft(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model inside a PEFT model, or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family_of(model: PreTrainedModel | PreTrainedConfig) -> Family | None:
    """The record for a model (or PEFT model, or config) by its `model_type`; None for a family without a record."""
    config = model if isinstance(model, PreTrainedConfig) else unwrap_peft(model).config
    return _BY_MODEL_TYPE.get(config.model_type)


def _attribute(model: PreTrainedModel, path: str) -> object:
    """`path` ("visual.merger") read from the inner model (transformers 5: `model.model`), else from the model."""
    base = unwrap_peft(model)
    for root in (getattr(base, "model", None), base):
        value = root
        for name in path.split("."):
            value = getattr(value, name, None)
        if value is not None:
            return value
    raise AttributeError(f"{type(base).__name__} has no {path!r} (model_type {base.config.model_type!r})")


def rope_index_function(model: PreTrainedModel) -> Callable | None:
    """The model's multimodal rotary position function (Qwen2-VL's `get_rope_index`), or None for 1-D positions.

    From the family's record; for a family without one, whatever the inner model calls `get_rope_index` (the
    Qwen2.5-VL / Qwen3-VL families have it too)."""
    record = family_of(model)
    name = record.rope_index if record is not None else "get_rope_index"
    if name is None:
        return None
    try:
        return _attribute(model, name)
    except AttributeError:
        return None


def media_tower(model: PreTrainedModel) -> torch.nn.Module:
    """The vision or audio encoder of `model` (a family with a record and a tower; ValueError otherwise)."""
    return _attribute(model, _record_with(model, "tower").tower)


def media_projector(model: PreTrainedModel) -> torch.nn.Module:
    """The module that maps encoder features to language-model embeddings (ValueError without a record)."""
    return _attribute(model, _record_with(model, "projector").projector)


def _record_with(model: PreTrainedModel, field: str) -> Family:
    record = family_of(model)
    if record is None or getattr(record, field) is None:
        model_type = unwrap_peft(model).config.model_type
        raise ValueError(
            f"model_type {model_type!r} has no {field} in napo.models.families.FAMILY_RECORDS: add its record"
        )
    return record


def build_tiny_model(
    family: str,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    audio_seconds: int = 2,
    seed: int = 0,
    **config_overrides: object,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | ProcessorMixin]:
    """A randomly initialised fp32 model of a family and its processing class, built offline.

    Args:
        family: one of ``FAMILIES``; its record's ``build_tiny`` makes the config and processor.
        tokenizer: from :func:`build_tokenizer`; copied, never mutated (processors add tokens).
            ``None``: ``build_tokenizer(DEFAULT_WORDS)``.
        hidden_size: width of the language model and of the vision / audio encoder; a multiple of 16.
        num_layers: layers of the language model and of the encoder.
        image_size: side in pixels every image is resized to; ``patch_size`` must divide it
            (and ``image_size / patch_size`` must be even for qwen2_vl and idefics3).
        audio_seconds: longest audio the qwen2_audio feature extractor keeps, in whole seconds.
        seed: ``torch.manual_seed`` for the weights.
        config_overrides: attributes set on the top-level config after it is built
            (e.g. ``vision_feature_layer=-2`` for llava); sub-configs are not touched.

    Returns:
        ``(model, processing_class)``: the tokenizer itself for ``"text"`` (a Llama), else the
        family's ``ProcessorMixin`` with the family's chat template. ``model.config`` vocab size
        equals ``len(processing_class tokenizer)``; the generation config's pad / bos / eos ids are the
        tokenizer's, so ``model.generate`` works on left-padded batches.
    """
    record = family_record(family)
    tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else build_tokenizer(DEFAULT_WORDS)
    template = chat_template(record.image_placeholder or IMAGE_TOKEN, record.audio_placeholder or AUDIO_TOKEN)
    shape = tiny.TinyShape(hidden_size, num_layers, image_size, patch_size, audio_seconds)
    torch.manual_seed(seed)
    config, model_class, processor = record.build_tiny(tokenizer, template, shape)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = model_class(config).float().eval()
    tok = getattr(processor, "tokenizer", processor)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor
