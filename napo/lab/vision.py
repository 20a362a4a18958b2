"""The vision bias lab's task record (`TASK`): a tiny LLaVA on the synthetic scenes of `napo.lab.scenes`, pairs as
the paper makes them (a general wrong `rejected`, sampled blind and question-less negatives), and the colour-prior
metrics (counterfactual / prior-consistent / no-prior accuracy, per image-noise level, POPE, CHAIR, image share).

The engine (`napo.lab.engine`) runs it: `napo lab` (or `napo lab --task vision`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from transformers import CLIPVisionConfig, PreTrainedModel, ProcessorMixin

from napo.evaluate import accuracy, chair, metrics_per_noise_level, modality_metrics, pope_metrics, prior_following_rate
from napo.inference import generate
from napo.lab import scenes
from napo.lab.tasks import KEY_METRICS, PER_NOISE_SPLITS, SFT_GATE, LabTask, as_chat
from napo.lab.vision_report import REPORT_METRICS, plots, render_report
from napo.models import build_tiny_model, build_tokenizer
from napo.models.tiny import TinyShape

POPE_SPLITS = ("pope_random", "pope_popular", "pope_adversarial")
# Metadata the lab's pair rows carry from their source row: ground truth for the annotator noise and pair labels.
PAIR_METADATA = ("answer", "prior_answer", "kind", "target", "image_noise")


@dataclass(frozen=True)
class LabSettings:
    """Sizes of one lab run. `full()` is the default lab (< 10 min on 2 CPU cores); `quick()` the CI variant.

    The model is the notes' prototype — a CLIP tower (64 px, hidden 64, 2 layers) under a Llama (hidden 128,
    2 layers) — except for the patch: 8 px (64 image tokens), not 16. With 16 px patches a 5-12 px object is a
    few percent of its patch and the model never learnt to read any colour (chance level after 400 steps even
    on clean single-object images); with 8 px it reads them within ~100 steps. SFT: AdamW, cosine schedule,
    loss on the answer tokens and EOS only.
    """

    n_train: int = 6000  # SFT rows of the biased train split
    # Share of the SFT rows without their image (text-only rows, answers unchanged): the blind model then answers
    # the prior, as a real VLM does (`napo.lab.sft.text_only_rows`).
    text_only_fraction: float = 0.1
    sft_steps: int = 700
    sft_batch_size: int = 64
    sft_lr: float = 1e-3
    n_pairs: int = 1500  # source rows of the pair generator (held-out `pairs` split)
    n_counterfactual_pairs: int = 300  # extra source rows drawn like the counterfactual split (held-out seed)
    pref_steps: int = 120
    pref_batch_size: int = 32
    # 5e-5: at 1e-4 DPO without an NLL term pushes the chosen likelihood down (log-prob −0.3 → −0.9) and costs 0.1
    # prior-consistent accuracy; at 3e-5 it gains little on some replicates (benchmarks/lab/RUN.md, lab v3 probes).
    pref_lr: float = 5e-5
    beta: float = 0.1
    # λ of NaPOConfig.sft_weight, 0 as in NaPO's released trainer: the preference term alone moves the model. With
    # λ = 0.1 or 1 the NLL of the chosen answers (the pairs hold counterfactual rows) dominates: DPO and the NLL-only
    # control give the same answers, so a grid would measure the NLL, not the objectives (benchmarks/lab/RUN.md).
    sft_weight: float = 0.0
    n_eval: int = 200  # rows per evaluation split
    text_hidden: int = 128
    text_layers: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    image_size: int = 64
    patch_size: int = 8
    # Negatives identical to chosen (a blind answer that is right because the prior is): kept, as the paper keeps
    # them (its noise is exactly such "negatives"). Such a pair has z ≡ 0 and no gradient, but it counts in its
    # type's means: it pulls ψ and ψ_Σ towards 0, so q towards 1 − σ(0) = 0.5 ('paper') / 1 ('official') and the
    # type's dynamic weight down, and it dilutes that type's mean loss by the fraction of ties.
    keep_identical: bool = True
    pair_temperature: float = 1.0  # the blind / question-less model's negatives are sampled (seeded), as the paper's

    @classmethod
    def full(cls) -> LabSettings:
        return cls()

    @classmethod
    def quick(cls) -> LabSettings:
        return cls(n_train=1024, sft_steps=80, n_pairs=96, n_counterfactual_pairs=32, pref_steps=10, n_eval=32)


def _rows(recipe: dict[str, Any], split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """Lab rows as samples: the question becomes a one-turn chat with the image before it."""
    return as_chat(scenes.make_split(recipe, split, n, seed), "image")


def build_model(recipe: dict[str, Any], settings: LabSettings, seed: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A fresh lab LLaVA: the vision tower gets its own (smaller) width, a `TinyShape` of its own set as the
    config's `vision_config` (the family's tiny builder gives the tower the text model's width)."""
    vision = TinyShape(
        hidden_size=settings.vision_hidden,
        num_layers=settings.vision_layers,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
    )
    return build_tiny_model(
        "llava",
        build_tokenizer(scenes.vocabulary(recipe)),
        hidden_size=settings.text_hidden,
        num_layers=settings.text_layers,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        seed=seed,
        vision_config=CLIPVisionConfig(**vision.vision()),
    )


