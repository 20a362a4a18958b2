"""The loading path for users' models, with its safety rules: safetensors only unless pickle is allowed, no network
for a local directory, remote code only when asked."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMultimodalLM,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from napo.models.processors import NAPO_PROCESSORS


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
        processor_class = NAPO_PROCESSORS.get(saved_class, processor_class)
    processing_class = processor_class.from_pretrained(path, **common)
    return model.eval(), processing_class
