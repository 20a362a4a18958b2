"""Perturbation specs: the op registry, the spec parser and `apply`.

A spec is one op or a chain of ops joined by ``+``::

    spec  := op ("+" op)*
    op    := KIND "." NAME [ "(" [ arg ("," arg)* [","] ] ")" ]
    arg   := KEY "=" value
    value := int | float | 'quoted' | "quoted" | bare_word

e.g. ``"image.blur(radius=4) + image.patch_mask(ratio=0.5)"``. Whitespace between tokens is
ignored. Quoted strings have no escapes (a string cannot contain its own quote character); bare
words are ``[A-Za-z_][A-Za-z0-9_-]*``. Every op and argument is checked against `OPS` before
anything runs, so a typo fails fast with the list of what is valid.
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from perturb import audio, image, text
from perturb._sample import copy_sample

Value = int | float | str


@dataclass(frozen=True)
class Arg:
    """One keyword argument of an op: its type, default and valid range (bounds inclusive)."""

    name: str
    type: type
    default: Value
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None

    def describe(self) -> str:
        """``"radius: float = 2.0 in [0, 100]"`` — what the CLI and error messages show."""
        limits = ""
        if self.choices is not None:
            limits = " one of " + "|".join(self.choices)
        elif self.low is not None or self.high is not None:
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            limits = f" in [{low}, {high}]"
        return f"{self.name}: {self.type.__name__} = {self.default!r}{limits}"


@dataclass(frozen=True)
class Op:
    """A registered perturbation: ``fn(sample, rng, **args) -> new sample``."""

    name: str
    fn: Callable[..., dict]
    args: dict[str, Arg]

    @property
    def doc(self) -> str:
        """The op's docstring: what it does, units, typical ranges."""
        return inspect.getdoc(self.fn) or ""

    def signature(self) -> str:
        """``"image.blur(radius=2.0)"`` — the op with its defaults, as a spec would write it."""
        if not self.args:
            return self.name
        return f"{self.name}(" + ", ".join(f"{a.name}={a.default!r}" for a in self.args.values()) + ")"


def _op(name: str, fn: Callable[..., dict], **limits: tuple[float | None, float | None] | tuple[str, ...]) -> Op:
    """Register `fn` under `name`; defaults and types come from its signature, ranges from `limits`.

    A numeric limit is ``(low, high)`` (None = unbounded); a str argument's limit is its choices.
    Reading defaults from the signature keeps one source of truth for them.
    """
    hints = typing.get_type_hints(fn)
    args = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue  # (sample, rng): supplied by `apply`, not by the spec
        kind = hints[param.name]
        limit = limits.pop(param.name, None)
        if kind is str:
            args[param.name] = Arg(param.name, str, param.default, choices=limit)
        else:
            low, high = limit if limit is not None else (None, None)
            args[param.name] = Arg(param.name, kind, param.default, low, high)
    if limits:
        raise TypeError(f"{name}: limits given for unknown arguments {sorted(limits)}")
    return Op(name, fn, args)


OPS: dict[str, Op] = {
    op.name: op
    for op in [
        _op("image.drop", image.drop),
        _op("image.diffusion", image.diffusion, t=(0, image.DIFFUSION_STEPS - 1)),
        _op("image.gaussian", image.gaussian, sigma=(0, 1)),
        _op("image.blur", image.blur, radius=(0, 1000)),
        _op("image.patch_mask", image.patch_mask, ratio=(0, 1), patch=(1, 4096)),
        _op("image.random_resized_crop", image.random_resized_crop, scale=(1e-4, 1)),
        _op("image.grayscale", image.grayscale),
        _op("text.drop_question", text.drop_question),
        _op("text.mask_tokens", text.mask_tokens, ratio=(0, 1)),
        _op("text.shuffle_words", text.shuffle_words),
        _op("audio.drop", audio.drop),
        _op("audio.noise", audio.noise, snr_db=(-60, 120), color=audio.NOISE_COLORS),
        _op("audio.lowpass", audio.lowpass, cutoff_hz=(1, 1e6)),
        _op("audio.time_mask", audio.time_mask, ratio=(0, 1)),
        _op("audio.pitch_shift", audio.pitch_shift, semitones=(-48, 48)),
        _op("audio.time_stretch", audio.time_stretch, rate=(0.1, 10)),
    ]
}


def _valid_ops() -> str:
    return "valid ops:\n" + "\n".join(f"  {op.signature()}" for op in OPS.values())


def _valid_args(op: Op) -> str:
    if not op.args:
        return f"{op.name} takes no arguments"
    return f"valid arguments of {op.name}: " + "; ".join(a.describe() for a in op.args.values())


# Token patterns, tried in this order at the current position (after skipping whitespace).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?(?![A-Za-z0-9_.])")
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_SPACE = re.compile(r"\s*")


