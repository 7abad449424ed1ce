"""Training-time augmentation: each transform against a plain reference or the
property it must have, and the whole chain seeded and bounded."""

import numpy as np
import pytest
import torch

from apps.asr import augment
from apps.asr.augment import (
    AugmentConfig,
    augment_wave,
    channel_response,
    coloured_noise,
    equalize,
    reverb,
    spec_augment,
    telephone,
    vtlp,
)
from dsstream.frontend import FbankConfig
from dsstream.frontend_torch import Fbank

RATE = 16000


def _sine(freq: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _band_power(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / RATE)
    return float(spec[(f >= lo) & (f < hi)].mean())


def test_all_is_exported():
    assert set(augment.__all__) == {
        "AugmentConfig", "augment_wave", "channel_response", "coloured_noise", "equalize",
        "reverb", "spec_augment", "telephone", "vtlp",
    }  # fmt: skip


@pytest.mark.parametrize("n", [1, 7, 4096, 50_001])
def test_fft_convolution_equals_direct_convolution(n):
    rng = np.random.default_rng(n)
    x, h = rng.standard_normal(n), rng.standard_normal(2400)
    np.testing.assert_allclose(augment._convolve(x, h), np.convolve(x, h)[:n], atol=1e-9)


def test_reverb_is_the_decaying_response_applied():
    wave = np.random.default_rng(0).standard_normal(RATE).astype(np.float32) * 0.1
    out = reverb(wave, 0.3, np.random.default_rng(1))
    rng = np.random.default_rng(1)  # the same draws, convolved directly
    t = np.arange(int(0.3 * RATE)) / RATE
    ir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / 0.3)
    ir[0] = 1.0
    ref = np.convolve(wave, ir / np.sqrt(np.sum(ir**2)))[: len(wave)]
    assert out.dtype == np.float32 and out.shape == wave.shape
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_coloured_noise_has_its_spectral_slope(alpha):
    noise = coloured_noise(4 * RATE + 123, alpha, np.random.default_rng(2))
    assert noise.shape == (4 * RATE + 123,) and abs(noise.std() - 1.0) < 1e-3
    # One octave up, the power per hertz falls by 2**alpha (0, 3 or 6 dB).
    ratio = _band_power(noise, 1000, 2000) / _band_power(noise, 2000, 4000)
    assert ratio == pytest.approx(2**alpha, rel=0.15)


def test_telephone_keeps_the_voice_band_and_removes_the_rest():
    low, high = _sine(1000), _sine(6000)
    assert _band_power(telephone(low), 900, 1100) == pytest.approx(
        _band_power(low, 900, 1100), rel=0.1
    )
    assert _band_power(telephone(high), 5900, 6100) < 1e-3 * _band_power(high, 5900, 6100)
    assert telephone(low).shape == low.shape


def test_equalize_scales_each_frequency_by_its_gain():
    n = 16384  # a power of two: bin k is exactly k * 16000 / n Hz
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    gain = np.random.default_rng(5).uniform(-30.0, 10.0, len(freqs))
    t = np.arange(n) / RATE
    for k in (40, 700, 5000):
        wave = np.cos(2 * np.pi * freqs[k] * t).astype(np.float32)
        out = equalize(wave, gain)
        np.testing.assert_allclose(out, wave * 10 ** (gain[k] / 20), atol=1e-4)
    wave = np.random.default_rng(6).standard_normal(12345).astype(np.float32)
    flat = np.zeros(len(np.fft.rfftfreq(16384, 1 / RATE)))
    np.testing.assert_allclose(equalize(wave, flat), wave, atol=1e-5)


