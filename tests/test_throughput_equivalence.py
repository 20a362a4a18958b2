"""Every throughput option changes how a model computes, not what: with the option on, one batch's loss and every
parameter's gradient (and, for the options that change how a sequence is scored, the log-ratio table of the whole
dataset) equal the plain padded path's on each tiny model family where the option is supported.

One parametrised test over (option, family). For each case it also checks that the option really acted on the
batch (a packed row, a prompt run once per row, fewer images through the tower, recomputed layers, no reference
model, the other attention kernel), so an option that silently falls back to the plain path fails instead of
passing trivially. Refusals and special cases stay beside their option: tests/test_padding_free.py,
tests/test_shared_prompt.py, tests/test_attention.py (xformers), tests/test_trainer.py (precomputed reference over
training steps, LoRA) and tests/test_bench_train.py (`napo.throughput.set_levers`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from helpers import COMMON, family_preference_rows, fresh_rows, loss_and_grads, perturbed

from napo import NaPOConfig, NaPOTrainer
from napo.models import build_tiny_model
from napo.models.families import family_of, media_tower, unwrap_peft

ROWS = 4  # rows of every batch: family_preference_rows' whole dataset
# A dataset variant by case name: (family, rows carry media). Text-only rows on a multimodal-rotary model.
CASE_DATA = {"qwen2_vl-text-rows": ("qwen2_vl", False)}
VISION = ("llava", "qwen2_vl", "idefics3", "paligemma")
ALL = ("text", *VISION, "qwen2_audio")


@dataclass
class Run:
    """What one batch through a trainer gave: loss, gradients by parameter name, the log-ratio table of the dataset
    (rows x answers, when asked for), the (batch, length) of every call of the policy's first decoder layer's MLP, the
    leading size (images or patches) of every call of its media tower, and how many tensors the forward saved for
    the backward."""

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    table: np.ndarray | None
    layer_calls: list[tuple[int, int]]
    tower_calls: list[int]
    saved_tensors: int  # tensors autograd kept from the forward for the backward, outside checkpointed regions


@dataclass(frozen=True)
class Option:
    """A throughput option: the NaPOConfig settings that turn it on (plus `prepare`, for one set on the models),
    the families it is supported on, whether it changes how sequences are scored (then the log-ratio tables are
    compared too), the tolerances of the comparison, and `engaged(trainer, run, plain)`, which asserts that the
    option acted."""

    settings: dict
    families: tuple[str, ...]
    engaged: Callable[[NaPOTrainer, Run, Run], None]
    scores_differently: bool = False
    prepare: Callable[[NaPOTrainer], None] | None = None
    loss_tol: dict = field(default_factory=lambda: dict(rtol=1e-6, atol=1e-7))
    grad_tol: dict = field(default_factory=lambda: dict(rtol=1e-5, atol=1e-7))


def packed_into_one_row(trainer: NaPOTrainer, run: Run, plain: Run) -> None:
    """The collated batch holds padding; the policy's forward saw one row of exactly its real tokens, without an
    attention mask, and the packed labels keep exactly the completion tokens."""
    batch = trainer._prepare_inputs(trainer.data_collator(fresh_rows(trainer, ROWS)))
    model_kwargs, labels, _ = trainer._model_inputs(batch)
    real_tokens = int(batch["attention_mask"].sum())
    assert real_tokens < batch["attention_mask"].numel()  # the padded batch does hold padding
    assert model_kwargs["input_ids"].shape == (1, real_tokens) and "attention_mask" not in model_kwargs
    assert int((labels != -100).sum()) == int(batch["completion_mask"][:, 1:].sum())
    assert (1, real_tokens) in run.layer_calls and (1, real_tokens) not in plain.layer_calls


def prompt_run_once_per_row(trainer: NaPOTrainer, run: Run, plain: Run) -> None:
    """A row holds several sequences (a prompt to share), and the policy ran a forward over one prompt per row,
    which the padded path never does (it runs every sequence)."""
    batch = trainer._prepare_inputs(trainer.data_collator(fresh_rows(trainer, ROWS)))
    sequences = batch["input_ids"].size(0)
    assert sequences > int(batch["sequence_row"].max()) + 1 == ROWS
    assert any(size == ROWS for size, _ in run.layer_calls)
    assert {size for size, _ in plain.layer_calls} == {sequences}


def images_encoded_once(trainer: NaPOTrainer, run: Run, plain: Run) -> None:
    """The tower saw each row's image once instead of once per sequence (chosen + present negatives; 10 sequences
    from the 4 rows); Idefics3's tiled images with a pixel mask keep the plain path (same count)."""
    dataset = trainer.train_dataset
    sequences = sum(1 + sum(row[c] is not None for c in trainer.negative_columns) for row in dataset)
    assert sequences == 10
    plain_images, once_images = plain.tower_calls[0], run.tower_calls[-1]  # the plain forward; the lever's last
    if unwrap_peft(trainer.model).config.model_type == "idefics3":
        assert once_images == plain_images
    else:
        assert once_images * sequences == plain_images * ROWS


