"""Training-time augmentation for synthetic speech, seeded per example.

Waveform: speed perturbation, gain, additive noise (coloured noise, or babble
made from other utterances), simple reverberation (an exponentially decaying
noise impulse response), and a telephone-band path (8 kHz, mu-law, back to
16 kHz) so 8 kHz callers are recognized, and, when asked for, a random
microphone/channel response (high-pass, tilt, resonances, low-pass).
Features: SpecAugment (time and frequency masks) and, when asked for, vocal
tract length perturbation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchaudio

from dsstream.frontend import FbankConfig

__all__ = [
    "AugmentConfig",
    "augment_wave",
    "channel_response",
    "coloured_noise",
    "equalize",
    "reverb",
    "spec_augment",
    "telephone",
    "vtlp",
]

RATE = 16000


@dataclass(frozen=True)
class AugmentConfig:
    speed: tuple[float, ...] = (0.9, 1.0, 1.1)  # speed factors (pitch moves with speed)
    gain_db: tuple[float, float] = (-12.0, 6.0)
    noise_prob: float = 0.5
    snr_db: tuple[float, float] = (5.0, 30.0)
    babble_prob: float = 0.3  # of noisy examples, babble instead of coloured noise
    reverb_prob: float = 0.3
    rt60_s: tuple[float, float] = (0.15, 0.6)
    telephone_prob: float = 0.15
    freq_masks: int = 2
    freq_width: int = 12  # mel bins
    time_masks: int = 2
    time_width: float = 0.05  # fraction of the utterance per mask
    # Vocal tract length perturbation: the spectrum stretched by a factor drawn
    # from ``vtlp_range`` (formants move, pitch and tempo stay), so each voice
    # also trains as a range of nearby voices.  Off by default.
    vtlp_prob: float = 0.0
    vtlp_range: tuple[float, float] = (0.9, 1.1)
    # A random channel (microphone, preamp, codec) colouring the whole signal:
    # synthetic voices come out of the synthesizer flat, real recordings do not
    # (LJ Speech has little energy below ~150 Hz).  Off here; the training
    # recipe turns it on (apps.asr.train --eq, 0.5 by default).
    eq_prob: float = 0.0
    highpass_hz: tuple[float, float] = (50.0, 400.0)  # 12 dB/octave below
    lowpass_hz: tuple[float, float] = (3500.0, 8000.0)  # 12 dB/octave above
    tilt_db_per_octave: tuple[float, float] = (-3.0, 3.0)  # about 1 kHz
    resonances: int = 3  # bumps or dips of +-eq_peak_db, 0.5 to 2 octaves wide
    eq_peak_db: float = 6.0


def _fft_size(n: int) -> int:
    # A power of two: numpy's FFT is several times slower on lengths with
    # large prime factors, which utterance lengths often have.
    return 1 << max(0, (n - 1).bit_length())


def coloured_noise(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of unit-variance noise with power spectrum 1/f^alpha
    (0 white, 1 pink, 2 brown)."""
    size = _fft_size(n)
    spec = np.fft.rfft(rng.standard_normal(n), size)
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    noise = np.fft.irfft(spec / f ** (alpha / 2), size)[:n]
    return (noise / (np.std(noise) + 1e-9)).astype(np.float32)


