"""Batch execution: requests' arrays in, each request's outputs out.

The runner is the engine's execution half (the batcher, engine/batcher.py, is
the scheduling half, as vLLM splits its scheduler from its model runner): it
pads and stacks the requests of one batch into the model's inputs, derives
inputs a shape callback computes (masks), runs the backend once and splits
the outputs back per request, cutting off the padding.  It has no queue and
no thread, so it is tested with plain arrays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from engine.artifact import Manifest, TensorSpec
from engine.backends import Backend
from engine.overlap import Staged, Stager
from engine.stats import EngineStats

__all__ = [
    "BatchInfo",
    "InputError",
    "LoadedModel",
    "Request",
    "Runner",
    "ShapeCallback",
    "as_array",
    "check_input",
]


class InputError(ValueError):
    """Inputs that do not match the artifact's declared names, dtypes or shapes."""


@dataclass(frozen=True)
class BatchInfo:
    """What a shape callback sees: padded shapes and each row's true lengths."""

    shapes: dict[str, tuple[int, ...]]  # input name -> padded batch shape
    lengths: dict[str, list[int]]  # dynamic dim name -> true size per row


ShapeCallback = Callable[[BatchInfo], Mapping[str, np.ndarray]]


@dataclass
class LoadedModel:
    """The swappable unit: a loaded backend and its manifest."""

    manifest: Manifest
    backend: Backend
    path: str

    @property
    def batch_dim(self) -> str | None:
        """The shared leading dynamic dim of every input and output, if any."""
        firsts = {s.shape[0] if s.shape else None for s in self.manifest.inputs}
        firsts |= {s.shape[0] if s.shape else None for s in self.manifest.outputs}
        (only,) = firsts if len(firsts) == 1 else (None,)
        return only if isinstance(only, str) else None


@dataclass
class Request:
    """One request's inputs by name; ``lengths`` (dynamic dim -> its true
    size) is filled in when the batch is assembled, to unpad the outputs."""

    arrays: dict[str, np.ndarray]
    lengths: dict[str, int] = field(default_factory=dict)


