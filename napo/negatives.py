"""The kinds of negative a preference row can carry: one record each, read by config, trainer, pairs, formats and data.

A row holds `chosen` and one answer per kind of negative (None where it lacks one):

    rejected                the original negative of the source dataset
    rejected_language_bias  the answer made without the image/audio (the language prior speaks)
    rejected_vision_bias    the answer made from the image without the question
    rejected_audio_bias     the answer made from the audio without the question

Adding a kind of negative is one record in `NEGATIVES` plus its `weight_<name>`, `alpha_<name>` and `margin_<name>`
fields in `NaPOConfig` (dataclass fields must be declared there for the command line; their defaults come from here,
and `NaPOConfig` refuses a record without its fields).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NegativeType:
    """One kind of negative.

    column: the dataset column, `rejected` or `rejected_<name>`.
    name: the short name: the prefix of its logged metrics (`language_bias/rewards/margins`; none for `rejected`,
        whose metrics keep TRL's names) and the suffix of its `NaPOConfig` fields (`weight_language_bias`).
    weight: the default fixed γ (weights='fixed'); the released code uses 0.02 / 0.49 / 0.49.
    alpha: the default α of its adaptive q (the paper: 0.5 with per-token margins, 0.01 with summed ones).
    margin: the default margin ψ feeding q: 'mean' (log-ratios per completion token) or 'sum'.
    image_spec, audio_spec: the `perturb` spec `napo pairs` degrades image / audio rows with to generate it by
        default, or None when it is not generated from such rows.
    """

    column: str
    name: str
    weight: float
    alpha: float
    margin: str
    image_spec: str | None = None
    audio_spec: str | None = None

    @property
    def metric_prefix(self) -> str:
        """'' for `rejected` (TRL's metric names), else '<name>/'."""
        return "" if self.column == "rejected" else f"{self.name}/"


NEGATIVES: tuple[NegativeType, ...] = (
    NegativeType("rejected", "rejected", weight=0.02, alpha=0.5, margin="mean"),
    NegativeType(
        "rejected_language_bias",
        "language_bias",
        weight=0.49,
        alpha=0.5,
        margin="mean",
        image_spec="image.drop",
        audio_spec="audio.drop",
    ),
    NegativeType(
        "rejected_vision_bias", "vision_bias", weight=0.49, alpha=0.01, margin="sum", image_spec="text.drop_question"
    ),
    NegativeType(
        "rejected_audio_bias",
        "audio_bias",
        weight=0.49,
        alpha=0.01,
        margin="sum",
        audio_spec="text.drop_question(prompt='Describe the audio.')",
    ),
)
# The negative columns, in the order datasets, batches and metrics list them.
NEGATIVE_COLUMNS: tuple[str, ...] = tuple(t.column for t in NEGATIVES)
NEGATIVE_BY_COLUMN: dict[str, NegativeType] = {t.column: t for t in NEGATIVES}
# The default negatives `napo pairs` generates: column -> perturbation spec, for image and for audio rows.
IMAGE_NEGATIVES: dict[str, str] = {t.column: t.image_spec for t in NEGATIVES if t.image_spec}
AUDIO_NEGATIVES: dict[str, str] = {t.column: t.audio_spec for t in NEGATIVES if t.audio_spec}


def negative_type(column: str) -> NegativeType:
    """The record of a negative column; ValueError naming the known columns otherwise."""
    try:
        return NEGATIVE_BY_COLUMN[column]
    except KeyError:
        raise ValueError(f"{column!r} is not a negative column: expected one of {list(NEGATIVE_COLUMNS)}") from None
