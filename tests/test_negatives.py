"""The registry of negative columns (`napo.negatives`): every module that handles negatives reads it."""

import dataclasses

import datasets
import pytest

from napo import config, negatives
from napo.config import NaPOConfig
from napo.data import validate_preference_dataset
from napo.negatives import NEGATIVES, NegativeType, negative_type
from napo.pairs import AUDIO_NEGATIVES, VISION_NEGATIVES, _resolve_negatives


@pytest.mark.parametrize("record", NEGATIVES, ids=lambda t: t.column)
def test_every_registered_negative_is_read_by_data_config_and_pairs(record: NegativeType) -> None:
    rows = datasets.Dataset.from_list([{"prompt": "what colour is the cat?", "chosen": "black", record.column: "red"}])
    assert validate_preference_dataset(rows) == [record.column]
    settings = NaPOConfig(output_dir="unused", report_to="none").negative_type_settings(record.column)
    assert settings == (record.weight, record.alpha, record.margin)
    if record.image_spec:
        source = datasets.Dataset.from_list([{"prompt": "what colour is the cat?", "chosen": "black"}])
        assert _resolve_negatives(None, source)[record.column] == record.image_spec
    assert (record.column in VISION_NEGATIVES) == bool(record.image_spec)
    assert (record.column in AUDIO_NEGATIVES) == bool(record.audio_spec)


def test_the_released_defaults():
    """The weights and margins of the authors' released runs (fixed 0.02 / 0.49 / 0.49; α 0.5 with per-token margins
    for language-biased negatives, 0.01 with summed ones for vision-biased ones)."""
    by_name = {t.name: (t.weight, t.alpha, t.margin) for t in NEGATIVES}
    assert by_name["rejected"][0] == 0.02
    assert by_name["language_bias"] == (0.49, 0.5, "mean")
    assert by_name["vision_bias"] == (0.49, 0.01, "sum")
    assert [t.metric_prefix for t in NEGATIVES] == ["", "language_bias/", "vision_bias/", "audio_bias/"]


def test_a_record_without_config_fields_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = NegativeType("rejected_tone_bias", "tone_bias", weight=0.1, alpha=0.5, margin="mean")
    monkeypatch.setattr(config, "NEGATIVE_BY_COLUMN", {**negatives.NEGATIVE_BY_COLUMN, extra.column: extra})
    monkeypatch.setattr(negatives, "NEGATIVE_BY_COLUMN", {**negatives.NEGATIVE_BY_COLUMN, extra.column: extra})
    with pytest.raises(TypeError, match=r"rejected_tone_bias.*\['weight_tone_bias', 'alpha_tone_bias'"):
        NaPOConfig(output_dir="unused", report_to="none")


def test_unknown_negative_column_is_named():
    with pytest.raises(ValueError, match="'rejected_colour' is not a negative column: expected one of"):
        negative_type("rejected_colour")
    assert dataclasses.is_dataclass(negative_type("rejected"))