def general_negative(recipe: dict[str, Any], row: dict[str, Any], rng: np.random.Generator) -> str | None:
    """A wrong answer of the row's question kind, uniformly: another colour, the other of yes/no, another count
    word of the recipe's counts; None for captions (no single wrong answer)."""
    if row["kind"] == "attribute":
        options = list(recipe["colours"])
    elif row["kind"] in ("existence", "spatial"):
        options = ["yes", "no"]
    elif row["kind"] == "count":
        counts = recipe["scene"]["count_weights"]
        options = [scenes.NUMBER_WORDS[c] for c in counts] + [scenes.NUMBER_WORDS[max(counts) + 1]]
    else:
        return None
    wrong = [o for o in options if o != row["answer"]]
    return wrong[int(rng.integers(len(wrong)))]


def confusable_colour(recipe: dict[str, Any], colour: str) -> str:
    """The recipe colour nearest to `colour` in RGB (Euclidean), other than itself: the annotator's look-alike."""
    rgb = np.asarray(recipe["colours"][colour], dtype=float)
    others = [c for c in recipe["colours"] if c != colour]
    return min(others, key=lambda c: float(((np.asarray(recipe["colours"][c], dtype=float) - rgb) ** 2).sum()))


def pair_source(
    rows: list[dict[str, Any]], recipe: dict[str, Any], settings: LabSettings, seed: int
) -> datasets.Dataset:
    """Source rows of the pairs as the paper builds them: chosen = the reference answer (an annotator that errs is
    `napo.lab.noise.annotator_noise`, applied per compare cell), `rejected` a general negative on every row, a wrong
    answer of the question's kind (`general_negative`), as RLAIF-V's rejected responses are: trained with DPO, it
    anchors typical colours where the image shows them; and the row's ground truth `PAIR_METADATA`. The pair
    generator adds `rejected_language_bias` (the SFT model's sampled answer without the image, `image.drop`) and
    `rejected_vision_bias` (to the image without the question, `text.drop_question`)."""
    rng = np.random.default_rng([seed, 15])
    text = datasets.Value("string")
    return datasets.Dataset.from_dict(
        {
            "prompt": [r["prompt"] for r in rows],
            "images": [r["images"] for r in rows],
            "chosen": [r["answer"] for r in rows],
            "rejected": [general_negative(recipe, r, rng) for r in rows],
            **{key: [r[key] for r in rows] for key in PAIR_METADATA},
        },
        features=datasets.Features(
            {
                "prompt": [{"role": text, "content": [{"type": text, "text": text}]}],
                "images": datasets.Sequence(datasets.Image()),
                "chosen": text,
                "rejected": text,
                **{key: text for key in PAIR_METADATA if key != "image_noise"},
                "image_noise": datasets.Value("float32"),
            }
        ),
    )


