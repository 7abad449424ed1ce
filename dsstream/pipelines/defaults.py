"""The server's default pipelines: the sample models shipped in ``samples/``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from dsstream.decoding.lm import vocab_sidecar
from dsstream.pipelines.base import PipelineRegistry
from dsstream.pipelines.config import AsrConfig, VqaConfig
from dsstream.pipelines.factories import AsrFactory, VqaFactory

__all__ = ["SAMPLES_DIR", "asr_model", "asr_lm", "punct_model", "default_registry", "preload"]

T = TypeVar("T")

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
    """The sample ASR model's n-gram LM under a samples folder: KenLM's binary
    of it where shipped (it maps in a millisecond; the 21 MB ARPA takes half a
    second to parse, most of a cold start), else the ARPA."""
    binary = root / "asr" / "lm.bin"
    if binary.is_file() and vocab_sidecar(binary).is_file():
        return binary
    return root / "asr" / "lm.arpa"


def punct_model(root: Path) -> Path | None:
    """The sample punctuation model under a samples folder, or None where it
    is not shipped (finals then stay raw; a session asking ``punctuate`` is
    told so).  Which precision ships as ``punct.ds`` was measured
    (samples/punct/MODEL.md)."""
    path = root / "punct" / "punct.ds"
    return path if path.is_file() else None


def default_registry(
    samples_dir: Path | None = None,
    int8: bool | None = None,
    beam_width: int | None = None,
    batch_delay_ms: float | None = None,
    engine_threads: int | None = None,
    decoder_mode: str | None = None,
) -> PipelineRegistry:
    """ASR and VQA backed by the sample artifacts; unavailable ones say what is missing.

    ``int8``: serve the INT8 ASR model (default: where it is shipped).
    ``beam_width``: the ASR decoder's beam (default: the one tuned for the
    model, in its artifact); narrower serves more streams per core, less
    accurately (docs/asr.md, "Decoder settings").
    ``batch_delay_ms``: how long a stream's encoder step may wait for other
    streams' steps to batch with (default: ``AsrConfig``'s).
    ``engine_threads``: ONNX Runtime threads per forward pass of every model
    (default: the configs' 1, best where streams share the cores).
    ``decoder_mode``: ASR sessions' default search, "free" or "lexicon"
    (default: the one the artifact's decoder settings chose)."""
    # Unset settings keep the configs' defaults; the configs check the values.
    asr_default, vqa_default = AsrConfig(), VqaConfig()
    asr_config = AsrConfig(
        beam_width=beam_width,  # None: the artifact's tuned beam
        batch_delay_ms=_or(batch_delay_ms, asr_default.batch_delay_ms),
        engine_threads=_or(engine_threads, asr_default.engine_threads),
        decoder_mode=decoder_mode,  # None: the artifact's choice
    )
    vqa_config = VqaConfig(engine_threads=_or(engine_threads, vqa_default.engine_threads))
    root = Path(samples_dir or SAMPLES_DIR)
    asr = AsrFactory(
        "sample-asr", asr_model(root, int8), asr_lm(root), asr_config,
        hint="train and export it with the recipe in apps/asr (python -m apps.asr.export)",
        punct=punct_model(root),
    )  # fmt: skip
    vqa = VqaFactory(
        "sample-vqa", root / "vqa" / "image.ds", root / "vqa" / "fuser.ds", vqa_config,
        asr=asr,  # spoken questions
        hint="train and export it with the recipe in apps/vqa (python -m apps.vqa.export)",
    )  # fmt: skip
    return PipelineRegistry([asr, vqa])


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def preload(samples_dir: Path | None = None) -> None:
    """What every worker of a default server loads alike, loaded once before
    ``dsstream serve --workers`` forks them, so they share it copy-on-write:
    ONNX Runtime and the pipelines and the sample LM (``KenLM.shared``;
    30 MB).  The ONNX Runtime sessions are made in each worker, after the
    fork.  Serving needs no torch (the core install has none)."""
    import onnxruntime  # noqa: F401

    import dsstream.pipelines.asr  # noqa: F401
    import dsstream.pipelines.vqa  # noqa: F401
    from dsstream.decoding.lm import KenLM

    lm = asr_lm(Path(samples_dir or SAMPLES_DIR))
    if lm.is_file():
        KenLM.shared(lm)
