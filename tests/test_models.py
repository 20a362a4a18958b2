"""Tiny offline models: every family runs forward, batched generate, TRL's collator, save and load; each family's
registry record (`napo.models.families`) says what its model and processor actually do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import noise_image
from safetensors.torch import load_file
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from napo.models import (
    DEFAULT_WORDS,
    FAMILIES,
    IMAGE_TOKEN,
    build_tiny_model,
    build_tokenizer,
    family_of,
    family_record,
    is_audio_model,
    is_vision_model,
    load_model,
    media_projector,
    media_tower,
    rope_index_function,
)

VISION = ("llava", "qwen2_vl", "idefics3", "paligemma")
QUESTIONS = ("What colour is the banana?", "How many cats are there in this picture?")


def _audio(seed: int, seconds: float) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(16000 * seconds)).astype(np.float32)


def _prompt_batch(
    family: str, processor, rows: tuple[int, ...] = (0, 1), *, forward_inputs_only: bool = True
) -> dict[str, torch.Tensor]:
    """Conversational prompts of different lengths (so one is left-padded), with their media; without the
    processor's outputs that are not forward inputs unless `forward_inputs_only` is False."""
    part = {"qwen2_audio": [{"type": "audio"}], "text": []}.get(family, [{"type": "image"}])
    conversations = [[{"role": "user", "content": [*part, {"type": "text", "text": QUESTIONS[i]}]}] for i in rows]
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    media: dict = {}
    if family in VISION:
        # 40x48: not square and not the model's size, so the processor must resize.
        media = {"images": [[noise_image(i, 40, 48)] for i in rows]}
    elif family == "qwen2_audio":
        media = {"audio": [_audio(i, 0.5 + 0.5 * i) for i in rows], "sampling_rate": 16000}
    batch = processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **media)
    if forward_inputs_only:
        batch.pop("labels", None)  # PaliGemma's processor adds prompt labels; a forward doesn't need them
    return dict(batch)


@pytest.fixture(scope="module", params=FAMILIES)
def built(request: pytest.FixtureRequest):
    return request.param, *build_tiny_model(request.param)


def test_forward_and_batched_generate(built) -> None:
    family, model, processor = built
    batch = _prompt_batch(family, processor)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the shorter prompt must be left-padded"
    with torch.no_grad():
        logits = model(**batch).logits
    tokenizer = processor if family == "text" else processor.tokenizer
    assert model.config.get_text_config().vocab_size == len(tokenizer)
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 3
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    # Left padding must not change the answer: the padded row generates what it generates alone.
    padded = int(batch["attention_mask"][:, 0].argmin())
    alone = _prompt_batch(family, processor, rows=(padded,))
    alone_out = model.generate(**alone, max_new_tokens=3, do_sample=False)
    eos = model.generation_config.eos_token_id
    batched_answer = out[padded, batch["input_ids"].shape[1] :].tolist()
    if eos in batched_answer:  # a finished row is padded until the others finish
        batched_answer = batched_answer[: batched_answer.index(eos) + 1]
    assert batched_answer == alone_out[0, alone["input_ids"].shape[1] :].tolist()
    assert is_vision_model(model) == (family in VISION)
    assert is_audio_model(model) == (family == "qwen2_audio")


@pytest.mark.parametrize("built", VISION, indirect=True)
def test_image_tokens_match_config(built) -> None:
    family, model, processor = built
    batch = _prompt_batch(family, processor)
    image_token_id = model.config.image_token_id
    assert image_token_id == processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    per_image = (batch["input_ids"] == image_token_id).sum(dim=1)
    # Images resized to 32 px, 8 px patches: 16 patches, merged 2x2 by idefics3.
    expected = {"llava": [16, 16], "idefics3": [4, 4], "paligemma": [16, 16]}.get(family)
    if family == "qwen2_vl":
        # Qwen2-VL keeps the aspect ratio: 40x48 px fits 1024 px as 16x32 -> 2x4 patches, merged 2x2.
        assert batch["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 4]]
        expected = [2, 2]
    assert per_image.tolist() == expected


@pytest.mark.parametrize("built", VISION, indirect=True)
def test_trl_vision_preference_collator(built) -> None:
    family, model, processor = built
    examples = [
        {
            "images": [noise_image(i, 40, 48)],
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        for i, (q, chosen, rejected) in enumerate(zip(QUESTIONS, ("yellow", "two cats"), ("brown", "three")))
    ]
    batch = DataCollatorForVisionPreference(processor)(examples)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    eos = processor.tokenizer.eos_token_id
    completions = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["completion_mask"])]
    words = [processor.tokenizer.decode(c[:-1]) for c in completions]
    assert words == ["yellow", "two cats", "brown", "three"]
    assert all(c[-1] == eos for c in completions)
    if family == "paligemma":  # answers must be the causal suffix (type 1), or each token sees the next
        real = batch["attention_mask"].bool()
        assert torch.equal(batch["token_type_ids"][real], batch["completion_mask"][real])
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "labels")}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(logits).all()


