"""The audio bias lab: clips that carry what their rows say, priors at the recipe's rates, and the whole
pipeline (SFT -> `napo pairs` audio negatives -> DPO/NaPO steps -> audio metrics) on a tiny Qwen2-Audio."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from napo.lab import sounds
from napo.lab.scenes import words

RECIPE = sounds.load_recipe()


def _clean(recipe: dict) -> dict:
    """The recipe without noise, detuning, gain or bursts: what a row says must be measurable exactly."""
    rec = copy.deepcopy(recipe)
    rec["audio"].update(snr_db=200.0, detune_cents=0, gain_db=[0.0, 0.0], burst_probability=0.0)
    return rec


def _peak_hz(wave: np.ndarray, rate: int = 16000) -> float:
    """Frequency (Hz) of the strongest FFT bin of a Hann-windowed wave."""
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.fft.rfftfreq(wave.size, 1 / rate)[spectrum.argmax()])


def test_rows_are_deterministic_and_prefix_stable() -> None:
    a = sounds.make_split(RECIPE, "train", 6, seed=3)
    b = sounds.make_split(RECIPE, "train", 3, seed=3)
    for x, y in zip(a, b):
        assert x["prompt"] == y["prompt"] and x["answer"] == y["answer"]
        np.testing.assert_array_equal(x["audios"][0], y["audios"][0])
    row = a[0]
    assert row["sampling_rate"] == 16000 and row["audios"][0].dtype == np.float32 and row["audios"][0].shape == (16000,)
    assert np.abs(row["audios"][0]).max() <= 1.0
    assert sounds.make_split(RECIPE, "train", 1, seed=4)[0]["audios"][0].tolist() != row["audios"][0].tolist()


def test_train_split_follows_the_priors() -> None:
    rows = sounds.make_split(RECIPE, "train", 600, seed=0)
    attribute = [r for r in rows if r["kind"] == "attribute" and r["prior_answer"] is not None]
    typical_rate = np.mean([r["answer"] == r["prior_answer"] for r in attribute])
    assert 0.9 <= typical_rate <= 0.99  # recipe: 0.95
    existence = [r for r in rows if r["kind"] == "existence"]
    assert 0.65 <= np.mean([r["answer"] == "yes" for r in existence]) <= 0.92  # recipe: 0.8
    assert {r["kind"] for r in rows} == set(sounds.KINDS)


def test_counterfactual_contradicts_and_prior_consistent_matches_the_prior() -> None:
    counterfactual = sounds.make_split(RECIPE, "counterfactual", 40, seed=0)
    consistent = sounds.make_split(RECIPE, "prior_consistent", 40, seed=0)
    assert all(r["prior_answer"] and r["answer"] != r["prior_answer"] for r in counterfactual)
    assert all(r["answer"] == r["prior_answer"] for r in consistent)
    assert len({r["answer"] for r in counterfactual}) >= 4  # atypical notes are spread, not one note


def test_no_prior_split_asks_only_about_instruments_without_a_typical_note() -> None:
    rows = sounds.make_split(RECIPE, "no_prior", 60, seed=0)
    assert {r["objects"][0] for r in rows} == {n for n, i in RECIPE["instruments"].items() if i["typical"] is None}
    assert all(r["prior_answer"] is None and r["kind"] == "attribute" for r in rows)
    assert len({r["answer"] for r in rows}) == len(RECIPE["notes"])  # every note, none favoured
    rec = copy.deepcopy(RECIPE)
    rec["instruments"] = {n: i for n, i in rec["instruments"].items() if i["typical"]}
    with pytest.raises(ValueError, match="no_prior"):
        sounds.make_split(rec, "no_prior", 1, seed=0)


def test_clip_plays_the_note_the_row_names() -> None:
    rec = _clean(RECIPE)
    for row in sounds.make_split(rec, "counterfactual", 12, seed=1):
        hz = rec["notes"][row["answer"]]
        # The fundamental is every timbre's strongest harmonic (amplitude 1.0 is each list's max).
        assert abs(_peak_hz(row["audios"][0]) - hz) < 2.0, row


def test_beeps_are_counted_as_the_row_says() -> None:
    rec = _clean(RECIPE)
    rows = [r for r in sounds.make_split(rec, "train", 80, seed=2) if r["kind"] in ("count", "existence")]
    assert rows
    beep_hz, rate = rec["beeps"]["frequency"], 16000
    t = np.arange(rate) / rate
    for row in rows:
        # Demodulate at the beep frequency and low-pass (10 ms frames): beeps are the loud runs.
        wave = row["audios"][0].astype(np.float64)
        frames = np.abs((wave * np.exp(-2j * np.pi * beep_hz * t)).reshape(-1, 160).mean(axis=1))
        loud = frames > 0.5 * frames.max() if frames.max() > 0.01 else np.zeros_like(frames, dtype=bool)
        runs = int(np.sum(loud[1:] & ~loud[:-1]) + loud[0])
        if row["answer"] == "yes":
            assert runs >= 1, row
        else:
            assert runs == (0 if row["answer"] == "no" else sounds.NUMBER_WORDS.index(row["answer"])), row


def test_note_synthesis_is_harmonic_and_peak_normalised() -> None:
    rec = _clean(RECIPE)
    wave = sounds.synthesize_note(rec, "clarinet", 300.0, 16000)
    assert wave.dtype == np.float32 and abs(np.abs(wave).max() - 0.5) < 1e-6
    spectrum = np.abs(np.fft.rfft(wave))  # 1 Hz bins
    # clarinet: odd harmonics only (1, 3, 5, 7), even ones absent.
    assert spectrum[900] > 0.2 * spectrum[300] and spectrum[600] < 1e-3 * spectrum[300]


def test_vocabulary_covers_every_prompt_and_answer() -> None:
    vocab = set(sounds.vocabulary(RECIPE))
    for split in sounds.SPLITS:
        for row in sounds.make_split(RECIPE, split, 30, seed=0):
            assert set(words(row["prompt"])) <= vocab and set(words(row["answer"])) <= vocab


def test_snr_levels_are_drawn_per_clip_and_named_by_audio_noise() -> None:
    """A list of SNR levels: each clip draws one, `audio_noise` is its amplitude ratio, and the clip's white noise
    is that loud (its share of the energy above 6 kHz, where no note harmonic or beep lies, rises with it)."""
    rec = _clean(RECIPE)
    rec["audio"]["snr_db"] = [20.0, -6.0]
    rows = [r for r in sounds.make_split(rec, "counterfactual", 60, seed=0)]
    assert {r["audio_noise"] for r in rows} == {round(10 ** (-20 / 20), 3), round(10 ** (6 / 20), 3)}

    def high_share(wave: np.ndarray) -> float:
        power = np.abs(np.fft.rfft(wave)) ** 2
        return float(power[np.fft.rfftfreq(wave.size, 1 / 16000) > 6000].sum() / power.sum())

    share = {
        level: np.mean([high_share(r["audios"][0]) for r in rows if r["audio_noise"] == level])
        for level in (0.1, 1.995)
    }
    # white noise puts 2/8 of its power above 6 kHz: at -6 dB it is 4/5 of the clip (share ≈ 0.2), at 20 dB 1/101
    assert share[1.995] > 0.15 and share[0.1] < 0.01
    rec["audio"]["snr_db"] = 0.0
    assert {r["audio_noise"] for r in sounds.make_split(rec, "counterfactual", 5, seed=0)} == {1.0}  # one level
    packaged = {r["audio_noise"] for r in sounds.make_split(RECIPE, "counterfactual", 60, seed=0)}
    assert packaged == {0.891, 1.122, 1.413}  # 1, -1 and -3 dB
    rec["audio"]["snr_db"] = ["loud"]
    with pytest.raises(ValueError, match="recipe field audio.snr_db"):
        sounds.make_split(rec, "train", 1, seed=0)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("audio", "detune_cents"), 60, "audio.detune_cents"),
        (("instruments", "tuba", "typical"), "xx", "instruments.tuba.typical"),
        (("instruments", "tuba", "envelope"), "boom", "instruments.tuba.envelope"),
        (("beeps", "count_weights"), {9: 1.0}, "beeps.count_weights"),
    ],
)
def test_bad_recipe_names_the_field(path: tuple[str, ...], value: object, field: str) -> None:
    rec = copy.deepcopy(RECIPE)
    target = rec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match=f"recipe field {field}"):
        sounds.make_split(rec, "train", 1, seed=0)


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_tiny_audio_lm(tmp_path) -> None:
    """SFT -> pairs with the audio defaults -> DPO and NaPO steps -> the audio lab metrics and report."""
    import datasets

    from napo.lab.audio import REPORT_METRICS, prepare_audio_lab, run_audio_lab

    lab = prepare_audio_lab(tmp_path, quick=True)
    pairs = datasets.load_from_disk(lab["pairs_dir"])
    assert lab["pairs_stats"]["negatives"]["rejected_language_bias"]["spec"] == "audio.drop"
    assert {"audios", "chosen", "rejected_language_bias", "rejected_audio_bias"} <= set(pairs.column_names)
    # the paper's general negative on every row, and the ground truth the annotator and pair labels read
    assert {"rejected", "answer", "prior_answer", "kind", "audio_noise"} <= set(pairs.column_names)
    assert all(r != a for r, a in zip(pairs["rejected"], pairs["answer"]))
    assert len(pairs[0]["audios"][0]) == 16000
    report = run_audio_lab(tmp_path, seeds=(0,), quick=True, log=lambda _: None)  # SFT and pairs from the cache
    assert report["sft_wall_time_s"] == 0.0 and set(report["models"]) == {"sft", "dpo", "napo"}
    for stats in report["models"].values():
        assert set(REPORT_METRICS) <= set(stats) and all(0.0 <= v["mean"] <= 1.0 for v in stats.values())
    napo_run = next(r for r in report["runs"] if r["objective"] == "napo")
    assert "language_bias/q" in napo_run["final_log"]  # audio_bias too when some row's negative differs from chosen
    assert "| counterfactual_accuracy |" in (tmp_path / "audio_report.md").read_text()
    assert "SFT gate" in (tmp_path / "audio_report.md").read_text() and "pass" in report["sft_gate"]
    for metric in ("counterfactual_accuracy", "prior_consistent_accuracy", "no_prior_accuracy"):  # also per SNR level
        levels = {k for k in report["models"]["sft"] if k.startswith(f"{metric}@noise")}
        assert levels and levels <= {f"{metric}@noise{v:g}" for v in (0.891, 1.122, 1.413)}
    assert (tmp_path / "audio_report.json").exists()


def test_answer_log_probs_scores_audio_rows_as_one_unbatched_forward() -> None:
    """napo.evaluate's scorer with audio: batched (mixed with audio-free rows) = each row alone."""
    import perturb
    from napo.evaluate import answer_log_probs
    from napo.lab.audio import AudioLabSettings, _rows, build_model

    model, processor = build_model(RECIPE, AudioLabSettings.quick(), seed=0)
    rows = _rows(RECIPE, "train", 3, seed=0)
    samples = rows + [perturb.apply("audio.drop", rows[0])]
    answers = [r["answer"] for r in rows] + [rows[0]["answer"]]
    batched = answer_log_probs(model, processor, samples, answers)
    alone = [answer_log_probs(model, processor, [s], [a])[0] for s, a in zip(samples, answers)]
    np.testing.assert_allclose(batched, alone, rtol=1e-4)
    assert batched[3] != batched[0]  # the audio is seen