def activations_not_kept(trainer: NaPOTrainer, run: Run, plain: Run) -> None:
    """Checkpointed layers keep only their inputs for the backward pass (they are run again there): the forward saved
    fewer tensors than the plain one."""
    assert run.saved_tensors < plain.saved_tensors


def reference_precomputed(trainer: NaPOTrainer, run: Run, plain: Run) -> None:
    """Nothing but the cached log-probs is kept: no reference model, one reference column per answer."""
    assert trainer.ref_model is None
    for column in ("chosen", *trainer.negative_columns):
        assert f"ref_{column}_logps" in trainer.train_dataset.column_names


def eager_attention(trainer: NaPOTrainer, run: Run, plain: Run) -> None:
    """Both models run transformers' eager attention (the plain path: sdpa)."""
    for model in (trainer.model, trainer.ref_model):
        assert unwrap_peft(model).config._attn_implementation == "eager"


def enable_checkpointing(trainer: NaPOTrainer) -> None:
    """What `Trainer.train` does first with `gradient_checkpointing=True` (this test runs a batch, not `train`)."""
    unwrap_peft(trainer.model).activation_checkpointing_enable(
        activation_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs
    )


def set_eager(trainer: NaPOTrainer) -> None:
    for model in (trainer.model, trainer.ref_model):
        unwrap_peft(model).set_attn_implementation("eager")


# Tolerances of the options whose kernels reorder floating-point sums (packing, a split prompt, another attention).
REORDERED_LOSS, REORDERED_GRADS = dict(rtol=1e-4, atol=1e-6), dict(rtol=1e-3, atol=1e-5)
OPTIONS: dict[str, Option] = {
    # Prefix-LM families are refused (tests/test_padding_free.py); text rows on a multimodal-rotary model are a case.
    "padding_free": Option(
        {"padding_free": True},
        ("text", "llava", "qwen2_vl", "idefics3", "qwen2_audio", "qwen2_vl-text-rows"),
        packed_into_one_row,
        scores_differently=True,
        loss_tol=REORDERED_LOSS,
        grad_tol=REORDERED_GRADS,
    ),
    # Qwen2-VL (multimodal rotary) and PaliGemma (prefix-LM) are refused (tests/test_shared_prompt.py).
    "share_prompt": Option(
        {"share_prompt": True},
        ("text", "llava", "idefics3", "qwen2_audio"),
        prompt_run_once_per_row,
        scores_differently=True,
        loss_tol=REORDERED_LOSS,
        grad_tol=REORDERED_GRADS,
    ),
    "encode_images_once": Option({"encode_images_once": True}, VISION, images_encoded_once),
    "gradient_checkpointing": Option(
        {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
        ALL,
        activations_not_kept,
        prepare=enable_checkpointing,
    ),
    "precompute_ref_log_probs": Option(
        {"precompute_ref_log_probs": True},
        ALL,
        reference_precomputed,
        loss_tol=dict(rtol=1e-5, atol=1e-6),
        grad_tol=dict(rtol=1e-4, atol=1e-6),
    ),
    "eager_attention": Option(
        {}, ALL, eager_attention, prepare=set_eager, loss_tol=dict(rtol=1e-5, atol=1e-6), grad_tol=REORDERED_GRADS
    ),
}
CASES = [(name, case) for name, option in OPTIONS.items() for case in option.families]


@functools.cache
def case_models(case: str):
    """(reference, policy moved away from it, processor, rows) of a case, built once per test session."""
    family, media = CASE_DATA.get(case, (case, True))
    reference, processor = build_tiny_model(family, seed=0)
    reference.eval().requires_grad_(False)
    policy = perturbed(reference).requires_grad_(True)
    return reference, policy, processor, family_preference_rows(family, media)


def trainer_for(case: str, output_dir, settings: dict) -> NaPOTrainer:
    """A trainer of fresh copies of the case's policy and reference (an option may change the models it gets)."""
    reference, policy, processor, dataset = case_models(case)
    return NaPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=NaPOConfig(output_dir=str(output_dir), **{**COMMON, **settings}),
        train_dataset=dataset,
        processing_class=processor,
    )


