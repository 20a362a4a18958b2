"""VLind-Bench (Lee et al. 2024, "VLind-Bench: Measuring Language Priors in Large Vision-Language Models",
arXiv:2406.08702), asked and scored as its reference (github.com/klee972/VLind-Bench: `eval/instructblip_eval.py`
builds the prompts, `eval/score_pipeline.py` scores them).

Data: VLind-Bench's data.json (per instance: concept, context_id, context (counterfactual), factual_context,
true_statement (true in the counterfactual context), false_statement (true by commonsense), existent_noun,
non-existent_noun, best_img_id, aggregated_human_label_good_images {image id: votes}) and an image folder holding
its `counterfactual/` and `factual/` trees. An instance counts when at least 2 annotators passed one of its images
(the reference's vote threshold). Each instance is asked, "True"/"False" expected:

    a1 / a2  commonsense prompt on the factual image, false / true statement    -> True / False  (CK)
    b1 / b2  "There is <noun>" on the best counterfactual image, existent / non -> True / False  (VP)
    c1 / c2  counterfactual context in the text + that image, true / false      -> True / False  (CB)
    d1 / d2  image prompt on every good counterfactual image, true / false      -> True / False  (LP)

An answer is read as the reference's `infer_true_or_false` reads it: lowercased, newlines to spaces, commas and
periods removed, split on spaces; the first word that is "true" or "false" decides, otherwise "NA". A test passes
when both of its answers are right. Pipeline scores (the numbers the paper and NaPO report), as fractions:

    commonsense_knowledge (CK) = a passes / instances        visual_perception (VP) = b passes / instances
    commonsense_bias (CB)      = c passes among a passes     language_prior (LP) = mean over instances passing b
                                                             and c of (d passes / good images), by the reference's
                                                             d_pass_ratio_macro
Plain accuracies: factual_accuracy = a passes / instances (the factual image) and counterfactual_accuracy = the mean
over instances of d passes / good images (counterfactual images, no pipeline); language_prior_rate = the same mean of
d pairs answered the commonsense way (d1 False and d2 True: the image ignored for the prior).
"""

from __future__ import annotations

import json
import os

from napo.benchmarks.answers import Question, read_records
from napo.benchmarks.words import data_text

VOTE_THRESHOLD = 2  # score_pipeline.py's default --vote_thres


def true_or_false(response: str) -> str:
    """ "True", "False" or "NA" by the reference's infer_true_or_false (module docstring)."""
    for word in response.lower().replace("\n", " ").replace(",", "").replace(".", "").split(" "):
        if word == "true":
            return "True"
        if word == "false":
            return "False"
    return "NA"


PROMPT_SETS = ("instructblip", "gpt4o")


def load_vlind(data: str | os.PathLike, prompts: str = "instructblip") -> tuple[list[Question], list[dict]]:
    """The questions (ids "<instance index>/<test>[/<image id>]", image paths under the image folder) and the kept
    instances ({"index", "concept", "context_id", "good_images"}). Raises ValueError naming the item for a missing
    field.

    prompts: the reference's prompt set of `eval/instructblip_eval.py` ("instructblip": the instruction first,
    "simple" prompts) or of `eval/gpt4o_eval.py` ("gpt4o": the instruction last, "detailed" prompts for c and d).
    """
    if prompts not in PROMPT_SETS:
        raise ValueError(f"vlind prompts {prompts!r}: expected one of {', '.join(PROMPT_SETS)}")
    table = json.loads(data_text("vlind_prompts.json"))
    templates, object_statement = table[prompts], table["object"]
    fields = (
        "concept",
        "context_id",
        "context",
        "factual_context",
        "true_statement",
        "false_statement",
        "existent_noun",
        "non-existent_noun",
        "best_img_id",
        "aggregated_human_label_good_images",
    )
    questions, kept = [], []
    for index, (where, item) in enumerate(read_records(data)):
        missing = [f for f in fields if f not in item]
        if missing:
            raise ValueError(f"{where}: missing {missing}; expected a VLind-Bench data.json instance")
        good = [i for i, votes in item["aggregated_human_label_good_images"].items() if votes >= VOTE_THRESHOLD]
        if not good:
            continue
        counterfactual = f"counterfactual/{item['concept']}/{item['context_id']}_{item['context']}"
        factual = f"factual/{item['concept']}/{item['context_id']}_{item['factual_context']}/0.jpg"
        best = f"{counterfactual}/{item['best_img_id']}.jpg"
        true, false = item["true_statement"], item["false_statement"]

        # `index` bound as a default: the closure is called only inside this iteration, but binding it says so.
        def ask(test: str, template: str, image: str, *, _index: int = index, **fill: str) -> None:
            questions.append(Question(f"{_index}/{test}", templates[template].format(**fill), image))

        ask("a1", "a", factual, statement=false)
        ask("a2", "a", factual, statement=true)
        ask("b1", "b", best, statement=object_statement.format(noun=item["existent_noun"]))
        ask("b2", "b", best, statement=object_statement.format(noun=item["non-existent_noun"]))
        ask("c1", "c", best, context=item["context"], statement=true)
        ask("c2", "c", best, context=item["context"], statement=false)
        for image_id in good:
            ask(f"d1/{image_id}", "d", f"{counterfactual}/{image_id}.jpg", statement=true)
            ask(f"d2/{image_id}", "d", f"{counterfactual}/{image_id}.jpg", statement=false)
        kept.append({"index": index, "concept": item["concept"], "context_id": item["context_id"], "good_images": good})
    if not kept:
        raise ValueError(f"{data}: no instance has an image with >= {VOTE_THRESHOLD} annotator votes")
    return questions, kept


