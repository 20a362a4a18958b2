"""Bias and hallucination metrics: pure functions on answers, captions and log-probabilities, and
the model-running part that produces their inputs.

The pure functions (`accuracy` ... `modality_shapley`) run no model: they take plain lists or
arrays and raise ValueError on empty input or on inputs of different lengths. The model-running
functions (`answer_log_probs`, `preference_log_probs`, `modality_metrics`) answer and score samples
(preference-row-shaped dicts: "prompt", "images") with a model and its processing class, encoded by
`napo.encoding` and scored by `napo.scoring` as the trainer encodes and scores them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

import perturb
from napo.collators import preference_collator
from napo.encoding import answer_batch, has_media, to_model, tokenize_text_dataset, with_row_index
from napo.inference import generate
from napo.rows import prepare_preference_dataset, validate_preference_dataset
from napo.scoring import answer_table, sequence_logps

_TRAILING_PUNCTUATION = ".,!?;:"
_YES_NO = re.compile(r"^(yes|no)\b")
_WORD = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> str:
    """Lowercase, strip surrounding whitespace and trailing punctuation, collapse inner whitespace.

    "  Yellow. " -> "yellow"; "A  red cat!" -> "a red cat".
    """
    return " ".join(text.lower().split()).rstrip(_TRAILING_PUNCTUATION).rstrip()


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of rows where normalize(prediction) == normalize(answer); in [0, 1]."""
    _check_pairs("accuracy", predictions, answers)
    return _match_rate(predictions, answers)


def prior_following_rate(predictions: Sequence[str], prior_answers: Sequence[str]) -> float:
    """Fraction of rows answered with the language prior's answer instead of what the image shows.

    Meant for counterfactual rows, where the image contradicts the prior (a purple banana, prior
    "yellow"); 1 means the model never looks at the image. Every prior answer must be a string.
    """
    _check_pairs("prior_following_rate", predictions, prior_answers)
    for i, p in enumerate(prior_answers):
        if not isinstance(p, str):
            raise ValueError(
                f"prior_following_rate: prior_answers[{i}] is {p!r}; keep only rows whose prior answer is known "
                "(e.g. the counterfactual split)"
            )
    return _match_rate(predictions, prior_answers)


def metrics_per_noise_level(
    metric: str, rows: Sequence[dict[str, Any]], answers: Sequence[str], *, level: str
) -> dict[str, float]:
    """`metric@noise<level>`: accuracy of `answers` on the rows of each value of the rows' `level` field (a lab
    row's media-noise level, e.g. "image_noise"), and for counterfactual_accuracy also
    `prior_following_rate@noise<level>` (the rows' `prior_answer`s)."""
    out = {}
    for value in sorted({r[level] for r in rows}):
        at = [i for i, r in enumerate(rows) if r[level] == value]
        out[f"{metric}@noise{value:g}"] = accuracy([answers[i] for i in at], [rows[i]["answer"] for i in at])
        if metric == "counterfactual_accuracy":
            out[f"prior_following_rate@noise{value:g}"] = prior_following_rate(
                [answers[i] for i in at], [rows[i]["prior_answer"] for i in at]
            )
    return out


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    """Fraction of rows where two answer lists agree after normalize; in [0, 1].

    Blind agreement = agreement(answers_with_image, answers_without_image): high means the image
    barely changes the answer (language bias). Question-blind agreement is the same with the
    question removed instead (vision bias).
    """
    _check_pairs("agreement", a, b)
    return _match_rate(a, b)