def test_channel_response_has_its_cutoffs_and_tilt():
    cfg = AugmentConfig(highpass_hz=(200.0, 200.0), lowpass_hz=(4000.0, 4000.0),
                        tilt_db_per_octave=(2.0, 2.0), resonances=0)  # fmt: skip
    freqs = np.array([50.0, 100.0, 200.0, 1000.0, 2000.0, 4000.0, 8000.0])
    gain = channel_response(freqs, np.random.default_rng(0), cfg)
    octaves = np.log2(freqs / 1000.0)
    # 12 dB per octave beyond each cutoff, plus the tilt everywhere.
    expected = 2.0 * octaves + np.array([-24.0, -12.0, 0.0, 0.0, 0.0, 0.0, -12.0])
    np.testing.assert_allclose(gain, expected, atol=1e-9)
    bumpy = channel_response(freqs, np.random.default_rng(0), AugmentConfig(resonances=3))
    assert np.isfinite(bumpy).all() and bumpy.min() >= -60.0


def test_the_channel_applies_only_when_asked_and_cuts_below_its_high_pass():
    plain = dict(speed=(1.0,), gain_db=(0.0, 0.0), noise_prob=0.0, reverb_prob=0.0,
                 telephone_prob=0.0, highpass_hz=(400.0, 400.0), lowpass_hz=(8000.0, 8000.0),
                 tilt_db_per_octave=(0.0, 0.0), resonances=0)  # fmt: skip
    wave = _sine(100) + _sine(1000)
    same = augment_wave(wave, np.random.default_rng(0), AugmentConfig(**plain), [])
    np.testing.assert_array_equal(same, wave)  # eq_prob 0: untouched, no draw
    out = augment_wave(wave, np.random.default_rng(0), AugmentConfig(**plain, eq_prob=1.0), [])
    # Two octaves under the 400 Hz cutoff: -24 dB of power 1/251; 1 kHz kept.
    assert _band_power(out, 90, 110) == pytest.approx(
        _band_power(wave, 90, 110) * 10 ** (-24 / 10), rel=0.1
    )
    assert _band_power(out, 990, 1010) == pytest.approx(_band_power(wave, 990, 1010), rel=0.05)


def test_nothing_configured_leaves_the_wave_alone():
    wave = _sine(440) * 0.5
    cfg = AugmentConfig(speed=(1.0,), gain_db=(0.0, 0.0), noise_prob=0.0, reverb_prob=0.0,
                        telephone_prob=0.0)  # fmt: skip
    np.testing.assert_array_equal(augment_wave(wave, np.random.default_rng(0), cfg, []), wave)


def test_speed_perturbation_changes_the_duration():
    cfg = AugmentConfig(speed=(1.1,), gain_db=(0.0, 0.0), noise_prob=0.0, reverb_prob=0.0,
                        telephone_prob=0.0)  # fmt: skip
    out = augment_wave(_sine(440), np.random.default_rng(0), cfg, [])
    assert len(out) == pytest.approx(RATE / 1.1, abs=2)


def test_the_chain_is_seeded_bounded_and_varied():
    cfg = AugmentConfig(noise_prob=1.0, reverb_prob=1.0, telephone_prob=0.5, gain_db=(0.0, 20.0))
    wave = _sine(300, 2.0)
    babble = [_sine(f, 3.0) for f in (200, 500, 700)]
    outs = [augment_wave(wave, np.random.default_rng(s), cfg, babble) for s in range(8)]
    again = augment_wave(wave, np.random.default_rng(3), cfg, babble)
    np.testing.assert_array_equal(outs[3], again)
    for out in outs:
        assert out.dtype == np.float32 and np.isfinite(out).all() and np.abs(out).max() <= 1.0
    assert len({round(float(np.abs(o).sum()), 3) for o in outs}) == len(outs)


def test_spec_augment_masks_bands_and_spans_only():
    feats = torch.randn(200, 80) + 5.0  # no zero before masking
    cfg = AugmentConfig(freq_masks=2, freq_width=12, time_masks=2, time_width=0.05)
    out = spec_augment(feats, np.random.default_rng(4), cfg)
    assert (feats != 0).all()  # the input is not modified
    zero = out == 0
    full_cols, full_rows = zero.all(dim=0), zero.all(dim=1)
    assert full_cols.sum() <= 2 * 12 and full_rows.sum() <= 2 * int(0.05 * 200)
    # Every zero lies in a fully masked band or span; everything else is kept.
    assert (zero == (full_cols[None, :] | full_rows[:, None])).all()
    keep = ~zero
    assert torch.equal(out[keep], feats[keep])


