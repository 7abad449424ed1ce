"""dsstream's inference engine: conversion to ``.ds`` artifacts, graph passes,
ONNX Runtime and PyTorch backends.

Running an artifact needs ONNX Runtime and NumPy only; conversion, the graph
passes and the torch backend need torch (``pip install dsstream[convert]``),
so their names here import it when first used, not with the package.
"""

from engine.artifact import ArtifactError, Manifest, TensorSpec, read_manifest
from engine.backends import BackendError
from engine.batching import BatchPlan, BatchPolicy, QueuedRequest, plan
from engine.engine import (
    BatchInfo,
    DeadlineExceeded,
    EngineConfig,
    EngineFuture,
    InferenceEngine,
    InputError,
    QueueFull,
)
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

# name -> module, imported on first use (these modules import torch).
_NEEDS_TORCH = {
    "convert": "engine.conversion",
    "Dim": "engine.conversion",
    "PRECISIONS": "engine.conversion",
    "ConversionError": "engine.conversion",
    "run_passes": "engine.passes",
    "DEFAULT_PASSES": "engine.passes",
}


def __getattr__(name: str) -> object:
    module = _NEEDS_TORCH.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    from engine.extras import require

    require("torch", "convert", f"engine.{name}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