def test_napo_lab_task_option_parses_and_refuses_unknown_tasks() -> None:
    from napo.cli import LabArguments, parse_command

    args = parse_command(["lab", "--task", "audio", "--quick", "--seeds", "0"])[LabArguments]
    assert args.task == "audio" and args.quick and args.seeds == [0]
    assert parse_command(["lab"])[LabArguments].task == "vision"
    with pytest.raises(SystemExit):
        parse_command(["lab", "--task", "speech"])


def _held_out_note_accuracy(model, processor) -> float:
    """How well the mean-pooled audio-encoder outputs tell the 7 notes apart on noisy clips: nearest centroid
    (centroids from even rows, accuracy on odd rows), in [0, 1]; chance is 1/7."""
    import torch

    from napo.models import media_tower

    rows = sounds.make_split(RECIPE, "no_prior", 140, seed=5)
    notes = list(RECIPE["notes"])
    labels = torch.tensor([notes.index(r["answer"]) for r in rows])
    features = processor.feature_extractor([r["audios"][0] for r in rows], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        pooled = media_tower(model)(features["input_features"]).last_hidden_state.mean(dim=1)
    pooled = torch.nn.functional.normalize(pooled - pooled.mean(0), dim=1)
    fit, held = torch.arange(len(rows)) % 2 == 0, torch.arange(len(rows)) % 2 == 1
    centroids = torch.nn.functional.normalize(
        torch.stack([pooled[fit & (labels == k)].mean(0) for k in range(len(notes))]), dim=1
    )
    return (((pooled[held] @ centroids.T).argmax(1)) == labels[held]).float().mean().item()


def test_the_audio_encoder_still_separates_the_notes_after_sft(tmp_path) -> None:
    """The lab's encoder tells the notes apart at init and still after 60 SFT steps. With transformers' default
    init (encoder_conv_gain=0) SFT collapsed it within 50 steps (accuracy ~0.25) and the lab model was deaf."""
    import dataclasses

    from napo.lab.audio import TASK, AudioLabSettings, build_model
    from napo.lab.engine import _sft
    from napo.models import load_model

    settings = dataclasses.replace(AudioLabSettings.full(), n_train=640, sft_steps=60)
    assert settings.encoder_conv_gain > 0
    model, processor = build_model(RECIPE, settings, seed=0)
    assert _held_out_note_accuracy(model, processor) > 0.6
    folder, _ = _sft(tmp_path / "sft", TASK, RECIPE, settings, 0, None)
    assert _held_out_note_accuracy(*load_model(str(folder))) > 0.6