def pair_options(settings: LabSettings, seed: int) -> dict[str, Any]:
    """`PairsConfig` fields: sampled negatives (seeded), identical ones kept or dropped per `keep_identical`."""
    return {
        "max_new_tokens": 16,
        "do_sample": True,
        "temperature": settings.pair_temperature,
        "seed": seed,
        "keep_identical": settings.keep_identical,
    }


def evaluate(
    model: PreTrainedModel, processor: ProcessorMixin, recipe: dict[str, Any], n: int
) -> tuple[dict[str, float], list[float]]:
    """The vision lab's metrics of one model (see `napo.lab.engine.evaluate_lab_model`) and the per-row image shares
    of the counterfactual split."""
    seed = recipe["seed"]
    counterfactual = _rows(recipe, "counterfactual", n, seed)
    mod = modality_metrics(model, processor, counterfactual, max_new_tokens=4)
    metrics = {
        "counterfactual_accuracy": mod["accuracy"],
        "prior_following_rate": prior_following_rate(mod["answers"], [r["prior_answer"] for r in counterfactual]),
        "blind_agreement": mod["blind_agreement"],
        "question_blind_agreement": mod["question_blind_agreement"],
        "image_share": mod["image_share"],
    }
    # The short-answer splits go through `generate` as one list: one run of full batches instead of a partial batch
    # per split (greedy decoding, so each row's answer does not depend on its batch-mates beyond rounding).
    short = {split: _rows(recipe, split, n, seed) for split in ("prior_consistent", "no_prior", *POPE_SPLITS)}
    answers = iter(
        generate(model, processor, [r for rows in short.values() for r in rows], batch_size=64, max_new_tokens=4)
    )
    answered = {"counterfactual": (counterfactual, mod["answers"])}
    answered.update({split: (rows, [next(answers) for _ in rows]) for split, rows in short.items()})
    for metric in ("prior_consistent_accuracy", "no_prior_accuracy"):
        rows, answers = answered[PER_NOISE_SPLITS[metric]]
        metrics[metric] = accuracy(answers, [r["answer"] for r in rows])
    for metric, split in PER_NOISE_SPLITS.items():
        metrics.update(metrics_per_noise_level(metric, *answered[split], level="image_noise"))
    for split in POPE_SPLITS:
        rows, answers = answered[split]
        pope = pope_metrics(answers, [r["answer"] for r in rows])
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            metrics[f"{split}_{key}"] = pope[key]
    for key in ("f1", "accuracy", "yes_ratio"):
        metrics[f"pope_{key}"] = float(np.mean([metrics[f"{s}_{key}"] for s in POPE_SPLITS]))
    captions = _rows(recipe, "captions", n, seed)
    texts = generate(model, processor, captions, batch_size=64, max_new_tokens=16)
    objects = recipe["objects"]
    hallucination = chair(
        texts, [r["objects"] for r in captions], list(objects), {o["plural"]: name for name, o in objects.items()}
    )
    metrics["chair_s"], metrics["chair_i"] = hallucination["chair_s"], hallucination["chair_i"]
    return metrics, mod["image_shares"]


TASK = LabTask(
    name="vision",
    modality="image",
    family="llava",
    settings=LabSettings,
    default_recipe="napo/lab/recipes/colors.yaml",
    load_recipe=scenes.load_recipe,
    make_split=scenes.make_split,
    build_model=build_model,
    pair_source=pair_source,
    pair_options=pair_options,
    evaluate=evaluate,
    report_metrics=REPORT_METRICS,
    summary_metrics=KEY_METRICS,
    report_name="report",
    render_report=render_report,
    gate=SFT_GATE,
    hardness="image_noise",
    confusable=confusable_colour,
    plots=plots,
    eval_passes=30,  # counterfactual: 3 answers + 4 scorings; 5 short-answer splits; captions (16 tokens)
)
