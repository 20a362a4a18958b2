"""POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models", arXiv:2305.10355),
scored as LLaVA's `llava/eval/eval_pope.py` scores it.

Question files: POPE's own layout, JSON lines {"question_id", "image", "text", "label": "yes"|"no"}, one file per
split (coco_pope_random.json, coco_pope_popular.json, coco_pope_adversarial.json). An answer is "no" when its first
sentence (the text before the first ".") with commas removed, split on single spaces, contains the word "No",
"not" or "no"; every other answer is "yes" ("No doubt, yes" is no; "I don't see one" is yes, as the reference
reads them). "yes" (the object is present) is the positive class.

Differences from the reference, none of which changes a number it prints: answers are matched to questions by
question_id (the reference zips answers and labels in file order); a split where nothing is answered "yes" has
precision 0 (the reference divides by zero).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from napo.benchmarks.answers import Question, id_key, read_records


def pope_yes_no(text: str) -> str:
    """ "yes" or "no" by LLaVA's eval_pope rule (module docstring)."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def split_name(path: str | os.PathLike) -> str:
    """A POPE file's split: its stem without the "<dataset>_pope_" prefix (coco_pope_random.json -> random)."""
    return re.sub(r"^.*pope_", "", Path(path).stem)


def load_pope(paths: Sequence[str | os.PathLike]) -> tuple[dict[str, list[Question]], dict[str, dict[str, int]]]:
    """The questions of each split and their labels (1 = yes, 0 = no) by question id key.

    Raises ValueError naming file and line for a record without question_id / image / text / label, a label other
    than yes/no, a duplicate question_id within a file, and two files with the same split name.
    """
    questions: dict[str, list[Question]] = {}
    labels: dict[str, dict[str, int]] = {}
    for path in paths:
        split = split_name(path)
        if split in questions:
            raise ValueError(f"{path}: split {split!r} given twice; pass each POPE split file once")
        questions[split], labels[split] = [], {}
        for where, record in read_records(path):
            missing = [k for k in ("question_id", "image", "text", "label") if k not in record]
            if missing:
                raise ValueError(
                    f"{where}: missing {missing}; POPE questions have question_id, image, text and label "
                    "(LLaVA's llava_pope_test.jsonl has no labels: pass POPE's coco_pope_<split>.json)"
                )
            key = id_key(record["question_id"], where)
            if key in labels[split]:
                raise ValueError(f"{where}: duplicate question_id {key} in {path}")
            label = str(record["label"]).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{where}: label {record['label']!r}; expected 'yes' or 'no'")
            labels[split][key] = int(label == "yes")
            questions[split].append(Question(record["question_id"], record["text"], record["image"]))
    return questions, labels


def pope_scores(answers: dict[str, str], labels: dict[str, int]) -> dict[str, float | int | dict[str, int]]:
    """accuracy, precision, recall, f1 and yes_ratio (fraction of answers read as yes) of one split's answers
    (id key -> text) against its labels (id key -> 1 yes / 0 no), over the answered questions; plus n and the
    confusion counts {TP, FP, TN, FN} the reference prints."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    keys = list(answers)
    truth = [labels[k] for k in keys]
    predicted = [int(pope_yes_no(answers[k]) == "yes") for k in keys]
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(truth, predicted, labels=[0, 1]).ravel())
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, average="binary", pos_label=1, zero_division=0.0
    )
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "yes_ratio": sum(predicted) / len(predicted),
        "n": len(keys),
        "counts": {"TP": tp, "FP": fp, "TN": tn, "FN": fn},
    }
