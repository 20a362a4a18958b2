"""Synthetic clips and questions of the audio bias lab, with a language prior under our control.

The audio twin of `napo.lab.scenes`. A recipe (YAML, see `recipes/sounds.yaml`) names notes (pitch
words -> Hz), instruments (a harmonic timbre and an envelope that identify them, a frequency and
optionally a typical note with a prior strength), beeps, how hard the clips are to hear, and the mix
of question kinds. `make_split` draws rows from it:

    {"prompt": "what note does the tuba play?", "audios": [float32 array, shape (16000,)],
     "sampling_rate": 16000, "answer": "do", "kind": "attribute", "prior_answer": "do",
     "objects": ["tuba"], "audio_noise": 1.0, "split": "train"}

Every clip holds one instrument playing one note for the whole clip (1 s at 16 kHz by default),
plus beeps for existence and count questions, an optional white-noise burst and white noise at
`audio.snr_db` (one level per clip when it is a list; `audio_noise` is the row's noise-to-signal
amplitude ratio 10^(-SNR/20), so every metric can be read per level of difficulty). The train split
plays each instrument's typical note at the recipe's rate (0.95) and asks existence questions mostly
about clips with beeps ("is there a beep?" -> mostly "yes"), so a model can score well from the
question alone. `counterfactual` (an atypical note: the prior is wrong) and `prior_consistent` (the
typical note) separate the two sources.

Every row is a pure function of (recipe, split, seed, row index), as in `napo.lab.scenes`.
"""

from __future__ import annotations

import copy
import re
import zlib
from importlib import resources
from typing import Any

import numpy as np
import yaml

from napo.lab.recipe_checks import (
    NUMBER_WORDS,
    check_count_weights,
    check_probability,
    check_questions,
    check_sections,
    check_splits_and_seed,
    check_train,
    need,
)
from napo.lab.scenes import _weighted, words

SPLITS = ("train", "pairs", "counterfactual", "prior_consistent", "no_prior")
KINDS = ("attribute", "existence", "count")
ENVELOPES = ("sustain", "pluck", "swell")
_FADE_S = 0.02  # fade-in/out of every sound, seconds: a hard onset would click across the spectrum
_PLUCK_TAU_S = 0.25  # decay time constant of a plucked note, seconds
_BURST_S = 0.1  # length of a distractor noise burst, seconds
_PEAK = 0.5  # peak amplitude of a note at 0 dB gain (full scale is 1.0)
_EXAMPLE = "napo/lab/recipes/sounds.yaml"


def load_recipe(path: str | None = None) -> dict[str, Any]:
    """Read and check an audio lab recipe; None reads the packaged default (`napo/lab/recipes/sounds.yaml`).

    Returns the recipe as a plain dict, with `typical` None and `prior` 0 filled in for instruments
    without a typical note. Raises ValueError naming the bad field.
    """
    if path is None:
        text = resources.files("napo.lab").joinpath("recipes/sounds.yaml").read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    return _checked(yaml.safe_load(text))


def vocabulary(recipe: dict[str, Any]) -> list[str]:
    """Every word (in the sense of `napo.lab.scenes.words`) a prompt or answer can contain, sorted.

    Templates, note names, instrument names, "yes"/"no" and the count words of `beeps.count_weights`.
    """
    rec = _checked(recipe)
    vocab = {"yes", "no"} | set(rec["notes"]) | set(rec["instruments"])
    for templates in rec["questions"].values():
        for template in templates:
            vocab.update(words(template.format(object="")))
    vocab.update(NUMBER_WORDS[c] for c in rec["beeps"]["count_weights"])
    return sorted(vocab)