def run_batch(trainer: NaPOTrainer, with_table: bool) -> Run:
    """One batch of all ROWS rows through `trainer` (`loss_and_grads`), recording its policy's layer and tower calls;
    with `with_table`, first the dataset's log-ratio table."""
    base = unwrap_peft(trainer.model)
    layer_calls, tower_calls = [], []
    hooks = [
        base.get_decoder()
        .layers[0]
        .mlp.register_forward_hook(lambda module, args, output: layer_calls.append(tuple(args[0].shape[:2])))
    ]
    if family_of(base).tower is not None:
        hooks.append(
            media_tower(base).register_forward_hook(
                lambda module, args, kwargs, output: tower_calls.append(next(iter((*args, *kwargs.values()))).shape[0]),
                with_kwargs=True,
            )
        )
    try:
        table = trainer.log_prob_table(trainer.train_dataset, batch_size=ROWS, of="logratio") if with_table else None
        del layer_calls[:], tower_calls[:]  # only the training batch's calls
        saved = [0]

        def count(tensor: torch.Tensor) -> torch.Tensor:
            saved[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            loss, grads = loss_and_grads(trainer, fresh_rows(trainer, ROWS))
    finally:
        for hook in hooks:
            hook.remove()
    return Run(loss, grads, table, layer_calls, tower_calls, saved[0])


@functools.cache
def plain_run(case: str, output_dir) -> Run:
    """The plain padded path on the case, run once per test session for every option compared with it."""
    return run_batch(trainer_for(case, output_dir, {}), with_table=True)


@pytest.mark.parametrize(("option_name", "case"), CASES, ids=[f"{name}-{case}" for name, case in CASES])
def test_option_gives_the_plain_loss_and_gradients(option_name, case, tmp_path_factory):
    option = OPTIONS[option_name]
    plain = plain_run(case, tmp_path_factory.getbasetemp() / f"plain-{case}")
    trainer = trainer_for(case, tmp_path_factory.mktemp(option_name), option.settings)
    if option.prepare is not None:
        option.prepare(trainer)
    run = run_batch(trainer, with_table=option.scores_differently)
    option.engaged(trainer, run, plain)

    assert np.isfinite(plain.table[:, 0]).all() and np.nanmax(np.abs(plain.table)) > 1e-2  # margins are not 0
    if option.scores_differently:
        np.testing.assert_allclose(run.table, plain.table, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run.loss, plain.loss, **option.loss_tol)
    assert run.grads.keys() == plain.grads.keys() and run.grads
    for name, grad in plain.grads.items():
        torch.testing.assert_close(run.grads[name], grad, **option.grad_tol, msg=name)
