"""CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning", arXiv:1809.02156), scored as its
reference `utils/chair.py` (github.com/LisaAnne/Hallucination) scores it.

A caption is lowercased, tokenised and every token singularised (`napo.benchmarks.words`, the reference's NLTK
and pattern.en steps); COCO's two-word objects ("hot dog", "teddy bear", ...) and qualifier phrases ("baby bird"
-> bird, "passenger jet" -> jet, "bow tie" -> tie) are merged left to right; "seat" is dropped when "toilet" is
in the caption; every remaining token that is a COCO object or one of its synonyms (`data/chair_synonyms.txt`,
the reference's list, parsed as it parses it) is a mention of its canonical object. The ground-truth objects of an
image are the canonical names of its COCO instance categories and, when captions are given, the objects its
reference captions mention.

    CHAIR_s = captions with >= 1 hallucinated mention / captions
    CHAIR_i = hallucinated mentions / mentions          (every occurrence counts, as in the reference)
    recall  = sum |mentioned objects ∩ ground truth| / sum |ground truth|   (not in the reference script)

Quirks kept because published numbers include them: the synonym line "motorcycle, scooter,  motor bike" makes
the reference's object " motor bike" (with a space), so "motor bike" never matches; pattern singularises "bus" to
"bu" and "ties" to "ty", so those words never match either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from napo.benchmarks.answers import Question, id_key
from napo.benchmarks.words import data_text, singularize, tokenize

# The reference's hard-coded phrases (utils/chair.py, CHAIR.__init__), as data: two-word COCO objects kept as one
# word, and qualifiers that would otherwise fire "person" ("baby bird" -> bird, "passenger train" -> train).
_DOUBLE_WORDS = (
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
)
_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_VEHICLE_WORDS = ("jet", "train")


@lru_cache(maxsize=1)
def vocabulary() -> tuple[dict[str, str], dict[str, str]]:
    """(synonym -> canonical COCO object, two-word phrase -> the word it counts as), from the packaged lists."""
    canonical: dict[str, str] = {}
    for line in data_text("chair_synonyms.txt").splitlines():
        if not line.strip():
            continue
        words = line.strip().split(", ")  # the reference's split: a double space leaves " motor bike"
        for word in words:
            canonical[word] = words[0]
    double = {phrase: phrase for phrase in _DOUBLE_WORDS}
    for animal in _ANIMAL_WORDS:
        double[f"baby {animal}"] = double[f"adult {animal}"] = animal
    for vehicle in _VEHICLE_WORDS:
        double[f"passenger {vehicle}"] = vehicle
    double.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return canonical, double


def caption_objects(caption: str) -> list[tuple[str, str]]:
    """Every COCO object mention of a caption, in order, as (word as found, canonical object)."""
    canonical, double = vocabulary()
    words = [singularize(w) for w in tokenize(caption.lower())]
    merged, i = [], 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in double:
            merged.append(double[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    if "toilet" in merged and "seat" in merged:  # "the seat of the toilet" is not a chair
        merged = [w for w in merged if w != "seat"]
    return [(w, canonical[w]) for w in merged if w in canonical]


def load_chair(
    instances: str | os.PathLike, captions: Sequence[str | os.PathLike] = (), *, prompt: str
) -> tuple[list[Question], dict[str, set[str]]]:
    """The images of a COCO instances file as caption questions (question_id = image id, image = file_name, text
    = prompt) and the ground-truth objects of each image by id key (instance categories, plus the objects of
    the images' reference captions in the COCO captions files `captions`).

    Raises ValueError for a file that is not COCO instances / captions JSON, an annotation of an unknown category
    or image, and a category name that is not in the synonym list.
    """
    data = _load_json(instances, ("images", "annotations", "categories"))
    canonical, _ = vocabulary()
    names = {c["id"]: c["name"] for c in data["categories"]}
    for name in names.values():
        if name not in canonical:
            raise ValueError(f"{instances}: category {name!r} is not a COCO object of the CHAIR synonym list")
    objects: dict[str, set[str]] = {id_key(image["id"], f"{instances} images"): set() for image in data["images"]}
    questions = [Question(image["id"], prompt, image["file_name"]) for image in data["images"]]
    for i, ann in enumerate(data["annotations"]):
        key = id_key(ann.get("image_id"), f"{instances} annotations[{i}]")
        if key not in objects or ann.get("category_id") not in names:
            raise ValueError(
                f"{instances} annotations[{i}]: image {key} / category {ann.get('category_id')} is not "
                "listed in the file's images / categories"
            )
        objects[key].add(canonical[names[ann["category_id"]]])
    for path in captions:
        for i, ann in enumerate(_load_json(path, ("annotations",))["annotations"]):
            key = id_key(ann.get("image_id"), f"{path} annotations[{i}]")
            if key in objects:  # captions files cover all of COCO; keep the images being scored
                objects[key].update(obj for _, obj in caption_objects(ann["caption"]))
    return questions, objects


def chair_scores(captions: dict[str, str], objects: dict[str, set[str]]) -> dict:
    """chair_s, chair_i, recall and per-caption details (module docstring) of captions (image id key -> text)."""
    sentences, mentions, hallucinated_mentions, hallucinated_captions, found, truth = [], 0, 0, 0, 0, 0
    for key, caption in captions.items():
        gt = objects[key]
        found_objects = caption_objects(caption)
        hallucinated = [[word, obj] for word, obj in found_objects if obj not in gt]
        mentions += len(found_objects)
        hallucinated_mentions += len(hallucinated)
        hallucinated_captions += bool(hallucinated)
        found += len({obj for _, obj in found_objects} & gt)
        truth += len(gt)
        sentences.append(
            {
                "image_id": key,
                "caption": caption,
                "hallucinated": hallucinated,
                "mentioned": [obj for _, obj in found_objects],
                "ground_truth": sorted(gt),
            }
        )
    return {
        "chair_s": hallucinated_captions / len(captions),
        "chair_i": hallucinated_mentions / mentions if mentions else 0.0,
        "recall": found / truth if truth else 0.0,
        "n": len(captions),
        "mentions": mentions,
        "sentences": sentences,
    }


def _load_json(path: str | os.PathLike, keys: tuple[str, ...]) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise ValueError(f"{path}: expected a COCO annotation file with keys {list(keys)}")
    return data
