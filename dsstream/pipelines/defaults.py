"""The server's default pipelines: the sample models shipped in ``samples/``."""

from __future__ import annotations

import math
import os
from pathlib import Path

from dsstream.pipelines.base import ArtifactPipelineFactory, PipelineRegistry

__all__ = ["SAMPLES_DIR", "asr_model", "asr_lm", "default_registry", "preload"]

# Editable installs and checkouts keep samples/ beside the packages;
# DSSTREAM_SAMPLES points elsewhere (e.g. a deployed model folder).
SAMPLES_DIR = Path(
    os.environ.get("DSSTREAM_SAMPLES", Path(__file__).resolve().parents[2] / "samples")
)


def asr_model(root: Path, int8: bool | None = None) -> Path:
    """The sample ASR artifact to serve on the CPU: the INT8 one where shipped
    (``int8=None``), or the one asked for.

    Measured on this project's CPU, INT8 runs the streaming step faster than
    float32 at the same WER (docs/benchmarks.md, docs/quantization.md); the VQA
    stages are too small to gain, so they stay float32."""
    quantized = root / "asr" / "model-int8.ds"
    if int8 is None:
        int8 = quantized.is_file()
    return quantized if int8 else root / "asr" / "model.ds"


def asr_lm(root: Path) -> Path:
    """The sample ASR model's n-gram LM under a samples folder."""
    return root / "asr" / "lm.arpa"


def default_registry(
    samples_dir: Path | None = None,
    int8: bool | None = None,
    beam_width: int | None = None,
    batch_delay_ms: float | None = None,
    engine_threads: int | None = None,
) -> PipelineRegistry:
    """ASR and VQA backed by the sample artifacts; unavailable ones say what is missing.

    ``int8``: serve the INT8 ASR model (default: where it is shipped).
    ``beam_width``: the ASR decoder's beam (default: the one tuned for the
    model, in its artifact); narrower serves more streams per core, less
    accurately (docs/asr.md, "Decoder settings").
    ``batch_delay_ms``: how long a stream's encoder step may wait for other
    streams' steps to batch with (default: ``AsrConfig``'s).
    ``engine_threads``: ONNX Runtime threads per forward pass of every model
    (default: the configs' 1, best where streams share the cores)."""
    if beam_width is not None and beam_width < 1:
        raise ValueError(f"beam_width must be at least 1, got {beam_width}")
    if batch_delay_ms is not None and not (math.isfinite(batch_delay_ms) and batch_delay_ms >= 0):
        raise ValueError(f"batch_delay_ms must be a finite number >= 0, got {batch_delay_ms}")
    if engine_threads is not None and engine_threads < 1:
        raise ValueError(f"engine_threads must be at least 1, got {engine_threads}")
    threads = {} if engine_threads is None else {"engine_threads": engine_threads}
    given = {"beam_width": beam_width, "batch_delay_ms": batch_delay_ms}
    settings = {k: v for k, v in given.items() if v is not None} | threads  # else AsrConfig's
    root = Path(samples_dir or SAMPLES_DIR)
    asr = ArtifactPipelineFactory(
        task="asr",
        name="sample-asr",
        files={"model": asr_model(root, int8), "lm": asr_lm(root)},
        entry="dsstream.pipelines.asr:load",
        hint="train and export it with the recipe in apps/asr (python -m apps.asr.export)",
        extra=settings,
    )
    vqa = ArtifactPipelineFactory(
        task="vqa",
        name="sample-vqa",
        files={"image": root / "vqa" / "image.ds", "fuser": root / "vqa" / "fuser.ds"},
        entry="dsstream.pipelines.vqa:load",
        hint="train and export it with the recipe in apps/vqa (python -m apps.vqa.export)",
        extra={"asr": asr, **threads},  # asr: spoken questions
    )
    return PipelineRegistry([asr, vqa])


def preload(samples_dir: Path | None = None) -> None:
    """What every worker of a default server loads alike, loaded once before
    ``dsstream serve --workers`` forks them, so they share it copy-on-write:
    torch, ONNX Runtime and the pipelines (about 290 MB a process, measured)
    and the sample LM (``KenLM.shared``; 30 MB).  The ONNX Runtime sessions
    are made in each worker, after the fork."""
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401
    import torchaudio  # noqa: F401

    import dsstream.pipelines.asr  # noqa: F401
    import dsstream.pipelines.vqa  # noqa: F401
    from dsstream.decoding.lm import KenLM

    lm = asr_lm(Path(samples_dir or SAMPLES_DIR))
    if lm.is_file():
        KenLM.shared(lm)
