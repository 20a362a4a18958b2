"""scripts/bench_train.py: every lever it measures (`napo.throughput.set_levers`) gives the plain path's loss, the FLOP
counter covers the model, and the script runs on CPU."""

import copy
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trl import DPOConfig, DPOTrainer

from napo import NaPOConfig, NaPOTrainer
from napo.fast import encode_images_once, image_chunks, unique_images
from napo.models import build_tiny_model
from napo.throughput import FlopCounter, set_levers

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"
spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
bench = sys.modules["bench_train"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(bench)

SIZE = bench.SIZES["tiny"]
ROWS = 2
PLAIN = bench.Variant("napo", "napo", precompute=False, gradient_checkpointing=False, attn="sdpa", optim="adamw_torch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A policy moved away from its reference (so margins are not 0), the processor, rows and their pairs."""
    reference, processor = bench.build_model(SIZE, torch.device("cpu"), "sdpa")
    reference.eval().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    rows = bench.synthesise_rows(SIZE, ROWS)
    return policy, reference, processor, rows, bench.as_pairs(rows), str(tmp_path_factory.mktemp("bench"))


def trainer_of(setup, variant):
    policy, reference, processor, rows, pairs, workdir = setup
    return bench.make_trainer(variant, policy, reference, processor, rows, pairs, ROWS, workdir, 0)


def loss_and_grads_with_levers(trainer, variant=PLAIN, n=ROWS):
    """Loss and gradients of `trainer` on its first `n` dataset rows, the model put in `variant`'s levers."""
    set_levers(trainer, variant)
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    # Collators may mutate their examples (TRL's vision collator does): give each call new dicts.
    batch = trainer._prepare_inputs(trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(n)]))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    set_levers(trainer, PLAIN)
    return loss.detach(), grads


def assert_close_grads(a, b, rtol):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=1e-7, msg=name)


def test_one_forward_per_row_equals_trl_on_the_separate_pairs(setup):
    """The work napo and TRL do in the benchmark is the same: NaPO's DPO objective with equal weights over the three
    negative types is TRL's DPO loss over the 3·rows pairs."""
    policy, reference, processor, rows, pairs, workdir = setup
    common = dict(
        output_dir=workdir,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        beta=0.1,
    )
    napo = NaPOTrainer(
        policy,
        reference,
        args=NaPOConfig(
            **common,
            objective="dpo",
            weights="fixed",
            weight_rejected=1.0,
            weight_language_bias=1.0,
            weight_vision_bias=1.0,
        ),
        train_dataset=rows,
        processing_class=processor,
    )
    trl = DPOTrainer(policy, reference, args=DPOConfig(**common), train_dataset=pairs, processing_class=processor)
    napo_loss, napo_grads = loss_and_grads_with_levers(napo)
    trl_loss, trl_grads = loss_and_grads_with_levers(trl, n=3 * ROWS)
    torch.testing.assert_close(napo_loss, trl_loss, rtol=1e-5, atol=1e-7)
    assert_close_grads(napo_grads, trl_grads, rtol=1e-4)


