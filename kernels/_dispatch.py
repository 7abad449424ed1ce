"""How every op picks its implementation (see ../shared/docs/style.md, point 6).

Each op has up to four implementations: ``ref`` (plain torch, the numerical
reference), ``cpu`` (the fast CPU path), ``triton`` (GPU, or the CPU under
``TRITON_INTERPRET=1``, which is how CI runs Triton kernels) and ``cuda`` (a CUDA
C++ kernel from kernels/csrc).  ``impl=None`` picks by device; a GPU
implementation that cannot run (Triton missing, the extension failing to build)
falls back to the reference with one warning per op and reason.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

__all__ = ["IMPLS", "triton_usable", "dot_in_float32", "dot_precision", "choose", "warn_once"]

IMPLS = ("ref", "cpu", "triton", "cuda")
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn once per process for ``key`` (an op and a reason)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_usable(device: torch.device) -> bool:
    """Triton can run on ``device``: a CUDA device, or any device with the interpreter on."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def dot_in_float32(dtype: torch.dtype) -> bool:
    """Whether a Triton kernel must upcast ``dtype`` tiles before ``tl.dot``: the
    interpreter (Triton 3.8) misreads bfloat16 operands of ``tl.dot`` (errors of
    1e10 measured), so under it bf16 tiles are multiplied in float32."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for ``dtype`` operands: IEEE for float32 (the
    GPU default, TF32, keeps 10 mantissa bits and would lose to torch's float32
    matmul by 1000x), the tensor-core default otherwise (ignored for 16-bit)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def choose(op: str, impl: str | None, device: torch.device, gpu: str) -> str:
    """The implementation to run: ``impl`` if given (checked), else by device.

    ``gpu`` is the op's GPU implementation ("triton" or "cuda").  On CUDA it is
    chosen when usable, else the reference (with a warning); elsewhere ``cpu``.
    """
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"{op}: unknown implementation {impl!r}; choose from {IMPLS}")
        if impl == "triton" and not triton_usable(device):
            raise RuntimeError(
                f"{op}: Triton needs a CUDA device or TRITON_INTERPRET=1 (device {device})"
            )
        if impl == "cuda" and device.type != "cuda":
            raise RuntimeError(f"{op}: the CUDA kernel needs CUDA tensors, got {device}")
        if impl == "cpu" and device.type != "cpu":
            raise RuntimeError(f"{op}: the CPU implementation needs CPU tensors, got {device}")
        return impl
    if device.type != "cuda":
        return "cpu"
    if gpu == "triton" and not triton_usable(device):
        warn_once(f"{op}:triton", f"{op}: Triton is not installed; using the plain-torch reference")
        return "ref"
    return gpu
