"""Models: the loading path for users' models (`loading`) and tiny offline ones for tests and the bias lab (`tiny`,
with its `tokenizer` and napo's own `processors`).

Everything is re-exported here, so `from napo.models import load_model, build_tiny_model` keeps working.
"""

from napo.models.loading import is_audio_model, is_vision_model, load_model
from napo.models.processors import PaliGemmaPreferenceProcessor, Qwen2VLImageOnlyProcessor
from napo.models.tiny import FAMILIES, build_tiny_model
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