def pope_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE yes/no metrics with "yes" (the object is present) as the positive class.

    A prediction counts as "yes" / "no" when its normalized text starts with that word ("Yes, there
    is." is "yes"). A prediction that starts with neither is never a "yes": it is a missed positive
    when the answer is "yes" and a wrong answer (not a true negative) when the answer is "no", so it
    lowers accuracy and recall but not precision. Every answer must start with yes or no.

    Returns accuracy, precision = TP/(TP+FP), recall = TP/(TP+FN), f1, yes_ratio (fraction of
    predictions that are "yes") and unparsed_ratio (fraction starting with neither word), all in
    [0, 1]; precision is 0 when there is no "yes" prediction, f1 is 0 when precision + recall is 0.
    """
    _check_pairs("pope_metrics", predictions, answers)
    labels = []
    for i, a in enumerate(answers):
        m = _YES_NO.match(normalize(a))
        if m is None:
            raise ValueError(
                f"pope_metrics: answers[{i}] is {a!r}; POPE reference answers must start with 'yes' or 'no'"
            )
        labels.append(m.group(1))
    preds = [m.group(1) if (m := _YES_NO.match(normalize(p))) else None for p in predictions]
    tp = sum(p == "yes" and a == "yes" for p, a in zip(preds, labels))
    fp = sum(p == "yes" and a == "no" for p, a in zip(preds, labels))
    tn = sum(p == "no" and a == "no" for p, a in zip(preds, labels))
    fn = sum(p != "yes" and a == "yes" for p, a in zip(preds, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        "unparsed_ratio": sum(p is None for p in preds) / n,
    }


def chair(
    captions: Sequence[str],
    objects_present: Sequence[Sequence[str]],
    vocabulary: Sequence[str],
    synonyms: dict[str, str] | None = None,
) -> dict[str, float | list[list[str]]]:
    """CHAIR object-hallucination rates of captions (Rohrbach et al. 2018, arXiv:1809.02156).

    An object mention is a word or phrase of the caption that is in `vocabulary` or is a key of
    `synonyms` (mapped to its canonical object, e.g. {"bananas": "banana", "kitten": "cat"});
    longer phrases win ("hot dog" before "dog"). Matching is on lowercase words. A mentioned object
    is hallucinated when it is not among that caption's `objects_present` (also mapped through
    `synonyms`). An object mentioned several times in one caption counts once.

    Returns chair_s = captions with >= 1 hallucinated object / captions, chair_i = hallucinated
    objects / mentioned objects (summed over captions; 0 when nothing is mentioned), and
    hallucinated: per caption, the hallucinated canonical objects in order of first mention.
    """
    _check_pairs("chair", captions, objects_present)
    synonyms = {k.lower(): v.lower() for k, v in (synonyms or {}).items()}
    canonical = {v.lower() for v in vocabulary}
    for phrase, target in synonyms.items():
        if target not in canonical:
            raise ValueError(
                f"chair: synonyms[{phrase!r}] = {target!r} is not in the vocabulary; map synonyms onto vocabulary "
                "objects"
            )
    phrases = {tuple(_WORD.findall(v)): v for v in canonical} | {
        tuple(_WORD.findall(k)): v for k, v in synonyms.items()
    }
    longest = max(len(p) for p in phrases)
    hallucinated: list[list[str]] = []
    n_mentioned = 0
    for caption, present in zip(captions, objects_present):
        present_set = {synonyms.get(o.lower(), o.lower()) for o in present}
        tokens = _WORD.findall(caption.lower())
        mentioned: list[str] = []
        i = 0
        while i < len(tokens):
            for length in range(min(longest, len(tokens) - i), 0, -1):
                obj = phrases.get(tuple(tokens[i : i + length]))
                if obj is not None:
                    if obj not in mentioned:
                        mentioned.append(obj)
                    i += length
                    break
            else:
                i += 1
        n_mentioned += len(mentioned)
        hallucinated.append([o for o in mentioned if o not in present_set])
    n_hallucinated = sum(len(h) for h in hallucinated)
    return {
        "chair_s": sum(bool(h) for h in hallucinated) / len(captions),
        "chair_i": n_hallucinated / n_mentioned if n_mentioned else 0.0,
        "hallucinated": hallucinated,
    }


def modality_shapley(
    v_full: np.ndarray, v_no_image: np.ndarray, v_no_text: np.ndarray, v_none: np.ndarray
) -> dict[str, np.ndarray | float]:
    """Exact two-player Shapley values of the image and the text for each sample.

    Inputs: shape (n,), the value v of the reference answer (e.g. its log-probability in nats)
    with both modalities, without the image, without the text (question), and without either.

        phi_image = 0.5 * [(v_full - v_no_image) + (v_no_text - v_none)]
        phi_text  = 0.5 * [(v_full - v_no_text) + (v_no_image - v_none)]

    so phi_image + phi_text = v_full - v_none (efficiency). image_share = |phi_image| /
    (|phi_image| + |phi_text|) in [0, 1], defined as 0.5 when both are 0 (neither modality matters,
    so neither dominates). Returns the per-sample arrays phi_image, phi_text, image_share (shape
    (n,)) and their means phi_image_mean, phi_text_mean, image_share_mean (floats).
    """
    arrays = [np.asarray(v, dtype=np.float64) for v in (v_full, v_no_image, v_no_text, v_none)]
    names = ("v_full", "v_no_image", "v_no_text", "v_none")
    for name, arr in zip(names, arrays):
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(
                f"modality_shapley: {name} has shape {arr.shape}; expected a non-empty 1-D array (one value per sample)"
            )
        if arr.shape != arrays[0].shape:
            raise ValueError(
                f"modality_shapley: {name} has shape {arr.shape} but v_full has {arrays[0].shape}; pass one value "
                "per sample for all four"
            )
    full, no_image, no_text, none = arrays
    phi_image = 0.5 * ((full - no_image) + (no_text - none))
    phi_text = 0.5 * ((full - no_text) + (no_image - none))
    total = np.abs(phi_image) + np.abs(phi_text)
    image_share = np.divide(np.abs(phi_image), total, out=np.full_like(total, 0.5), where=total > 0)
    return {
        "phi_image": phi_image,
        "phi_text": phi_text,
        "image_share": image_share,
        "phi_image_mean": float(phi_image.mean()),
        "phi_text_mean": float(phi_text.mean()),
        "image_share_mean": float(image_share.mean()),
    }


def _check_pairs(fn: str, a: Sequence, b: Sequence) -> None:
    """Raise ValueError unless a and b are non-empty and of equal length."""
    if len(a) == 0:
        raise ValueError(f"{fn}: empty input; pass at least one row")
    if len(a) != len(b):
        raise ValueError(f"{fn}: {len(a)} predictions but {len(b)} references; pass one reference per prediction")


def _match_rate(a: Sequence[str], b: Sequence[str]) -> float:
    """Fraction of rows where the normalized strings are equal."""
    return sum(normalize(x) == normalize(y) for x, y in zip(a, b)) / len(a)


# ---------------------------------------------------------------------------------------------
# running a model


@torch.inference_mode()
def answer_log_probs(
    model: PreTrainedModel,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    samples: Sequence[dict],
    answers: Sequence[str],
    *,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """log π(answer | sample) in nats: the sum of the log-probabilities of the answer's tokens and
    of the EOS that ends it (what the preference trainer scores), under the full sample; encoded by
    `napo.encoding.answer_batch` and scored by `napo.scoring.sequence_logps`, as in training.

    Samples with and without images (or audios) may be mixed; they are batched separately. Shape (n,), float64.
    `on_batch` is called with the number of samples of each scored batch (progress bars).
    """
    _check_pairs("answer_log_probs", samples, answers)
    out = np.zeros(len(samples), dtype=np.float64)
    groups: dict[tuple[bool, bool], list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault((bool(sample.get("images")), bool(sample.get("audios"))), []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            inputs, answer_mask = answer_batch(
                processing_class, [samples[i] for i in chunk], [answers[i] for i in chunk]
            )
            batch = to_model({**inputs, "completion_mask": answer_mask}, model)
            # The trainer's scoring (`napo.scoring`), from the logits: this model has no fused LM head.
            out[chunk] = sequence_logps(model, batch, fused_lm_head=False).double().cpu().numpy()
            if on_batch is not None:
                on_batch(len(chunk))
    return out


@torch.inference_mode()
def preference_log_probs(
    model: PreTrainedModel,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    dataset: Dataset,
    *,
    reference: PreTrainedModel | None = None,
    batch_size: int = 32,
    max_length: int | None = 1024,
) -> tuple[np.ndarray, Dataset, tuple[str, ...]]:
    """log π(y|x) of every answer of a preference dataset, or with `reference` the log-ratio
    log π(y|x) − log π_ref(y|x), in nats, without building a trainer: rows are encoded by the trainer's collator
    (`napo.collators.preference_collator`, text rows tokenized by `napo.encoding.tokenize_text_dataset`) and scored by
    `napo.scoring.sequence_logps`, so the numbers are `NaPOTrainer.log_prob_table`'s (padded layout) for a trainer
    with this `max_length` (NaPOConfig's default: 1024). The models are not modified (no fused LM head is installed).

    Returns (table, scored, negative_columns): table float32 (len(scored), 1 + K), column 0 the chosen answer,
    column k the k-th negative column, NaN where a row lacks it; `scored` the rows scored (text rows whose prompt
    fills `max_length` dropped, with a warning), with a `row_index` column (their position in `dataset`).
    """
    dataset = with_row_index(prepare_preference_dataset(dataset))
    columns = tuple(validate_preference_dataset(dataset))
    multimodal = has_media(dataset[0])
    if not multimodal:
        dataset = tokenize_text_dataset(
            dataset, processing_class, ("chosen", *columns), max_length=max_length, name="scored"
        )
    collator = preference_collator(processing_class, columns, multimodal=multimodal, max_length=max_length)

    def score(batch: dict) -> torch.Tensor:
        logps = sequence_logps(model, to_model(batch, model), fused_lm_head=False)
        if reference is not None:
            logps = logps - sequence_logps(reference, to_model(batch, reference), fused_lm_head=False).to(logps)
        return logps

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)
    return answer_table(loader, score, len(dataset), 1 + len(columns)), dataset, columns


MODALITY_PASSES = 7  # model passes of `modality_metrics` over its rows: 3 generations + 4 Shapley scorings


def modality_metrics(
    model: PreTrainedModel,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    rows: Sequence[dict],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Answer rows with and without each modality and measure how much the answer rests on the image.

    Rows need "prompt", "images" and "answer" (the reference). The model answers greedily (a) the
    full row, (b) the row with its images removed (`image.drop`), (c) the row with its question
    replaced by a generic instruction (`text.drop_question`). The reference answer is scored under
    the four subsets {full, no image, no question, neither} for the exact two-player Shapley values.

    Returns floats in [0, 1]: accuracy (a vs answer), blind_agreement (a vs b: high = the image
    barely matters, language bias), question_blind_agreement (a vs c: high = the question barely
    matters, vision bias), image_share (mean per-sample |φ_image| / (|φ_image| + |φ_text|)); and the
    per-row lists answers, blind_answers, question_blind_answers and image_shares.

    The rows go through the model `MODALITY_PASSES` times (3 generations, 4 scorings); `on_batch` is called with the
    number of samples of each finished batch of any pass (progress bars: total = MODALITY_PASSES · len(rows)).
    """
    rows = list(rows)
    answers_ref = [row["answer"] for row in rows]
    variants = {
        name: [perturb.apply(spec, row) for row in rows] if spec else rows
        for name, spec in (("full", None), ("no_image", "image.drop"), ("no_question", "text.drop_question"))
    }
    variants["neither"] = [perturb.apply("image.drop+text.drop_question", row) for row in rows]
    kwargs = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, on_batch=on_batch)
    full = generate(model, processing_class, variants["full"], **kwargs)
    blind = generate(model, processing_class, variants["no_image"], **kwargs)
    question_blind = generate(model, processing_class, variants["no_question"], **kwargs)
    values = {
        name: answer_log_probs(model, processing_class, samples, answers_ref, batch_size=batch_size, on_batch=on_batch)
        for name, samples in variants.items()
    }
    shapley = modality_shapley(values["full"], values["no_image"], values["no_question"], values["neither"])
    return {
        "accuracy": accuracy(full, answers_ref),
        "blind_agreement": agreement(full, blind),
        "question_blind_agreement": agreement(full, question_blind),
        "image_share": shapley["image_share_mean"],
        "answers": full,
        "blind_answers": blind,
        "question_blind_answers": question_blind,
        "image_shares": shapley["image_share"].tolist(),
    }
