"""``InferenceEngine``: load a ``.ds`` artifact and run it with input checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from engine.artifact import Manifest, TensorSpec, read_manifest
from engine.backends import Backend, load_backend

__all__ = ["InferenceEngine", "InputError"]


class InputError(ValueError):
    """Inputs that do not match the artifact's declared names, dtypes or shapes."""


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_input(spec: TensorSpec, x: np.ndarray) -> None:
    """Raise :class:`InputError` unless ``x`` fits ``spec`` (dtype, rank, sizes, ranges)."""
    if str(x.dtype) != spec.dtype:
        raise InputError(f"input {spec.name!r} must be {spec.dtype}, got {x.dtype}")
    if x.ndim != len(spec.shape):
        raise InputError(
            f"input {spec.name!r} must have {len(spec.shape)} dims {list(spec.shape)}, "
            f"got shape {list(x.shape)}"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, x.shape)):
        if isinstance(want, int):
            if want != got:
                raise InputError(f"input {spec.name!r} dim {axis} must be {want}, got {got}")
            continue
        lo, hi = spec.dims.get(want, (0, 2**31 - 1))
        if not lo <= got <= hi:
            raise InputError(
                f"input {spec.name!r} dim {axis} ({want}) must be in [{lo}, {hi}], got {got}"
            )


class InferenceEngine:
    """Run a converted model.

    ``InferenceEngine("model.ds", device="cpu")``; ``backend="auto"`` picks ONNX
    Runtime on CPU and PyTorch on CUDA.  ``infer`` takes a dict keyed by input
    name, or positional arrays/tensors, and returns ``{output name: array}``.
    """

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        batch_size: int = 1,
        backend: str = "auto",
    ) -> None:
        self.path = str(model_path)
        self.device = device
        self.batch_size = batch_size
        self.manifest: Manifest
        self.manifest, checksums = read_manifest(self.path)
        self.backend: Backend = load_backend(self.path, self.manifest, checksums, device, backend)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.manifest.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.manifest.outputs]

    def _arrange(self, inputs: Mapping[str, Any] | Sequence[Any] | Any) -> list[np.ndarray]:
        specs = self.manifest.inputs
        if isinstance(inputs, Mapping):
            missing = [s.name for s in specs if s.name not in inputs]
            extra = sorted(set(inputs) - {s.name for s in specs})
            if missing or extra:
                raise InputError(
                    f"inputs must be {self.input_names}; missing {missing}, unexpected {extra}"
                )
            arrays = [_as_array(inputs[s.name]) for s in specs]
        else:
            seq = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
            if len(seq) != len(specs):
                raise InputError(
                    f"expected {len(specs)} input(s) {self.input_names}, got {len(seq)}"
                )
            arrays = [_as_array(x) for x in seq]
        for spec, x in zip(specs, arrays):
            check_input(spec, x)
        return arrays

    def infer(self, inputs: Mapping[str, Any] | Sequence[Any] | Any) -> dict[str, np.ndarray]:
        """Run one request; raises :class:`InputError` for inputs outside the declared specs."""
        outputs = self.backend.run(self._arrange(inputs))
        return dict(zip(self.output_names, outputs))
