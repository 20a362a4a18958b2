"""Models: tiny offline ones for tests and the bias lab, and the loading path for users' models.

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
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMultimodalLM,
    AutoProcessor,
    AutoTokenizer,
    BatchEncoding,
    BatchFeature,
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
    PaliGemmaProcessor,
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
    Qwen2VLProcessor,
    SiglipVisionConfig,
    WhisperFeatureExtractor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

FAMILIES: tuple[str, ...] = ("text", "llava", "qwen2_vl", "idefics3", "paligemma", "qwen2_audio")

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
IMAGE_TOKEN, AUDIO_TOKEN = "<image>", "<audio>"
# Placeholders the processors of the families look up by name; all are single special tokens.
FAMILY_TOKENS = (
    IMAGE_TOKEN,
    AUDIO_TOKEN,
    "<fake_token_around_image>",  # idefics3
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
    "<|vision_start|>",  # qwen2_vl
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_end|>",
    "<|AUDIO|>",  # qwen2_audio
    "<|audio_bos|>",
    "<|audio_eos|>",
)
# <unk> first, so no id that code tests for truth (`pad_token_id or eos_token_id` in TRL) is 0.
SPECIAL_TOKENS: tuple[str, ...] = (UNK, PAD, BOS, EOS, *ROLE_TOKENS, *FAMILY_TOKENS)

# Words of the built-in bias lab and of the tests: colours, objects, counts, question words.
DEFAULT_WORDS: tuple[str, ...] = tuple(
    """
    red orange yellow green blue purple pink brown black white gray grey
    banana apple lemon tomato carrot leaf sky grass snow bear polar cat cats dog dogs car cars bird
    fish frog ball box circle square triangle star shape object objects
    zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10
    yes no a an the of in on is are what which how many there this that it its color colour image
    picture photo describe answer with word question sound audio hear do you see please
    . , ? ! : ' -
    """.split()
)

# Which placeholder each family's processor expands; the tokenizer's own template uses the generic ones.
_PLACEHOLDERS: dict[str, tuple[str, str]] = {
    "text": (IMAGE_TOKEN, AUDIO_TOKEN),
    "llava": (IMAGE_TOKEN, AUDIO_TOKEN),
    "qwen2_vl": ("<|vision_start|><|image_pad|><|vision_end|>", AUDIO_TOKEN),
    "idefics3": (IMAGE_TOKEN, AUDIO_TOKEN),
    "paligemma": (IMAGE_TOKEN, AUDIO_TOKEN),
    "qwen2_audio": (IMAGE_TOKEN, "<|audio_bos|><|AUDIO|><|audio_eos|>"),
}


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor, which needs torchvision.

    Images behave exactly as with ``Qwen2VLProcessor``; videos are not supported. ``save_pretrained``
    records this class and :func:`load_model` loads it back.
    """

    def __init__(
        self,
        image_processor: Qwen2VLImageProcessorPil | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        **kwargs: object,
    ) -> None:
        # ProcessorMixin takes its sub-processors from this signature: no video_processor here.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class PaliGemmaPreferenceProcessor(PaliGemmaProcessor):
    """PaliGemma's processor that also encodes text alone, as answer (suffix) tokens.

    TRL's ``DataCollatorForVisionPreference`` encodes prompts with images, then chosen and
    rejected answers as text only, and concatenates the ``token_type_ids``. PaliGemma's own
    processor refuses text without images; and type 0 on answer tokens would put them in the
    bidirectional prefix, so each answer token would see the ones after it. Here text alone gets
    type 1 (causal suffix), which is what PaliGemma was trained with.
    """

    def __call__(
        self,
        images: object = None,
        text: str | list[str] | None = None,
        suffix: str | list[str] | None = None,
        **kwargs: object,
    ) -> BatchFeature | BatchEncoding:
        if images is not None or text is None or suffix is not None:
            return super().__call__(images=images, text=text, suffix=suffix, **kwargs)
        encoded = self.tokenizer(text, **kwargs)
        mask = encoded["attention_mask"]
        encoded["token_type_ids"] = mask.clone() if isinstance(mask, torch.Tensor) else copy.deepcopy(mask)
        return encoded


# Processor classes of napo's own, which AutoProcessor does not know by name.
_NAPO_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    cls.__name__: cls for cls in (Qwen2VLImageOnlyProcessor, PaliGemmaPreferenceProcessor)
}


def chat_template(image_placeholder: str = IMAGE_TOKEN, audio_placeholder: str = AUDIO_TOKEN) -> str:
    """A jinja chat template for TRL-style messages (content: a str or a list of typed parts).

    Renders ``<bos>`` once, then per turn ``<|role|>`` + content + ``<eos>``; with
    ``add_generation_prompt`` it ends with ``<|assistant|>``. Every structural piece is a special
    token, so the rendered prompt tokenizes to an exact prefix of prompt + answer, and the answer
    alone (what TRL cuts off after the prompt) tokenizes to the answer's tokens + ``<eos>``.
    """
    part = (
        "{%- if part['type'] == 'image' -%}"
        + image_placeholder
        + "{%- elif part['type'] == 'audio' -%}"
        + audio_placeholder
        + "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    )
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|' + message['role'] + '|>' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}" + part + "{%- endfor -%}{%- endif -%}"
        "{{- eos_token -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
    )


