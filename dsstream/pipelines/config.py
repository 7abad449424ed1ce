"""Typed settings of the task runtimes, importable without loading a model.

``AsrConfig`` and ``VqaConfig`` are what a model factory
(dsstream/pipelines/factories.py) holds and its runtime reads: a setting goes
CLI -> ``default_registry`` -> config -> runtime -> engine or decoder config,
each hop a typed field a reader (and a tool) can follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AsrConfig", "VqaConfig"]


@dataclass(frozen=True)
class AsrConfig:
    """Process-wide settings of the ASR runtime (per-session ones are in AsrOptions)."""

    device: str = "cpu"
    max_batch: int = 64  # streams per acoustic-model forward pass
    batch_delay_ms: float = 0.0  # longest a stream's step waits for others to batch with
    # ONNX Runtime threads per forward pass.  1: the server's other threads keep the
    # cores busy, and a pool's threads spin between ops (a quarter of a 2-core
    # server's CPU, measured; docs/benchmarks.md).  None: ONNX Runtime's default.
    engine_threads: int | None = 1
    # None: the artifact's tuned beam, else 32.  The beam buys real-speech accuracy
    # for decoder CPU time (apps.asr.tune; docs/asr.md, "Decoder settings").
    beam_width: int | None = None
    hotword_beam_width: int = 16  # sessions with hotwords (see CTCDecoder)
    alpha: float | None = None  # LM weight; None: the artifact's tuned value, else 0.5
    beta: float | None = None  # word insertion bonus; None: artifact's, else 1.0
    # Sessions' default search mode ("free" or "lexicon"); None: the one the
    # artifact's decoder settings chose by measurement, else "free".
    decoder_mode: str | None = None
    vad_threshold: float = 0.5
    session_pool_bytes: int = 512 << 20  # model state of all open streams

    def __post_init__(self) -> None:
        if self.decoder_mode not in (None, "free", "lexicon"):
            raise ValueError(f"decoder_mode must be free or lexicon, got {self.decoder_mode!r}")
        if self.beam_width is not None and self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}")
        if not (math.isfinite(self.batch_delay_ms) and self.batch_delay_ms >= 0):
            raise ValueError(
                f"batch_delay_ms must be a finite number >= 0, got {self.batch_delay_ms}"
            )
        _check_threads(self.engine_threads)


@dataclass(frozen=True)
class VqaConfig:
    """Process-wide VQA runtime settings."""

    device: str = "cpu"
    max_batch: int = 32  # questions (or images) per forward pass
    cache_bytes: int = 64 << 20  # keys/values of cached images
    max_image_pixels: int = 4096 * 4096  # larger images are refused (decompression bombs)
    # ONNX Runtime threads per forward pass: the sample stages are too small to
    # gain from more (measured), and idle pool threads spin; None: its default.
    engine_threads: int | None = 1

    def __post_init__(self) -> None:
        _check_threads(self.engine_threads)


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ValueError(f"engine_threads must be at least 1, got {threads}")
