"""Standard benchmarks (napo.benchmarks): hand-checked fixtures scored by the rules of each reference script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from napo.benchmarks import BenchmarkSpec, evaluate, flat_metrics, parse_eval_spec
from napo.benchmarks.amber import amber_scores, load_amber
from napo.benchmarks.chair import caption_objects
from napo.benchmarks.pope import pope_yes_no
from napo.benchmarks.vlind import true_or_false
from napo.benchmarks.words import singularize, tokenize
from napo.cli import main


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------------------------------- POPE
@pytest.mark.parametrize(
    ("answer", "read_as"),
    [
        ("No doubt, yes", "no"),  # "No" is a word of the first sentence
        ("I don't see one", "yes"),  # "don't" is not "not"
        ("Yes, there is a dog.", "yes"),
        ("There is no dog in the image.", "no"),
        ("Not really", "yes"),  # capitalised "Not" is none of No / not / no
        ("no.", "no"),
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("No,there is none", "yes"),  # commas removed: "Nothere"
        ("I see no\ndog", "yes"),  # split on spaces only: "no\ndog" is one word
        ("There is not. No.", "no"),
        ("", "yes"),
    ],
)
def test_pope_reads_answers_as_llava_eval_pope(answer: str, read_as: str) -> None:
    assert pope_yes_no(answer) == read_as


def _pope_files(tmp_path: Path) -> tuple[Path, list[dict]]:
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    questions = [
        {"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a thing {i}?", "label": label}
        for i, label in enumerate(labels)
    ]
    return _jsonl(tmp_path / "coco_pope_random.json", questions), questions


def test_pope_metrics_from_an_answer_file_written_as_llava_model_vqa_loader_writes_it(tmp_path: Path) -> None:
    questions_file, questions = _pope_files(tmp_path)
    # Labels yes yes yes no no no; answers read as yes, yes, no | yes, no, no -> TP 2, FN 1, FP 1, TN 2.
    texts = ["Yes", "Yes, there is.", "No doubt, yes", "I don't see one", "There is no such thing.", "no"]
    # model_vqa_loader.py's lines: question_id, prompt, text, answer_id, model_id, metadata; here in reverse order.
    answers = [
        {
            "question_id": q["question_id"],
            "prompt": q["text"],
            "text": t,
            "answer_id": f"uuid{i}",
            "model_id": "llava-v1.5-7b",
            "metadata": {},
        }
        for i, (q, t) in enumerate(zip(questions, texts))
    ][::-1]
    out = tmp_path / "pope.json"
    main(
        [
            "eval",
            "--benchmark",
            "pope",
            "--data",
            str(questions_file),
            "--predictions",
            str(_jsonl(tmp_path / "answers.jsonl", answers)),
            "--out",
            str(out),
        ]
    )
    metrics = json.loads(out.read_text())
    assert metrics["counts"] == {"TP": 2, "FP": 1, "TN": 2, "FN": 1}
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["yes_ratio"] == pytest.approx(3 / 6)
    assert metrics["coverage"]["fraction"] == 1.0


def test_pope_several_splits_with_shared_ids_need_one_answer_file_each(tmp_path: Path) -> None:
    random_file, questions = _pope_files(tmp_path)
    popular = [{**q, "label": "no"} for q in questions]
    popular_file = _jsonl(tmp_path / "coco_pope_popular.json", popular)
    all_yes = _jsonl(tmp_path / "a.jsonl", [{"question_id": q["question_id"], "text": "Yes"} for q in questions])
    spec = BenchmarkSpec("pope", data=[str(random_file), str(popular_file)])
    with pytest.raises(ValueError, match="question id 1 is in both random and popular"):
        evaluate(spec, out=tmp_path / "m.json", predictions=[str(all_yes)])
    metrics = evaluate(spec, out=tmp_path / "m.json", predictions=[str(all_yes), str(all_yes)])
    assert metrics["splits"]["random"]["accuracy"] == pytest.approx(0.5)
    assert metrics["splits"]["popular"]["accuracy"] == 0.0
    assert metrics["splits"]["popular"]["precision"] == 0.0  # no true positive: 0, where the reference divides by 0
    assert metrics["accuracy"] == pytest.approx(0.25)  # the mean over splits
    assert metrics["yes_ratio"] == 1.0


def test_pope_bad_answer_files_stop_with_the_id_or_line(tmp_path: Path) -> None:
    questions_file, questions = _pope_files(tmp_path)
    spec = BenchmarkSpec("pope", data=[str(questions_file)])
    rows = [{"question_id": q["question_id"], "text": "Yes"} for q in questions]

    def score(rows_or_text, **kwargs):
        path = tmp_path / "bad.jsonl"
        if isinstance(rows_or_text, str):
            path.write_text(rows_or_text)
        else:
            _jsonl(path, rows_or_text)
        return evaluate(spec, out=tmp_path / "m.json", predictions=[str(path)], **kwargs)

    with pytest.raises(ValueError, match=r"1 of 6 questions have no answer, e\.g\. ids \['6'\]"):
        score(rows[:5])
    partial = score(rows[:5], allow_partial=True)
    assert partial["coverage"] == {"questions": 6, "answered": 5, "fraction": 5 / 6, "missing_ids": ["6"]}
    assert partial["counts"] == {"TP": 3, "FP": 2, "TN": 0, "FN": 0}
    with pytest.raises(ValueError, match=r"line 7: duplicate id 2 \(first at .*line 2\)"):
        score(rows + [rows[1]])
    with pytest.raises(ValueError, match=r"ids that are not questions.*\['99'\]"):
        score(rows + [{"question_id": 99, "text": "No"}])
    with pytest.raises(ValueError, match=r"bad.jsonl line 3: not valid JSON"):
        score("".join(json.dumps(r) + "\n" for r in rows[:2]) + "{oops\n")
    with pytest.raises(ValueError, match=r"line 1: expected an id"):
        score([{"qid": 1, "text": "Yes"}])
    with pytest.raises(ValueError, match=r"id 1.5 is a float"):
        score([{"question_id": 1.5, "text": "Yes"}])
    bad_label = _jsonl(tmp_path / "coco_pope_x.json", [{**questions[0], "label": "maybe"}])
    with pytest.raises(ValueError, match="coco_pope_x.json line 1: label 'maybe'"):
        evaluate(BenchmarkSpec("pope", data=[str(bad_label)]), out=tmp_path / "m.json", predictions=[str(bad_label)])


def test_napo_eval_benchmark_refuses_options_of_other_modes(tmp_path: Path) -> None:
    questions_file, _ = _pope_files(tmp_path)
    with pytest.raises(SystemExit, match="--n do not apply"):
        main(
            [
                "eval",
                "--benchmark",
                "pope",
                "--data",
                str(questions_file),
                "--predictions",
                "x",
                "--n",
                "3",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
    with pytest.raises(SystemExit, match="--data need --benchmark"):
        main(["eval", "--model", "m", "--data", str(questions_file)])
    with pytest.raises(SystemExit, match="pass --model .* or --predictions"):
        main(["eval", "--benchmark", "pope", "--data", str(questions_file), "--out", str(tmp_path / "m.json")])
    with pytest.raises(SystemExit, match="chair: pass --annotations"):
        main(["eval", "--benchmark", "chair", "--predictions", "x", "--out", str(tmp_path / "m.json")])


# ----------------------------------------------------------------------------------------------------- CHAIR
def test_singularize_follows_pattern_en_including_its_quirks() -> None:
    # Values of pattern.en.singularize (pattern 3.6), which the CHAIR reference calls on every token.
    expected = {
        "dogs": "dog",
        "people": "person",
        "women": "woman",
        "children": "child",
        "mice": "mouse",
        "knives": "knife",
        "buses": "bus",
        "benches": "bench",
        "glasses": "glass",
        "potatoes": "potato",
        "sheep": "sheep",
        "scissors": "scissors",
        "cookies": "cookies",
        "mothers-in-law": "mother-in-law",
        "bus": "bu",
        "glass": "glas",
        "ties": "ty",
        "lice": "louse",
        "water": "water",
        "ice": "ice",
    }
    assert {w: singularize(w) for w in expected} == expected


def test_tokenize_splits_as_nltk_word_tokenize_for_object_words() -> None:
    assert tokenize("a man's hot-dog, two dogs' bowls. it isn't (sofa)...") == [
        "a",
        "man",
        "'s",
        "hot-dog",
        ",",
        "two",
        "dogs",
        "'",
        "bowls",
        ".",
        "it",
        "is",
        "n't",
        "(",
        "sofa",
        ")",
        "...",
    ]


def test_caption_objects_use_two_word_and_qualifier_rules() -> None:
    assert caption_objects("A baby bird near hot dogs, wine glasses and a teddy bear.") == [
        ("bird", "bird"),
        ("hot dog", "hot dog"),
        ("wine glass", "wine glass"),
        ("teddy bear", "teddy bear"),
    ]
    # "seat" is a synonym of chair, but not next to a toilet; "motor bike" is not an object in the reference list.
    assert caption_objects("the seat of the toilet") == [("toilet", "toilet")]
    assert caption_objects("a seat and a motor bike and a motor cycle") == [
        ("seat", "chair"),
        ("motor cycle", "motorcycle"),
    ]


def _coco(tmp_path: Path) -> tuple[Path, Path]:
    names = ["person", "dog", "couch", "bird", "hot dog", "toilet", "dining table", "tie"]
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    cid = {n: i + 1 for i, n in enumerate(names)}
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (11, 22, 33)]
    annotations = [
        {"image_id": im, "category_id": cid[n]}
        for im, n in [
            (11, "person"),
            (11, "couch"),
            (11, "person"),
            (22, "bird"),
            (33, "toilet"),
            (33, "person"),
            (33, "dining table"),
        ]
    ]
    instances = _json(
        tmp_path / "instances_val2014.json", {"images": images, "annotations": annotations, "categories": categories}
    )
    captions = _json(
        tmp_path / "captions_val2014.json",
        {"annotations": [{"image_id": 22, "caption": "A hot dog on a plate."}, {"image_id": 999, "caption": "A dog."}]},
    )
    return instances, captions


CAPTIONS = {
    11: "A man sitting on a sofa with a dog and another dog.",  # person, couch, dog, dog: 2 hallucinated mentions
    22: "A baby bird next to hot dogs and a bus.",  # bird, hot dog (hallucinated); "bus" -> "bu" never matches
    33: "The seat of the toilet and the man's hat.",  # toilet, person; "seat" dropped next to toilet
}


def test_chair_on_hand_checked_captions_and_rohrbach_layout(tmp_path: Path) -> None:
    instances, captions = _coco(tmp_path)
    predictions = _jsonl(tmp_path / "caps.jsonl", [{"image_id": k, "caption": v} for k, v in CAPTIONS.items()])
    spec = BenchmarkSpec("chair", annotations=[str(instances)])
    metrics = evaluate(spec, out=tmp_path / "chair.json", predictions=[str(predictions)])
    assert metrics["chair_s"] == pytest.approx(2 / 3)
    assert metrics["chair_i"] == pytest.approx(3 / 8)  # every occurrence counts: 8 mentions, 3 hallucinated
    assert metrics["recall"] == pytest.approx(5 / 6)  # dining table of image 33 never mentioned
    assert [s["hallucinated"] for s in metrics["sentences"]] == [
        [["dog", "dog"], ["dog", "dog"]],
        [["hot dog", "hot dog"]],
        [],
    ]
    # With the reference captions as ground truth too, image 22's "hot dog" is no longer hallucinated.
    with_caps = evaluate(
        BenchmarkSpec("chair", annotations=[str(instances), str(captions)]),
        out=tmp_path / "c2.json",
        predictions=[str(predictions)],
    )
    assert with_caps["chair_s"] == pytest.approx(1 / 3) and with_caps["chair_i"] == pytest.approx(2 / 8)
    # The caption file Rohrbach et al.'s chair.py reads ({"overall", "imgToEval"}), same numbers.
    rohrbach = _json(
        tmp_path / "fc_beam5_test.json",
        {
            "overall": {"CIDEr": 1.0},
            "imgToEval": {str(k): {"image_id": k, "caption": v, "CIDEr": 1.0} for k, v in CAPTIONS.items()},
        },
    )
    again = evaluate(spec, out=tmp_path / "c3.json", predictions=[str(rohrbach)])
    assert (again["chair_s"], again["chair_i"]) == (metrics["chair_s"], metrics["chair_i"])
    # A LLaVA-layout caption file numbering its lines as question_id: the image_id decides.
    numbered = _jsonl(
        tmp_path / "numbered.jsonl",
        [{"question_id": i, "image_id": k, "text": v} for i, (k, v) in enumerate(CAPTIONS.items())],
    )
    again = evaluate(spec, out=tmp_path / "c4.json", predictions=[str(numbered)])
    assert (again["chair_s"], again["chair_i"]) == (metrics["chair_s"], metrics["chair_i"])


def test_chair_refuses_captions_of_images_absent_from_the_annotations(tmp_path: Path) -> None:
    instances, _ = _coco(tmp_path)
    predictions = _jsonl(
        tmp_path / "caps.jsonl", [{"image_id": 11, "caption": "a dog"}, {"image_id": 5, "caption": "x"}]
    )
    with pytest.raises(ValueError, match=r"caps.jsonl line 2: caption for image 5, which is not in"):
        evaluate(
            BenchmarkSpec("chair", annotations=[str(instances)]),
            out=tmp_path / "m.json",
            predictions=[str(predictions)],
        )
    questions = _jsonl(
        tmp_path / "q.jsonl", [{"question_id": 11, "image": "a.jpg"}, {"question_id": 44, "image": "b.jpg"}]
    )
    with pytest.raises(ValueError, match=r"q.jsonl line 2: image 44 is not in the CHAIR annotations"):
        evaluate(
            BenchmarkSpec("chair", data=[str(questions)], annotations=[str(instances)]),
            out=tmp_path / "m.json",
            predictions=[str(predictions)],
        )


# ----------------------------------------------------------------------------------------------------- AMBER
def _amber(tmp_path: Path) -> tuple[Path, Path]:
    annotations = [
        {"id": 1, "type": "generative", "truth": ["sky", "grass", "person"], "hallu": ["dog", "cloud"]},
        {"id": 2, "type": "generative", "truth": ["car"], "hallu": ["tree"]},
        {"id": 3, "type": "discriminative-hallucination", "truth": "yes"},
        {"id": 4, "type": "discriminative-hallucination", "truth": "no"},
        {"id": 5, "type": "discriminative-attribute-state", "truth": "no"},
        {"id": 6, "type": "discriminative-attribute-number", "truth": "no"},
        {"id": 7, "type": "relation", "truth": "yes"},
    ]
    queries = [{"id": a["id"], "image": f"AMBER_{a['id']}.jpg", "query": "Describe this image."} for a in annotations]
    return _json(tmp_path / "query_all.json", queries), _json(tmp_path / "annotations.json", annotations)


def test_amber_generative_and_discriminative_by_hand(tmp_path: Path) -> None:
    queries, annotations = _amber(tmp_path)
    responses = [
        # person, ground (grass's association word), sky: safe; dog (a "hallu" object) and cat: hallucinated.
        {"id": 1, "response": "A person walks on the ground under the sky with a dog and a cat."},
        # car: truth; light: a global safe word, never hallucinated.
        {"id": 2, "response": "A car with a light."},
        {"id": 3, "response": "Yes"},
        {"id": 4, "response": "No"},
        {"id": 5, "response": "Yes"},
        {"id": 6, "response": "No."},  # not exactly "No": neither answer, as the reference reads it
        {"id": 7, "response": "No"},
    ]
    # AMBER's own response layout: a JSON array of {"id", "response"}.
    spec = BenchmarkSpec("amber", data=[str(queries)], annotations=[str(annotations)])
    metrics = evaluate(spec, out=tmp_path / "amber.json", predictions=[str(_json(tmp_path / "r.json", responses))])
    gen = metrics["generative"]
    assert gen["chair"] == pytest.approx(2 / 7)  # 7 mentions (person ground sky dog cat car light), 2 hallucinated
    assert gen["cover"] == pytest.approx(4 / 4)  # sky, grass (via ground), person; car
    assert gen["hal"] == pytest.approx(1 / 2)
    assert gen["cog"] == pytest.approx(1 / 3)  # dog of {dog, cloud, tree}
    d = metrics["discriminative"]
    # truths yes no no no yes, answers Yes No Yes (none) No; "No" is positive: said No 2, correct No 1, truth No 3.
    assert d["all"]["accuracy"] == pytest.approx(2 / 5)
    assert d["all"]["precision"] == pytest.approx(1 / 2) and d["all"]["recall"] == pytest.approx(1 / 3)
    assert d["all"]["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert d["existence"]["accuracy"] == 1.0 and d["attribute"]["accuracy"] == 0.0 and d["relation"]["accuracy"] == 0.0
    printout = metrics["reference_printout"]
    assert printout["CHAIR"] == round(100 * 2 / 7.001, 1) and printout["discriminative/all"]["Recall"] == 33.3
    assert printout["discriminative/all"]["F1"] == round(2 * 0.5 * 0.333 / (0.5 + 0.333 + 0.0001) * 100, 1)
    pope_spec = BenchmarkSpec("amber", data=[str(queries)], annotations=[str(annotations)], amber_yes_no="pope")
    pope_read = evaluate(pope_spec, out=tmp_path / "a2.json", predictions=[str(tmp_path / "r.json")])
    assert pope_read["discriminative"]["all"]["accuracy"] == pytest.approx(3 / 5)  # "No." now read as No


def test_amber_refuses_ids_outside_its_annotations(tmp_path: Path) -> None:
    queries, annotations = _amber(tmp_path)
    extra = _json(tmp_path / "q2.json", [{"id": 50, "image": "AMBER_50.jpg", "query": "Describe."}])
    with pytest.raises(ValueError, match=r"q2.json item 0: id 50 is not in the annotations"):
        load_amber([str(queries), str(extra)], str(annotations))
    _, truth = load_amber([str(queries)], str(annotations))
    with pytest.raises(ValueError, match="yes_no='loose'"):
        amber_scores({"3": "Yes"}, truth, yes_no="loose")


# ----------------------------------------------------------------------------------------------------- VLind
def _vlind(tmp_path: Path) -> Path:
    def instance(concept: str, votes: dict[str, int]) -> dict:
        return {
            "concept": concept,
            "context_id": 0,
            "context": "lemons are blue",
            "factual_context": "lemons are yellow",
            "true_statement": "The lemon is blue.",
            "false_statement": "The lemon is yellow.",
            "existent_noun": "a lemon",
            "non-existent_noun": "a dog",
            "best_img_id": 0,
            "aggregated_human_label_good_images": votes,
        }

    return _json(
        tmp_path / "data.json",
        [instance("color", {"0": 3, "1": 2, "2": 1}), instance("size", {"0": 3}), instance("taste", {"0": 1})],
    )  # the third: no good image, left out


def test_vlind_pipeline_scores_by_hand(tmp_path: Path) -> None:
    data = _vlind(tmp_path)
    t, f = "True.", "false"
    answers = {
        # instance 0: CK pass, VP pass, CB pass; d on images 0 and 1: pass, prior (False/True).
        "0/a1": t,
        "0/a2": f,
        "0/b1": t,
        "0/b2": f,
        "0/c1": t,
        "0/c2": f,
        "0/d1/0": t,
        "0/d2/0": f,
        "0/d1/1": "False, it is yellow",
        "0/d2/1": "It is true",
        # instance 1: CK fails, so CB fails though c is right; VP pass; d: unparsed -> not a pass, not the prior.
        "1/a1": f,
        "1/a2": f,
        "1/b1": t,
        "1/b2": f,
        "1/c1": t,
        "1/c2": f,
        "1/d1/0": "maybe",
        "1/d2/0": f,
    }
    predictions = _jsonl(tmp_path / "a.jsonl", [{"question_id": k, "text": v} for k, v in answers.items()])
    metrics = evaluate(
        BenchmarkSpec("vlind", data=[str(data)]), out=tmp_path / "v.json", predictions=[str(predictions)]
    )
    assert metrics["instances"] == 2
    assert metrics["commonsense_knowledge"] == 0.5 and metrics["visual_perception"] == 1.0
    assert metrics["commonsense_bias"] == 1.0  # c passes among a passes: 1 / 1
    assert metrics["language_prior"] == pytest.approx(0.5)  # instance 0 (b and c pass): d 1 of 2 images
    assert metrics["counterfactual_accuracy"] == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["language_prior_rate"] == pytest.approx((0.5 + 0.0) / 2)
    assert true_or_false("Yes, it is TRUE.") == "True" and true_or_false("truly") == "NA"

    # The same answers in the file VLind-Bench's own eval/instructblip_eval.py writes: data.json + "<model>_pred_*".
    written = json.loads(data.read_text())
    for i, item in enumerate(written[:2]):
        for test, field in [
            ("a1", "a1_image"),
            ("a2", "a2_image"),
            ("b1", "b1"),
            ("b2", "b2"),
            ("c1", "c1_image"),
            ("c2", "c2_image"),
        ]:
            item[f"instructblip_pred_{field}"] = {"response": answers[f"{i}/{test}"]}
        for test in ("d1", "d2"):
            item[f"instructblip_pred_{test}"] = {
                k.rsplit("/", 1)[1]: {"response": v} for k, v in answers.items() if k.startswith(f"{i}/{test}/")
            }
    reference = _json(tmp_path / "data_instructblip_7b.json", written)
    again = evaluate(BenchmarkSpec("vlind", data=[str(data)]), out=tmp_path / "v2.json", predictions=[str(reference)])
    assert {k: again[k] for k in metrics if k not in ("answers", "coverage")} == {
        k: metrics[k] for k in metrics if k not in ("answers", "coverage")
    }


def test_vlind_questions_use_the_reference_prompts_and_image_paths(tmp_path: Path) -> None:
    from napo.benchmarks.vlind import load_vlind

    questions, instances = load_vlind(_vlind(tmp_path))
    by_id = {q.question_id: q for q in questions}
    assert [i["index"] for i in instances] == [0, 1]
    # instructblip_eval.py: prompt(false_statement, 'commonsense_TF_reversed') on the factual image.
    assert by_id["0/a1"].text == (
        "Only respond in True or False.\nStatement: The lemon is yellow.\n"
        "Based on common sense, is the given statement true or false?"
    )
    assert by_id["0/a1"].image == "factual/color/0_lemons are yellow/0.jpg"
    assert by_id["0/b2"].text.startswith(
        "Only respond in True or False.\nStatement: There is a dog in the given image."
    )
    assert by_id["0/c1"].text == (
        "Only respond in True or False.\nContext: lemons are blue\nStatement: The lemon is "
        "blue.\nBased on the context, is the given statement true or false?"
    )
    assert by_id["0/d2/1"].image == "counterfactual/color/0_lemons are blue/1.jpg"
    assert "0/d1/2" not in by_id  # image 2 has 1 vote, under the threshold of 2
    gpt4o = {q.question_id: q for q in load_vlind(tmp_path / "data.json", "gpt4o")[0]}
    assert gpt4o["0/d1/0"].text == (
        "Statement: The lemon is blue.\nBased on the image, is the given statement true or "
        "false? Forget real-world common sense and just follow the information provided in "
        "the image. Only respond in True or False."
    )


# ----------------------------------------------------------------------------------------------------- compare
def test_parse_eval_spec_and_flat_metrics(tmp_path: Path) -> None:
    specs = parse_eval_spec(
        "pope=a/coco_pope_random.json,pope=a/coco_pope_popular.json,"
        "amber=q.json,amber.annotations=ann.json,amber.image_dir=imgs"
    )
    assert specs["pope"].data == ["a/coco_pope_random.json", "a/coco_pope_popular.json"]
    assert specs["pope"].image_dir == "a" and specs["amber"].annotations == ["ann.json"]
    with pytest.raises(ValueError, match="benchmark 'mmhal'"):
        parse_eval_spec("mmhal=x.json")
    with pytest.raises(ValueError, match="option 'folder'"):
        parse_eval_spec("pope=x.json,pope.folder=y")
    flat = flat_metrics(
        "amber",
        {
            "generative": {"chair": 0.1, "n": 3},
            "discriminative": {"all": {"f1": 0.5}},
            "coverage": {"fraction": 1.0},
            "reference_printout": {"CHAIR": 10.0},
        },
    )
    assert flat == {"amber/generative/chair": 0.1, "amber/discriminative/all/f1": 0.5}


# ----------------------------------------------------------------------------------------------------- --model
@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    from napo.models import build_tiny_model

    folder = tmp_path_factory.mktemp("llava")
    model, processor = build_tiny_model("llava", seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _random_images(folder: Path, names: list[str]) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_napo_eval_pope_generates_resumable_llava_layout_answers_with_a_tiny_llava(
    tiny_llava: Path, tmp_path: Path
) -> None:
    import numpy as np

    questions_file, questions = _pope_files(tmp_path)
    images = _random_images(tmp_path / "val2014", [q["image"] for q in questions])
    out = tmp_path / "results" / "pope.json"
    command = [
        "eval",
        "--benchmark",
        "pope",
        "--model",
        str(tiny_llava),
        "--data",
        str(questions_file),
        "--image-dir",
        str(images),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--max-new-tokens",
        "4",
        "--no-progress",
    ]
    main(command)
    answer_file = tmp_path / "results" / "pope.answers.jsonl"
    lines = [json.loads(line) for line in answer_file.read_text().splitlines()]
    assert [a["question_id"] for a in lines] == [q["question_id"] for q in questions]
    assert all(set(a) == {"question_id", "prompt", "text", "model_id"} for a in lines)
    assert [a["prompt"] for a in lines] == [q["text"] for q in questions]
    metrics = json.loads(out.read_text())
    # The metrics are those of the answers written, by the reference rule transcribed here.
    said_yes = [
        not any(w in ("No", "not", "no") for w in a["text"].split(".")[0].replace(",", "").split(" ")) for a in lines
    ]
    is_yes = [q["label"] == "yes" for q in questions]
    assert metrics["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(said_yes, is_yes)]))
    assert metrics["yes_ratio"] == pytest.approx(np.mean(said_yes))
    assert metrics["answers"] == [str(answer_file)]

    # Crash after 2 answers, the third half written: the rerun answers the rest, and greedy answers are the same.
    answer_file.write_text("".join(json.dumps(a) + "\n" for a in lines[:2]) + '{"question_id": 3, "te')
    main(command)
    assert [json.loads(line) for line in answer_file.read_text().splitlines()] == lines
    assert json.loads(out.read_text())["accuracy"] == metrics["accuracy"]
    # Another model's answers are not mixed in.
    lines[0]["model_id"] = "someone-else"
    answer_file.write_text("".join(json.dumps(a) + "\n" for a in lines[:1]))
    with pytest.raises(SystemExit, match="answer of model 'someone-else'"):
        main(command)


def test_napo_eval_chair_captions_the_images_of_the_annotations_with_a_tiny_llava(
    tiny_llava: Path, tmp_path: Path
) -> None:
    instances, _ = _coco(tmp_path)
    images = _random_images(tmp_path / "val2014", [f"COCO_val2014_{i:012d}.jpg" for i in (11, 22, 33)])
    out = tmp_path / "chair.json"
    main(
        [
            "eval",
            "--benchmark",
            "chair",
            "--model",
            str(tiny_llava),
            "--annotations",
            str(instances),
            "--image-dir",
            str(images),
            "--out",
            str(out),
            "--max-new-tokens",
            "6",
            "--prompt",
            "Describe it.",
            "--no-progress",
        ]
    )
    answers = [json.loads(line) for line in (tmp_path / "chair.answers.jsonl").read_text().splitlines()]
    assert [(a["question_id"], a["prompt"]) for a in answers] == [
        (11, "Describe it."),
        (22, "Describe it."),
        (33, "Describe it."),
    ]
    metrics = json.loads(out.read_text())
    rescored = evaluate(
        BenchmarkSpec("chair", annotations=[str(instances)]),
        out=tmp_path / "re.json",
        predictions=[str(tmp_path / "chair.answers.jsonl")],
    )
    assert [s["caption"] for s in metrics["sentences"]] == [a["text"] for a in answers]
    assert (metrics["chair_s"], metrics["chair_i"], metrics["recall"]) == (
        rescored["chair_s"],
        rescored["chair_i"],
        rescored["recall"],
    )