def test_save_then_load_model_gives_identical_logits(built, tmp_path: Path) -> None:
    family, model, processor = built
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model(str(tmp_path))
    assert type(loaded) is type(model)
    assert type(loaded_processor) is type(processor)
    batch = _prompt_batch(family, processor)
    reloaded_batch = _prompt_batch(family, loaded_processor)
    for key, value in batch.items():
        assert torch.equal(value, reloaded_batch[key]), key
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_load_model_refuses_pickled_weights_unless_allowed(tmp_path: Path) -> None:
    model, processor = build_tiny_model("llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # transformers 5 only writes safetensors: rewrite the weights as a pickled checkpoint.
    (weights,) = tmp_path.glob("*.safetensors")
    torch.save(load_file(weights), tmp_path / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_model(str(tmp_path))
    loaded, _ = load_model(str(tmp_path), allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        build_tiny_model("gpt2")


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_prompt_is_an_exact_token_prefix_of_prompt_and_answer(kind: str) -> None:
    tokenizer = build_tokenizer(DEFAULT_WORDS, corpus=[*QUESTIONS, "yellow", "two cats"] * 5, kind=kind)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[1]}]}]
    answer = [{"role": "assistant", "content": "two cats"}]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=False)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[len(prompt_ids) :] == tokenizer.encode("two cats", add_special_tokens=False) + [
        tokenizer.eos_token_id
    ]
    assert tokenizer.decode(tokenizer.encode("two cats")) == "two cats"
    assert tokenizer.decode(tokenizer.encode("yellow")) == "yellow"
    image_ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    assert len(image_ids) == 1 and image_ids[0] in tokenizer.all_special_ids


def test_word_tokenizer_lowercases_and_maps_unknown_words_to_unk() -> None:
    tokenizer = build_tokenizer(["yellow"], corpus=["Two cats, please."])
    assert tokenizer.decode(tokenizer.encode("Two CATS")) == "two cats"
    assert tokenizer.encode("giraffe") == [tokenizer.unk_token_id]
    assert tokenizer.decode(tokenizer.encode("two cats, please.")) == "two cats, please."


def test_the_record_is_found_from_the_model_it_builds(built) -> None:
    family, model, _ = built
    assert family_of(model) is family_record(family) and family_of(model.config) is family_record(family)


def test_the_record_declares_every_processor_output(built) -> None:
    """What a collator must carry along the tokens, cast, or drop: every output of the processor is declared."""
    family, _, processor = built
    record = family_record(family)
    batch = _prompt_batch(family, processor, forward_inputs_only=False)
    declared = {*record.media_features, *record.media_layout, *record.processor_only}
    declared |= {"input_ids", "attention_mask", *(i.name for i in record.per_token_inputs)}
    assert set(batch) == declared
    for spec in record.per_token_inputs:
        assert batch[spec.name].shape == batch["input_ids"].shape, spec.name
    assert all(batch[name].is_floating_point() for name in record.media_features)


@pytest.mark.parametrize("built", [*VISION, "qwen2_audio"], indirect=True)
def test_one_placeholder_expands_to_the_media_tokens_of_the_model(built) -> None:
    family, model, processor = built
    record = family_record(family)
    if family == "qwen2_audio":
        placeholder, token_id = record.audio_placeholder, model.config.audio_token_index
        media = {"audio": [_audio(0, 1.0)], "sampling_rate": 16000}
    else:
        placeholder, token_id = record.image_placeholder, model.config.image_token_id
        media = {"images": [[noise_image(0, 40, 48)]]}
    batch = processor(text=[f"{placeholder} what colour ?"], return_tensors="pt", **media)
    assert int((batch["input_ids"] == token_id).sum()) > 1  # expanded to the media's tokens, one per patch / frame


@pytest.mark.parametrize("built", [*VISION, "qwen2_audio"], indirect=True)
def test_the_forward_runs_media_through_the_tower_and_projector_of_the_record(built) -> None:
    family, model, processor = built
    calls = []
    handles = [
        module.register_forward_hook(lambda module, args, out, name=name: calls.append(name))
        for name, module in (("tower", media_tower(model)), ("projector", media_projector(model)))
    ]
    try:
        with torch.no_grad():
            model(**_prompt_batch(family, processor))
    finally:
        for handle in handles:
            handle.remove()
    assert {"tower", "projector"} <= set(calls)


def test_prefix_lm_is_what_the_attention_does(built) -> None:
    """Changing the last prompt token changes the logits at earlier positions exactly when the prompt is one
    bidirectional block (prefix-LM); a causal model's earlier positions cannot see it."""
    family, model, processor = built
    batch = _prompt_batch(family, processor, rows=(0,))
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    tokenizer = getattr(processor, "tokenizer", processor)
    last = int(changed["input_ids"][0, -1])
    changed["input_ids"][0, -1] = tokenizer.convert_tokens_to_ids(
        "red" if last != tokenizer.convert_tokens_to_ids("red") else "blue"
    )
    with torch.no_grad():
        before, after = (model(**inputs).logits[0, :-1] for inputs in (batch, changed))
    assert (not torch.allclose(before, after, atol=1e-6)) == family_record(family).prefix_lm


def test_only_multimodal_rotary_families_have_a_rope_index(built) -> None:
    family, model, processor = built
    rope_index = rope_index_function(model)
    assert (rope_index is not None) == (family_record(family).rope_index is not None)
    if rope_index is not None:
        batch = _prompt_batch(family, processor)
        positions, _ = rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        assert positions.shape == (3, *batch["input_ids"].shape)
        assert not torch.equal(positions[1], positions[2])  # image tokens get distinct height and width positions


def test_a_model_type_without_a_record_falls_back_or_names_the_registry() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(
        MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    assert family_of(model) is None and rope_index_function(model) is None
    with pytest.raises(ValueError, match="FAMILY_RECORDS"):
        media_tower(model)
