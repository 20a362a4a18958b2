"""Audio degradations of mono waveforms.

Ops have the signature ``op(sample, rng, *, args) -> sample`` and receive a sample already
validated and copied by `perturb.apply` (audios are float32 1-D arrays, shape (n,)); they return
float32 1-D arrays. The rate is ``sample["sampling_rate"]`` (Hz, default 16000). A sample without
audios, and an empty waveform, are returned unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from perturb._sample import remove_placeholders, sampling_rate

NOISE_COLORS = ("white", "pink")
_LOWPASS_TAPS = 511  # Blackman-windowed sinc: -6 dB at the cutoff, < -70 dB from rate / 160 above it
_MIN_STFT = 2048  # librosa's default n_fft; shorter inputs are zero-padded to it


def _each_audio(sample: dict, fn: Callable[[np.ndarray, int], np.ndarray]) -> dict:
    """Apply ``fn(wave, rate)`` to every non-empty waveform; the result is cast to float32."""
    if not sample.get("audios"):
        return sample
    rate = sampling_rate(sample)
    return {**sample, "audios": [fn(w, rate).astype(np.float32) if w.size else w for w in sample["audios"]]}


def drop(sample: dict, rng: np.random.Generator) -> dict:
    """Remove every waveform: ``audios`` becomes ``[]`` and ``{"type": "audio"}`` parts leave the prompt.

    The language-bias negative for audio models. A sample without an ``audios`` key is unchanged.
    """
    if sample.get("audios") is None:
        return sample
    out = {**sample, "audios": []}
    if sample.get("prompt") is not None:
        out["prompt"] = remove_placeholders(sample["prompt"], "audio")
    return out


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """Pink noise of length n: white noise shaped in frequency so that power ~ 1/f (-10 dB/decade)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = 1.0  # the DC bin is zeroed below; avoid dividing by zero
    spectrum /= np.sqrt(freqs)  # amplitude ~ f^-1/2  <=>  power ~ 1/f
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n)


def noise(sample: dict, rng: np.random.Generator, *, snr_db: float = 10.0, color: str = "white") -> dict:
    """Add white or pink noise at signal-to-noise ratio `snr_db` (dB).

    The drawn noise ``n`` is rescaled so that ``10 * log10(mean(x**2) / mean(n**2)) == snr_db``
    exactly for this waveform (measured, not expected, power). `snr_db` typical range -10..30:
    20 is clean-sounding, 0 is as loud as the signal, -5 mostly buries speech. An all-zero
    waveform has no power to refer to and stays silent.
    """

    def add(wave: np.ndarray, rate: int) -> np.ndarray:
        x = wave.astype(np.float64)
        n = rng.standard_normal(x.size) if color == "white" else _pink(x.size, rng)
        noise_power = np.mean(n**2)
        if noise_power == 0.0:  # pink noise of length 1 (only a DC bin): nothing to scale
            return wave
        target = np.mean(x**2) / 10.0 ** (snr_db / 10.0)
        return x + n * np.sqrt(target / noise_power)

    return _each_audio(sample, add)


def lowpass(sample: dict, rng: np.random.Generator, *, cutoff_hz: float = 1000.0) -> dict:
    """Low-pass filter at `cutoff_hz` (Hz): zero-phase FIR, Blackman-windowed sinc of 511 taps.

    Gain is 0 dB (ripple < 0.01 dB) up to rate / 160 below the cutoff, -6 dB at it, below -70 dB
    from rate / 160 above it (100 Hz at 16 kHz). Output has the input's length and
    alignment. 1000 Hz leaves muffled but partly intelligible speech, 300 Hz keeps prosody only.
    A cutoff at or above the Nyquist frequency (rate / 2) leaves the audio unchanged.
    """

    def filt(wave: np.ndarray, rate: int) -> np.ndarray:
        if cutoff_hz >= rate / 2:
            return wave
        half = _LOWPASS_TAPS // 2
        taps = np.sinc(2.0 * cutoff_hz / rate * np.arange(-half, half + 1)) * np.blackman(_LOWPASS_TAPS)
        taps /= taps.sum()  # unit DC gain
        # Full convolution then the centred slice: zero delay for any length, even one shorter than the filter.
        return np.convolve(wave.astype(np.float64), taps)[half : half + wave.size]

    return _each_audio(sample, filt)


def time_mask(sample: dict, rng: np.random.Generator, *, ratio: float = 0.2) -> dict:
    """Silence one contiguous span of ``round(ratio * n)`` samples at a uniformly random start.

    SpecAugment-style time masking in the waveform domain. `ratio` in [0, 1]: 0.1-0.3 removes a
    word or two of a short utterance, 1 silences everything.
    """

    def mask(wave: np.ndarray, rate: int) -> np.ndarray:
        width = round(ratio * wave.size)
        start = int(rng.integers(0, wave.size - width + 1))
        out = wave.copy()
        out[start : start + width] = 0.0
        return out

    return _each_audio(sample, mask)


def _padded(wave: np.ndarray) -> np.ndarray:
    # librosa warns and degrades on inputs shorter than one STFT frame: pad with silence and cut after.
    return np.pad(wave, (0, max(0, _MIN_STFT - wave.size)))


def pitch_shift(sample: dict, rng: np.random.Generator, *, semitones: float = 2.0) -> dict:
    """Shift pitch by `semitones` (frequencies x ``2 ** (semitones / 12)``), same duration (librosa).

    Phase-vocoder time stretch then resampling (``librosa.effects.pitch_shift``). Typical -4..4;
    12 is an octave. Output has the input's length.
    """
    import librosa  # imported on use: it is slow to import and only the audio ops need it

    return _each_audio(
        sample,
        lambda wave, rate: librosa.effects.pitch_shift(_padded(wave), sr=rate, n_steps=semitones)[: wave.size],
    )


def time_stretch(sample: dict, rng: np.random.Generator, *, rate: float = 1.2) -> dict:
    """Speed up by `rate` without changing pitch (librosa phase vocoder): length becomes ``round(n / rate)``.

    `rate` > 1 is faster/shorter, < 1 slower/longer; typical 0.8-1.5.
    """
    import librosa  # imported on use: it is slow to import and only the audio ops need it

    return _each_audio(
        sample,
        lambda wave, sr: librosa.effects.time_stretch(_padded(wave), rate=rate)[: round(wave.size / rate)],
    )