def build_tokenizer(
    words: Iterable[str] = (), *, corpus: Iterable[str] = (), kind: str = "word"
) -> PreTrainedTokenizerFast:
    """Train a small tokenizer in memory, with every family's placeholders as special tokens.

    Args:
        words: ``kind="word"``: words that become single tokens, lower-cased; ``kind="bpe"``:
            more training text.
        corpus: texts. ``kind="word"`` adds every word of them (split on whitespace and on each
            punctuation character, lower-cased); ``kind="bpe"`` trains the merges on them.
        kind: ``"word"``: a WordLevel vocabulary, lower-casing its input, unknown words -> ``<unk>``,
            decoded space-joined ("two cats"; punctuation attached: "yes."). ``"bpe"``: byte-level
            BPE (256 bytes, the special tokens and the corpus' merges, at most 1000 tokens), case
            kept, nothing unknown.

    Returns:
        A fast tokenizer with ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>``, the role tokens, the
        placeholders of ``SPECIAL_TOKENS`` and the chat template of :func:`chat_template`; it pads
        on the left. No special token is added on ``encode``: the chat template writes ``<bos>``.
    """
    corpus = list(corpus)
    if kind == "word":
        pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
        vocab_words = {w.lower() for w in words}
        for text in corpus:
            vocab_words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        for word in sorted(vocab_words - set(vocab)):
            vocab[word] = len(vocab)
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre
        # The WordPiece decoder joins with spaces and glues punctuation back ("yes ." -> "yes.").
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1000,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([*corpus, *words], trainer=trainer)
    else:
        raise ValueError(f"kind={kind!r}: expected 'word' or 'bpe'")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, UNK, BOS, EOS)],
        model_input_names=["input_ids", "attention_mask"],
        chat_template=chat_template(),
        padding_side="left",
    )


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


def is_vision_model(model: PreTrainedModel) -> bool:
    """True when the model takes images (its config has a ``vision_config``)."""
    return getattr(model.config, "vision_config", None) is not None


def is_audio_model(model: PreTrainedModel) -> bool:
    """True when the model takes audio (its config has an ``audio_config``)."""
    return getattr(model.config, "audio_config", None) is not None


def load_model(
    path: str,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | ProcessorMixin]:
    """Load a user's model and its processing class from a Hugging Face id or a local directory.

    Args:
        path: a hub id or a directory written by ``save_pretrained``. A local directory is read
            without any network access.
        trust_remote_code: passed to transformers; only set it for code you have read.
        allow_pickle: also accept ``pytorch_model.bin`` (pickle can run arbitrary code on load);
            by default only safetensors weights are loaded.
        dtype: e.g. ``torch.bfloat16`` or ``"auto"``; ``None`` keeps transformers' default (fp32).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, or ``"xformers"`` (napo's adapter,
            ``napo.attention``: CUDA and the ``gpu`` extra); ``None`` keeps transformers' default (sdpa).

    Returns:
        ``(model, processing_class)``: ``AutoProcessor`` for models with a vision or audio
        config, else ``AutoTokenizer``. The model is in eval mode.

    Raises:
        ValueError: the directory holds only pickled weights and ``allow_pickle`` is False.
    """
    local = Path(path).is_dir()
    pickle_hint = (
        "Pickled weights can run arbitrary code when loaded: load them only from a source you trust, "
        "with load_model(..., allow_pickle=True) or the --allow-pickle option of napo train, pairs and eval; "
        "better, convert them once to safetensors."
    )
    if local and not allow_pickle and not any(Path(path).glob("*.safetensors")) and any(Path(path).glob("*.bin")):
        raise ValueError(f"{path} holds only pickled weights (*.bin). {pickle_hint}")
    common = dict(trust_remote_code=trust_remote_code, local_files_only=local)
    config = AutoConfig.from_pretrained(path, **common)
    multimodal = any(getattr(config, key, None) is not None for key in ("vision_config", "audio_config"))
    # AutoModelForMultimodalLM maps both image-text-to-text and audio-text-to-text models.
    model_class = AutoModelForMultimodalLM if multimodal else AutoModelForCausalLM
    # use_safetensors=None: safetensors when present, else pickled weights.
    use_safetensors = None if allow_pickle else True
    if attn_implementation == "xformers":
        from napo.attention import register_xformers_attention

        register_xformers_attention()
    try:
        model = model_class.from_pretrained(
            path,
            config=config,
            use_safetensors=use_safetensors,
            dtype=dtype,
            attn_implementation=attn_implementation,
            **common,
        )
    except OSError as error:  # a hub repository without safetensors weights
        if allow_pickle or "safetensors" not in str(error):
            raise
        raise ValueError(f"{path} has no safetensors weights. {pickle_hint}") from error
    processor_class: type = AutoProcessor if multimodal else AutoTokenizer
    processor_config = Path(path, "processor_config.json")
    if local and processor_config.is_file():
        # napo's own processor classes (tiny models) are unknown to AutoProcessor.
        saved_class = json.loads(processor_config.read_text()).get("processor_class")
        processor_class = _NAPO_PROCESSORS.get(saved_class, processor_class)
    processing_class = processor_class.from_pretrained(path, **common)
    return model.eval(), processing_class


__all__ = [
    "AUDIO_TOKEN",
    "DEFAULT_WORDS",
    "FAMILIES",
    "IMAGE_TOKEN",
    "SPECIAL_TOKENS",
    "PaliGemmaPreferenceProcessor",
    "Qwen2VLImageOnlyProcessor",
    "build_tiny_model",
    "build_tokenizer",
    "chat_template",
    "is_audio_model",
    "is_vision_model",
    "load_model",
]
