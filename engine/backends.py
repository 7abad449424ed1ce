"""Execution backends: ONNX Runtime (the CPU default) and PyTorch (the GPU
default and the numerical reference).  Both take and return numpy arrays in
the manifest's input/output order."""

from __future__ import annotations

import contextlib
import functools
import io
import platform
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engine.artifact import Manifest, read_member
from engine.extras import require

__all__ = [
    "Backend", "OnnxBackend", "TorchBackend", "load_backend", "BackendError", "int8_dot_saturates",
]  # fmt: skip


class BackendError(RuntimeError):
    """A backend that cannot run here (missing member, no CUDA, ...)."""


class Backend(Protocol):
    name: str

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Inputs in manifest order; outputs in manifest order."""


@functools.cache  # the CPU does not change: read /proc/cpuinfo once per process
def int8_dot_saturates(cpuinfo: str | None = None) -> bool:
    """Whether ONNX Runtime's fused uint8 x int8 kernels lose accuracy here:
    on x86 without VNNI they multiply with VPMADDUBSW, whose int16 sums of
    two products saturate (255 * 127 * 2 > 32767); measured on an AVX2-only
    AMD EPYC: 15% relative error on a static INT8 MLP that the VNNI Xeon
    of earlier runs kept under the test's 3% bound (tests/test_quant.py).
    ``cpuinfo``: /proc/cpuinfo's text (read when None; False where it cannot
    be read, e.g. not Linux, or not x86)."""
    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return False
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    words = set(flags.split())
    return "avx2" in words and not words & {"avx512_vnni", "avx_vnni"}


class OnnxBackend:
    name = "onnx"

    def __init__(self, data: bytes, threads: int | None = None, quantized: bool = False) -> None:
        """``threads``: intra-op threads of a forward pass (None: ONNX Runtime's
        default, one per physical core).  Its pool threads spin between ops, so
        where other work shares the cores (a server's frontends and decoders),
        1 saves CPU: measured at a quarter of a 2-core server's (docs/benchmarks.md).
        ``quantized``: an INT8 QDQ graph (engine.quant).  ONNX Runtime's
        MatMul+Add -> Gemm fusion runs before its QDQ fusions and leaves
        DequantizeLinear -> Gemm, which has no integer kernel; without it,
        DequantizeLinear -> MatMul becomes MatMulIntegerToFloat (measured 3x
        faster on a 4-layer MLP here)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if quantized and int8_dot_saturates():
            # Basic passes only (constant folding, eliminations): the QDQ fusions
            # into integer kernels are extended ones, so each DequantizeLinear ->
            # MatMul runs in float, the same QDQ arithmetic without saturation,
            # at float speed (see int8_dot_saturates).
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if threads:
            options.intra_op_num_threads = threads
        disabled = ["MatMulAddFusion"] if quantized else []
        self.session = ort.InferenceSession(
            data, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.input_names, inputs)))


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        data: bytes,
        device: str = "cpu",
        compile: bool = False,
        fuse_kernels: bool | None = None,
        bf16_inputs: tuple[int, ...] = (),
    ) -> None:
        """``fuse_kernels``: swap in the project's fused kernels (kernels/) where the
        graph allows; default on CUDA, where they are GPU kernels (on the CPU the
        fused op runs torch's own layer_norm and linear, so it gains nothing)."""
        require("torch", "gpu", "the PyTorch backend")
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.bf16_inputs = set(bf16_inputs)  # positions fed as float32 arrays (NumPy has no bf16)
        # INT8 programs call torch.ops.quantized_decomposed.*, which exist only
        # once this module has registered them: without it, loading fails.
        import torch.ao.quantization.fx._decomposed  # noqa: F401

        program = torch.export.load(io.BytesIO(data))
        self.fused = 0
        if fuse_kernels if fuse_kernels is not None else self.device.type == "cuda":
            from engine.passes import fuse_int8_linear, fuse_layernorm_linear

            self.fused = fuse_layernorm_linear(program) + fuse_int8_linear(program)
        module = program.module().to(self.device)
        # torch.compile (Inductor) recompiles per new dynamic shape range at first
        # use, so it pays for long-running services, not one-off calls.
        self.module = torch.compile(module, dynamic=True) if compile else module

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        return self.run_tensors([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])

    def run_tensors(self, inputs: list[Any], stream: Any = None) -> list[np.ndarray]:
        """Tensors (on the host or already on this device) in manifest order; with
        a CUDA ``stream``, the forward pass is queued on it (engine.overlap)."""
        torch = self.torch
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            args = [x.to(self.device) for x in inputs]
            args = [
                a.to(torch.bfloat16) if i in self.bf16_inputs else a for i, a in enumerate(args)
            ]
            out = self.module(*args)
            outs = out if isinstance(out, (tuple, list)) else [out]
            # NumPy has no bfloat16: such outputs come back as float32 (exact widening).
            return [
                (o.float() if o.dtype == torch.bfloat16 else o).detach().cpu().numpy() for o in outs
            ]


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if device.startswith("cuda"):
        require("torch", "gpu", f"device {device!r}")
        import torch

        if not torch.cuda.is_available():
            raise BackendError(f"device {device!r} requested but CUDA is not available here")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise BackendError(
                f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
        return
    raise BackendError(f"unknown device {device!r}; use 'cpu' or 'cuda[:N]'")


def load_backend(
    path: str,
    manifest: Manifest,
    checksums: dict[str, str],
    device: str,
    backend: str,
    compile: bool = False,
    cpu_threads: int | None = None,
) -> Backend:
    """The backend for ``device``; ``backend="auto"``: ONNX Runtime on CPU, PyTorch on CUDA.

    ``compile`` applies ``torch.compile`` to the PyTorch backend.  ``cpu_threads``:
    the ONNX Runtime backend's threads per forward pass (None: its default);
    PyTorch's CPU threads are process-wide (``torch.set_num_threads``).
    """
    if cpu_threads is not None and cpu_threads < 1:
        raise ValueError(f"cpu_threads must be at least 1, got {cpu_threads}")
    _check_device(device)
    if backend == "auto":
        cpu_onnx = device == "cpu" and "onnx" in manifest.backends and not compile
        backend = "onnx" if cpu_onnx else "torch"
    if backend not in ("onnx", "torch"):
        raise BackendError(f"backend must be 'auto', 'onnx' or 'torch', got {backend!r}")
    if backend not in manifest.backends:
        raise BackendError(
            f"{path} has no {backend} backend (it has: {', '.join(manifest.backends)})"
        )
    if backend == "onnx":
        if device != "cpu":
            raise BackendError("the ONNX Runtime backend runs on CPU here; use backend='torch'")
        quantized = "quantization" in manifest.extra
        data = read_member(path, "onnx/model.onnx", checksums)
        return OnnxBackend(data, threads=cpu_threads, quantized=quantized)
    bf16 = tuple(i for i, spec in enumerate(manifest.inputs) if spec.dtype == "bfloat16")
    return TorchBackend(read_member(path, "torch/program.pt2", checksums), device, compile,
                        bf16_inputs=bf16)  # fmt: skip
