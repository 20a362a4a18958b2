"""napo pairs and napo.inference.generate, end to end on tiny models saved to disk and loaded by path."""

from __future__ import annotations

import json
import shutil

import datasets
import numpy as np
import pytest
from helpers import comparable_rows
from PIL import Image

import perturb
from napo.cli import main
from napo.data import read_dataset, validate_preference_dataset
from napo.inference import generate
from napo.models import build_tiny_model, load_model
from napo.pairs import VISION_NEGATIVES, PairsConfig, build_pairs, inject_label_noise, parse_negatives

N_ROWS = 20
OBJECTS = ["bear", "banana", "apple", "lemon", "sky", "grass", "snow", "car", "bird", "frog"]


def _question(i: int) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "text": None},
                {"type": "text", "text": f"what colour is the {OBJECTS[i % len(OBJECTS)]}?"},
            ],
        }
    ]


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llava")
    model, processor = build_tiny_model("llava", seed=1)
    # A random model often says <eos> first; at least 2 tokens keeps every negative a non-empty answer.
    model.generation_config.min_new_tokens = 2
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vlm(vlm_path):
    return load_model(vlm_path)


def _write_source(folder, n: int = N_ROWS, chosen: dict[int, str] | None = None) -> str:
    """n rows of JSONL (messages prompt, one PNG image, chosen, id) under folder; `chosen` overrides some answers."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
        answer = (chosen or {}).get(i, f"the {OBJECTS[i % len(OBJECTS)]} is white")
        lines.append(json.dumps({"prompt": _question(i), "images": [f"img/{i}.png"], "chosen": answer, "id": i}))
    (folder / "source.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "source.jsonl")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, vlm_path):
    """One uninterrupted CLI run on N_ROWS rows: (source path, output dir)."""
    folder = tmp_path_factory.mktemp("clean")
    source = _write_source(folder)
    main(
        [
            "pairs",
            "--source",
            source,
            "--model",
            vlm_path,
            "--output-dir",
            str(folder / "out"),
            "--max-new-tokens",
            "6",
            "--batch-size",
            "4",
            "--shard-size",
            "8",
            "--no-progress",
        ]
    )
    return source, folder / "out"


def test_output_has_design_columns_and_the_original_inputs(clean_run):
    source, out = clean_run
    dataset = datasets.load_from_disk(str(out / "dataset"))
    assert dataset.column_names == [
        "prompt",
        "images",
        "chosen",
        "id",
        "rejected_language_bias",
        "rejected_vision_bias",
    ]
    assert validate_preference_dataset(dataset) == ["rejected_language_bias", "rejected_vision_bias"]
    assert dataset["id"] == list(range(N_ROWS))
    expected, _ = read_dataset(source)
    assert comparable_rows(dataset, ["prompt", "images", "chosen"]) == comparable_rows(
        expected, ["prompt", "images", "chosen"]
    )
    parquet = datasets.Dataset.from_parquet(str(out / "data.parquet"))
    assert parquet.to_list() == dataset.to_list()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["source_rows"] == stats["rows_written"] == N_ROWS and stats["rejects"] == 0
    assert sum(stats["answer_words_histogram"]["chosen"]) == N_ROWS
    assert "| rejected_vision_bias | `text.drop_question` |" in (out / "stats.md").read_text()


def test_negatives_equal_generate_on_the_perturbed_row(clean_run, vlm):
    """Independent reference: perturb each row ourselves and answer it alone (batch size 1)."""
    _, out = clean_run
    model, processor = vlm
    dataset = datasets.load_from_disk(str(out / "dataset"))
    for column, spec in VISION_NEGATIVES.items():
        degraded = [perturb.apply(spec, {"prompt": row["prompt"], "images": row["images"]}) for row in dataset]
        reference = generate(model, processor, degraded, batch_size=1, max_new_tokens=6)
        assert dataset[column] == reference, column
    assert dataset["rejected_language_bias"] != dataset["rejected_vision_bias"]


def test_interrupted_job_resumes_every_row_exactly_once(tmp_path, vlm_path, clean_run):
    source = _write_source(tmp_path)
    config = PairsConfig(source, vlm_path, str(tmp_path / "out"), max_new_tokens=6, batch_size=4, shard_size=8)

    def crash_after_first_shard(shard_id: int) -> None:
        raise KeyboardInterrupt  # what Ctrl-C or a kill between shards looks like to the job

    with pytest.raises(KeyboardInterrupt):
        build_pairs(config, progress=False, on_shard=crash_after_first_shard)
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["00000", "00000.json"]
    (tmp_path / "out" / "shards" / "00001.tmp-4242").mkdir()  # a kill mid-write leaves a half-written folder
    finished = []
    build_pairs(config, progress=False, on_shard=finished.append)
    assert finished == [1, 2]  # shard 0 was not redone
    assert not list((tmp_path / "out" / "shards").glob("*.tmp-*"))
    dataset = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    assert dataset["id"] == list(range(N_ROWS))
    uninterrupted = datasets.load_from_disk(str(clean_run[1] / "dataset"))
    assert dataset.to_list() == uninterrupted.to_list()


def test_resume_with_other_arguments_is_refused(tmp_path, vlm_path, capsys):
    source = _write_source(tmp_path, n=3)
    args = [
        "pairs",
        "--source",
        source,
        "--model",
        vlm_path,
        "--output-dir",
        str(tmp_path / "out"),
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    main(args)
    assert str(tmp_path / "out" / "data.parquet") in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"other arguments \(batch_size: 8 -> 2\).*--overwrite"):
        main([*args, "--batch-size", "2"])
    main([*args, "--batch-size", "2", "--overwrite"])
    assert json.loads((tmp_path / "out" / "args.json").read_text())["batch_size"] == 2


def test_output_folder_of_something_else_is_refused(tmp_path, vlm_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no napo pairs job"):
        build_pairs(PairsConfig(_write_source(tmp_path, n=2), vlm_path, str(tmp_path / "out")), progress=False)


def test_bad_rows_go_to_rejects_and_the_rest_is_written(tmp_path, vlm_path):
    source = _write_source(tmp_path, n=6)
    (tmp_path / "img" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = (tmp_path / "source.jsonl").read_text().splitlines()
    row4 = json.loads(lines[4])
    del row4["chosen"]
    lines[4] = json.dumps(row4)
    (tmp_path / "source.jsonl").write_text("\n".join(lines) + "\n")
    stats = build_pairs(PairsConfig(source, vlm_path, str(tmp_path / "out"), max_new_tokens=3), progress=False)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejects] == [(2, "images"), (4, "chosen")]
    assert "cannot be decoded as an image" in rejects[0]["reason"] and "missing (None)" in rejects[1]["reason"]
    assert datasets.load_from_disk(str(tmp_path / "out" / "dataset"))["id"] == [0, 1, 3, 5]
    assert stats["rejects"] == 2 and stats["rows_written"] == 4


def test_negatives_identical_to_chosen_are_dropped_unless_kept(tmp_path, vlm, vlm_path):
    model, processor = vlm
    source = _write_source(tmp_path, n=4)
    rows, _ = read_dataset(source)
    blind = generate(model, processor, [perturb.apply("image.drop", dict(row)) for row in rows], max_new_tokens=4)
    source = _write_source(tmp_path, n=4, chosen={0: blind[0].upper(), 1: blind[1]})  # case does not matter
    negatives = {"rejected_language_bias": "image.drop"}
    config = PairsConfig(source, vlm_path, str(tmp_path / "drop"), negatives=negatives, max_new_tokens=4)
    stats = build_pairs(config, progress=False)
    assert datasets.load_from_disk(str(tmp_path / "drop" / "dataset"))["id"] == [2, 3]
    assert (
        stats["dropped_no_negative"] == 2 and stats["negatives"]["rejected_language_bias"]["identical_to_chosen"] == 2
    )
    kept = PairsConfig(
        source, vlm_path, str(tmp_path / "keep"), negatives=negatives, max_new_tokens=4, keep_identical=True
    )
    build_pairs(kept, progress=False)
    assert datasets.load_from_disk(str(tmp_path / "keep" / "dataset"))["rejected_language_bias"][:2] == blind[:2]


def test_label_noise_flips_exactly_round_rate_n_rows(clean_run, tmp_path, vlm_path):
    source, clean_out = clean_run
    clean = datasets.load_from_disk(str(clean_out / "dataset"))
    config = PairsConfig(
        source,
        vlm_path,
        str(tmp_path / "out"),
        max_new_tokens=6,
        batch_size=4,
        shard_size=8,
        inject_label_noise=0.3,
        seed=0,
    )
    stats = build_pairs(config, progress=False)
    noisy = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    assert noisy.features["noisy"] == datasets.Value("bool")
    flipped = [i for i, flag in enumerate(noisy["noisy"]) if flag]
    assert len(flipped) == round(0.3 * N_ROWS) == stats["label_noise"]["rows_swapped"]
    for i, (before, after) in enumerate(zip(clean, noisy)):
        if i in flipped:
            assert after["chosen"] == before["rejected_language_bias"]
            assert after["rejected_language_bias"] == after["rejected_vision_bias"] == before["chosen"]
        else:
            assert {k: after[k] for k in before if k != "images"} == {k: before[k] for k in before if k != "images"}


def test_inject_label_noise_is_deterministic_per_seed():
    dataset = datasets.Dataset.from_dict(
        {"prompt": ["q"] * 50, "chosen": [f"c{i}" for i in range(50)], "rejected": [f"r{i}" for i in range(50)]}
    )
    first, rows = inject_label_noise(dataset, 0.1, seed=3)
    again, same_rows = inject_label_noise(dataset, 0.1, seed=3)
    _, other_rows = inject_label_noise(dataset, 0.1, seed=4)
    assert rows == same_rows != other_rows and len(rows) == 5
    assert first.to_list() == again.to_list()
    assert [first["chosen"][i] for i in rows] == [f"r{i}" for i in rows]
    assert inject_label_noise(dataset, 0.0, seed=3)[1] == [] and len(inject_label_noise(dataset, 1.0, seed=3)[1]) == 50
    with pytest.raises(ValueError, match=r"expected a fraction in \[0, 1\]"):
        inject_label_noise(dataset, 1.5, seed=0)


def test_bad_negative_arguments_fail_before_generation(tmp_path):
    source = _write_source(tmp_path, n=2)
    with pytest.raises(ValueError, match="expected COLUMN=SPEC"):
        parse_negatives(["image.drop"])
    assert parse_negatives(["rejected=image.diffusion(t=500)"]) == {"rejected": "image.diffusion(t=500)"}
    with pytest.raises(ValueError, match="image.dorp"):
        build_pairs(
            PairsConfig(source, "no-model-needed", str(tmp_path / "a"), negatives={"rejected": "image.dorp"}),
            progress=False,
        )
    with pytest.raises(ValueError, match=r"negative column 'rejected_colour_bias': expected one of"):
        build_pairs(
            PairsConfig(
                source, "no-model-needed", str(tmp_path / "b"), negatives={"rejected_colour_bias": "image.drop"}
            ),
            progress=False,
        )


def test_generate_mixes_text_only_and_image_samples(vlm):
    """A batch where only some samples have an image: same answers as one sample at a time, in input order."""
    model, processor = vlm
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(24, 24, 3), dtype=np.uint8))
    samples = [
        {"prompt": _question(0), "images": [image]},
        {"prompt": [{"role": "user", "content": "what colour is the sky?"}]},
        {"prompt": [{"role": "user", "content": "what colour is the bear?"}], "images": [image]},  # placeholder added
        {"prompt": _question(3), "images": [image.rotate(90)]},
    ]
    batched = generate(model, processor, samples, batch_size=4, max_new_tokens=5)
    alone = [generate(model, processor, [s], batch_size=1, max_new_tokens=5)[0] for s in samples]
    assert batched == alone and all(batched)
    sampled = generate(model, processor, samples, batch_size=2, max_new_tokens=5, do_sample=True, seed=7)
    assert sampled == generate(model, processor, samples, batch_size=2, max_new_tokens=5, do_sample=True, seed=7)


def test_audio_dataset_gets_audio_negatives(tmp_path):
    import soundfile

    model, processor = build_tiny_model("qwen2_audio", seed=0)
    model.generation_config.min_new_tokens = 2
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    lines = []
    for i in range(3):
        tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * np.arange(8000) / 16000)
        soundfile.write(tmp_path / f"{i}.wav", tone.astype(np.float32), 16000)
        prompt = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "what do you hear?"}]}]
        lines.append(json.dumps({"prompt": prompt, "audio": f"{i}.wav", "chosen": f"tone {i}"}))
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    stats = build_pairs(
        PairsConfig(str(tmp_path / "a.jsonl"), str(tmp_path / "model"), str(tmp_path / "out"), max_new_tokens=3),
        progress=False,
    )
    dataset = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    assert list(stats["negatives"]) == ["rejected_language_bias", "rejected_audio_bias"]
    assert stats["negatives"]["rejected_language_bias"]["spec"] == "audio.drop"
    assert validate_preference_dataset(dataset) == ["rejected_language_bias", "rejected_audio_bias"]
    assert dataset[0]["sampling_rate"] == 16000 and len(dataset[0]["audios"][0]) == 8000


def test_overwrite_removes_only_job_files(tmp_path, vlm_path):
    source = _write_source(tmp_path, n=2)
    out = tmp_path / "out"
    build_pairs(PairsConfig(source, vlm_path, str(out), max_new_tokens=2), progress=False)
    (out / "mine.txt").write_text("keep me")
    build_pairs(PairsConfig(source, vlm_path, str(out), max_new_tokens=3), overwrite=True, progress=False)
    assert (out / "mine.txt").read_text() == "keep me"
    shutil.rmtree(out)
