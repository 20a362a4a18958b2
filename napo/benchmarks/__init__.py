"""Standard hallucination benchmarks, offline and scored as their reference scripts score them: POPE, CHAIR,
AMBER and VLind-Bench (one module each; `answers` reads and generates answer files; `words` tokenises and
singularises; `data/` holds the word lists, with their sources in `data/SOURCES.md`).

    spec = BenchmarkSpec("pope", data=["coco_pope_random.json"], image_dir="val2014")
    metrics = evaluate(spec, out="pope.json", predictions=["answers.jsonl"])          # any model's answers
    metrics = evaluate(spec, out="pope.json", model=model, processing_class=processor, model_id="my-llava")

With a model, answers are generated (batched, resumable) into `<out stem>.answers[.<split>].jsonl` beside `out` in
LLaVA's answer layout, then scored like any answer file. The metrics JSON records the benchmark, the files, the
answer files and `coverage` (questions, answered, fraction; below 1 only with allow_partial).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napo.benchmarks.answers import Question, answer_file_for, generate_answers, id_key, match_answers, read_answers

BENCHMARKS = ("pope", "chair", "amber", "vlind")
CHAIR_ID_KEYS = ("image_id", "question_id", "id")  # a caption's image id first
DEFAULT_CAPTION_PROMPT = "Please describe this image in detail."
# Metrics of `flat_metrics` where lower is better (hallucination rates, the prior followed).
LOWER_IS_BETTER = frozenset(
    {
        "chair/chair_s",
        "chair/chair_i",
        "amber/generative/chair",
        "amber/generative/hal",
        "amber/generative/cog",
        "vlind/language_prior_rate",
    }
)


@dataclass
class BenchmarkSpec:
    """What to evaluate: a benchmark and its files.

    data: pope: one question file per split; chair: a question file ({question_id or image_id = COCO image id,
    image, optional text}; empty: every image of the instances file); amber: query files; vlind: data.json.
    annotations: chair: a COCO instances file, optionally followed by COCO captions files; amber: annotations.json.
    image_dir: the folder the questions' image names are relative to (vlind: the one holding counterfactual/ and
    factual/). prompt: chair's question for images without one. amber_yes_no: "exact" (the reference) or "pope".
    vlind_prompts: the reference's prompt set, "instructblip" or "gpt4o" (`napo.benchmarks.vlind.load_vlind`).
    """

    name: str
    data: list[str] = field(default_factory=list)
    annotations: list[str] = field(default_factory=list)
    image_dir: str | None = None
    prompt: str = DEFAULT_CAPTION_PROMPT
    amber_yes_no: str = "exact"
    vlind_prompts: str = "instructblip"

    def __post_init__(self) -> None:
        if self.name not in BENCHMARKS:
            raise ValueError(f"benchmark {self.name!r}: expected one of {', '.join(BENCHMARKS)}")
        wants_annotations = {"chair": "a COCO instances file (+ optional captions files)", "amber": "annotations.json"}
        if self.name in wants_annotations and not self.annotations:
            raise ValueError(f"{self.name}: pass --annotations: {wants_annotations[self.name]}")
        if self.name not in wants_annotations and self.annotations:
            raise ValueError(f"{self.name} takes no --annotations (its labels are in --data)")
        if self.name == "amber" and len(self.annotations) != 1:
            raise ValueError(f"amber: one annotations file (AMBER's data/annotations.json), got {self.annotations}")
        if not self.data and self.name != "chair":
            raise ValueError(f"{self.name}: pass --data")
        if self.name == "vlind" and len(self.data) != 1:
            raise ValueError(f"vlind: one data file (VLind-Bench's data.json), got {self.data}")
        if self.name == "chair" and len(self.data) > 1:
            raise ValueError(f"chair: at most one question file, got {self.data}")
        if self.amber_yes_no not in ("exact", "pope"):
            raise ValueError(f"amber_yes_no={self.amber_yes_no!r}: expected 'exact' or 'pope'")
        if self.vlind_prompts not in ("instructblip", "gpt4o"):
            raise ValueError(f"vlind_prompts={self.vlind_prompts!r}: expected 'instructblip' or 'gpt4o'")


@dataclass
class Benchmark:
    """A loaded benchmark: its questions per part (POPE: per split; the others: one part, None) and the scoring of
    {part: {id key: answer}} into metrics."""

    spec: BenchmarkSpec
    parts: dict[str | None, list[Question]]
    score: Callable[[dict[str | None, dict[str, str]]], dict[str, Any]]
    read: Callable[[str], dict[str, tuple[str, str]]] = read_answers  # answer file -> {id key: (text, where)}


def load_benchmark(spec: BenchmarkSpec, answers: dict[str, tuple[str, str]] | None = None) -> Benchmark:
    """Read and check a benchmark's files (each loader raises ValueError naming the file and line it refuses).

    CHAIR without a question file asks every image of the instances file; given the `answers` to score, it scores
    the images they name instead (as the reference scores the images of its caption file), each of which must be
    an image of the instances file.
    """
    if spec.name == "pope":
        from napo.benchmarks.pope import load_pope, pope_scores

        questions, labels = load_pope(spec.data)

        def score_pope(answers: dict) -> dict:
            splits = {split: pope_scores(answers[split], labels[split]) for split in questions}
            if len(splits) == 1:
                return next(iter(splits.values()))
            # Several splits: each split's metrics, and their mean at the top (papers report per split or the mean).
            keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
            return {**{k: sum(s[k] for s in splits.values()) / len(splits) for k in keys}, "splits": splits}

        return Benchmark(spec, questions, score_pope)
    if spec.name == "chair":
        from napo.benchmarks.chair import chair_scores, load_chair

        images, objects = load_chair(spec.annotations[0], spec.annotations[1:], prompt=spec.prompt)
        if spec.data:
            questions = _chair_questions(spec.data[0], objects, spec.prompt)
        elif answers is not None:
            absent = [(key, where) for key, (_, where) in answers.items() if key not in objects]
            if absent:
                raise ValueError(
                    f"{absent[0][1]}: caption for image {absent[0][0]}, which is not in "
                    f"{spec.annotations[0]} ({len(absent)} such captions)"
                )
            questions = [q for q in images if id_key(q.question_id, "image") in answers]
        else:
            questions = images
        return Benchmark(
            spec,
            {None: questions},
            lambda answers: chair_scores(answers[None], objects),
            read=lambda path: read_answers(path, CHAIR_ID_KEYS),
        )
    if spec.name == "amber":
        from napo.benchmarks.amber import amber_scores, load_amber

        questions, annotations = load_amber(spec.data, spec.annotations[0])
        return Benchmark(
            spec, {None: questions}, lambda answers: amber_scores(answers[None], annotations, yes_no=spec.amber_yes_no)
        )
    from napo.benchmarks.vlind import load_vlind, read_reference_predictions, vlind_scores

    questions, instances = load_vlind(spec.data[0], spec.vlind_prompts)
    return Benchmark(
        spec,
        {None: questions},
        lambda answers: vlind_scores(answers[None], instances),
        read=lambda path: read_reference_predictions(path, instances) or read_answers(path),
    )


def _answers_per_part(
    benchmark: Benchmark, keys: dict[str | None, list[str]], predictions: list[str]
) -> tuple[dict[str | None, dict], dict[str | None, str]]:
    """Each part's answers ({question key: answer}) and the file they came from: one file per part, in order, or one
    file for all parts (question ids then must not repeat across parts). `keys`: each part's question keys."""
    if len(predictions) == len(keys):
        per_part = {part: benchmark.read(path) for part, path in zip(keys, predictions)}
        sources = dict(zip(keys, predictions))
    elif len(predictions) == 1:
        answers = benchmark.read(predictions[0])
        owner: dict[str, str | None] = {}
        for part, ids in keys.items():
            for key in ids:
                if key in owner:
                    raise ValueError(
                        f"question id {key} is in both {owner[key]} and {part}: pass one --predictions "
                        "file per --data file, in the same order"
                    )
                owner[key] = part
        unknown = [key for key in answers if key not in owner]
        if unknown:
            raise ValueError(
                f"{predictions[0]}: answers for ids that are not questions of this benchmark, e.g. "
                f"{unknown[:5]} ({answers[unknown[0]][1]})"
            )
        per_part = {part: {k: v for k, v in answers.items() if owner[k] == part} for part in keys}
        sources = dict.fromkeys(keys, predictions[0])
    else:
        raise ValueError(
            f"{len(predictions)} --predictions files for {len(keys)} --data files: pass one, or one per data file"
        )
    return per_part, sources