def test_every_compatible_lever_at_once_gives_the_plain_loss_and_gradients(setup):
    """The benchmark's precomputed variant with `set_levers` putting on gradient checkpointing, eager attention, images
    encoded once and packing together (share_prompt refuses Qwen2-VL) gives the plain trainer's loss and gradients,
    each lever acting on the batch; afterwards `set_levers(PLAIN)` puts the models back. Each option alone, on every
    family: tests/test_throughput_equivalence.py."""
    every = replace(
        PLAIN,
        name="napo-precomputed",
        precompute=True,
        gradient_checkpointing=True,
        attn="eager",
        images_once=True,
        padding_free=True,
    )
    plain_trainer, trainer = trainer_of(setup, PLAIN), trainer_of(setup, every)
    assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names
    # The benchmark's rows have answers of different lengths, so its padded batches hold padding that packing drops.
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(ROWS)])
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()

    patches, decoder_rows, saved = [], [], {}
    policy = trainer.model  # both trainers train the shared policy: the hooks see either's forward
    hooks = [
        policy.model.visual.register_forward_hook(lambda module, args, output: patches.append(args[0].shape[0])),
        policy.get_decoder()
        .layers[0]
        .mlp.register_forward_hook(lambda module, args, output: decoder_rows.append(args[0].shape[0])),
    ]

    def counted(name, trainer, variant):
        def count(tensor):
            saved[name] = saved.get(name, 0) + 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            return loss_and_grads_with_levers(trainer, variant)

    try:
        plain = counted("plain", plain_trainer, PLAIN)
        plain_patches, plain_rows = patches[-1], decoder_rows[-1]
        with_levers = counted("levers", trainer, every)
    finally:
        for hook in hooks:
            hook.remove()
    assert plain_patches == (1 + len(bench.NEGATIVE_COLUMNS)) * patches[-1]  # each row's image encoded once
    assert plain_rows == ROWS * (1 + len(bench.NEGATIVE_COLUMNS)) and decoder_rows[-1] == 1  # one packed row
    assert saved["levers"] < saved["plain"]  # checkpointed layers keep only their inputs
    torch.testing.assert_close(with_levers[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_close_grads(with_levers[1], plain[1], rtol=1e-3)

    base = trainer.model
    assert base.config._attn_implementation == "sdpa" and not base.is_activation_checkpointing
    assert not base.model._napo_encode_images_once and not trainer.padding_free


def test_images_encoded_once_keep_llava_logits():
    """Fixed-size image tensors (LLaVA): two copies of one image and another image give the plain logits."""
    model, processor = build_tiny_model("llava", seed=0)
    rng = np.random.default_rng(0)
    image, other = (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2))
    text = ["<image> what colour ?"] * 3
    inputs = processor(images=[image, other, image], text=text, return_tensors="pt")
    plain = model(**inputs).logits
    encode_images_once(model)
    try:
        once = model(**inputs).logits
    finally:
        encode_images_once(model, enabled=False)
    torch.testing.assert_close(once, plain, rtol=1e-6, atol=1e-6)
    assert unique_images(image_chunks(inputs["pixel_values"], None)) == ([0, 1], [0, 1, 0])


def test_fused_adamw_takes_the_plain_step(setup):
    """One benchmark step with `adamw_torch_fused` moves the weights as `adamw_torch` does, from the same start."""
    start = {name: p.detach().clone() for name, p in setup[0].named_parameters()}
    after = {}
    for optim in ("adamw_torch", "adamw_torch_fused"):
        with torch.no_grad():
            for name, p in setup[0].named_parameters():
                p.copy_(start[name])
        variant = replace(PLAIN, optim=optim)
        trainer = trainer_of(setup, variant)
        cls, kwargs = bench.Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
        assert kwargs.get("fused", False) == (optim == "adamw_torch_fused")
        optimizer = cls([p for p in trainer.model.parameters() if p.requires_grad], **kwargs)
        bench.train_step(
            trainer, iter([trainer.data_collator([dict(r) for r in trainer.train_dataset])]), optimizer, variant
        )
        after[optim] = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with torch.no_grad():
        for name, p in setup[0].named_parameters():
            p.copy_(start[name])
    assert any(not torch.equal(after["adamw_torch"][n], start[n]) for n in start)
    assert_close_grads(after["adamw_torch_fused"], after["adamw_torch"], rtol=1e-5)


def test_flop_counter_covers_every_parameter_once(setup):
    """Tied embeddings: the LM head stands for the embedding table, so the counts add up to the model's size."""
    counter = FlopCounter.of(setup[0])
    total = sum(p.numel() for p in setup[0].parameters())
    assert counter.lm_params + counter.vision_params + counter.projector_params == total


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "paligemma"])
def test_flop_counter_splits_every_tiny_vlm_into_language_model_tower_and_projector(family):
    """The registry's tower and projector and the decoder partition the parameters: nothing counted twice or missed
    (the input embedding table is a lookup, counted only when the LM head is a separate matrix)."""
    model, _ = build_tiny_model(family)
    counter = FlopCounter.of(model)
    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    lookup_only = embeddings.numel() if embeddings is not head else 0
    total = sum(p.numel() for p in model.parameters())
    assert counter.lm_params + counter.vision_params + counter.projector_params + lookup_only == total
    assert counter.vision_params > 0 and counter.projector_params > 0


def test_script_runs_on_cpu_and_records_cuda_only_levers_as_skipped(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    argv = [
        "--model-size",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--batch-rows",
        "1",
        "--levers",
        "flash,xformers",
        "--out",
        str(out),
    ]
    record = bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    printed = capsys.readouterr().out
    for lever in ("flash", "xformers"):
        assert "CUDA-only" in record["levers_skipped"][lever] and f"lever {lever} skipped" in printed
    assert set(record["variants"]) == {"napo", "napo-precomputed", "trl"}
    assert record["speedup_vs_trl"]["napo"]["mean"] > 0
    assert all(v["mfu"] is None and v["flops_per_s"]["mean"] > 0 for v in record["variants"].values())
    # TRL holds the same parameters and reference and forwards more sequences per row.
    assert record["peak_mem_ratio_vs_trl"]["napo"] < 1
    assert record["variants"]["napo-precomputed"]["resident_bytes"] < record["variants"]["napo"]["resident_bytes"]
    assert "python scripts/bench_train.py --model-size tiny" in record["command"]


def test_shared_prompt_lever_runs_where_positions_can_be_split():
    """LLaVA (1-D positions) gets the shared-prompt variants; Qwen2-VL (multimodal rotary positions) and a base with
    gradient checkpointing (no KV cache) record why not, instead of failing mid-run."""
    cpu = torch.device("cpu")
    variants, skipped = bench.plan_variants(PLAIN, ["shared-prompt"], cpu, "llava")
    assert [v.name for v in variants if v.share_prompt] == ["napo+shared-prompt", "napo-precomputed+shared-prompt"]
    assert not skipped
    for base, family in ((PLAIN, "qwen2_vl"), (replace(PLAIN, gradient_checkpointing=True), "llava")):
        variants, skipped = bench.plan_variants(base, ["shared-prompt"], cpu, family)
        assert not any(v.share_prompt for v in variants) and "shared-prompt" in skipped
