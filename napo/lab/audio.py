"""The audio bias lab's task record (`TASK`): a tiny Qwen2-Audio on the biased clips of `napo.lab.sounds`, language-
and audio-biased pairs with `napo pairs`' audio defaults, and the note-prior metrics. The engine
(`napo.lab.engine`) runs it: `napo lab --task audio [--quick] [--seeds 0 1 2] [--out benchmarks/lab]`.

    lab = prepare_audio_lab("out")                       # SFT checkpoint + pairs (cached in out/cache/audio-*/)
    run = train_lab_model(lab["sft_dir"], lab["pairs_dir"], "out/napo-0", objective="napo", seed=0)
    metrics = evaluate_audio_model(run["model_dir"], lab)
    report = run_audio_lab("benchmarks/lab")             # all of it, plus audio_report.md / audio_report.json

`prepare_audio_lab`, `evaluate_audio_model` and `run_audio_lab` are the engine's `prepare_lab`,
`evaluate_lab_model` and `run_lab` with `task="audio"`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import PreTrainedModel, ProcessorMixin

import perturb
from napo.evaluate import (
    accuracy,
    agreement,
    answer_log_probs,
    metrics_per_noise_level,
    modality_shapley,
    prior_following_rate,
)
from napo.inference import generate
from napo.lab import sounds
from napo.lab.report import cell, gate_line
from napo.lab.tasks import PER_NOISE_SPLITS, SFT_GATE, LabTask, as_chat
from napo.models import build_tiny_model, build_tokenizer, media_tower
from napo.pairs import AUDIO_NEGATIVES

# What the audio-blind and question-blind answers are generated from: the same degradations `napo pairs`
# uses for audio data, so the lab measures the biases the pairs target.
NO_AUDIO = AUDIO_NEGATIVES["rejected_language_bias"]  # "audio.drop"
NO_QUESTION = AUDIO_NEGATIVES["rejected_audio_bias"]  # "text.drop_question(prompt='Describe the audio.')"
GENERIC_PROMPT_WORDS = ("describe", "the", "audio", ".")  # words of NO_QUESTION's prompt, for the tokenizer
# The ground truth carried by every pair row, for pair labels and annotator noise (`napo.lab.noise`).
PAIR_METADATA = ("answer", "prior_answer", "kind", "audio_noise")
REPORT_METRICS = (
    "counterfactual_accuracy",
    "prior_consistent_accuracy",
    "prior_following_rate",
    "blind_agreement",
    "question_blind_agreement",
    "audio_share",
    "no_prior_accuracy",
)


@dataclass(frozen=True)
class AudioLabSettings:
    """Sizes of one audio lab run. `full()` is the default lab; `quick()` the CI variant.

    The model is a Qwen2-Audio built from a config: a 2-layer audio encoder and a 2-layer Qwen2 of width
    `hidden` (1 s clips -> 100 mel frames -> 25 audio tokens). SFT: AdamW, warm-up then cosine, loss on
    the answer tokens and EOS only.

    `encoder_conv_gain`: the encoder's two input convolutions are re-drawn He-scaled (std gain * sqrt(2 / fan_in),
    zero bias) instead of transformers' std 0.02. With std 0.02 the clip's contribution is small next to the
    biases and position embeddings: the mean-pooled encoder outputs of the 7 notes have cosine 0.997, and
    SFT collapsed them within 50 steps (nearest-centroid accuracy 0.98 at init -> 0.25, cosine 1.000), so
    the SFT model could not hear the note (no_prior_accuracy 0.06, chance 0.14). He-scaled, the encoder
    stays separable through SFT and preference training, which both train every parameter.
    """

    n_train: int = 3000  # SFT rows of the biased train split
    # SFT rows without their clip (see `napo.lab.vision.LabSettings`): none. At 0.1 three of five replicate SFT models
    # stopped listening (blind agreement 1.0, no-prior accuracy 0.04-0.15; benchmarks/lab/RUN.md), so the audio lab's
    # audio-blind negatives still come from a model that never heard a question without its clip.
    text_only_fraction: float = 0.0
    sft_steps: int = 300
    sft_batch_size: int = 32
    sft_lr: float = 2e-3
    n_pairs: int = 320  # source rows of the pair generator (held-out `pairs` split)
    n_counterfactual_pairs: int = 300  # extra source rows drawn like the counterfactual split (held-out seed)
    pref_steps: int = 40
    pref_batch_size: int = 16
    pref_lr: float = 1e-4
    beta: float = 0.1
    sft_weight: float = 0.0  # NaPOConfig.sft_weight: 40 steps keep the chosen likelihood here without it
    n_eval: int = 150  # rows per evaluation split
    hidden: int = 64
    layers: int = 2
    encoder_conv_gain: float = 1.0  # 0: transformers' init (std 0.02)
    # As the vision lab's (`napo.lab.vision.LabSettings`): negatives identical to chosen kept, as the paper keeps
    # them, and the audio-blind / question-blind negatives sampled (seeded), as the paper's.
    keep_identical: bool = True
    pair_temperature: float = 1.0

    @classmethod
    def full(cls) -> AudioLabSettings:
        return cls()

    @classmethod
    def quick(cls) -> AudioLabSettings:
        return cls(
            n_train=64,
            sft_steps=4,
            sft_batch_size=16,
            n_pairs=8,
            n_counterfactual_pairs=4,
            pref_steps=2,
            pref_batch_size=4,
            n_eval=4,
        )


def _rows(recipe: dict[str, Any], split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Lab rows as samples: the question becomes a one-turn chat with the audio before it."""
    return as_chat(sounds.make_split(recipe, split, n, seed), "audio")