def make_split(recipe: dict[str, Any], split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Draw n rows of a split (one of SPLITS); see the module docstring for a row's fields.

    - train, pairs: kinds mixed as `train.kinds`; notes follow the priors; existence clips have
      beeps with probability `train.existence_present`; count clips have 1-3 beeps.
    - counterfactual / prior_consistent: attribute questions about an instrument with a typical
      note, playing another note / the typical note.
    - no_prior: attribute questions about an instrument without a typical note (any note, uniformly):
      only hearing the note answers them; chance is 1 / number of notes. `prior_answer` is None.

    `prior_answer` is what the language prior predicts: the typical note (None for instruments
    without one), the frequent existence answer of the train split, the most frequent beep count.
    """
    if split not in SPLITS:
        raise ValueError(f"make_split: unknown split {split!r}; expected one of {SPLITS}")
    if n < 0 or seed < 0:
        raise ValueError(f"make_split: n and seed must be non-negative, got n={n}, seed={seed}")
    rec = _checked(recipe)
    if split == "no_prior" and all(i["typical"] for i in rec["instruments"].values()):
        raise ValueError("make_split: split 'no_prior' needs an instrument without `typical` in the recipe")
    split_id = zlib.crc32(("audio/" + split).encode())  # a stable per-split stream, unlike hash()
    rows = []
    for i in range(n):
        row = _row(rec, split, np.random.default_rng([seed, split_id, i]))
        row["split"] = split
        rows.append(row)
    return rows


def synthesize_note(recipe: dict[str, Any], instrument: str, hz: float, n_samples: int) -> np.ndarray:
    """One instrument's note at `hz` Hz: its harmonics (those below Nyquist) under its envelope.

    Returns float32, shape (n_samples,), peak amplitude `_PEAK` (0.5). No noise, no detuning.
    """
    inst = recipe["instruments"][instrument]
    rate = recipe["audio"]["sampling_rate"]
    t = np.arange(n_samples) / rate
    wave = np.zeros(n_samples)
    for k, amp in enumerate(inst["timbre"], start=1):
        if amp and k * hz < rate / 2:  # a harmonic above Nyquist would alias to a false pitch
            wave += amp * np.sin(2 * np.pi * k * hz * t)
    wave *= _envelope(inst["envelope"], t, t[-1] if n_samples else 0.0)
    peak = np.abs(wave).max() if n_samples else 0.0
    return (wave * (_PEAK / peak if peak > 0 else 0.0)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# recipe checking


def _checked(recipe: dict[str, Any]) -> dict[str, Any]:
    """A checked copy of the recipe with defaults filled in; ValueError names the bad field."""
    rec = copy.deepcopy(recipe)
    check_sections(rec, ("audio", "notes", "instruments", "beeps", "train", "questions", "splits", "seed"), _EXAMPLE)
    _check_audio(rec["audio"])
    _check_notes(rec["notes"], rec["audio"])
    _check_instruments(rec["instruments"], rec["notes"])
    _check_beeps(rec["beeps"], rec["audio"])
    check_train(rec["train"], KINDS)
    check_questions(rec["questions"], {kind: {"object"} for kind in KINDS})
    check_splits_and_seed(rec, SPLITS)
    return rec


def _check_audio(audio: dict[str, Any]) -> None:
    """audio: sampling_rate (16 kHz), seconds, snr_db, detune_cents, gain_db, burst_probability."""
    need(
        audio.get("sampling_rate") == 16000,
        "audio.sampling_rate",
        "expected 16000 (Hz); napo feeds models 16 kHz audio",
    )
    need(0.1 <= audio.get("seconds", 0) <= 30, "audio.seconds", "expected a clip length in [0.1, 30] seconds")
    snr = audio.get("snr_db")
    levels = snr if isinstance(snr, list) else [snr]
    need(
        bool(levels) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in levels),
        "audio.snr_db",
        "expected a number (dB) or a list of levels, one drawn per clip; use a large value such as 100 for clean clips",
    )
    need(
        0 <= audio.get("detune_cents", -1) < 50,
        "audio.detune_cents",
        "expected cents in [0, 50): beyond 50 a note passes for its neighbour",
    )
    lo, hi = audio.get("gain_db", (1, 0))
    need(lo <= hi <= 0, "audio.gain_db", "expected [lo, hi] dB with lo <= hi <= 0")
    check_probability(audio, "burst_probability", "audio.burst_probability")


def _check_notes(notes: dict[str, Any], audio: dict[str, Any]) -> None:
    """At least two notes, each a single lowercase word -> Hz in [20, Nyquist)."""
    need(len(notes) >= 2, "notes", "need at least two notes (counterfactuals need an atypical one)")
    for name, hz in notes.items():
        need(re.fullmatch(r"[a-z]+", name) is not None, f"notes.{name}", "note names are single lowercase words")
        need(
            isinstance(hz, (int, float)) and 20 <= hz < audio["sampling_rate"] / 2,
            f"notes.{name}",
            f"expected Hz in [20, {audio['sampling_rate'] // 2})",
        )


def _check_instruments(instruments: dict[str, Any], notes: dict[str, Any]) -> None:
    """Each instrument: a name (not a note's), a timbre, an envelope, a typical note of the recipe with its prior
    (or none: prior 0, filled in) and a weight. Some instrument has a typical note."""
    for name, inst in instruments.items():
        field = f"instruments.{name}"
        need(
            re.fullmatch(r"[a-z]+", name) is not None and name not in notes,
            field,
            "instrument names are single lowercase words, not note names",
        )
        timbre = inst.get("timbre")
        need(
            isinstance(timbre, list) and len(timbre) > 0 and all(a >= 0 for a in timbre) and timbre[0] > 0,
            f"{field}.timbre",
            "expected harmonic amplitudes >= 0 with a non-zero fundamental",
        )
        need(
            inst.get("envelope") in ENVELOPES,
            f"{field}.envelope",
            f"{inst.get('envelope')!r} is not one of {ENVELOPES}",
        )
        inst.setdefault("typical", None)
        if inst["typical"] is None:
            inst["prior"] = 0.0
        else:
            need(inst["typical"] in notes, f"{field}.typical", f"{inst['typical']!r} is not a note of the recipe")
            check_probability(inst, "prior", f"{field}.prior")
        need(inst.get("weight", 0) > 0, f"{field}.weight", "expected a relative frequency > 0")
    need(
        any(i["typical"] for i in instruments.values()),
        "instruments",
        "no instrument has a typical note: there is no prior to study",
    )


def _check_beeps(beeps: dict[str, Any], audio: dict[str, Any]) -> None:
    """beeps: frequency below Nyquist, seconds < gap, level_db, count_weights whose most beeps fit in the clip."""
    need(0 < beeps.get("frequency", 0) < audio["sampling_rate"] / 2, "beeps.frequency", "expected Hz below Nyquist")
    need(
        0 < beeps.get("seconds", 0) < beeps.get("gap", 0),
        "beeps.seconds",
        "expected 0 < seconds < gap (beeps must not touch)",
    )
    need(isinstance(beeps.get("level_db"), (int, float)), "beeps.level_db", "expected a number (dB)")
    check_count_weights(beeps.get("count_weights"), "beeps.count_weights")
    need(
        max(beeps["count_weights"]) * beeps["gap"] < audio["seconds"],
        "beeps.count_weights",
        "the most beeps do not fit in audio.seconds",
    )


# ---------------------------------------------------------------------------------------------
# rows


def _row(rec: dict[str, Any], split: str, rng: np.random.Generator) -> dict[str, Any]:
    """One row of a split: choose the kind, the instrument, its note and the beeps, then render the clip."""
    if split in ("train", "pairs"):
        kinds = rec["train"]["kinds"]
        kind = _weighted(list(kinds), list(kinds.values()), rng)
    else:
        kind = "attribute"
    names = list(rec["instruments"])
    typical = {"counterfactual": False, "prior_consistent": True}.get(split)
    if typical is not None:  # only instruments that have a prior
        names = [n for n in names if rec["instruments"][n]["typical"]]
    elif split == "no_prior":
        names = [n for n in names if not rec["instruments"][n]["typical"]]
    instrument = _weighted(names, [rec["instruments"][n]["weight"] for n in names], rng)
    note = _note(rec, instrument, rng, typical)
    counts = rec["beeps"]["count_weights"]
    beeps = 0
    if kind == "attribute":
        answer, prior = note, rec["instruments"][instrument]["typical"]
    elif kind == "existence":
        if rng.random() < rec["train"]["existence_present"]:
            beeps = _weighted(list(counts), list(counts.values()), rng)
        answer = "yes" if beeps else "no"
        prior = "yes" if rec["train"]["existence_present"] >= 0.5 else "no"
    else:
        beeps = _weighted(list(counts), list(counts.values()), rng)
        answer, prior = NUMBER_WORDS[beeps], NUMBER_WORDS[max(counts, key=counts.get)]
    template = rec["questions"][kind][int(rng.integers(len(rec["questions"][kind])))]
    snr = rec["audio"]["snr_db"]
    if isinstance(snr, list):  # one level per clip; a single number draws nothing, so its clips stay as they were
        snr = snr[int(rng.integers(len(snr)))]
    return {
        "prompt": template.format(object=instrument),
        "audios": [_render(rec, instrument, note, beeps, snr, rng)],
        "sampling_rate": rec["audio"]["sampling_rate"],
        "answer": answer,
        "kind": kind,
        "prior_answer": prior,
        "objects": [instrument],
        "audio_noise": round(10.0 ** (-snr / 20), 3),
    }


def _note(rec: dict[str, Any], instrument: str, rng: np.random.Generator, typical: bool | None) -> str:
    """The note an instrument plays: its typical one with probability `prior` (or as forced), else another."""
    notes = list(rec["notes"])
    t = rec["instruments"][instrument]["typical"]
    if t is None:
        return notes[int(rng.integers(len(notes)))]
    if typical is None:
        typical = bool(rng.random() < rec["instruments"][instrument]["prior"])
    if typical:
        return t
    others = [n for n in notes if n != t]
    return others[int(rng.integers(len(others)))]


def _render(
    rec: dict[str, Any], instrument: str, note: str, beeps: int, snr_db: float, rng: np.random.Generator
) -> np.ndarray:
    """The clip: a detuned note at a random gain, beeps at random onsets, an optional burst, white noise at
    `snr_db` (dB of clip power over noise power).

    Returns float32, shape (round(seconds * rate),), clipped to [-1, 1].
    """
    audio = rec["audio"]
    rate = audio["sampling_rate"]
    n = int(round(audio["seconds"] * rate))
    cents = rng.uniform(-audio["detune_cents"], audio["detune_cents"])
    hz = rec["notes"][note] * 2.0 ** (cents / 1200)
    gain = 10.0 ** (rng.uniform(*audio["gain_db"]) / 20)
    wave = synthesize_note(rec, instrument, hz, n).astype(np.float64) * gain
    if beeps:
        cfg = rec["beeps"]
        length, gap = int(cfg["seconds"] * rate), int(cfg["gap"] * rate)
        start = int(rng.integers(0, n - (beeps - 1) * gap - length + 1))
        t = np.arange(length) / rate
        beep = np.sin(2 * np.pi * cfg["frequency"] * t) * _envelope("sustain", t, t[-1])
        beep *= _PEAK * gain * 10.0 ** (cfg["level_db"] / 20)
        for b in range(beeps):
            wave[start + b * gap : start + b * gap + length] += beep
    if rng.random() < audio["burst_probability"]:
        length = min(n, int(_BURST_S * rate))
        start = int(rng.integers(0, n - length + 1))
        wave[start : start + length] += rng.standard_normal(length) * _PEAK * gain * 0.5
    power = np.mean(wave**2)
    wave += rng.standard_normal(n) * np.sqrt(power / 10.0 ** (snr_db / 10))
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _envelope(kind: str, t: np.ndarray, end: float) -> np.ndarray:
    """Amplitude envelope in [0, 1] over times t (seconds, shape (n,)) of a sound ending at `end` s."""
    fade = np.clip(np.minimum(t, end - t) / _FADE_S, 0.0, 1.0)
    if kind == "pluck":
        return fade * np.exp(-t / _PLUCK_TAU_S)
    if kind == "swell":  # a half-sine over the whole sound: soft start, loudest in the middle
        return np.sin(np.pi * t / end) if end > 0 else fade
    return fade
