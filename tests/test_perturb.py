"""perturb: each op against an independent reference (schedules, SNR, spectra), the parser, the sample contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import sample_snapshot
from PIL import Image

import perturb

RANDOM_OPS = [
    "image.diffusion",
    "image.gaussian",
    "image.patch_mask",
    "image.random_resized_crop",
    "text.mask_tokens",
    "text.shuffle_words",
    "audio.noise",
    "audio.noise(color=pink)",
    "audio.time_mask",
]


def tone(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate).astype(np.float32)


def rgb_image(height: int = 48, width: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def full_sample() -> dict:
    return {
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "What colour is the polar bear standing on the ice floe near the water?"},
                ],
            },
        ],
        "images": [rgb_image(), rgb_image(32, 32, seed=1)],
        "audios": [tone(440, 16000), tone(220, 16000, 0.5)],
        "sampling_rate": 16000,
        "chosen": "White.",
    }


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    clean = clean.astype(np.float64)
    return 10 * math.log10(np.mean(clean**2) / np.mean((noisy.astype(np.float64) - clean) ** 2))


def dominant_hz(wave: np.ndarray, rate: int) -> float:
    n = 8 * wave.size  # zero-padding: a bin spacing of rate / (8 n)
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size), n))
    return float(np.argmax(spectrum) * rate / n)


def alpha_bar(t: int) -> float:
    """DDPM ᾱ_t = Π_{s=0..t} (1 − β_s), β_s = 1e-4 + (0.02 − 1e-4)·s/999, written out independently."""
    product = 1.0
    for s in range(t + 1):
        product *= 1.0 - (1e-4 + (0.02 - 1e-4) * s / 999)
    return product


# --- image ---------------------------------------------------------------------------------------


def test_diffusion_correlation_falls_monotonically_with_t() -> None:
    sample = {"images": [rgb_image(64, 64)]}
    x0 = np.asarray(sample["images"][0], dtype=np.float64).ravel()
    correlations = [
        np.corrcoef(
            x0, np.asarray(perturb.apply(f"image.diffusion(t={t})", sample)["images"][0], dtype=np.float64).ravel()
        )[0, 1]
        for t in (0, 100, 300, 600, 900)
    ]
    assert all(a > b for a, b in zip(correlations, correlations[1:])), correlations
    assert correlations[0] > 0.999
    assert correlations[-1] < 0.2


def test_diffusion_at_t0_is_nearly_the_original() -> None:
    image = rgb_image(64, 64)
    out = perturb.apply("image.diffusion(t=0)", {"images": [image]})["images"][0]
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(image, dtype=np.int16))
    assert diff.mean() < 2.0 and out.size == image.size and out.mode == "RGB"


@pytest.mark.parametrize("t", [10, 50, 100])
def test_diffusion_noise_variance_matches_the_ddpm_schedule(t: int) -> None:
    # Mid-grey x0 ≈ 0, so x_t ≈ sqrt(1 - ᾱ_t)·ε stays far from the clipping range for t <= 100.
    gray = Image.new("RGB", (128, 128), (128, 128, 128))
    out = perturb.apply(f"image.diffusion(t={t})", {"images": [gray]}, seed=t)["images"][0]
    xt = np.asarray(out, dtype=np.float64) / 127.5 - 1.0
    x0 = 128 / 127.5 - 1.0
    noise = xt - math.sqrt(alpha_bar(t)) * x0
    assert noise.var() == pytest.approx(1.0 - alpha_bar(t), rel=0.05)
    assert abs(noise.mean()) < 0.01


def test_gaussian_noise_std_is_sigma_in_image_units() -> None:
    gray = Image.new("RGB", (96, 96), (128, 128, 128))
    out = perturb.apply("image.gaussian(sigma=0.1)", {"images": [gray]})["images"][0]
    assert (np.asarray(out, dtype=np.float64) / 255 - 128 / 255).std() == pytest.approx(0.1, rel=0.05)


def test_patch_mask_blacks_out_the_given_fraction_of_cells() -> None:
    white = Image.new("RGB", (64, 48), (255, 255, 255))  # 4 x 3 = 12 cells of 16 px
    out = np.asarray(perturb.apply("image.patch_mask(ratio=0.5, patch=16)", {"images": [white]})["images"][0])
    cells = out.reshape(3, 16, 4, 16, 3).max(axis=(1, 3, 4))
    assert set(np.unique(out)) == {0, 255}
    assert (cells == 0).sum() == 6


def test_random_resized_crop_keeps_size_and_zooms_in() -> None:
    # Horizontal gradient: a crop of half the area spans ~71% of the columns, so the range of values shrinks.
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 100).astype(np.uint8), (80, 1))).convert("RGB")
    out = perturb.apply("image.random_resized_crop(scale=0.5)", {"images": [ramp]})["images"][0]
    row = np.asarray(out, dtype=np.float64)[40, :, 0]
    assert out.size == ramp.size
    assert 0.6 * 255 < row.max() - row.min() < 0.8 * 255


def test_grayscale_gives_equal_channels() -> None:
    out = np.asarray(perturb.apply("image.grayscale", {"images": [rgb_image()]})["images"][0])
    assert out.shape == (48, 64, 3) and (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_blur_removes_high_frequencies() -> None:
    image = rgb_image(64, 64)
    out = perturb.apply("image.blur(radius=4)", {"images": [image]})["images"][0]
    assert np.asarray(out, dtype=np.float64).std() < 0.3 * np.asarray(image, dtype=np.float64).std()


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    levels = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    image = Image.fromarray(levels)
    assert image.mode == "I;16"
    out = np.asarray(perturb.apply("image.blur(radius=0)", {"images": [image]})["images"][0])
    assert out[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16", "I", "1", "CMYK", "F"])
def test_any_mode_is_converted_to_rgb(mode: str) -> None:
    image = Image.new(mode, (20, 10))
    out = perturb.apply("image.gaussian(sigma=0.2)", {"images": [image]})["images"][0]
    assert out.mode == "RGB" and out.size == (20, 10)


def test_image_drop_removes_images_and_their_placeholders() -> None:
    sample = full_sample()
    out = perturb.apply("image.drop", sample)
    assert out["images"] == []
    user = out["prompt"][1]["content"]
    assert {"type": "image"} not in user
    assert user == [sample["prompt"][1]["content"][1]]
    assert out["prompt"][0] == sample["prompt"][0] and len(out["audios"]) == 2


# --- text ----------------------------------------------------------------------------------------


def test_drop_question_keeps_placeholders_and_removes_the_question() -> None:
    sample = full_sample()
    out = perturb.apply("text.drop_question", sample)
    user = out["prompt"][1]["content"]
    assert user == [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
    assert "polar bear" not in str(out["prompt"])
    assert out["prompt"][0] == {"role": "system", "content": "Answer briefly."}


def test_drop_question_on_a_string_prompt_and_with_a_custom_instruction() -> None:
    out = perturb.apply("text.drop_question(prompt='Describe the audio, briefly.')", {"prompt": "Is it a dog?"})
    assert out["prompt"] == "Describe the audio, briefly."
    only_image = {"prompt": [{"role": "user", "content": [{"type": "image"}]}]}
    assert perturb.apply("text.drop_question", only_image)["prompt"][0]["content"][-1]["text"] == "Describe the image."


def test_text_ops_rewrite_the_last_user_turn_only() -> None:
    prompt = [
        {"role": "user", "content": "first question stays as it was"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "one two three four five six seven eight nine ten"},
    ]
    out = perturb.apply("text.mask_tokens(ratio=0.3, mask=MASK)", {"prompt": prompt})["prompt"]
    assert out[:2] == prompt[:2]
    words = out[2]["content"].split(" ")
    assert words.count("MASK") == 3 and len(words) == 10


def test_shuffle_words_permutes_words_and_keeps_whitespace() -> None:
    text = "a b c d e f g h\ni j k l"
    out = perturb.apply("text.shuffle_words", {"prompt": text}, seed=3)["prompt"]
    assert out != text and sorted(out.split()) == sorted(text.split())
    assert [len(line.split()) for line in out.split("\n")] == [8, 4]


# --- audio ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [16000, 8000])
@pytest.mark.parametrize("color", ["white", "pink"])
@pytest.mark.parametrize("target", [-5, 0, 10, 20])
def test_noise_hits_the_requested_snr(target: float, color: str, rate: int) -> None:
    clean = tone(440, rate)
    out = perturb.apply(f"audio.noise(snr_db={target}, color={color})", {"audios": [clean], "sampling_rate": rate})
    noisy = out["audios"][0]
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    assert abs(snr_db(clean, noisy) - target) < 0.5


def spectral_slope_db_per_decade(noise: np.ndarray, rate: int, low: float, high: float) -> float:
    """Least-squares slope of the averaged periodogram (dB) against log10(frequency)."""
    segments = noise[: noise.size // 1024 * 1024].reshape(-1, 1024) * np.hanning(1024)
    power = (np.abs(np.fft.rfft(segments, axis=1)) ** 2).mean(axis=0)
    freqs = np.fft.rfftfreq(1024, 1 / rate)
    band = (freqs >= low) & (freqs <= high)
    return float(np.polyfit(np.log10(freqs[band]), 10 * np.log10(power[band]), 1)[0])


@pytest.mark.parametrize(("color", "expected"), [("pink", -10.0), ("white", 0.0)])
def test_noise_colour_has_the_expected_spectral_slope(color: str, expected: float) -> None:
    clean = tone(440, 16000, seconds=4)
    noisy = perturb.apply(f"audio.noise(snr_db=0, color={color})", {"audios": [clean]})["audios"][0]
    slope = spectral_slope_db_per_decade(noisy.astype(np.float64) - clean, 16000, 50, 6000)
    assert abs(slope - expected) < 1.0, slope  # estimates scatter by ~0.2 dB/decade


@pytest.mark.parametrize("rate", [16000, 8000])
def test_lowpass_attenuates_above_and_keeps_below_the_cutoff(rate: int) -> None:
    middle = slice(rate // 10, -rate // 10)  # away from the filter's start-up at the edges

    def gain_db(freq: float) -> float:
        x = tone(freq, rate)
        y = perturb.apply("audio.lowpass(cutoff_hz=1000)", {"audios": [x], "sampling_rate": rate})["audios"][0]
        return 20 * math.log10(np.sqrt(np.mean(y[middle] ** 2)) / np.sqrt(np.mean(x[middle] ** 2)))

    assert gain_db(1500) < -20
    assert gain_db(3000) < -20
    assert abs(gain_db(300)) < 1
    assert abs(gain_db(700)) < 1


@pytest.mark.parametrize("rate", [0.8, 1.2, 2.0])
def test_time_stretch_changes_length_by_one_over_rate_and_keeps_pitch(rate: float) -> None:
    x = tone(440, 16000)
    y = perturb.apply(f"audio.time_stretch(rate={rate})", {"audios": [x]})["audios"][0]
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(y.size - x.size / rate) <= 1
    assert dominant_hz(y, 16000) == pytest.approx(440, rel=0.01)


@pytest.mark.parametrize("semitones", [2, -3])
def test_pitch_shift_moves_the_dominant_frequency(semitones: float) -> None:
    x = tone(440, 16000)
    y = perturb.apply(f"audio.pitch_shift(semitones={semitones})", {"audios": [x]})["audios"][0]
    assert y.shape == x.shape and y.dtype == np.float32
    assert dominant_hz(y, 16000) == pytest.approx(440 * 2 ** (semitones / 12), rel=0.01)


def test_time_mask_silences_one_span_of_the_given_length() -> None:
    ones = np.ones(1000, dtype=np.float32)
    out = perturb.apply("audio.time_mask(ratio=0.2)", {"audios": [ones]})["audios"][0]
    zeros = np.flatnonzero(out == 0)
    assert zeros.size == 200 and zeros[-1] - zeros[0] == 199


def test_audio_drop_removes_audios_and_their_placeholders() -> None:
    prompt = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Who speaks?"}]}]
    out = perturb.apply("audio.drop", {"prompt": prompt, "audios": [tone(440, 16000)]})
    assert out["audios"] == [] and out["prompt"][0]["content"] == [{"type": "text", "text": "Who speaks?"}]


def test_stereo_audio_is_refused_with_a_clear_message() -> None:
    stereo = np.zeros((2, 1600), dtype=np.float32)
    with pytest.raises(ValueError, match=r"audios'\]\[0\].*mono.*\(2, 1600\)"):
        perturb.apply("audio.noise", {"audios": [stereo]})


# --- the sample contract -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(perturb.OPS))
def test_every_op_is_deterministic_and_leaves_the_input_alone(name: str) -> None:
    sample = full_sample()
    before = sample_snapshot(sample)
    first = perturb.apply(name, sample, seed=7)
    assert sample_snapshot(first) == sample_snapshot(perturb.apply(name, sample, seed=7))
    assert sample_snapshot(sample) == before
    assert all(a is not b for a, b in zip(first["images"], sample["images"]))
    assert all(a is not b for a, b in zip(first["audios"], sample["audios"]))
    assert first["prompt"] is not sample["prompt"] and first["chosen"] == "White."
    assert all(a.dtype == np.float32 and a.ndim == 1 for a in first["audios"])


@pytest.mark.parametrize("spec", RANDOM_OPS)
def test_random_ops_depend_on_the_seed(spec: str) -> None:
    sample = full_sample()
    assert sample_snapshot(perturb.apply(spec, sample, seed=0)) != sample_snapshot(perturb.apply(spec, sample, seed=1))


def test_ops_in_a_chain_draw_independent_noise() -> None:
    gray = {"images": [Image.new("RGB", (32, 32), (128, 128, 128))]}
    twice = perturb.apply("image.gaussian(sigma=0.05)+image.gaussian(sigma=0.05)", gray)["images"][0]
    once = perturb.apply("image.gaussian(sigma=0.05)", gray)["images"][0]
    # Same noise twice would double the deviation (std 0.1); independent draws give sqrt(2) * 0.05.
    std = (np.asarray(twice, dtype=np.float64) / 255 - 128 / 255).std()
    assert std == pytest.approx(math.sqrt(2) * 0.05, rel=0.1)
    assert once.tobytes() != twice.tobytes()


@pytest.mark.parametrize("name", ["image.blur", "image.drop", "text.shuffle_words", "audio.noise", "audio.drop"])
def test_missing_modality_leaves_the_sample_unchanged(name: str) -> None:
    assert perturb.apply(name, {"chosen": "yes"}) == {"chosen": "yes"}


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ({"images": rgb_image()}, r"sample\['images'\]: expected a list of PIL images"),
        ({"images": [np.zeros((4, 4, 3))]}, r"sample\['images'\]\[0\]: expected a PIL image"),
        ({"audios": np.zeros(10)}, r"sample\['audios'\]: expected a list"),
        ({"audios": [np.array(["a", "b"])]}, r"sample\['audios'\]\[0\]: expected a 1-D real numeric"),
        ({"prompt": 3}, r"sample\['prompt'\]: expected a str or a list"),
        (
            {"prompt": [{"role": "user", "content": [{"text": "x"}]}]},
            r"\['content'\]\[0\]: expected a dict with a str 'type'",
        ),
        ({"sampling_rate": 0}, r"sample\['sampling_rate'\]: expected a positive int"),
        ([], r"a sample is a dict"),
    ],
)
def test_malformed_samples_raise_naming_the_key(sample: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        perturb.apply("image.blur", sample)


def test_negative_seed_is_refused() -> None:
    with pytest.raises(ValueError, match="seed"):
        perturb.apply("image.blur", {}, seed=-1)


# --- spec parser ---------------------------------------------------------------------------------


def test_parse_fills_defaults_and_coerces_ints_to_floats() -> None:
    assert perturb.parse("image.blur(radius=4)+image.patch_mask(ratio=0.5)") == [
        ("image.blur", {"radius": 4.0}),
        ("image.patch_mask", {"ratio": 0.5, "patch": 16}),
    ]
    assert isinstance(perturb.parse("image.blur(radius=4)")[0][1]["radius"], float)
    assert perturb.parse("image.drop") == [("image.drop", {})]


def test_parse_tolerates_whitespace_quotes_and_bare_words() -> None:
    chain = perturb.parse(
        '  audio.noise ( snr_db = -5 , color = pink , )\n+ text.mask_tokens(mask="[+,)]", ratio=1e-1)'
        " + text.drop_question(prompt='What, if anything (+) is shown?')"
    )
    assert chain == [
        ("audio.noise", {"snr_db": -5.0, "color": "pink"}),
        ("text.mask_tokens", {"ratio": 0.1, "mask": "[+,)]"}),
        ("text.drop_question", {"prompt": "What, if anything (+) is shown?"}),
    ]


def test_every_registered_op_lists_its_arguments_with_defaults() -> None:
    for name, op in perturb.OPS.items():
        assert op.name == name and op.doc, name
        assert perturb.parse(op.signature()) == [(name, {a: arg.default for a, arg in op.args.items()})]
    assert perturb.OPS["image.diffusion"].args["t"].default == 500
    assert perturb.OPS["audio.noise"].args["color"].choices == ("white", "pink")


def test_unknown_op_lists_all_ops_with_defaults() -> None:
    with pytest.raises(ValueError) as error:
        perturb.parse("image.blur(radius=2)+image.difusion(t=3)")
    message = str(error.value)
    assert "unknown op 'image.difusion'" in message
    for expected in ("image.diffusion(t=500)", "audio.noise(snr_db=10.0, color='white')", "text.drop_question"):
        assert expected in message


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("image.blur(sigma=2)", ["unknown argument 'sigma'", "radius: float = 2.0 in [0, 1000]"]),
        ("image.diffusion(t=2.5)", ["t=2.5 should be int", "t: int = 500 in [0, 999]"]),
        ("image.diffusion(t=1000)", ["t=1000 is out of range", "in [0, 999]"]),
        ("image.blur(radius=big)", ["radius='big' should be float"]),
        ("audio.noise(color=red)", ["'red' is not one of white, pink", "snr_db: float = 10.0"]),
        ("audio.noise(snr_db=1e999)", ["not finite"]),
        ("image.blur(radius=1, radius=2)", ["given twice"]),
        ("image.drop(x=1)", ["image.drop takes no arguments"]),
    ],
)
def test_bad_arguments_list_the_ops_valid_arguments(spec: str, expected: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        perturb.parse(spec)
    for fragment in expected:
        assert fragment in str(error.value)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        "image",
        "image.blur+",
        "+image.blur",
        "image.blur(",
        "image.blur(4)",
        "image.blur radius=2",
        "image.blur(radius=2",
        "image.blur(radius=)",
        "image.blur(radius='2)",
        "image.blur image.drop",
    ],
)
def test_malformed_specs_raise_value_error_with_the_position(spec: str) -> None:
    with pytest.raises(ValueError, match=r"bad perturbation spec .* at position \d+"):
        perturb.parse(spec)