def evaluate(
    spec: BenchmarkSpec,
    *,
    out: str | os.PathLike,
    predictions: list[str] | None = None,
    model: Any = None,
    processing_class: Any = None,
    model_id: str | None = None,
    allow_partial: bool = False,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    prompt_suffix: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Score answer files (`predictions`), or answers `model` generates, on a benchmark; write the metrics to `out`.

    predictions: one file, or one per part (POPE: per --data file, in order; needed when splits share question
    ids). Missing answers are an error unless allow_partial; unknown or duplicate ids and unparseable lines always.
    """
    if (predictions is None) == (model is None):
        raise ValueError("pass either answer files (--predictions) or a model (--model), not both or neither")
    chair_scored_ids = spec.name == "chair" and not spec.data and predictions
    given = read_answers(predictions[0], CHAIR_ID_KEYS) if chair_scored_ids else None
    benchmark = load_benchmark(spec, given)
    parts = benchmark.parts
    if model is not None:
        model_id = model_id or getattr(getattr(model, "config", None), "_name_or_path", None) or "model"
        image_dir = spec.image_dir
        predictions = [
            str(
                generate_answers(
                    model,
                    processing_class,
                    questions,
                    answer_file_for(out, part if len(parts) > 1 else None),
                    model_id=model_id,
                    image_dir=image_dir,
                    prompt_suffix=prompt_suffix,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    progress=progress,
                )
            )
            for part, questions in parts.items()
        ]
    keys = {part: [id_key(q.question_id, "question") for q in questions] for part, questions in parts.items()}
    per_part, sources = _answers_per_part(benchmark, keys, predictions)
    matched, coverage = {}, {}
    for part in parts:
        matched[part], coverage[part] = match_answers(
            keys[part], per_part[part], source=sources[part], allow_partial=allow_partial
        )
    metrics = benchmark.score(matched)
    if len(parts) > 1:
        for part in parts:
            metrics["splits"][part]["coverage"] = coverage[part]
        total = sum(c["questions"] for c in coverage.values())
        answered = sum(c["answered"] for c in coverage.values())
        metrics["coverage"] = {"questions": total, "answered": answered, "fraction": answered / total}
    else:
        metrics["coverage"] = next(iter(coverage.values()))
    record = {
        "benchmark": spec.name,
        "data": spec.data,
        "annotations": spec.annotations,
        "answers": predictions,
        "model_id": model_id,
        "allow_partial": allow_partial,
        **metrics,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def evaluate_model(
    eval_spec: str, model: Any, processing_class: Any, out_dir: str | os.PathLike, *, model_id: str, **options: Any
) -> dict[str, float]:
    """Every benchmark of an `parse_eval_spec` string on a model: metrics and answers under `out_dir`
    (<name>.json, <name>.answers*.jsonl; resumable), returned flat as {"pope/f1": ..., "chair/chair_s": ...}.
    `options` go to `evaluate` (batch_size, max_new_tokens, prompt_suffix, ...)."""
    flat: dict[str, float] = {}
    for name, spec in parse_eval_spec(eval_spec).items():
        record = evaluate(
            spec,
            out=Path(out_dir, f"{name}.json"),
            model=model,
            processing_class=processing_class,
            model_id=model_id,
            progress=False,
            **options,
        )
        flat.update(flat_metrics(name, record))
    return flat


def _chair_questions(path: str, objects: dict[str, set[str]], prompt: str) -> list[Question]:
    """Caption questions of a question file: {question_id or image_id (a COCO image id), image, text (default:
    prompt)} per record; an image absent from the annotations is refused, naming the line."""
    from napo.benchmarks.answers import read_records

    questions, seen = [], {}
    for where, record in read_records(path):
        id_field = "image_id" if "image_id" in record else "question_id"
        if id_field not in record or "image" not in record:
            raise ValueError(f"{where}: expected image_id (or question_id) and image; got keys {sorted(record)}")
        key = id_key(record[id_field], where)
        if key not in objects:
            raise ValueError(f"{where}: image {key} is not in the CHAIR annotations")
        if key in seen:
            raise ValueError(f"{where}: duplicate image {key} (first at {seen[key]})")
        seen[key] = where
        questions.append(Question(record[id_field], record.get("text", prompt), record["image"]))
    return questions


def flat_metrics(name: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The float metrics of an `evaluate` record as {"<benchmark>/<metric>": value} (AMBER's nested ones as
    "amber/generative/chair", "amber/discriminative/all/f1"), for tables; counts, coverage and details are left out."""
    skip = {"coverage", "counts", "reference_printout", "splits", "sentences"}
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in skip:
                    walk(f"{prefix}/{k}", v)
        elif isinstance(value, float):
            flat[prefix] = value

    for key, value in metrics.items():
        if key not in skip and key not in ("benchmark", "data", "annotations", "answers", "model_id", "allow_partial"):
            walk(f"{name}/{key}", value)
    return flat


def parse_eval_spec(text: str) -> dict[str, BenchmarkSpec]:
    """Benchmarks from "NAME=FILE,NAME.key=VALUE,..." (napo compare --eval): NAME=FILE adds a --data file of
    benchmark NAME (repeatable), NAME.image_dir / NAME.annotations (repeatable) / NAME.prompt / NAME.amber_yes_no
    set that option, e.g. "pope=coco_pope_random.json,pope.image_dir=val2014,amber=query_all.json,
    amber.annotations=annotations.json,amber.image_dir=AMBER". Image folder default: the data file's folder."""
    fields: dict[str, dict[str, Any]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, sep, value = item.partition("=")
        if not sep or not value:
            raise ValueError(f"--eval entry {item!r}: expected NAME=FILE or NAME.option=VALUE")
        name, _, option = target.strip().partition(".")
        if name not in BENCHMARKS:
            raise ValueError(f"--eval entry {item!r}: benchmark {name!r} is not one of {', '.join(BENCHMARKS)}")
        entry = fields.setdefault(name, {"name": name, "data": [], "annotations": []})
        option = option or "data"
        if option in ("data", "annotations"):
            entry[option].append(value)
        elif option in ("image_dir", "prompt", "amber_yes_no", "vlind_prompts"):
            entry[option] = value
        else:
            raise ValueError(
                f"--eval entry {item!r}: option {option!r}; expected image_dir, annotations, prompt, "
                "amber_yes_no or vlind_prompts"
            )
    specs = {}
    for name, entry in fields.items():
        if "image_dir" not in entry and entry["data"]:
            entry["image_dir"] = str(Path(entry["data"][0]).parent)
        specs[name] = BenchmarkSpec(**entry)
    return specs