def vlind_scores(answers: dict[str, str], instances: list[dict]) -> dict[str, float | int]:
    """The pipeline scores and accuracies of the module docstring over the instances all of whose questions are
    answered (the others are left out: a test needs both of its answers)."""

    def passed(i: int, first: str, second: str, expect: tuple[str, str] = ("True", "False")) -> bool:
        return (true_or_false(answers[f"{i}/{first}"]), true_or_false(answers[f"{i}/{second}"])) == expect

    n = a = b = c = bc = 0
    d_pass_macro = d_macro = prior_macro = 0.0
    for inst in instances:
        i, good = inst["index"], inst["good_images"]
        keys = [f"{i}/{t}" for t in ("a1", "a2", "b1", "b2", "c1", "c2")]
        keys += [f"{i}/d{k}/{g}" for g in good for k in (1, 2)]
        if any(k not in answers for k in keys):
            continue
        n += 1
        a_pass, b_pass = passed(i, "a1", "a2"), passed(i, "b1", "b2")
        c_pass = passed(i, "c1", "c2") and a_pass
        bc_pass = b_pass and c_pass
        d = [passed(i, f"d1/{g}", f"d2/{g}") for g in good]
        a, b, c, bc = a + a_pass, b + b_pass, c + c_pass, bc + bc_pass
        d_macro += sum(d) / len(good)
        d_pass_macro += sum(d) / len(good) if bc_pass else 0.0
        prior_macro += sum(passed(i, f"d1/{g}", f"d2/{g}", ("False", "True")) for g in good) / len(good)
    if n == 0:
        raise ValueError("vlind: no instance has all of its questions answered")
    return {
        "commonsense_knowledge": a / n,
        "visual_perception": b / n,
        "commonsense_bias": c / a if a else 0.0,
        "language_prior": d_pass_macro / bc if bc else 0.0,
        "factual_accuracy": a / n,
        "counterfactual_accuracy": d_macro / n,
        "language_prior_rate": prior_macro / n,
        "instances": n,
    }


def read_reference_predictions(path: str | os.PathLike, instances: list[dict]) -> dict[str, tuple[str, str]] | None:
    """Answers from a file the reference's own eval scripts wrote (data.json with "<model>_pred_a1_image",
    "_b1", "_c1_image", "_d1": {image id: {"response"}} ... per instance), as {question id: (response, where)};
    None when `path` is not such a file. Instances are matched by position and must have the same concept and
    context_id as the data file's."""
    records = read_records(path)
    suffix = "_a1_image"
    prefix = next((k[: -len(suffix)] for _, r in records[:1] for k in r if k.endswith(suffix)), None)
    if prefix is None:
        return None
    fields = {"a1": "a1_image", "a2": "a2_image", "b1": "b1", "b2": "b2", "c1": "c1_image", "c2": "c2_image"}
    answers: dict[str, tuple[str, str]] = {}
    for inst in instances:
        i = inst["index"]
        if i >= len(records):
            raise ValueError(f"{path}: {len(records)} instances, fewer than the data file's")
        where, record = records[i]
        if (record.get("concept"), record.get("context_id")) != (inst["concept"], inst["context_id"]):
            raise ValueError(
                f"{where}: concept/context_id {record.get('concept')!r}/{record.get('context_id')!r}, "
                f"but the data file's instance {i} is {inst['concept']!r}/{inst['context_id']!r}"
            )
        for test, field in fields.items():
            if f"{prefix}_{field}" in record:
                answers[f"{i}/{test}"] = (record[f"{prefix}_{field}"]["response"], where)
        for test in ("d1", "d2"):
            for image_id, answer in record.get(f"{prefix}_{test}", {}).items():
                answers[f"{i}/{test}/{image_id}"] = (answer["response"], where)
    return answers
