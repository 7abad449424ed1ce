"""The server's default pipelines: the sample models shipped in ``samples/``."""

from __future__ import annotations

import os
from pathlib import Path

from dsstream.pipelines.base import ArtifactPipelineFactory, PipelineRegistry

__all__ = ["SAMPLES_DIR", "default_registry"]

# Editable installs and checkouts keep samples/ beside the packages;
# DSSTREAM_SAMPLES points elsewhere (e.g. a deployed model folder).
SAMPLES_DIR = Path(
    os.environ.get("DSSTREAM_SAMPLES", Path(__file__).resolve().parents[2] / "samples")
)


def default_registry(samples_dir: Path | None = None) -> PipelineRegistry:
    """ASR and VQA backed by the sample artifacts; unavailable ones say what is missing."""
    root = Path(samples_dir or SAMPLES_DIR)
    asr = ArtifactPipelineFactory(
        task="asr",
        name="sample-asr",
        files={"model": root / "asr" / "model.ds", "lm": root / "asr" / "lm.arpa"},
        entry="dsstream.pipelines.asr:load",
        hint="train and export it with the recipe in apps/asr (python -m apps.asr.export)",
    )
    vqa = ArtifactPipelineFactory(
        task="vqa",
        name="sample-vqa",
        files={"image": root / "vqa" / "image.ds", "fuser": root / "vqa" / "fuser.ds"},
        entry="dsstream.pipelines.vqa:load",
        hint="train and export it with the recipe in apps/vqa (python -m apps.vqa.export)",
        extra={"asr": asr},  # spoken questions
    )
    return PipelineRegistry([asr, vqa])
