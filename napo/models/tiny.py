"""Tiny offline models for tests and the bias lab: one builder per family, random weights, a real processor.

Each builder is named by its family's record in :mod:`napo.models.families` (whose ``build_tiny_model`` calls it
and finishes the model); it returns the config, the model class and the processor, and does nothing else.

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

from dataclasses import dataclass

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
    PreTrainedConfig,
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
from napo.models.tokenizer import IMAGE_TOKEN

_MEAN, _STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class TinyShape:
    """Sizes of a tiny model (see `napo.models.families.build_tiny_model` for their meaning and constraints)."""

    hidden_size: int = 64
    num_layers: int = 2
    image_size: int = 32  # px, every image resized to it
    patch_size: int = 8  # px
    audio_seconds: int = 2  # longest audio the feature extractor keeps

    def vision(self) -> dict:
        """The vision tower's config fields shared by the CLIP / SigLIP / Idefics3 towers."""
        return dict(
            hidden_size=self.hidden_size,
            intermediate_size=2 * self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=4,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )


TinyParts = tuple[PreTrainedConfig, type[PreTrainedModel], PreTrainedTokenizerBase | ProcessorMixin]


def _decoder(tokenizer: PreTrainedTokenizerBase, shape: TinyShape, max_position_embeddings: int) -> dict:
    """The language model's config fields shared by the Llama and Qwen2 decoders (4 heads, 2 key-value heads)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=2 * shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def _llama(tokenizer: PreTrainedTokenizerBase, shape: TinyShape) -> LlamaConfig:
    return LlamaConfig(**_decoder(tokenizer, shape, 2048))


def tiny_text(tokenizer: PreTrainedTokenizerFast, template: str, shape: TinyShape) -> TinyParts:
    """A Llama; the processing class is the tokenizer itself (its own chat template)."""
    return _llama(tokenizer, shape), LlamaForCausalLM, tokenizer


def tiny_llava(tokenizer: PreTrainedTokenizerFast, template: str, shape: TinyShape) -> TinyParts:
    """A CLIP tower under a Llama; (image_size / patch_size)^2 image tokens per image (CLS dropped)."""
    image_processor = CLIPImageProcessorPil(
        size={"height": shape.image_size, "width": shape.image_size},
        do_center_crop=False,
        image_mean=_MEAN,
        image_std=_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",  # drops CLS: grid**2 tokens per image
        num_additional_image_tokens=1,
        chat_template=template,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**shape.vision()),
        text_config=_llama(tokenizer, shape),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    return config, LlavaForConditionalGeneration, processor


def tiny_qwen2_vl(tokenizer: PreTrainedTokenizerFast, template: str, shape: TinyShape) -> TinyParts:
    """Qwen2-VL: patches merged 2x2, multimodal rotary positions; images only (no torchvision)."""
    merge = 2
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=shape.patch_size,
        merge_size=merge,
        temporal_patch_size=2,
        min_pixels=shape.image_size * shape.image_size,
        max_pixels=shape.image_size * shape.image_size,
        image_mean=_MEAN,
        image_std=_STD,
    )
    processor = Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=template)
    head_dim = shape.hidden_size // 4
    third = head_dim // 2 // 3
    # mrope splits the rotary half-dimension over (time, height, width): it must sum to head_dim / 2.
    mrope = [head_dim // 2 - 2 * third, third, third]
    config = Qwen2VLConfig(
        text_config=dict(
            _decoder(tokenizer, shape, 4096),
            rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=shape.num_layers,
            embed_dim=shape.hidden_size,
            hidden_size=shape.hidden_size,
            num_heads=4,
            patch_size=shape.patch_size,
            spatial_merge_size=merge,
            temporal_patch_size=2,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    return config, Qwen2VLForConditionalGeneration, processor


def tiny_idefics3(tokenizer: PreTrainedTokenizerFast, template: str, shape: TinyShape) -> TinyParts:
    """Idefics3 (SmolVLM's architecture) without image splitting; pixel shuffle 2."""
    scale = 2
    grid = shape.image_size // shape.patch_size
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": shape.image_size},
        max_image_size={"longest_edge": shape.image_size},
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
        vision_config=Idefics3VisionConfig(**shape.vision()),
        text_config=_llama(tokenizer, shape),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=scale,
        pad_token_id=tokenizer.pad_token_id,
    )
    return config, Idefics3ForConditionalGeneration, processor


def tiny_paligemma(tokenizer: PreTrainedTokenizerFast, template: str, shape: TinyShape) -> TinyParts:
    """A SigLIP tower under a Gemma, prefix-LM over the prompt; one image token per patch."""
    grid = shape.image_size // shape.patch_size
    image_processor = SiglipImageProcessorPil(
        size={"height": shape.image_size, "width": shape.image_size}, image_mean=_MEAN, image_std=_STD
    )
    image_processor.image_seq_length = grid * grid  # PaliGemmaProcessor reads it: one token per patch
    processor = PaliGemmaPreferenceProcessor(image_processor, tokenizer, chat_template=template)
    text = GemmaConfig(
        vocab_size=len(tokenizer),  # after the processor added its <loc>/<seg> tokens
        hidden_size=shape.hidden_size,
        intermediate_size=2 * shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=shape.hidden_size // 4,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**shape.vision()),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projection_dim=shape.hidden_size,
    )
    return config, PaliGemmaForConditionalGeneration, processor


def tiny_qwen2_audio(tokenizer: PreTrainedTokenizerFast, template: str, shape: TinyShape) -> TinyParts:
    """A Whisper-style encoder under a Qwen2; one audio token per 40 ms, clips cut at `shape.audio_seconds`."""
    feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=shape.audio_seconds)
    processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=template)
    frames = feature_extractor.nb_max_frames  # 100 mel frames per second
    config = Qwen2AudioConfig(
        audio_config=Qwen2AudioEncoderConfig(
            num_mel_bins=80,
            d_model=shape.hidden_size,
            encoder_layers=shape.num_layers,
            encoder_attention_heads=4,
            encoder_ffn_dim=2 * shape.hidden_size,
            max_source_positions=frames // 2,  # the encoder's stride-2 conv halves the frames
        ),
        text_config=Qwen2Config(**_decoder(tokenizer, shape, 4096)),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    return config, Qwen2AudioForConditionalGeneration, processor
