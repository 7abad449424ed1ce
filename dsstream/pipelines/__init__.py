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
from dsstream.pipelines.config import AsrConfig, VqaConfig
from dsstream.pipelines.defaults import SAMPLES_DIR, default_registry
from dsstream.pipelines.factories import AsrFactory, VqaFactory

__all__ = [
    "ArtifactPipelineFactory",
    "AsrConfig",
    "AsrFactory",
    "VqaConfig",
    "VqaFactory",
    "Frame",
    "ModelUnavailable",
    "Pipeline",
    "PipelineError",
    "PipelineFactory",
    "PipelineRegistry",
    "SAMPLES_DIR",
    "default_registry",
]
