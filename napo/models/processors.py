"""napo's own processor classes for tiny models: Qwen2-VL without torchvision, PaliGemma that encodes answers alone."""

from __future__ import annotations

import copy

import torch
from transformers import (
    BatchEncoding,
    BatchFeature,
    PaliGemmaProcessor,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


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
NAPO_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    cls.__name__: cls for cls in (Qwen2VLImageOnlyProcessor, PaliGemmaPreferenceProcessor)
}