def _mel_centres_hz(cfg: FbankConfig) -> np.ndarray:
    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    m = np.linspace(mel(cfg.f_min), mel(cfg.f_max), cfg.n_mels + 2)[1:-1]
    return 700.0 * (10 ** (m / 2595.0) - 1.0)


def test_vtlp_of_one_is_the_identity_and_a_peak_moves_by_alpha():
    cfg = FbankConfig(mean=tuple(np.linspace(-3, 1, 80)), std=tuple(np.linspace(1, 2, 80)))
    feats = torch.randn(50, 80, dtype=torch.float64)
    torch.testing.assert_close(vtlp(feats, 1.0, cfg), feats)
    centres = _mel_centres_hz(cfg)
    k = 40
    logmel = torch.zeros(3, 80, dtype=torch.float64)
    logmel[:, k] = 10.0  # one band lit, in the log-mel domain
    mean, std = torch.tensor(cfg.mean).double(), torch.tensor(cfg.std).double()
    for alpha in (0.9, 1.1):
        out = vtlp((logmel - mean) / std, alpha, cfg) * std + mean
        peak = int(out[0].argmax())
        assert abs(centres[peak] - alpha * centres[k]) < 0.5 * (centres[k + 1] - centres[k - 1])
        assert peak != k


@pytest.mark.parametrize("alpha", [0.9, 1.1])
def test_vtlp_approximates_the_spectrum_of_faster_speech(alpha):
    """Playing speech alpha times faster scales every frequency by alpha; its
    long-term log-mel spectrum is what vtlp predicts from the original."""
    pytest.importorskip("soundfile")
    import soundfile as sf

    from dsstream.pipelines.defaults import SAMPLES_DIR

    wave, rate = sf.read(
        SAMPLES_DIR / "asr" / "clips" / "heldout-espeak-david.flac", dtype="float32"
    )
    fbank = Fbank(FbankConfig())
    faster = augment_wave(wave, np.random.default_rng(0), AugmentConfig(
        speed=(alpha,), noise_prob=0.0, reverb_prob=0.0, telephone_prob=0.0, gain_db=(0.0, 0.0),
    ), [])  # fmt: skip
    with torch.no_grad():
        original = fbank(torch.from_numpy(wave)[None])[0]
        target = fbank(torch.from_numpy(faster)[None])[0].mean(0)
    warped = vtlp(original, alpha, fbank.config).mean(0)
    band = slice(5, 75)  # inside the band edges, where vtlp clamps
    before = (original.mean(0) - target)[band].abs().mean()
    after = (warped - target)[band].abs().mean()
    assert after < 0.5 * before, (float(before), float(after))


def test_training_examples_get_vtlp_when_asked():
    from apps.asr.train import SpeechSet, load_wave
    from dsstream.pipelines.defaults import SAMPLES_DIR

    row = {"path": str(SAMPLES_DIR / "asr" / "clips" / "heldout-espeak-david.flac"), "text": "x"}
    plain = dict(speed=(1.0,), noise_prob=0.0, reverb_prob=0.0, telephone_prob=0.0,
                 gain_db=(0.0, 0.0), freq_masks=0, time_masks=0)  # fmt: skip
    without = SpeechSet([row], FbankConfig(), AugmentConfig(**plain), seed=0)[0][0]
    warped = SpeechSet([row], FbankConfig(), AugmentConfig(**plain, vtlp_prob=1.0), seed=0)[0][0]
    assert warped.shape == without.shape and not torch.allclose(warped, without)
    # The example's own stream: the waveform chain's draws, one for vtlp, then alpha.
    rng = np.random.default_rng([0, 0, 0])
    wave = load_wave(row["path"])
    augment_wave(wave, rng, AugmentConfig(**plain), [wave])
    rng.random()
    torch.testing.assert_close(warped, vtlp(without, rng.uniform(0.9, 1.1), FbankConfig()))
