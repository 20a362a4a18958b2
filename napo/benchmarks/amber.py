"""AMBER (Wang et al. 2023, "An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination Evaluation",
arXiv:2311.07397), scored as its reference `inference.py` (github.com/junyangwang0410/AMBER) scores it, without
the API-free but download-bound parts (spaCy vectors, NLTK tagger and WordNet; see below).

Files: AMBER's queries ([{"id", "image", "query"}], e.g. data/query/query_all.json) and its annotations
(data/annotations.json: per id, "type" generative / discriminative-* / relation and "truth" (objects, or "yes" /
"no"), "hallu" for generative ids). The word association list (data/relation.json) and safe words
(data/safe_words.txt) ship with napo (`data/amber_*`).

Generative (ids of type "generative"): the response's nouns that are AMBER object words (keys and values of the
association list) are its mentions. A mention is hallucinated unless it is a safe word, a ground-truth object or
an association word of one.

    CHAIR = hallucinated mentions / mentions          Cover = ground-truth objects mentioned / ground-truth objects
    Hal   = responses with >= 1 hallucinated mention / responses
    Cog   = annotated hallucination-prone objects ("hallu") mentioned / those objects

with the reference's bookkeeping, quirks included (a mention that is an association word of two truths marks the
first one covered).

Discriminative (every other type): a response is "Yes" or "No" when it is exactly that string (the reference
compares `response == 'Yes'`); `yes_no="pope"` reads answers by LLaVA's POPE rule first (not the reference).
"No" is the positive class: precision = correct "No" / "No" answers, recall = correct "No" / questions whose
truth is no; per dimension existence (discriminative-hallucination), attribute (state + number + action) and
relation (discriminative-relation and relation).

Differences from the reference (numbers are therefore close to but not the same as published AMBER numbers):
- nouns: the reference keeps tokens NLTK's tagger tags NN* and lemmatises them with WordNet; napo keeps every
  token (`napo.benchmarks.words.tokenize`, case kept as the reference keeps it) whose singular by WordNet's noun
  suffix rules is an AMBER word. A word used as a verb or adjective that is not a safe word ("a light blue car")
  therefore counts, and a lemma WordNet would shorten past the AMBER word ("pants" -> "pant") is kept;
- near-synonyms: the reference also accepts a mention whose spaCy en_core_web_lg similarity to a truth or
  association word exceeds 0.8 (and marks Cog for similarity to a "hallu" word); napo matches exact words only,
  unless a `similar(word, other) -> bool` is passed. On the same nouns, exact matching alone can only raise CHAIR
  and Hal and lower Cover and Cog; counting other parts of speech can move them either way. How far napo's numbers
  are from the reference's on real responses has not been measured (no spaCy model offline).
`reference_printout` holds the numbers as the script prints them: percent, one decimal, with its 0.001 starting
denominators and F1's +0.0001.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from functools import lru_cache

from napo.benchmarks.answers import Question, id_key, read_records
from napo.benchmarks.pope import pope_yes_no
from napo.benchmarks.words import data_text, tokenize

# WordNet's noun detachment rules (morphy), tried in this order, plus the unchanged word.
_NOUN_SUFFIXES = (
    ("s", ""),
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
)
_DIMENSIONS = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "state",
    "discriminative-attribute-number": "number",
    "discriminative-attribute-action": "action",
}


@lru_cache(maxsize=1)
def word_lists() -> tuple[dict[str, list[str]], set[str], list[str]]:
    """(association: object -> its association words, all AMBER object words, safe words), from the packaged files."""
    association = json.loads(data_text("amber_relation.json"))
    words = set(association) | {w for related in association.values() for w in related}
    safe = data_text("amber_safe_words.txt").split("\n")
    return association, words, safe


def response_nouns(response: str) -> list[str]:
    """The AMBER object words a response mentions, every occurrence, in order (see the module docstring)."""
    _, words, _ = word_lists()
    nouns = []
    for token in tokenize(response):
        candidates = [token] + [token[: -len(old)] + new for old, new in _NOUN_SUFFIXES if token.endswith(old)]
        known = [c for c in candidates if c in words]
        if known:
            nouns.append(min(known, key=len))
    return nouns


def load_amber(
    queries: Sequence[str | os.PathLike], annotations: str | os.PathLike
) -> tuple[list[Question], dict[str, dict]]:
    """Questions of AMBER query files (question_id = AMBER id, text = query) and the annotation of each id key.

    Raises ValueError naming file and item for a query without id / image / query, a duplicate id, an id absent
    from the annotations, and a generative annotation whose object is not in the association list.
    """
    association, _, _ = word_lists()
    truth: dict[str, dict] = {}
    for where, record in read_records(annotations):
        if "id" not in record or "type" not in record or "truth" not in record:
            raise ValueError(f"{where}: expected AMBER annotations with id, type and truth")
        truth[id_key(record["id"], where)] = record
    questions, seen = [], {}
    for path in queries:
        for where, record in read_records(path):
            missing = [k for k in ("id", "image", "query") if k not in record]
            if missing:
                raise ValueError(f"{where}: missing {missing}; AMBER queries have id, image and query")
            key = id_key(record["id"], where)
            if key in seen:
                raise ValueError(f"{where}: duplicate id {key} (first at {seen[key]})")
            if key not in truth:
                raise ValueError(f"{where}: id {key} is not in the annotations {annotations}")
            ann = truth[key]
            if ann["type"] == "generative":
                unknown = [w for w in ann["truth"] + ann.get("hallu", []) if w not in association]
                if unknown:
                    raise ValueError(f"{annotations}: id {key} has objects {unknown} not in AMBER's association list")
            seen[key] = where
            questions.append(Question(record["id"], record["query"], record["image"]))
    return questions, {key: truth[key] for key in seen}


def amber_scores(
    responses: dict[str, str],
    annotations: dict[str, dict],
    *,
    yes_no: str = "exact",
    similar: Callable[[str, str], bool] | None = None,
) -> dict:
    """AMBER's generative and discriminative metrics (fractions in [0, 1]) of responses (id key -> text); a part
    with no answered question is left out. See the module docstring for the definitions and `yes_no`."""
    if yes_no not in ("exact", "pope"):
        raise ValueError(f"yes_no={yes_no!r}: expected 'exact' (the reference) or 'pope'")
    generative = {k: r for k, r in responses.items() if annotations[k]["type"] == "generative"}
    discriminative = {k: r for k, r in responses.items() if annotations[k]["type"] != "generative"}
    out: dict = {}
    if generative:
        counts = _generative_counts(generative, annotations, similar)
        out["generative"] = {
            "chair": counts["chair_score"] / counts["chair_num"] if counts["chair_num"] else 0.0,
            "cover": counts["safe_cover_score"] / counts["safe_cover_num"],
            "hal": 1 - counts["non_hallu_score"] / counts["non_hallu_num"],
            "cog": counts["hallu_cover_score"] / counts["hallu_cover_num"] if counts["hallu_cover_num"] else 0.0,
            "n": len(generative),
            "mentions": counts["chair_num"],
        }
        out["reference_printout"] = {
            name: round(100 * value, 1)
            for name, value in (
                ("CHAIR", counts["chair_score"] / (counts["chair_num"] + 0.001)),
                ("Cover", counts["safe_cover_score"] / (counts["safe_cover_num"] + 0.001)),
                ("Hal", 1 - counts["non_hallu_score"] / (counts["non_hallu_num"] + 0.001)),
                ("Cog", counts["hallu_cover_score"] / (counts["hallu_cover_num"] + 0.001)),
            )
        }
    if discriminative:
        if yes_no == "pope":
            discriminative = {k: pope_yes_no(r).capitalize() for k, r in discriminative.items()}
        groups: dict[str, list[str]] = {"all": list(discriminative)}
        for key in discriminative:
            dimension = _DIMENSIONS.get(annotations[key]["type"], "relation")
            groups.setdefault(dimension, []).append(key)
            if dimension in ("state", "number", "action"):
                groups.setdefault("attribute", []).append(key)
        out["discriminative"] = {}
        for name, keys in groups.items():
            # The reference's existence F1 adds 0.001 to its denominator, the others 0.0001.
            scores, printout = _yes_no_scores(
                [discriminative[k] for k in keys],
                [annotations[k]["truth"] for k in keys],
                f1_epsilon=0.001 if name == "existence" else 0.0001,
            )
            out["discriminative"][name] = scores
            out.setdefault("reference_printout", {})[f"discriminative/{name}"] = printout
    return out


def _generative_counts(responses: dict[str, str], annotations: dict[str, dict], similar) -> dict[str, int]:
    """The reference's generative counters (inference.py main loop), without its 0.001 starting values."""
    association, _, global_safe = word_lists()
    c = dict.fromkeys(
        (
            "chair_score",
            "chair_num",
            "safe_cover_score",
            "safe_cover_num",
            "hallu_cover_score",
            "hallu_cover_num",
            "non_hallu_score",
            "non_hallu_num",
        ),
        0,
    )
    for key, response in responses.items():
        ann = annotations[key]
        nouns = response_nouns(response)
        # Association words first, each tagged with the index of its object, then the objects themselves; a hit on
        # an association word marks its object's slot at the end of the list.
        safe_words = [w for obj in ann["truth"] for w in association[obj]] + list(ann["truth"])
        safe_list = [i for i, obj in enumerate(ann["truth"]) for _ in association[obj]] + [0] * len(ann["truth"])
        ha_words = [w for obj in ann["hallu"] for w in association[obj]] + list(ann["hallu"])
        ha_list = [i for i, obj in enumerate(ann["hallu"]) for _ in association[obj]] + [0] * len(ann["hallu"])
        safe_len, ha_len = len(ann["truth"]), len(ann["hallu"])
        hallucinated = [0] * len(nouns)

        def mark(flags: list[int], length: int, j: int) -> None:
            if j < len(flags) - length:
                flags[flags[j] + len(flags) - length] = 1
            else:
                flags[j] = 1

        for idx, noun in enumerate(nouns):
            if noun in global_safe:
                continue
            if noun in safe_words:
                mark(safe_list, safe_len, safe_words.index(noun))
                continue
            if noun in ha_words:
                mark(ha_list, ha_len, ha_words.index(noun))
            if similar is not None:
                j = next((j for j, w in enumerate(ha_words) if similar(noun, w)), None)
                if j is not None:
                    mark(ha_list, ha_len, j)
                j = next((j for j, w in enumerate(safe_words) if similar(noun, w)), None)
                if j is not None:
                    mark(safe_list, safe_len, j)
                    continue
            hallucinated[idx] = 1
        c["chair_score"] += sum(hallucinated)
        c["chair_num"] += len(hallucinated)
        c["safe_cover_score"] += sum(safe_list[len(safe_list) - safe_len :])
        c["safe_cover_num"] += safe_len
        c["hallu_cover_score"] += sum(ha_list[len(ha_list) - ha_len :]) if ha_len else 0
        c["hallu_cover_num"] += ha_len
        c["non_hallu_score"] += sum(hallucinated) == 0
        c["non_hallu_num"] += 1
    return c


def _yes_no_scores(responses: list[str], truths: list[str], *, f1_epsilon: float) -> tuple[dict, dict]:
    """accuracy / precision / recall / f1 with "No" positive, and the reference's printout of them."""
    correct = sum((t == "yes" and r == "Yes") or (t != "yes" and r == "No") for r, t in zip(responses, truths))
    truth_no = sum(t != "yes" for t in truths)
    said_no = sum(r == "No" for r in responses)
    no_correct = sum(t != "yes" and r == "No" for r, t in zip(responses, truths))
    precision = no_correct / said_no if said_no else 0.0
    recall = no_correct / truth_no if truth_no else 0.0
    scores = {
        "accuracy": correct / len(responses),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "n": len(responses),
        "unparsed": sum(r not in ("Yes", "No") for r in responses),
    }
    p = round(no_correct / (said_no + 0.001) * 100, 1)
    r = round(no_correct / (truth_no + 0.001) * 100, 1)
    printout = {
        "Accuracy": round(correct / (len(responses) + 0.001) * 100, 1),
        "Precision": p,
        "Recall": r,
        "F1": round(2 * (p / 100) * (r / 100) / ((p / 100) + (r / 100) + f1_epsilon) * 100, 1),
    }
    return scores, printout
