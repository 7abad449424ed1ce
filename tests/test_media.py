"""Audio input (streaming resampler, file loading) and image decoding."""

import io
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from conftest import png_bytes

from dsstream.audio import ResampleError, StreamingResampler, iter_chunks, load_audio
from dsstream.media import ImageError, decode_image, sniff_image_format

RATES = [
    (48000, 16000),
    (44100, 16000),
    (8000, 16000),
    (22050, 16000),
    (11025, 16000),
    (16000, 8000),
    (32000, 16000),
    (16000, 16000),
]


def _stream(resampler, x, sizes):
    outs, i = [], 0
    for size in sizes:
        outs.append(resampler.process(x[i : i + size]))
        i += size
    outs.append(resampler.process(x[i:]))
    outs.append(resampler.finish())
    return np.concatenate(outs)


@pytest.mark.parametrize("orig, new", RATES)
@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_resampler_equals_offline_in_any_chunking(orig, new, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(9973) * 0.2).astype(np.float32)
    ref = torchaudio.functional.resample(torch.from_numpy(x), orig, new).numpy()
    sizes = rng.integers(1, 1500, 12)
    out = _stream(StreamingResampler(orig, new), x, sizes)
    assert out.shape == ref.shape
    # Same kernel, same products: only conv1d's summation order may differ.
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_resampler_single_samples_and_empty_stream():
    x = np.linspace(-0.5, 0.5, 301).astype(np.float32)
    ref = torchaudio.functional.resample(torch.from_numpy(x), 44100, 16000).numpy()
    np.testing.assert_allclose(
        _stream(StreamingResampler(44100, 16000), x, [1] * 300), ref, atol=1e-6
    )
    assert len(StreamingResampler(48000, 16000).finish()) == 0


@pytest.mark.parametrize("orig, new", [(48000, 16000), (8000, 16000), (44100, 16000)])
def test_resampler_kernel_is_torchaudios(orig, new):
    from torchaudio.functional.functional import _get_sinc_resample_kernel

    from dsstream.audio import _kernel

    gcd = math.gcd(orig, new)
    ref, width = _get_sinc_resample_kernel(orig, new, gcd, dtype=torch.float32)
    ours, our_width, o, n = _kernel(orig, new)
    assert (our_width, o, n) == (width, orig // gcd, new // gcd)
    np.testing.assert_allclose(ours, ref[:, 0, :].numpy(), rtol=0, atol=1e-6)


def test_resampler_refuses_pathological_ratios():
    with pytest.raises(ResampleError, match="common rate"):
        StreamingResampler(8001, 16000)


def test_load_audio_mono_and_stereo(tmp_path):
    stereo = np.stack([np.full(100, 0.5), np.full(100, -0.25)], axis=1).astype(np.float32)
    path = tmp_path / "s.flac"
    sf.write(path, stereo, 22050)
    mono, rate = load_audio(path)
    assert rate == 22050 and mono.shape == (100,)
    np.testing.assert_allclose(mono, 0.125, atol=1e-4)
    both, _ = load_audio(path, mono=False)
    assert both.shape == (100, 2)
    with pytest.raises(ValueError, match="cannot read audio file"):
        load_audio(tmp_path / "missing.wav")


def test_iter_chunks_covers_everything():
    x = np.arange(1000)
    chunks = list(iter_chunks(x, 16000, 20))  # 320 samples each
    assert [len(c) for c in chunks] == [320, 320, 320, 40]
    assert np.array_equal(np.concatenate(chunks), x)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decode_image_formats(fmt):
    data = png_bytes(33, 17, fmt)
    assert sniff_image_format(data) == fmt
    img = decode_image(data)
    assert img.size == (33, 17) and img.mode == "RGB"


@pytest.mark.parametrize(
    "data, match",
    [
        (b"GIF89a....", "not a JPEG, PNG or WebP"),
        (b"", "not a JPEG"),
        (png_bytes()[:60], "unreadable PNG"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 junk", "unreadable WEBP"),
    ],
)
def test_decode_image_refuses_bad_bytes(data, match):
    with pytest.raises(ImageError, match=match):
        decode_image(data)


def test_decode_image_refuses_bombs_before_decoding():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, "PNG")
    with pytest.raises(ImageError, match="exceeds"):
        decode_image(buf.getvalue())
    with pytest.raises(ImageError, match="exceeds"):
        decode_image(png_bytes(100, 100), max_pixels=99 * 100)
