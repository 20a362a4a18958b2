"""Models: the loading path for users' models (`loading`, with its safety rules), the family registry (`families`:
one record per family, looked up by name or `model_type`) and tiny offline models for tests and the bias lab
(`tiny`, with its `tokenizer` and napo's own `processors`).

Everything is re-exported here, so `from napo.models import load_model, build_tiny_model` keeps working.
"""

from napo.models.families import (
    FAMILIES,
    FAMILY_RECORDS,
    MEDIA_FEATURES,
    PER_TOKEN_INPUTS,
    PROCESSOR_ONLY_OUTPUTS,
    Family,
    PerTokenInput,
    build_tiny_model,
    family_of,
    family_record,
    media_projector,
    media_tower,
    rope_index_function,
    unwrap_peft,
)
from napo.models.loading import is_audio_model, is_vision_model, load_model
from napo.models.processors import PaliGemmaPreferenceProcessor, Qwen2VLImageOnlyProcessor
from napo.models.tokenizer import (
    AUDIO_TOKEN,
    DEFAULT_WORDS,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    build_tokenizer,
    chat_template,
)

__all__ = [
    "AUDIO_TOKEN",
    "DEFAULT_WORDS",
    "FAMILIES",
    "FAMILY_RECORDS",
    "IMAGE_TOKEN",
    "MEDIA_FEATURES",
    "PER_TOKEN_INPUTS",
    "PROCESSOR_ONLY_OUTPUTS",
    "SPECIAL_TOKENS",
    "Family",
    "PaliGemmaPreferenceProcessor",
    "PerTokenInput",
    "Qwen2VLImageOnlyProcessor",
    "build_tiny_model",
    "build_tokenizer",
    "chat_template",
    "family_of",
    "family_record",
    "is_audio_model",
    "is_vision_model",
    "load_model",
    "media_projector",
    "media_tower",
    "rope_index_function",
    "unwrap_peft",
]
