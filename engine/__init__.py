"""dsstream's inference engine: conversion to ``.ds`` artifacts, graph passes,
ONNX Runtime and PyTorch backends."""

from engine.artifact import ArtifactError, Manifest, TensorSpec, read_manifest
from engine.backends import BackendError
from engine.convert import PRECISIONS, ConversionError, Dim, convert
from engine.engine import InferenceEngine, InputError
from engine.passes import DEFAULT_PASSES, run_passes

__all__ = [
    "convert",
    "Dim",
    "PRECISIONS",
    "ConversionError",
    "InferenceEngine",
    "InputError",
    "BackendError",
    "ArtifactError",
    "Manifest",
    "TensorSpec",
    "read_manifest",
    "run_passes",
    "DEFAULT_PASSES",
]
