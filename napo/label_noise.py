"""Uniform label noise: flip the preference of a chosen fraction of a preference dataset's rows.

`napo pairs --inject_label_noise` and `napo compare`'s "flip" noise use it; `napo.lab.noise` has the erring
annotator, whose errors depend on the row.
"""

from __future__ import annotations

import datasets
import numpy as np

from napo.negatives import NEGATIVE_COLUMNS


def inject_label_noise(
    dataset: datasets.Dataset, rate: float, seed: int, negatives: list[str] | None = None
) -> tuple[datasets.Dataset, list[int]]:
    """Flip the preference of round(rate * rows) rows, the same rows for every negative column; add bool `noisy`.

    A row has one `chosen` for all its negatives, so a flipped row gets chosen := its first non-None negative
    (in the order of `negatives`) and every non-None negative := the original chosen: each of its pairs then
    prefers a biased answer over the reference one. With one negative column this is a plain swap. Precomputed
    reference log-probs (`ref_chosen_logps`, `ref_<column>_logps`), where present, move with their answers.

    Args:
        rate: fraction of rows to flip, in [0, 1].
        seed: the flipped rows are `numpy.random.default_rng(seed).choice(rows, count, replace=False)`.
        negatives: the rejected columns to flip; None: every column of NEGATIVE_COLUMNS present.

    Returns:
        `(dataset, flipped)`: a new dataset (same columns in the same order, plus `noisy`) and the sorted
        indices of the flipped rows.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"label noise rate {rate}: expected a fraction in [0, 1]")
    final = dataset
    negatives = negatives if negatives is not None else [c for c in NEGATIVE_COLUMNS if c in final.column_names]
    if not negatives:
        raise ValueError(f"no rejected column to flip (columns: {final.column_names})")
    count = round(rate * len(final))
    flipped = sorted(np.random.default_rng(seed).choice(len(final), size=count, replace=False).tolist())
    answers = ("chosen", *negatives)
    # Each layer maps an answer column to a column that moves with it: the texts, then (when the dataset carries
    # them) their reference log-probs, so that a shared precomputed reference stays right after the flip.
    layers = [{name: name for name in answers}]
    refs = {name: f"ref_{name}_logps" for name in answers if f"ref_{name}_logps" in final.column_names}
    if refs and len(refs) < len(answers):
        raise ValueError(f"reference log-prob columns {sorted(refs.values())} cover only some of {list(answers)}")
    layers += [refs] if refs else []
    features = {column: final.features[column] for layer in layers[1:] for column in layer.values()}
    columns = {column: list(final[column]) for layer in layers for column in layer.values()}
    for i in flipped:
        present = [name for name in negatives if columns[name][i] is not None]
        for layer in layers:
            original = columns[layer["chosen"]][i]
            columns[layer["chosen"]][i] = columns[layer[present[0]]][i]
            for name in present:
                columns[layer[name]][i] = original
    noisy = np.zeros(len(final), dtype=bool)
    noisy[flipped] = True
    order = final.column_names
    final = final.remove_columns(list(columns))
    for name, values in columns.items():
        final = final.add_column(name, values, feature=features.get(name, datasets.Value("string")))
    final = final.add_column("noisy", noisy.tolist(), feature=datasets.Value("bool"))
    return final.select_columns([*order, "noisy"]), flipped
