"""Tiny offline models for tests and the bias lab: one per family, random weights, a real processor.

Tiny models are built from configs with random weights and a tokenizer trained in memory, so no
code path here needs the network. Every family gets a real transformers processor, so the same
code (TRL's collators, batched ``generate``) runs on a tiny model and on a user's checkpoint.

Image / audio tokens per input with the defaults (``image_size=32``, ``patch_size=8``); pass
everything the processor returns to forward / generate:

    llava        16 ``<image>`` tokens per image, resized to 32x32 ((32/8)^2 patches, CLS dropped).
    qwen2_vl     keeps the aspect ratio: the image is resized to multiples of 16 px within 32x32 px
                 of area, one ``<|image_pad|>`` per 16x16 px (a square image: 4), inside
                 ``<|vision_start|>...<|vision_end|>``; also returns ``image_grid_thw`` and
                 ``mm_token_type_ids``; ``pixel_values`` are flat patches (n_patches, 3*2*8*8).
    idefics3     4 ``<image>`` tokens per image (16 patches, pixel shuffle 2), wrapped in
                 ``<fake_token_around_image><global-img>...<fake_token_around_image>``; also returns
                 ``pixel_attention_mask``; ``pixel_values`` is (batch, images, 3, 32, 32).
    paligemma    16 ``<image>`` tokens per image; the processor inserts ``<bos>`` after the last image
                 token and appends "\n" to every prompt, and returns ``token_type_ids`` (0 prefix,
                 1 answer) and ``labels`` (drop them before a forward on prompts). The vocabulary
                 has PaliGemma's 1,152 ``<locNNNN>``/``<segNNN>`` tokens on top.
    qwen2_audio  one ``<|AUDIO|>`` token per 40 ms of audio (audio cut at ``audio_seconds``), inside
                 ``<|audio_bos|>...<|audio_eos|>``; also returns ``input_features`` (batch, 80 mel,
                 100 * audio_seconds frames) and ``feature_attention_mask``. The processor's audio
                 keyword is ``audio=`` (1-D float32 arrays at 16 kHz) with ``sampling_rate=16000``.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
    WhisperFeatureExtractor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from napo.models.processors import PaliGemmaPreferenceProcessor, Qwen2VLImageOnlyProcessor
from napo.models.tokenizer import AUDIO_TOKEN, DEFAULT_WORDS, IMAGE_TOKEN, build_tokenizer, chat_template

FAMILIES: tuple[str, ...] = ("text", "llava", "qwen2_vl", "idefics3", "paligemma", "qwen2_audio")

# Which placeholder each family's processor expands; the tokenizer's own template uses the generic ones.
_PLACEHOLDERS: dict[str, tuple[str, str]] = {
    "text": (IMAGE_TOKEN, AUDIO_TOKEN),
    "llava": (IMAGE_TOKEN, AUDIO_TOKEN),
    "qwen2_vl": ("<|vision_start|><|image_pad|><|vision_end|>", AUDIO_TOKEN),
    "idefics3": (IMAGE_TOKEN, AUDIO_TOKEN),
    "paligemma": (IMAGE_TOKEN, AUDIO_TOKEN),
    "qwen2_audio": (IMAGE_TOKEN, "<|audio_bos|><|AUDIO|><|audio_eos|>"),
}


def _llama(tokenizer: PreTrainedTokenizerBase, hidden_size: int, num_layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def _qwen2(tokenizer: PreTrainedTokenizerBase, hidden_size: int, num_layers: int, **extra: object) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def _vision(hidden_size: int, num_layers: int, image_size: int, patch_size: int) -> dict:
    return dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


_MEAN, _STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


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
    """A randomly initialised fp32 model of ``family`` and its processing class, built offline.

    Args:
        family: one of ``FAMILIES``.
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
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {FAMILIES}")
    tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else build_tokenizer(DEFAULT_WORDS)
    image_placeholder, audio_placeholder = _PLACEHOLDERS[family]
    template = chat_template(image_placeholder, audio_placeholder)
    grid = image_size // patch_size
    vision = _vision(hidden_size, num_layers, image_size, patch_size)
    processor: PreTrainedTokenizerBase | ProcessorMixin
    torch.manual_seed(seed)

    if family == "text":
        processor = tokenizer
        config = _llama(tokenizer, hidden_size, num_layers)
        model_class: type[PreTrainedModel] = LlamaForCausalLM
    elif family == "llava":
        image_processor = CLIPImageProcessorPil(
            size={"height": image_size, "width": image_size},
            do_center_crop=False,
            image_mean=_MEAN,
            image_std=_STD,
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="default",  # drops CLS: grid**2 tokens per image
            num_additional_image_tokens=1,
            chat_template=template,
        )
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(**vision),
            text_config=_llama(tokenizer, hidden_size, num_layers),
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
        )
        model_class = LlavaForConditionalGeneration
    elif family == "qwen2_vl":
        merge = 2
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=patch_size,
            merge_size=merge,
            temporal_patch_size=2,
            min_pixels=image_size * image_size,
            max_pixels=image_size * image_size,
            image_mean=_MEAN,
            image_std=_STD,
        )
        processor = Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=template)
        head_dim = hidden_size // 4
        third = head_dim // 2 // 3
        # mrope splits the rotary half-dimension over (time, height, width): it must sum to head_dim / 2.
        mrope = [head_dim // 2 - 2 * third, third, third]
        config = Qwen2VLConfig(
            text_config=_qwen2(
                tokenizer,
                hidden_size,
                num_layers,
                rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
            ),
            vision_config=dict(
                depth=num_layers,
                embed_dim=hidden_size,
                hidden_size=hidden_size,
                num_heads=4,
                patch_size=patch_size,
                spatial_merge_size=merge,
                temporal_patch_size=2,
            ),
            image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        )
        model_class = Qwen2VLForConditionalGeneration
    elif family == "idefics3":
        scale = 2
        image_processor = Idefics3ImageProcessorPil(
            size={"longest_edge": image_size},
            max_image_size={"longest_edge": image_size},
            do_image_splitting=False,
            image_mean=_MEAN,
            image_std=_STD,
        )
        processor = Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=grid * grid // (scale * scale),
            chat_template=template,
        )
        config = Idefics3Config(
            vision_config=Idefics3VisionConfig(**vision),
            text_config=_llama(tokenizer, hidden_size, num_layers),
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            scale_factor=scale,
            pad_token_id=tokenizer.pad_token_id,
        )
        model_class = Idefics3ForConditionalGeneration
    elif family == "paligemma":
        image_processor = SiglipImageProcessorPil(
            size={"height": image_size, "width": image_size}, image_mean=_MEAN, image_std=_STD
        )
        image_processor.image_seq_length = grid * grid  # PaliGemmaProcessor reads it: one token per patch
        processor = PaliGemmaPreferenceProcessor(image_processor, tokenizer, chat_template=template)
        text = GemmaConfig(
            vocab_size=len(tokenizer),  # after the processor added its <loc>/<seg> tokens
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden_size // 4,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = PaliGemmaConfig(
            vision_config=SiglipVisionConfig(**vision),
            text_config=text,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            projection_dim=hidden_size,
        )
        model_class = PaliGemmaForConditionalGeneration
    else:  # qwen2_audio
        feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=audio_seconds)
        processor = Qwen2AudioProcessor(
            feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=template
        )
        frames = feature_extractor.nb_max_frames  # 100 mel frames per second
        config = Qwen2AudioConfig(
            audio_config=Qwen2AudioEncoderConfig(
                num_mel_bins=80,
                d_model=hidden_size,
                encoder_layers=num_layers,
                encoder_attention_heads=4,
                encoder_ffn_dim=2 * hidden_size,
                max_source_positions=frames // 2,  # the encoder's stride-2 conv halves the frames
            ),
            text_config=Qwen2Config(**_qwen2(tokenizer, hidden_size, num_layers)),
            audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
        )
        model_class = Qwen2AudioForConditionalGeneration

    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = model_class(config).float().eval()
    tok = processor if family == "text" else processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor
