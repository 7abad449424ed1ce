"""Audio input: file loading, chunking and a streaming resampler.

The resampler runs torchaudio's band-limited sinc kernel (Hann-windowed sinc,
6 zero crossings, roll-off 0.99), computed here with NumPy, block by block, so
resampling a stream in any chunking gives the samples of
``torchaudio.functional.resample`` on the whole signal (tested against it);
nothing here needs torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_audio", "iter_chunks", "channel_options", "StreamingResampler", "ResampleError"]

# A kernel is [new, 1, orig + 2*width] floats for the reduced ratio orig:new;
# rates with a huge reduced ratio (e.g. 8001 Hz -> 16 kHz) would need hundreds
# of MB, so they are refused.  Every common rate is far below this.
MAX_KERNEL_ELEMENTS = 4_000_000


class ResampleError(ValueError):
    """The rate pair cannot be resampled at reasonable cost."""


def load_audio(path: str | Path, mono: bool = True) -> tuple[np.ndarray, int]:
    """Read an audio file with soundfile.

    Returns ``(samples, sample_rate)``: float32 ``[n]`` when ``mono`` (channels
    averaged), else ``[n, channels]``, in [-1, 1].
    """
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise ValueError(f"cannot read audio file {path}: {exc}") from exc
    if mono:
        return data.mean(axis=1, dtype=np.float32), int(rate)
    return data, int(rate)


def channel_options(samples: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
    """A session's options for ``samples``: with ``split_channels`` the channel
    count is the array's (``[n, channels]``, each channel recognized alone)."""
    if not options.get("split_channels"):
        return options
    if samples.ndim != 2:
        raise ValueError("split_channels needs audio of several channels, [n, channels]")
    return {**options, "channels": samples.shape[1]}


def iter_chunks(samples: np.ndarray, sample_rate: int, chunk_ms: float) -> Iterator[np.ndarray]:
    """Split ``samples`` (``[n]`` or ``[n, c]``) into chunks of ``chunk_ms`` milliseconds."""
    step = max(1, int(round(sample_rate * chunk_ms / 1000.0)))
    for start in range(0, len(samples), step):
        yield samples[start : start + step]


LOWPASS_WIDTH = 6  # zero crossings of the sinc on each side (torchaudio's default)
ROLLOFF = 0.99  # the low-pass cutoff, as a fraction of the lower Nyquist rate


@functools.lru_cache(maxsize=32)
def _kernel(orig: int, new: int) -> tuple[np.ndarray, int, int, int]:
    """``(kernel [n, o + 2 * width], width, o, n)`` for the reduced ratio
    ``o:n``: torchaudio's ``_get_sinc_resample_kernel`` (sinc_interp_hann) in
    float32, operation for operation."""
    gcd = math.gcd(orig, new)
    o, n = orig // gcd, new // gcd
    base = min(o, n) * ROLLOFF
    width = math.ceil(LOWPASS_WIDTH * o / base)
    idx = np.arange(-width, width + o, dtype=np.float32)[None, :] / np.float32(o)
    t = np.arange(0, -n, -1, dtype=np.float32)[:, None] / np.float32(n) + idx
    t *= np.float32(base)
    t = np.clip(t, -LOWPASS_WIDTH, LOWPASS_WIDTH)
    window = np.cos(t * np.float32(math.pi / LOWPASS_WIDTH / 2)) ** 2
    t *= np.float32(math.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, np.float32(1.0), np.sin(t) / t)
    kernel *= window * np.float32(base / o)
    return kernel.astype(np.float32), int(width), o, n


class StreamingResampler:
    """Resample a stream of float32 chunks from ``orig_rate`` to ``new_rate`` Hz.

    Each output block of ``n`` samples needs ``o + 2*width`` input samples
    (``o:n`` the reduced rate ratio), so the resampler holds back at most
    ``o + width`` input samples; :meth:`finish` pads the tail with zeros exactly
    as the offline function does.
    """

    def __init__(self, orig_rate: int, new_rate: int) -> None:
        self.orig_rate, self.new_rate = int(orig_rate), int(new_rate)
        self.identity = self.orig_rate == self.new_rate
        if self.identity:
            return
        gcd = math.gcd(self.orig_rate, self.new_rate)
        o, n = self.orig_rate // gcd, self.new_rate // gcd
        if n * o > MAX_KERNEL_ELEMENTS:
            raise ResampleError(
                f"cannot resample {orig_rate} Hz to {new_rate} Hz at reasonable cost; "
                "send a common rate (8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000)"
            )
        self._kernel, self._width, self._o, self._n = _kernel(self.orig_rate, self.new_rate)
        self._received = 0  # input samples seen so far
        self._emitted = 0  # output samples returned so far
        self._next_block = 0  # index of the next output block to compute
        # Input history, starting at absolute sample index _buf_start (may be
        # negative: the zero padding in front of the signal).
        self._buf = np.zeros(self._width, dtype=np.float32)
        self._buf_start = -self._width

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Feed ``[k]`` float32 samples; return the output samples now complete."""
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if self.identity:
            return chunk
        self._buf = np.concatenate([self._buf, chunk])
        self._received += len(chunk)
        out = self._run(self._received)
        self._emitted += len(out)
        return out

    def finish(self) -> np.ndarray:
        """Flush the held-back tail; the total output then has the offline length."""
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        total = self._received
        self._buf = np.concatenate([self._buf, np.zeros(self._width + self._o, np.float32)])
        out = self._run(total + self._width + self._o)
        target = math.ceil(self._n * total / self._o)
        out = out[: max(0, target - self._emitted)]
        self._emitted += len(out)
        return out

    def _run(self, available: int) -> np.ndarray:
        o, w = self._o, self._width
        last = (available - o - w) // o  # last block whose input is all here
        if last < self._next_block:
            return np.zeros(0, dtype=np.float32)
        first = self._next_block
        lo = first * o - w - self._buf_start
        hi = last * o + o + w - self._buf_start
        x = np.ascontiguousarray(self._buf[lo:hi], np.float32)
        # conv1d(x, kernel, stride=o) as one matmul over the blocks' input windows
        # (NumPy, not torch: each torch op hands the GIL to another of a server's
        # stream threads, which cost 5x the work among 64 of them; measured).
        blocks = last - first + 1
        windows = np.lib.stride_tricks.as_strided(
            x, (blocks, self._kernel.shape[1]), (o * x.itemsize, x.itemsize), writeable=False
        )
        out = (windows @ self._kernel.T).reshape(-1)  # [blocks, n] -> block-major samples
        self._next_block = last + 1
        keep_from = self._next_block * o - w
        self._buf = self._buf[keep_from - self._buf_start :]
        self._buf_start = keep_from
        return out