class _Scanner:
    """Position-tracking reader over a spec string; errors quote the spec and the position."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.pos = 0

    def skip_space(self) -> None:
        self.pos = _SPACE.match(self.spec, self.pos).end()

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.spec)

    def peek(self, char: str) -> bool:
        self.skip_space()
        return self.spec.startswith(char, self.pos)

    def take(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        self.skip_space()
        match = pattern.match(self.spec, self.pos)
        if match:
            self.pos = match.end()
        return match

    def expect(self, char: str, what: str) -> None:
        if not self.peek(char):
            self.fail(f"expected {what}")
        self.pos += len(char)

    def fail(self, message: str, hint: str = "") -> typing.NoReturn:
        found = self.spec[self.pos : self.pos + 20] or "end of spec"
        raise ValueError(
            f"bad perturbation spec {self.spec!r} at position {self.pos} ({found!r}): {message}"
            + (f"\n{hint}" if hint else "")
        )


def _read_value(scan: _Scanner) -> Value:
    if match := scan.take(_NUMBER):
        literal = match.group()
        return int(literal) if re.fullmatch(r"[+-]?\d+", literal) else float(literal)
    if match := scan.take(_QUOTED):
        return match.group(1) if match.group(1) is not None else match.group(2)
    if match := scan.take(_BARE):
        return match.group()
    scan.fail("expected a value: a number, a quoted string or a bare word")


def _check_value(op: Op, arg: Arg, value: Value) -> Value:
    """Coerce ``int -> float`` where a float is expected; reject wrong types and out-of-range values."""
    problem = ""
    if arg.type is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, arg.type):
        problem = f"{arg.name}={value!r} should be {arg.type.__name__}, got {type(value).__name__}"
    elif arg.choices is not None and value not in arg.choices:
        problem = f"{arg.name}={value!r} is not one of {', '.join(arg.choices)}"
    elif isinstance(value, float) and not math.isfinite(value):
        problem = f"{arg.name}={value!r} is not finite"
    elif (arg.low is not None and value < arg.low) or (arg.high is not None and value > arg.high):
        problem = f"{arg.name}={value!r} is out of range"
    if problem:
        raise ValueError(f"{op.name}: {problem}; {_valid_args(op)}")
    return value


def _read_op(scan: _Scanner) -> tuple[str, dict[str, Value]]:
    start = scan.pos
    match = scan.take(_NAME)
    if not match:
        scan.fail("expected an op name like 'image.blur'", _valid_ops())
    op = OPS.get(match.group())
    if op is None:
        scan.pos = start
        scan.skip_space()
        scan.fail(f"unknown op {match.group()!r}", _valid_ops())
    given: dict[str, Value] = {}
    if scan.peek("("):
        scan.pos += 1
        while not scan.peek(")"):
            key = scan.take(_KEY)
            if not key or not scan.peek("="):
                scan.fail("expected key=value", _valid_args(op))
            scan.pos += 1
            name = key.group()
            if name not in op.args:
                raise ValueError(f"{op.name}: unknown argument {name!r}; {_valid_args(op)}")
            if name in given:
                raise ValueError(f"{op.name}: argument {name!r} given twice; {_valid_args(op)}")
            given[name] = _check_value(op, op.args[name], _read_value(scan))
            if not scan.peek(")"):
                scan.expect(",", "',' or ')'")
        scan.pos += 1
    return op.name, {name: given.get(name, arg.default) for name, arg in op.args.items()}


def parse(spec: str) -> list[tuple[str, dict[str, Value]]]:
    """Parse and validate a spec into ``[(op_name, {arg: value, ...}), ...]``, defaults filled in.

    >>> parse("image.blur(radius=4) + text.drop_question")
    [('image.blur', {'radius': 4.0}), ('text.drop_question', {'prompt': 'Describe the image.'})]

    Raises ValueError for anything that is not a valid chain: an unknown op (the message lists all
    ops with their defaults), an unknown or repeated argument, a wrong type or an out-of-range value
    (the message lists the op's arguments with types, defaults and ranges).
    """
    if not isinstance(spec, str):
        raise ValueError(f"a perturbation spec is a string like 'image.blur(radius=4)', got {type(spec).__name__}")
    scan = _Scanner(spec)
    if scan.at_end():
        scan.fail("empty spec", _valid_ops())
    chain = [_read_op(scan)]
    while not scan.at_end():
        scan.expect("+", "'+' between ops, or the end of the spec")
        chain.append(_read_op(scan))
    return chain


def apply(spec: str, sample: dict, seed: int = 0) -> dict:
    """Return a perturbed copy of `sample`; the input is never mutated.

    Args:
        spec: one op or a ``+`` chain, e.g. ``"image.diffusion(t=500)"`` (see `parse`, `OPS`).
        sample: dict with optional keys ``prompt`` (str or TRL messages), ``images`` (list of
            PIL images), ``audios`` (list of 1-D numeric arrays, mono) and ``sampling_rate`` (Hz,
            default 16000); other keys are carried over untouched. A key that is present must be
            well-formed, else ValueError naming the key. An op whose modality is absent (no images
            for ``image.blur``, no prompt for ``text.*``) leaves the sample unchanged.
        seed: non-negative int. Op ``i`` of the chain draws from
            ``numpy.random.default_rng([seed, i])``, so the output is a pure function of
            (spec, sample, seed) and an op's randomness does not depend on the ops before it.

    Returns:
        A new dict: images are new PIL objects (perturbed ones in RGB, others in their input mode),
        audios are new float32 1-D arrays, the prompt is a new object.
    """
    chain = parse(spec)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    out = copy_sample(sample)
    for position, (name, args) in enumerate(chain):
        out = OPS[name].fn(out, np.random.default_rng([int(seed), position]), **args)
    return out