def as_array(x: Any) -> np.ndarray:
    """A NumPy array of ``x`` (a torch tensor is copied off its device)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_input(spec: TensorSpec, x: np.ndarray) -> None:
    """Raise :class:`InputError` unless ``x`` fits ``spec`` (dtype, rank, sizes, ranges)."""
    # NumPy has no bfloat16: a bf16 model takes float32 arrays (the backend casts them).
    bf16_as_f32 = spec.dtype == "bfloat16" and x.dtype == np.float32
    if str(x.dtype) != spec.dtype and not bf16_as_f32:
        bf16 = spec.dtype == "bfloat16"
        dtype = "float32 (cast to bfloat16 by the engine)" if bf16 else spec.dtype
        raise InputError(f"input {spec.name!r} must be {dtype}, got {x.dtype}")
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


class Runner:
    """Assemble, run and split one batch at a time.

    ``callback``: derives inputs per batch (:meth:`InferenceEngine.register_shape_callback`);
    ``stager``: set in overlap mode, where assembled inputs go to the device
    through it (engine/overlap.py) before the forward pass."""

    def __init__(self, stats: EngineStats | None = None) -> None:
        self.stats = stats or EngineStats()
        self.callback: ShapeCallback | None = None
        self.stager: Stager | None = None
        self.stream: Any = None  # the compute stream of overlap mode

    def run(self, requests: list[Request], model: LoadedModel) -> list[dict[str, np.ndarray]]:
        """Pad, stack, derive callback inputs, run once, unstack and unpad."""
        feeds, rows = self.assemble(requests, model)
        return self.outputs(requests, rows, model, feeds)

    def outputs(
        self,
        requests: list[Request],
        rows: list[int],
        model: LoadedModel,
        feeds: list[np.ndarray] | Staged,
    ) -> list[dict[str, np.ndarray]]:
        """The forward pass over assembled (or staged) inputs, split per request."""
        cpu0 = time.thread_time()
        if isinstance(feeds, Staged):
            assert self.stager is not None
            backend: Any = model.backend  # a TorchBackend: enable_overlap checked
            outputs = backend.run_tensors(self.stager.ready(feeds), self.stream)
        else:
            outputs = model.backend.run(feeds)
        self.stats.record_cpu(time.thread_time() - cpu0)
        return split(outputs, model.manifest.outputs, requests, rows, len(requests) > 1)

    def assemble(
        self, requests: list[Request], model: LoadedModel
    ) -> tuple[list[np.ndarray], list[int]]:
        """The batch's inputs in manifest order (padded, stacked, callback-derived)
        and each request's row count."""
        manifest = model.manifest
        specs = {s.name: s for s in manifest.inputs}
        given = [n for n in specs if n in requests[0].arrays]
        padded_dims: dict[str, int] = {}  # dim name -> batch max
        for req in requests:
            for name in given:
                for want, size in zip(specs[name].shape[1:], req.arrays[name].shape[1:]):
                    if isinstance(want, str):
                        req.lengths[want] = size
                        padded_dims[want] = max(padded_dims.get(want, 0), size)
        feeds: dict[str, np.ndarray] = {}
        for name in given:
            parts = [pad(r.arrays[name], specs[name], padded_dims) for r in requests]
            feeds[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        rows = [next(iter(r.arrays.values())).shape[0] for r in requests]
        if self.callback is not None:
            feeds.update(self._derived(requests, rows, padded_dims, feeds, specs))
        missing = [n for n in specs if n not in feeds]
        if missing:
            raise InputError(f"inputs {missing} are missing (neither given nor derived)")
        return [feeds[s.name] for s in manifest.inputs], rows

    def _derived(
        self,
        requests: list[Request],
        rows: list[int],
        padded_dims: dict[str, int],
        feeds: dict[str, np.ndarray],
        specs: dict[str, TensorSpec],
    ) -> dict[str, np.ndarray]:
        """The shape callback's inputs for this batch, checked against their specs."""
        assert self.callback is not None
        lengths = {d: [r.lengths[d] for r, n in zip(requests, rows) for _ in range(n)]
                   for d in padded_dims}  # fmt: skip
        shapes = {n: tuple(a.shape) for n, a in feeds.items()}
        derived = {}
        for name, value in self.callback(BatchInfo(shapes, lengths)).items():
            if name not in specs:
                raise InputError(f"shape callback returned unknown input {name!r}")
            arr = as_array(value)
            check_input(specs[name], arr)
            derived[name] = arr
        return derived


def split(
    outputs: list[np.ndarray],
    specs: Sequence[TensorSpec],
    requests: list[Request],
    rows: list[int],
    batched: bool,
) -> list[dict[str, np.ndarray]]:
    """Each request's rows of the batch outputs, cut to its true lengths."""
    results: list[dict[str, np.ndarray]] = [{} for _ in requests]
    offsets = np.cumsum([0, *rows])
    for spec, out in zip(specs, outputs):
        for i, req in enumerate(requests):
            part = out[offsets[i] : offsets[i + 1]] if batched else out
            index = tuple(
                slice(0, req.lengths[d]) if isinstance(d, str) and d in req.lengths else slice(None)
                for d in spec.shape[1:]
            )
            results[i][spec.name] = np.ascontiguousarray(part[(slice(None), *index)])
    return results


def pad(x: np.ndarray, spec: TensorSpec, targets: dict[str, int]) -> np.ndarray:
    """``x`` zero-padded at the end of each dynamic non-batch dim to ``targets``."""
    widths = [(0, 0)]
    for want, size in zip(spec.shape[1:], x.shape[1:]):
        widths.append((0, targets[want] - size) if isinstance(want, str) else (0, 0))
    if all(w == (0, 0) for w in widths):
        return x
    return np.pad(x, widths)
