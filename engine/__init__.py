"""dsstream's inference engine: conversion to ``.ds`` artifacts, graph passes,
ONNX Runtime and PyTorch backends."""

from engine.artifact import ArtifactError, Manifest, TensorSpec, read_manifest
from engine.backends import BackendError
from engine.batching import BatchPlan, BatchPolicy, QueuedRequest, plan
from engine.convert import PRECISIONS, ConversionError, Dim, convert
from engine.engine import (
    BatchInfo,
    DeadlineExceeded,
    EngineConfig,
    EngineFuture,
    InferenceEngine,
    InputError,
    QueueFull,
)
from engine.passes import DEFAULT_PASSES, run_passes
from engine.pipeline import Pipeline, StagePipeline
from engine.seed import EngineMonitor, ModelConverter
from engine.sessions import (
    SessionClosed,
    SessionError,
    SessionEvicted,
    SessionPoolFull,
    StateSpec,
    StreamSession,
)

__all__ = [
    "convert",
    "Dim",
    "PRECISIONS",
    "ConversionError",
    "EngineConfig",
    "InferenceEngine",
    "InputError",
    "QueueFull",
    "DeadlineExceeded",
    "EngineFuture",
    "BatchInfo",
    "BatchPolicy",
    "BatchPlan",
    "QueuedRequest",
    "plan",
    "BackendError",
    "ArtifactError",
    "Manifest",
    "TensorSpec",
    "read_manifest",
    "run_passes",
    "DEFAULT_PASSES",
    "Pipeline",
    "StagePipeline",
    "ModelConverter",
    "EngineMonitor",
    "StateSpec",
    "StreamSession",
    "SessionError",
    "SessionPoolFull",
    "SessionClosed",
    "SessionEvicted",
]
