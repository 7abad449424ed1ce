"""Task pipelines (ASR, VQA) behind the begin/step/end interface."""

from dsstream.pipelines.base import (
    ArtifactPipelineFactory,
    Frame,
    ModelUnavailable,
    Pipeline,
    PipelineError,
    PipelineFactory,
    PipelineRegistry,
)
from dsstream.pipelines.defaults import SAMPLES_DIR, default_registry

__all__ = [
    "ArtifactPipelineFactory",
    "Frame",
    "ModelUnavailable",
    "Pipeline",
    "PipelineError",
    "PipelineFactory",
    "PipelineRegistry",
    "SAMPLES_DIR",
    "default_registry",
]
