"""Optional dependencies: a feature whose extra is not installed says which
extra to install, instead of an ImportError from deep inside.

The core install (``pip install dsstream``) serves, transcribes and answers
with ONNX Runtime and NumPy; torch and the rest come with extras:
``convert`` (torch, torchaudio, onnx, onnxscript: conversion, graph passes,
quantization), ``train`` (the recipes), ``gpu`` (the torch backend and the
custom kernels).
"""

from __future__ import annotations

import importlib.util

__all__ = ["MissingExtra", "require", "available"]


class MissingExtra(ImportError):
    """A feature needs a package of an extra that is not installed."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module already imported with no spec (a test's stand-in)
        return False


def require(module: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtra` naming ``extra`` unless ``module`` is installed."""
    if not available(module):
        raise MissingExtra(
            f"{feature} needs {module}, which is not installed: pip install 'dsstream[{extra}]'"
        )