def build_model(
    recipe: dict[str, Any], settings: AudioLabSettings, seed: int
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A fresh lab Qwen2-Audio whose feature extractor keeps the whole clip (whole seconds, rounded up)."""
    tokenizer = build_tokenizer([*sounds.vocabulary(recipe), *GENERIC_PROMPT_WORDS])
    seconds = math.ceil(recipe["audio"]["seconds"])
    model, processor = build_tiny_model(
        "qwen2_audio",
        tokenizer,
        hidden_size=settings.hidden,
        num_layers=settings.layers,
        audio_seconds=seconds,
        seed=seed,
    )
    if settings.encoder_conv_gain:  # see AudioLabSettings: He-scaled convolutions, so the clip outweighs the biases
        encoder = media_tower(model)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in (encoder.conv1, encoder.conv2):
                fan_in = conv.in_channels * conv.kernel_size[0]
                conv.weight.normal_(0.0, settings.encoder_conv_gain * math.sqrt(2.0 / fan_in), generator=generator)
                conv.bias.zero_()
    return model, processor


def audio_modality_metrics(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    rows: Sequence[dict],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 4,
) -> dict[str, Any]:
    """Answer rows with and without each modality and measure how much the answer rests on the audio.

    Rows need "prompt", "audios" and "answer". The model answers greedily (a) the full row, (b) the row
    without its audio (`audio.drop`), (c) the row with its question replaced by "Describe the audio.".
    The reference answer's log-prob (nats) is scored under {full, no audio, no question, neither} for the
    exact two-player Shapley values of `napo.evaluate.modality_shapley` (audio is its first player).

    Returns floats in [0, 1]: accuracy (a vs answer), blind_agreement (a vs b: high = the audio barely
    matters, language bias), question_blind_agreement (a vs c: high = the question barely matters, audio
    bias), audio_share (mean per-row |φ_audio| / (|φ_audio| + |φ_text|)); and per-row lists answers,
    blind_answers and audio_shares.
    """
    rows = list(rows)
    reference = [row["answer"] for row in rows]
    variants = {
        "full": rows,
        "no_audio": [perturb.apply(NO_AUDIO, row) for row in rows],
        "no_question": [perturb.apply(NO_QUESTION, row) for row in rows],
        "neither": [perturb.apply(f"{NO_AUDIO}+{NO_QUESTION}", row) for row in rows],
    }
    kwargs = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    answers = {
        name: generate(model, processor, variants[name], **kwargs) for name in ("full", "no_audio", "no_question")
    }
    values = {
        name: answer_log_probs(model, processor, samples, reference, batch_size=batch_size)
        for name, samples in variants.items()
    }
    shapley = modality_shapley(values["full"], values["no_audio"], values["no_question"], values["neither"])
    return {
        "accuracy": accuracy(answers["full"], reference),
        "blind_agreement": agreement(answers["full"], answers["no_audio"]),
        "question_blind_agreement": agreement(answers["full"], answers["no_question"]),
        "audio_share": shapley["image_share_mean"],  # the first player's share: here the audio
        "answers": answers["full"],
        "blind_answers": answers["no_audio"],
        "audio_shares": shapley["image_share"].tolist(),
    }


def evaluate(
    model: PreTrainedModel, processor: ProcessorMixin, recipe: dict[str, Any], n: int
) -> tuple[dict[str, float], list[float]]:
    """The audio lab's bias metrics of one model, all in [0, 1], and the per-row audio shares of the counterfactual
    split.

    Metrics: counterfactual_accuracy, prior_consistent_accuracy, prior_following_rate (counterfactual rows answered
    with the instrument's typical note), blind_agreement and question_blind_agreement (counterfactual rows: answer
    unchanged without the audio / without the question), audio_share (mean Shapley audio share of the reference
    answer's log-prob, counterfactual rows) and no_prior_accuracy (instruments without a typical note: whether the
    model hears the note at all; chance is 1 / number of notes).
    """
    counterfactual = _rows(recipe, "counterfactual", n, recipe["seed"])
    mod = audio_modality_metrics(model, processor, counterfactual)
    answered = {"counterfactual": (counterfactual, mod["answers"])}
    for split in ("prior_consistent", "no_prior"):
        rows = _rows(recipe, split, n, recipe["seed"])
        answered[split] = (rows, generate(model, processor, rows, batch_size=64, max_new_tokens=4))
    metrics = {
        "counterfactual_accuracy": mod["accuracy"],
        "prior_following_rate": prior_following_rate(mod["answers"], [r["prior_answer"] for r in counterfactual]),
        "blind_agreement": mod["blind_agreement"],
        "question_blind_agreement": mod["question_blind_agreement"],
        "audio_share": mod["audio_share"],
    }
    for metric in ("prior_consistent_accuracy", "no_prior_accuracy"):
        rows, answers = answered[PER_NOISE_SPLITS[metric]]
        metrics[metric] = accuracy(answers, [r["answer"] for r in rows])
    for metric, split in PER_NOISE_SPLITS.items():
        metrics.update(metrics_per_noise_level(metric, *answered[split], level="audio_noise"))
    return metrics, mod["audio_shares"]


def general_negative(recipe: dict[str, Any], row: dict[str, Any], rng: np.random.Generator) -> str:
    """A wrong answer of the row's question kind, uniformly: another note, the other of yes/no, another count word
    of the recipe's beep counts (or one more)."""
    if row["kind"] == "attribute":
        options = list(recipe["notes"])
    elif row["kind"] == "existence":
        options = ["yes", "no"]
    else:
        counts = recipe["beeps"]["count_weights"]
        options = [sounds.NUMBER_WORDS[c] for c in counts] + [sounds.NUMBER_WORDS[max(counts) + 1]]
    wrong = [o for o in options if o != row["answer"]]
    return wrong[int(rng.integers(len(wrong)))]


def confusable_note(recipe: dict[str, Any], note: str) -> str:
    """The recipe note nearest in pitch to `note` (by |log frequency ratio|), other than itself: the annotator's
    look-alike."""
    hz = recipe["notes"][note]
    others = [n for n in recipe["notes"] if n != note]
    return min(others, key=lambda n: abs(math.log(recipe["notes"][n] / hz)))


def pair_source(
    rows: list[dict[str, Any]], recipe: dict[str, Any], settings: AudioLabSettings, seed: int
) -> datasets.Dataset:
    """Source rows of the audio pairs, built as the vision lab's (`napo.lab.vision.pair_source`): prompt, the clip
    and its sampling rate, chosen = the reference answer, `rejected` a general negative on every row (a wrong answer
    of the question's kind, `general_negative`) and the row's ground truth `PAIR_METADATA`. The pair generator adds
    `rejected_language_bias` (the SFT model's sampled answer without the audio, `audio.drop`) and
    `rejected_audio_bias` (to the audio without the question), with `napo pairs`' audio defaults."""
    rng = np.random.default_rng([seed, 15])
    text = datasets.Value("string")
    return datasets.Dataset.from_dict(
        {
            "prompt": [r["prompt"] for r in rows],
            "audios": [r["audios"] for r in rows],
            "sampling_rate": [r["sampling_rate"] for r in rows],
            "chosen": [r["answer"] for r in rows],
            "rejected": [general_negative(recipe, r, rng) for r in rows],
            **{key: [r[key] for r in rows] for key in PAIR_METADATA},
        },
        features=datasets.Features(
            {
                "prompt": [{"role": text, "content": [{"type": text, "text": text}]}],
                "audios": datasets.List(datasets.List(datasets.Value("float32"))),
                "sampling_rate": datasets.Value("int32"),
                "chosen": text,
                "rejected": text,
                **{key: text for key in PAIR_METADATA if key != "audio_noise"},
                "audio_noise": datasets.Value("float32"),
            }
        ),
    )


def pair_options(settings: AudioLabSettings, seed: int) -> dict[str, Any]:
    """`PairsConfig` fields: sampled negatives of up to 8 tokens (seeded), identical ones kept or dropped per
    `keep_identical`."""
    return {
        "max_new_tokens": 8,
        "do_sample": True,
        "temperature": settings.pair_temperature,
        "seed": seed,
        "keep_identical": settings.keep_identical,
    }


def render_audio_report(report: dict[str, Any]) -> str:
    """The markdown audio report: metrics per model (mean ± std over seeds) and plain sentences on them."""
    models = report["models"]
    lines = [
        "# napo audio bias lab",
        "",
        f"`{report['command']}` — {report['date']}, {report['device']}, {report['wall_time_s']:.0f} s end to end "
        f"(SFT {report['sft_wall_time_s']:.0f} s, pairs {report['pairs_wall_time_s']:.0f} s; 0 = cached).",
        f"Seeds {report['seeds']} (preference training; SFT and pairs are shared, SFT is one model). "
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
        "",
        "Clips: one instrument plays one note (1 s, 16 kHz) with white noise at the recipe's SNR; each instrument "
        "with a typical note plays it in 95% of training clips. Counterfactual rows play another note.",
        f"SFT: {report['settings']['sft_steps']} steps, lr {report['settings']['sft_lr']:g}; the audio encoder's "
        f"input convolutions He-initialised (gain {report['settings'].get('encoder_conv_gain', 0):g}; 0 = "
        "transformers' std 0.02, with which SFT collapsed the encoder and the model could not hear the note). "
        f"Preference pairs: {report['pairs']['rows_written']} rows "
        f"from {report['settings']['n_pairs']} train-like and {report['settings'].get('n_counterfactual_pairs', 0)} "
        f"counterfactual source clips; {report['settings']['pref_steps']} preference steps, every parameter trained.",
        "",
        "| metric | " + " | ".join(models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    lines += [
        f"| {metric} | " + " | ".join(cell(models[name][metric]) for name in models) + " |" for metric in REPORT_METRICS
    ]
    if "sft_gate" in report:
        lines += ["", gate_line(report["sft_gate"])]
    m = {name: {k: v["mean"] for k, v in stats.items()} for name, stats in models.items()}
    sft = m["sft"]
    lines += [
        "",
        "## What it shows",
        "",
        f"- **Bias after SFT**: counterfactual accuracy {sft['counterfactual_accuracy']:.3f} vs prior-consistent "
        f"{sft['prior_consistent_accuracy']:.3f}; {sft['prior_following_rate']:.3f} of counterfactual answers are the "
        f"typical note; blind agreement {sft['blind_agreement']:.3f}; audio share {sft['audio_share']:.3f}.",
    ]
    for name in ("dpo", "napo"):
        d, s = m[name], {k: v["std"] for k, v in models[name].items()}
        lines.append(
            f"- **{name.upper()}** (n={len(report['seeds'])} seeds): counterfactual "
            f"{sft['counterfactual_accuracy']:.3f} → "
            f"{d['counterfactual_accuracy']:.3f} ± {s['counterfactual_accuracy']:.3f}, prior-consistent "
            f"{sft['prior_consistent_accuracy']:.3f} → {d['prior_consistent_accuracy']:.3f} ± "
            f"{s['prior_consistent_accuracy']:.3f}; "
            f"blind agreement {sft['blind_agreement']:.3f} → {d['blind_agreement']:.3f}; audio share "
            f"{sft['audio_share']:.3f} → {d['audio_share']:.3f}; no-prior accuracy (hearing the note) "
            f"{sft['no_prior_accuracy']:.3f} → {d['no_prior_accuracy']:.3f} ± {s['no_prior_accuracy']:.3f}."
        )
    chance = report["no_prior_chance"]
    if sft["no_prior_accuracy"] < 2 * chance:
        lines.append(
            f"- **The SFT model does not hear the note**: on instruments without a typical note it is right "
            f"{sft['no_prior_accuracy']:.3f} of the time (chance {chance:.3f}). Preference pairs cannot teach a "
            "perception the model lacks: at this model size and SFT budget the audio does not separate the notes "
            "(raise the SFT steps, the model size or `audio.snr_db` before reading the DPO / NaPO rows as a "
            "comparison)."
        )
    diff = m["napo"]["counterfactual_accuracy"] - m["dpo"]["counterfactual_accuracy"]
    spread = max(models[name]["counterfactual_accuracy"]["std"] for name in ("dpo", "napo"))
    if abs(diff) <= max(2 * spread, 0.01):
        lines.append(
            f"- **NaPO vs DPO**: counterfactual accuracy differs by {diff:+.3f}, within twice the seed spread "
            f"({spread:.3f}): on these clean pairs neither objective is ahead."
        )
    else:
        lines.append(
            f"- **NaPO vs DPO**: {'NaPO' if diff > 0 else 'DPO'} is ahead on counterfactual accuracy by "
            f"{abs(diff):.3f} (seed spread {spread:.3f}, {len(report['seeds'])} seeds)."
        )
    return "\n".join(lines) + "\n"


def _report_extras(lab: dict[str, Any]) -> dict[str, Any]:
    return {"no_prior_chance": 1 / len(lab["recipe"]["notes"])}  # no_prior_accuracy of a model that cannot hear


TASK = LabTask(
    name="audio",
    modality="audio",
    family="qwen2_audio",
    settings=AudioLabSettings,
    default_recipe="napo/lab/recipes/sounds.yaml",
    load_recipe=sounds.load_recipe,
    make_split=sounds.make_split,
    build_model=build_model,
    pair_source=pair_source,
    pair_options=pair_options,
    evaluate=evaluate,
    report_metrics=REPORT_METRICS,
    summary_metrics=REPORT_METRICS,
    report_name="audio_report",
    render_report=render_audio_report,
    gate=SFT_GATE,
    eval_passes=15,
    hardness="audio_noise",
    confusable=confusable_note,  # counterfactual: 3 answers + 4 scorings; prior-consistent and no-prior answers
    report_extras=_report_extras,
    cache_prefix="audio-",
    log_prefix="[audio lab]",
    logging_steps=1,  # short runs: the report's final q and margins are those of the last step
)


def prepare_audio_lab(
    out_dir: str | Path, *, recipe: str | dict | None = None, seed: int = 0, quick: bool = False
) -> dict[str, Any]:
    """`napo.lab.engine.prepare_lab` of the audio lab: its SFT checkpoint and pairs, cached under
    `<out_dir>/cache/audio-<key>/`."""
    from napo.lab.engine import prepare_lab

    return prepare_lab(out_dir, recipe=recipe, seed=seed, quick=quick, task="audio")


def evaluate_audio_model(
    model_dir_or_model_and_processor: str | Path | tuple[PreTrainedModel, ProcessorMixin],
    lab: dict[str, Any],
    *,
    n: int | None = None,
) -> dict[str, float]:
    """The audio lab's metrics of one model (`evaluate`'s) on `prepare_audio_lab`'s recipe; n rows per split."""
    from napo.lab.engine import evaluate_lab_model

    return evaluate_lab_model(model_dir_or_model_and_processor, {**lab, "task": "audio"}, n=n)


def run_audio_lab(out_dir: str | Path = "benchmarks/lab", **options: Any) -> dict[str, Any]:
    """`napo.lab.engine.run_lab` of the audio lab (same options): audio_report.json and audio_report.md."""
    from napo.lab.engine import run_lab

    return run_lab(out_dir, task="audio", **options)