def _convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``np.convolve(x, h)[: len(x)]`` by FFT (a 0.6 s response is 9,600 taps)."""
    size = _fft_size(len(x) + len(h) - 1)
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[: len(x)]


def _add(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    p_signal = np.mean(wave**2) + 1e-9
    p_noise = np.mean(noise**2) + 1e-9
    return wave + noise * np.sqrt(p_signal / (p_noise * 10 ** (snr_db / 10)))


def reverb(wave: np.ndarray, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """``wave`` (16 kHz) in a room: a direct path plus exponentially decaying noise
    reaching -60 dB after ``rt60`` seconds; the response has unit energy."""
    n = int(rt60 * RATE)
    t = np.arange(n) / RATE
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
    ir[0] = 1.0
    return _convolve(wave, ir / np.sqrt(np.sum(ir**2))).astype(np.float32)


def telephone(wave: np.ndarray) -> np.ndarray:
    """``wave`` (16 kHz) through an 8 kHz mu-law channel and back to 16 kHz."""
    x = torchaudio.functional.resample(torch.from_numpy(wave), RATE, 8000)
    x = torchaudio.functional.mu_law_decoding(torchaudio.functional.mu_law_encoding(x, 256), 256)
    return torchaudio.functional.resample(x, 8000, RATE).numpy()


def channel_response(freqs: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """A random channel's gain in dB at ``freqs`` (Hz): a high-pass and a low-pass
    (12 dB/octave beyond cutoffs drawn from the config's ranges), a spectral
    tilt about 1 kHz, and ``cfg.resonances`` Gaussian bumps or dips in
    log-frequency; floored at -60 dB."""
    octaves = np.log2(np.maximum(freqs, 1.0) / 1000.0)
    hp = np.log2(rng.uniform(*cfg.highpass_hz) / 1000.0)
    lp = np.log2(rng.uniform(*cfg.lowpass_hz) / 1000.0)
    gain = 12.0 * np.minimum(octaves - hp, 0.0) - 12.0 * np.maximum(octaves - lp, 0.0)
    gain += rng.uniform(*cfg.tilt_db_per_octave) * octaves
    for _ in range(cfg.resonances):
        centre = rng.uniform(np.log2(0.2), np.log2(6.0))  # 200 Hz to 6 kHz
        width = rng.uniform(0.5, 2.0) / 2.355  # octaves at half height -> sigma
        gain += rng.uniform(-cfg.eq_peak_db, cfg.eq_peak_db) * np.exp(
            -0.5 * ((octaves - centre) / width) ** 2
        )
    return np.maximum(gain, -60.0)


def equalize(wave: np.ndarray, gain_db: np.ndarray) -> np.ndarray:
    """``wave`` through a zero-phase filter of gain ``gain_db`` at the bins of
    ``np.fft.rfftfreq(_fft_size(len(wave)), 1 / 16000)``."""
    size = _fft_size(len(wave))
    spec = np.fft.rfft(wave, size) * 10 ** (gain_db / 20)
    return np.fft.irfft(spec, size)[: len(wave)].astype(np.float32)


def augment_wave(
    wave: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, babble: list[np.ndarray]
) -> np.ndarray:
    """One randomly augmented copy of ``wave`` (float32, 16 kHz); ``babble``: other utterances."""
    speed = float(rng.choice(cfg.speed))
    if speed != 1.0:  # resampling plays it faster or slower
        wave = torchaudio.functional.resample(
            torch.from_numpy(wave), int(RATE * speed), RATE
        ).numpy()
    if rng.random() < cfg.reverb_prob:
        wave = reverb(wave, rng.uniform(*cfg.rt60_s), rng)
    if rng.random() < cfg.noise_prob:
        if babble and rng.random() < cfg.babble_prob:
            noise = np.zeros_like(wave)
            for _ in range(int(rng.integers(2, 5))):
                other = babble[int(rng.integers(len(babble)))]
                start = int(rng.integers(0, max(1, len(other) - len(wave) + 1)))
                piece = other[start : start + len(wave)]
                noise[: len(piece)] += piece
        else:
            noise = coloured_noise(len(wave), float(rng.choice([0.0, 1.0, 2.0])), rng)
        wave = _add(wave, noise, rng.uniform(*cfg.snr_db))
    # Drawn only when enabled, so runs without it keep their random sequence.
    if cfg.eq_prob and rng.random() < cfg.eq_prob:
        freqs = np.fft.rfftfreq(_fft_size(len(wave)), 1 / RATE)
        wave = equalize(wave, channel_response(freqs, rng, cfg))
    if rng.random() < cfg.telephone_prob:
        wave = telephone(wave)
    wave = wave * 10 ** (rng.uniform(*cfg.gain_db) / 20)
    peak = np.max(np.abs(wave)) + 1e-9
    return (wave / peak if peak > 1.0 else wave).astype(np.float32)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:  # the HTK scale torchaudio's MelSpectrogram uses
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10 ** (m / 2595.0) - 1.0)


def vtlp(feats: torch.Tensor, alpha: float, fbank: FbankConfig) -> torch.Tensor:
    """Features ``[T, mels]`` (normalized as ``fbank`` makes them) of the same speech
    from a vocal tract ``alpha`` times shorter: the log-mel spectrum read at
    ``f / alpha`` for each band centre ``f`` (clamped to the band), interpolated
    between bands.  ``alpha`` > 1 moves formants up."""
    m = fbank.n_mels
    lo, hi = _hz_to_mel(np.array([fbank.f_min, fbank.f_max]))
    centres_mel = np.linspace(lo, hi, m + 2)[1:-1]
    src = np.interp(
        _hz_to_mel(_mel_to_hz(centres_mel) / alpha), centres_mel, np.arange(m, dtype=np.float64)
    )
    left = np.floor(src).astype(np.int64)
    right = np.minimum(left + 1, m - 1)
    w = torch.from_numpy(src - left).to(feats.dtype)
    mean = torch.tensor(fbank.mean or [0.0] * m, dtype=feats.dtype)
    std = torch.tensor(fbank.std or [1.0] * m, dtype=feats.dtype)
    logmel = feats * std + mean  # interpolate log energies, not per-band z-scores
    warped = logmel[:, left] * (1 - w) + logmel[:, right] * w
    return (warped - mean) / std


def spec_augment(feats: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Mask ``freq_masks`` mel bands and ``time_masks`` time spans of ``[T, mels]`` features."""
    feats = feats.clone()
    t, m = feats.shape
    for _ in range(cfg.freq_masks):
        w = int(rng.integers(0, cfg.freq_width + 1))
        f0 = int(rng.integers(0, max(1, m - w)))
        feats[:, f0 : f0 + w] = 0.0
    for _ in range(cfg.time_masks):
        w = int(rng.integers(0, max(1, int(cfg.time_width * t)) + 1))
        t0 = int(rng.integers(0, max(1, t - w)))
        feats[t0 : t0 + w] = 0.0
    return feats
