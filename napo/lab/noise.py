"""Label noise of the lab's preference rows, where the ground truth is known: pair labels, an erring annotator.

NaPO is built for the noise of automatically built pairs, not for uniformly flipped labels: an automatic
annotator picks `chosen`, and where the image (or the clip) is hard to read it sometimes picks a wrong answer — one the
language prior suggests, or a colour that looks alike. A "biased" negative may then be as good as chosen, or
better. `annotator_noise` makes that noise at a chosen rate ε; `napo.pairs.inject_label_noise` (uniform flips)
stays as the control. `label_pairs` tags every (row, negative) pair against the ground truth:

    clean     chosen is right, the negative wrong (the pair teaches what it should)
    tie       both right (a negative identical to a right chosen) or both wrong: neither answer is better
    inverted  chosen is wrong, the negative right (the pair teaches the opposite)

Rows need the lab's pair metadata (`napo.lab.vision.PAIR_METADATA`, `napo.lab.audio.PAIR_METADATA`): `answer`
(the truth), `prior_answer`, `kind`, the task's media-noise column (`image_noise`, `audio_noise`); and `chosen`
plus the negative columns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import numpy as np

from napo.config import NEGATIVE_TYPES
from napo.evaluate import normalize
from napo.lab.tasks import lab_task

PAIR_LABELS = ("clean", "tie", "inverted")
NOISE_KINDS = ("annotator", "flip")


def pair_label_column(negative: str) -> str:
    """The label column of a negative column: `pair_label_rejected`, `pair_label_language_bias`, ..."""
    return "pair_label_" + (NEGATIVE_TYPES[negative] or "rejected")


def pair_label(truth: str, chosen: str, negative: str | None) -> str | None:
    """clean / tie / inverted of one pair against the true answer (see the module docstring); None: no pair."""
    if negative is None:
        return None
    chosen_right, negative_right = normalize(chosen) == normalize(truth), normalize(negative) == normalize(truth)
    if chosen_right and not negative_right:
        return "clean"
    if negative_right and not chosen_right:
        return "inverted"
    return "tie"


def label_pairs(dataset: datasets.Dataset) -> datasets.Dataset:
    """`dataset` with a `pair_label_<type>` column for each negative column present (replacing any there)."""
    negatives = [c for c in NEGATIVE_TYPES if c in dataset.column_names]
    if "answer" not in dataset.column_names:
        raise ValueError(f"pair labels need the true `answer` column (columns: {dataset.column_names})")
    truth, chosen = dataset["answer"], dataset["chosen"]
    for negative in negatives:
        column = pair_label_column(negative)
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        labels = [pair_label(t, c, n) for t, c, n in zip(truth, chosen, dataset[negative])]
        dataset = dataset.add_column(column, labels, feature=datasets.Value("string"))
    return dataset


def annotator_noise(
    dataset: datasets.Dataset,
    rate: float,
    seed: int,
    recipe: dict[str, Any],
    *,
    task: str = "vision",
    prior_share: float = 0.5,
) -> tuple[datasets.Dataset, list[int]]:
    """An automatic annotator that chooses `chosen` and errs on round(rate · rows) rows, mostly on hard media.

    Which rows: drawn without replacement with probability ∝ the row's media noise, the task's `hardness` column
    (vision: `image_noise`, a row at pixel noise 0.4 is four times as likely to be misannotated as one at 0.1;
    audio: `audio_noise`, the noise-to-signal amplitude ratio). What the annotator says instead of the truth:
    - attribute questions (colour, note): with probability `prior_share` the prior answer (when the object has one
      and the truth is another), else the confusable answer (the task's `confusable`: the recipe colour nearest
      in RGB, the note nearest in pitch);
    - other questions: the prior answer (e.g. "yes", "one") when it differs from the truth, else the row's
      general `rejected` answer (a wrong answer of the question's kind).
    The negatives stay as generated; `noisy` marks the misannotated rows and the pair labels are recomputed.

    Args:
        dataset: the lab's pair rows (with the task's pair metadata: answer, prior_answer, kind, hardness).
        rate: ε, the annotator's error rate, in [0, 1].
        seed: seeds the rows chosen and the kind of each error.
        recipe: the lab recipe (what `confusable` reads: colours and their RGB, notes and their pitch).
        task: the lab task (`napo.lab.tasks.TASK_MODULES`) whose `hardness` and `confusable` apply.
        prior_share: the fraction of attribute errors that say the prior answer.

    Returns (the new dataset with `noisy` and `pair_label_*`, the sorted misannotated row indices).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"annotator error rate {rate}: expected a fraction in [0, 1]")
    spec = lab_task(task)
    missing = [c for c in ("answer", "prior_answer", "kind", spec.hardness, "chosen") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"annotator noise needs the lab's pair metadata; missing columns {missing}")
    rng = np.random.default_rng([seed, 1515])
    n = len(dataset)
    hardness = np.asarray(dataset[spec.hardness], dtype=float)
    weights = hardness if hardness.sum() > 0 else np.ones(n)
    count = round(rate * n)
    erred = sorted(rng.choice(n, size=count, replace=False, p=weights / weights.sum()).tolist()) if count else []
    chosen = list(dataset["chosen"])
    rejected = dataset["rejected"] if "rejected" in dataset.column_names else [None] * n
    for i in erred:
        row = {"answer": dataset[i]["answer"], "prior_answer": dataset[i]["prior_answer"], "kind": dataset[i]["kind"]}
        chosen[i] = annotator_error(row, rejected[i], recipe, rng, spec.confusable, prior_share)
    noisy = np.zeros(n, dtype=bool)
    noisy[erred] = True
    columns = dataset.column_names
    out = dataset.remove_columns([c for c in ("chosen", "noisy") if c in columns])
    out = out.add_column("chosen", chosen, feature=datasets.Value("string"))
    out = out.add_column("noisy", noisy.tolist(), feature=datasets.Value("bool"))
    order = [c for c in columns if c != "noisy"] + ["noisy"]
    return label_pairs(out.select_columns(order)), erred


def annotator_error(
    row: dict[str, Any],
    general_negative: str | None,
    recipe: dict[str, Any],
    rng: np.random.Generator,
    confusable: Callable[[dict[str, Any], str], str],
    prior_share: float = 0.5,
) -> str:
    """The wrong answer the annotator gives for one row (see `annotator_noise`); `confusable(recipe, truth)` is
    the task's look-alike of a true attribute answer."""
    truth, prior = row["answer"], row["prior_answer"]
    if row["kind"] == "attribute":
        if prior and prior != truth and rng.random() < prior_share:
            return prior
        return confusable(recipe, truth)
    if prior and prior != truth:
        return prior
    if general_negative is None or general_negative == truth:
        raise ValueError(f"no wrong answer to give for a {row['kind']} row answered {truth!r}")
    return general_negative
