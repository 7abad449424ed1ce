"""Triton, imported once for every kernel module; ``None`` where it is not installed
(the CPU implementations and references work without it).

``TRITON_INTERPRET=1`` must be set before this module is first imported for
the kernels to run on the CPU (the interpreter is chosen when a kernel is
decorated); the test suite sets it when there is no GPU.
"""

from __future__ import annotations

from typing import Any

__all__ = ["triton", "tl"]

import importlib

triton: Any = None
tl: Any = None
try:
    triton = importlib.import_module("triton")
    tl = importlib.import_module("triton.language")
except ImportError:  # pragma: no cover - torch's CUDA wheels bring Triton
    pass
