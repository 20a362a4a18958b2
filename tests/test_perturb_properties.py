"""perturb under random valid specs, random small samples and random garbage specs (hypothesis)."""

from __future__ import annotations

import numpy as np
from helpers import sample_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import perturb
from perturb import Arg

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


def arg_values(arg: Arg) -> st.SearchStrategy:
    if arg.choices is not None:
        return st.sampled_from(arg.choices)
    if arg.type is str:
        return st.text(st.characters(exclude_characters="'\"", exclude_categories=("Cs",)), max_size=12)
    if arg.type is int:
        return st.integers(int(arg.low), int(arg.high))
    return st.floats(arg.low, arg.high, allow_nan=False)


@st.composite
def chains(draw: st.DrawFn) -> list[tuple[str, dict]]:
    """1-3 registered ops with arguments drawn from their valid ranges."""
    names = draw(st.lists(st.sampled_from(sorted(perturb.OPS)), min_size=1, max_size=3))
    return [(name, {a: draw(arg_values(arg)) for a, arg in perturb.OPS[name].args.items()}) for name in names]


def render(chain: list[tuple[str, dict]]) -> str:
    """Write a chain as a spec string, spelling every argument out (strings single-quoted)."""
    ops = []
    for name, args in chain:
        written = ", ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v!r}" for k, v in args.items())
        ops.append(f"{name}({written})" if args else name)
    return " + ".join(ops)


@st.composite
def images(draw: st.DrawFn) -> Image.Image:
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "I;16"]))
    width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


@st.composite
def audios(draw: st.DrawFn) -> np.ndarray:
    length = draw(st.integers(0, 4000))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0]))
    return (scale * np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(length)).astype(np.float32)


@st.composite
def samples(draw: st.DrawFn) -> dict:
    pictures = draw(st.lists(images(), max_size=2))
    question = draw(st.text(max_size=40))
    placeholders = [{"type": "image"} for _ in pictures]
    prompt = draw(
        st.sampled_from([question, [{"role": "user", "content": [*placeholders, {"type": "text", "text": question}]}]])
    )
    return {
        "prompt": prompt,
        "images": pictures,
        "audios": draw(st.lists(audios(), max_size=2)),
        "sampling_rate": draw(st.sampled_from([8000, 16000])),
    }


@PROPERTY_SETTINGS
@given(chain=chains())
def test_rendered_chains_parse_back_to_themselves(chain: list[tuple[str, dict]]) -> None:
    parsed = perturb.parse(render(chain))
    assert [name for name, _ in parsed] == [name for name, _ in chain]
    for (_, got), (_, drawn) in zip(parsed, chain):
        assert got == drawn and all(type(v) is type(drawn[k]) for k, v in got.items())


@PROPERTY_SETTINGS
@given(chain=chains(), sample=samples(), seed=st.integers(0, 2**32))
def test_valid_specs_return_a_valid_sample_and_never_mutate(
    chain: list[tuple[str, dict]], sample: dict, seed: int
) -> None:
    before = sample_snapshot(sample)
    out = perturb.apply(render(chain), sample, seed=seed)
    assert sample_snapshot(sample) == before
    names = {name for name, _ in chain}

    assert all(isinstance(im, Image.Image) for im in out["images"])
    if "image.drop" in names:
        assert out["images"] == []
    else:
        # Every image op keeps the size (random_resized_crop resizes back).
        assert [im.size for im in out["images"]] == [im.size for im in sample["images"]]

    assert all(a.dtype == np.float32 and a.ndim == 1 and np.isfinite(a).all() for a in out["audios"])
    if "audio.drop" in names:
        assert out["audios"] == []
    elif "audio.time_stretch" not in names:
        assert [a.size for a in out["audios"]] == [a.size for a in sample["audios"]]


SPEC_ALPHABET = "image.blurdopatch_mskgen(t)=,+ 0123456789-e'\"_xyz"


@PROPERTY_SETTINGS
@given(spec=st.one_of(st.text(max_size=60), st.text(SPEC_ALPHABET, max_size=60)))
def test_garbage_specs_parse_or_raise_value_error(spec: str) -> None:
    try:
        chain = perturb.parse(spec)
    except ValueError:
        return
    assert chain and all(name in perturb.OPS for name, _ in chain)


@PROPERTY_SETTINGS
@given(chain=chains(), cut=st.integers(0, 200), junk=st.text(SPEC_ALPHABET, max_size=3))
def test_damaged_valid_specs_parse_or_raise_value_error(chain: list[tuple[str, dict]], cut: int, junk: str) -> None:
    spec = render(chain)
    cut = min(cut, len(spec))
    try:
        perturb.parse(spec[:cut] + junk + spec[cut + 1 :])
    except ValueError:
        pass
