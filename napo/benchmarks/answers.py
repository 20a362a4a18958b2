"""Answer files of the standard benchmarks: reading any program's answers, matching them to the questions, and
generating them with a model (batched, resumable) through `napo.inference.generate`.

napo writes answers in LLaVA's answer layout (`llava/eval/model_vqa_loader.py`), one JSON object a line:

    {"question_id": 1, "prompt": "Is there a dog in the image?", "text": "Yes", "model_id": "llava-1.5-7b"}

and reads, besides that layout, the layouts of the benchmarks' own tools: CHAIR's {"image_id", "caption"} (also
Rohrbach et al.'s {"imgToEval": {id: {"image_id", "caption"}}}), AMBER's [{"id", "response"}], as JSON lines or one
JSON array. A record's id is the first of question_id / image_id / id it has, its answer the first of text /
caption / response / answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ID_KEYS = ("question_id", "image_id", "id")
TEXT_KEYS = ("text", "caption", "response", "answer")


@dataclass(frozen=True)
class Question:
    """One prompt a model answers: `question_id` (as in the benchmark's file), the prompt `text`, and `image`, a
    path relative to the image folder (None: a text-only question)."""

    question_id: int | str
    text: str
    image: str | None


def id_key(value: Any, where: str) -> str:
    """The matching key of a question or answer id: ints and strings compare by their text (1 == "1"), so an answer
    file that wrote ids as strings still matches; any other type (float, list, null) is refused, naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: id {value!r} is a {type(value).__name__}; expected an integer or a string")
    return str(value)


def read_records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """The JSON objects of a file as (location, record): a JSON array or object file, or JSON lines.

    location is "FILE line N" (JSON lines) or "FILE item N"; an unparseable line or a non-object item raises
    ValueError naming it. Rohrbach et al.'s {"imgToEval": {...}} becomes its values.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            if not stripped.startswith("{"):
                raise ValueError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
            data = None  # JSON lines whose first line is an object
        if data is not None:
            if isinstance(data, dict) and isinstance(data.get("imgToEval"), dict):
                data = list(data["imgToEval"].values())
            if isinstance(data, dict):  # one JSON line, or one object
                return [(f"{path} line 1", data)]
            records = []
            for i, item in enumerate(data):
                if not isinstance(item, dict):
                    raise ValueError(f"{path} item {i}: {item!r} is not a JSON object")
                records.append((f"{path} item {i}", item))
            return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not valid JSON ({error.msg}): {line[:80]!r}") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path} line {number}: {item!r} is not a JSON object")
        records.append((f"{path} line {number}", item))
    return records


def read_answers(path: str | os.PathLike, id_keys: Sequence[str] = ID_KEYS) -> dict[str, tuple[str, str]]:
    """{id key: (answer text, location)} of an answer file in any layout of the module docstring; a record's id is
    the first of `id_keys` it has (CHAIR puts image_id first: a caption file may number its lines as question_id).

    Raises ValueError naming the line for a record without an id or an answer, an answer that is not a string, and
    a duplicate id (with both lines).
    """
    answers: dict[str, tuple[str, str]] = {}
    for where, record in read_records(path):
        id_field = next((k for k in id_keys if k in record), None)
        text_field = next((k for k in TEXT_KEYS if k in record), None)
        if id_field is None or text_field is None:
            raise ValueError(
                f"{where}: expected an id ({'/'.join(id_keys)}) and an answer ({'/'.join(TEXT_KEYS)}); "
                f"got keys {sorted(record)}"
            )
        key = id_key(record[id_field], where)
        if not isinstance(record[text_field], str):
            raise ValueError(f"{where}: {text_field} of id {key} is {record[text_field]!r}; expected a string")
        if key in answers:
            raise ValueError(f"{where}: duplicate id {key} (first at {answers[key][1]}); keep one answer per question")
        answers[key] = (record[text_field], where)
    return answers


def match_answers(
    question_ids: Sequence[str], answers: dict[str, tuple[str, str]], *, source: str, allow_partial: bool = False
) -> tuple[dict[str, str], dict[str, Any]]:
    """Answers of the questions, by id key, and the coverage record.

    An answer whose id is not a question is an error (naming the ids); a question without an answer is an error
    unless `allow_partial`, when only the answered questions are scored. coverage = {"questions": N, "answered": n,
    "fraction": n / N, "missing_ids": the first 20 unanswered ids}.
    """
    wanted = set(question_ids)
    unknown = [key for key in answers if key not in wanted]
    if unknown:
        first = answers[unknown[0]][1]
        raise ValueError(
            f"{source}: {len(unknown)} answers for ids that are not questions of this benchmark, e.g. "
            f"{unknown[:5]} ({first}); answer files of another benchmark or split?"
        )
    missing = [key for key in question_ids if key not in answers]
    if missing and not allow_partial:
        raise ValueError(
            f"{source}: {len(missing)} of {len(question_ids)} questions have no answer, e.g. ids "
            f"{missing[:5]}; answer them all, or pass --allow-partial to score the answered ones"
        )
    if len(missing) == len(question_ids):
        raise ValueError(f"{source}: none of the {len(question_ids)} questions has an answer")
    matched = {key: answers[key][0] for key in question_ids if key in answers}
    coverage = {
        "questions": len(question_ids),
        "answered": len(matched),
        "fraction": len(matched) / len(question_ids),
        "missing_ids": missing[:20],
    }
    return matched, coverage


def generate_answers(
    model: Any,
    processing_class: Any,
    questions: Sequence[Question],
    answer_file: str | os.PathLike,
    *,
    model_id: str,
    image_dir: str | os.PathLike | None = None,
    prompt_suffix: str = "",
    batch_size: int = 16,
    max_new_tokens: int = 128,
    progress: bool = True,
) -> Path:
    """Answer every question greedily and append the answers to `answer_file` (LLaVA layout) as each batch finishes.

    Resumable: questions already in `answer_file` are skipped. A file written by another model (other model_id)
    or for other questions is refused rather than mixed in; a last line cut off by a crash is dropped and its
    question answered again. A question becomes a TRL-style sample {"prompt": [user message: text + prompt_suffix],
    "images": [the RGB image]} rendered by `napo.inference.generate`, as `napo pairs` and `napo eval` render theirs.
    Returns the answer file's path.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from napo.inference import generate

    answer_file = Path(answer_file)
    answer_file.parent.mkdir(parents=True, exist_ok=True)
    keys = {id_key(q.question_id, "question"): q for q in questions}
    done = _resume(answer_file, keys, model_id)
    todo = [q for key, q in keys.items() if key not in done]
    bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc="answering", unit="q", disable=not progress)
    with answer_file.open("a", encoding="utf-8") as out:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            samples = []
            for q in batch:
                sample: dict[str, Any] = {"prompt": [{"role": "user", "content": q.text + prompt_suffix}]}
                if q.image is not None:
                    path = Path(image_dir or ".", q.image)
                    if not path.is_file():
                        raise ValueError(
                            f"question {q.question_id}: image {path} not found; pass --image-dir, the "
                            "folder the benchmark's image names are relative to"
                        )
                    with Image.open(path) as image:
                        sample["images"] = [image.convert("RGB")]
                samples.append(sample)
            texts = generate(model, processing_class, samples, batch_size=batch_size, max_new_tokens=max_new_tokens)
            for q, text in zip(batch, texts):
                out.write(
                    json.dumps(
                        {
                            "question_id": q.question_id,
                            "prompt": q.text + prompt_suffix,
                            "text": text,
                            "model_id": model_id,
                        }
                    )
                    + "\n"
                )
            out.flush()
            bar.update(len(batch))
    bar.close()
    return answer_file


def _resume(answer_file: Path, keys: dict[str, Question], model_id: str) -> set[str]:
    """Ids already answered in `answer_file` (see generate_answers); truncates a cut-off last line."""
    if not answer_file.exists():
        return set()
    raw = answer_file.read_bytes()
    if raw and not raw.endswith(b"\n"):  # a crash mid-write: drop the partial line
        raw = raw[: raw.rfind(b"\n") + 1]
        answer_file.write_bytes(raw)
    done = set()
    for where, record in read_records(answer_file) if raw.strip() else []:
        if record.get("model_id") != model_id:
            raise ValueError(
                f"{where}: answer of model {record.get('model_id')!r}, but this run answers with "
                f"{model_id!r}; use another --out or delete {answer_file}"
            )
        key = id_key(record.get("question_id"), where)
        if key not in keys:
            raise ValueError(
                f"{where}: question {key} is not in this benchmark's data; use another --out or delete {answer_file}"
            )
        done.add(key)
    return done


def answer_file_for(out: str | os.PathLike, split: str | None = None) -> Path:
    """Where answers generated for the metrics file `out` go: beside it, `<out stem>.answers[.<split>].jsonl`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.answers{'.' + split if split else ''}.jsonl")
