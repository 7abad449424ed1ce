"""``InferenceEngine``: load a ``.ds`` artifact and serve requests, merging
concurrent ones into batches, with async calls, stats and atomic hot swap.

The engine is a facade over three parts, split as vLLM splits scheduling from
execution: the batcher (engine/batcher.py: queue, thread and futures around
the pure ``plan``), the runner (engine/runner.py: assemble, pad, run, split)
and the stream sessions (engine/sessions.py), which step through the one
public :meth:`InferenceEngine.submit`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from engine.artifact import Manifest, read_manifest
from engine.backends import Backend, load_backend
from engine.batcher import Batcher, DeadlineExceeded, EngineFuture, QueueFull
from engine.batching import BatchPolicy, length_bucket
from engine.overlap import Stager
from engine.runner import (
    BatchInfo,
    InputError,
    LoadedModel,
    Request,
    Runner,
    ShapeCallback,
    as_array,
    check_input,
)
from engine.sessions import SessionError, SessionPool, SessionTable, StreamSession, state_specs
from engine.stats import EngineStats

__all__ = [
    "EngineConfig",
    "InferenceEngine",
    "InputError",
    "QueueFull",
    "DeadlineExceeded",
    "EngineFuture",
    "BatchInfo",
]


@dataclass(frozen=True)
class EngineConfig:
    """How an :class:`InferenceEngine` runs its model.

    ``backend``: "auto" (ONNX Runtime on CPU, PyTorch on CUDA), "onnxruntime"
    or "torch"; ``policy``: dynamic batching (its ``max_batch_size`` 1: every
    request alone); ``compile``: torch.compile the PyTorch backend;
    ``session_pool_bytes`` / ``session_idle_timeout_s``: the stream sessions'
    state cap and idle eviction; ``cpu_threads``: ONNX Runtime's threads per
    forward pass (None: its default, every core; 1 where other work shares
    the cores, as in a streaming server)."""

    device: str = "cpu"
    backend: str = "auto"
    policy: BatchPolicy = field(default_factory=lambda: BatchPolicy(max_batch_size=1))
    compile: bool = False
    session_pool_bytes: int = 256 << 20
    session_idle_timeout_s: float = 300.0
    cpu_threads: int | None = None

    @classmethod
    def of(
        cls, batch_size: int = 1, policy: BatchPolicy | None = None, **settings: Any
    ) -> EngineConfig:
        """A config from the constructor's keyword form: ``batch_size`` is the
        short way to say ``policy=BatchPolicy(max_batch_size=batch_size)``;
        giving both with different sizes is an error, not a silent choice."""
        if policy is not None and batch_size not in (1, policy.max_batch_size):
            raise ValueError(
                f"batch_size={batch_size} and policy.max_batch_size={policy.max_batch_size} "
                "disagree; give one of them"
            )
        return cls(policy=policy or BatchPolicy(max_batch_size=max(1, batch_size)), **settings)


# ~270 lines, past our ~250 bound, half of them docstrings: the facade over the
# batcher, runner and sessions, whose public methods are the engine's API.
class InferenceEngine:
    """Run a converted model.

    ``InferenceEngine("model.ds", device="cpu", batch_size=16)``;
    ``backend="auto"`` picks ONNX Runtime on CPU and PyTorch on CUDA.  With
    ``batch_size > 1`` (or a ``policy``) and a model whose inputs and outputs
    share a leading dynamic dim, concurrent requests are merged into one
    forward pass.  ``infer`` takes a dict keyed by input name, or positional
    arrays/tensors, and returns ``{output name: array}``.  ``cpu_threads``:
    ONNX Runtime's threads per forward pass (None: its default, every core);
    1 where other work shares the cores, as in a streaming server.
    """

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        batch_size: int = 1,
        backend: str = "auto",
        policy: BatchPolicy | None = None,
        compile: bool = False,
        session_pool_bytes: int = 256 << 20,
        session_idle_timeout_s: float = 300.0,
        cpu_threads: int | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        keywords = EngineConfig.of(
            batch_size, policy, device=device, backend=backend, compile=compile,
            session_pool_bytes=session_pool_bytes, session_idle_timeout_s=session_idle_timeout_s,
            cpu_threads=cpu_threads,
        )  # fmt: skip
        if config is not None and keywords != EngineConfig():
            raise ValueError("give the engine's settings as config=EngineConfig(...) or as "
                             "keywords, not both")  # fmt: skip
        self.config = config or keywords
        self.policy = self.config.policy
        self.batch_size = self.policy.max_batch_size
        self.device = self.config.device
        self._model = self._load(str(model_path))
        self._name = Path(model_path).stem
        self._stats = EngineStats()
        self._runner = Runner(self._stats)
        self._batcher = Batcher(
            self._runner, self.policy, lambda: self._model, lambda: self.batching, self._stats
        )
        self.sessions = SessionPool(
            self.config.session_pool_bytes, self.config.session_idle_timeout_s
        )
        self._table = SessionTable(self.sessions)
        self._checkpoint = "kv_cache"

    # -- model --------------------------------------------------------------------

    def _load(self, path: str) -> LoadedModel:
        manifest, checksums = read_manifest(path)
        cfg = self.config
        backend = load_backend(
            path, manifest, checksums, cfg.device, cfg.backend, cfg.compile, cfg.cpu_threads
        )
        return LoadedModel(manifest, backend, path)

    @property
    def manifest(self) -> Manifest:
        return self._model.manifest

    @property
    def backend(self) -> Backend:
        return self._model.backend

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.manifest.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.manifest.outputs]

    @property
    def batching(self) -> bool:
        return self.policy.max_batch_size > 1 and self._model.batch_dim is not None

    def swap(self, new: InferenceEngine | str | Path) -> None:
        """Atomically replace the model: running batches finish on the old one,
        every batch formed afterwards (queued requests included) uses the new one."""
        model = new._model if isinstance(new, InferenceEngine) else self._load(str(new))
        old = {(s.name, s.dtype) for s in self._model.manifest.inputs}
        if {(s.name, s.dtype) for s in model.manifest.inputs} != old:
            raise ValueError("the new model's inputs differ in names or dtypes; refusing to swap")
        self._model = model  # one reference: the batcher reads it when it plans
        self._stats.swaps += 1

    # -- streaming sessions ------------------------------------------------------------

    def open_session(self) -> StreamSession:
        """A new stream with zeroed state, pinned to the current model.

        Raises :class:`SessionPoolFull` when the state pool is at its cap.
        """
        model = self._model
        specs = state_specs(model.manifest)
        if not specs:
            raise SessionError("this model declares no streaming state (convert it with state=...)")
        session = StreamSession(self.submit, self._table, model, specs)
        self._table.open(session)
        return session

    def step_sessions(
        self, steps: Sequence[tuple[StreamSession, Mapping[str, Any]]]
    ) -> list[dict[str, np.ndarray]]:
        """Step several sessions at once: submitted together, they share batches."""
        futures = [session.step_async(inputs) for session, inputs in steps]
        return [f.result() for f in futures]

    def set_checkpoint_strategy(self, strategy: str) -> None:
        """``"kv_cache"`` (seed API): streaming keeps only the declared state (attention
        keys/values, convolution context), never full activations."""
        if strategy != "kv_cache":
            raise ValueError(f"unknown checkpoint strategy {strategy!r}; supported: 'kv_cache'")
        self._checkpoint = strategy

    def register_shape_callback(self, fn: ShapeCallback) -> None:
        """``fn(BatchInfo) -> {input name: array}`` derives inputs (e.g. masks) per batch."""
        self._runner.callback = fn

    def enable_overlap(
        self, compute_stream: Any = None, copy_stream: Any = None, buffer_size: int = 2
    ) -> bool:
        """Overlap host-to-device copies with compute on CUDA: batch n+1's inputs
        go through ``buffer_size`` pinned buffers to the GPU on ``copy_stream``
        while batch n computes on ``compute_stream`` (``torch.cuda.Stream``;
        new streams when None).  Requests then run on two threads, one that
        forms and stages batches and one that computes.  Accepted on every
        device and reported in ``stats()["overlap"]``; returns whether it is
        active (on the CPU there is no copy to hide, so it stays inactive).
        """
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        self._batcher.overlap = {"active": False, "buffer_size": buffer_size}
        if not self.device.startswith("cuda"):
            reason = "no CUDA device: host and device memory are the same"
            self._batcher.overlap["reason"] = reason
            return False
        if not hasattr(self.backend, "run_tensors"):
            reason = f"the {self.backend.name} backend takes host arrays only"
            self._batcher.overlap["reason"] = reason
            return False
        from engine.overlap import DeviceStager

        stager = DeviceStager(self.device, copy_stream, compute_stream, buffer_size)
        self._start_overlap(stager, buffer_size, stager.compute_stream)
        return True

    def _start_overlap(self, stager: Stager, buffer_size: int, stream: Any = None) -> None:
        """The copy/compute pipeline through any stager (tests use
        :class:`engine.overlap.HostStager`, which needs no GPU)."""
        self._batcher.start_overlap(stager, buffer_size, stream)

    # -- requests -------------------------------------------------------------------

    def _prepare(self, inputs: Mapping[str, Any] | Sequence[Any] | Any) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in self.manifest.inputs}
        if isinstance(inputs, Mapping):
            arrays = {k: as_array(v) for k, v in inputs.items()}
        else:
            seq = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
            if len(seq) > len(specs):
                raise InputError(
                    f"expected at most {len(specs)} input(s) {list(specs)}, got {len(seq)}"
                )
            arrays = {name: as_array(x) for name, x in zip(specs, seq)}
        extra = sorted(set(arrays) - set(specs))
        missing = [n for n in specs if n not in arrays]
        if extra or (missing and self._runner.callback is None):
            raise InputError(f"inputs must be {list(specs)}; missing {missing}, unexpected {extra}")
        for name, x in arrays.items():
            check_input(specs[name], x)
        return arrays

    def infer(
        self, inputs: Mapping[str, Any] | Sequence[Any] | Any, deadline_ms: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run one request and wait for it; raises :class:`InputError` for bad inputs."""
        if self.batching or self._runner.stager is not None:
            return self.infer_async(inputs, deadline_ms).result()
        arrays = self._prepare(inputs)
        t0 = time.monotonic()
        try:
            out = self._runner.run([Request(arrays)], self._model)[0]
        except Exception:
            self._stats.record_error()
            raise
        self._stats.record(0.0, time.monotonic() - t0, 1)
        return out

    def submit(
        self,
        inputs: Mapping[str, Any] | Sequence[Any] | Any,
        model: LoadedModel | None = None,
        deadline_ms: float | None = None,
    ) -> EngineFuture:
        """Queue a request for the batcher; the future's ``result()`` (or
        ``get()``) is the output dict.  ``model``: run on this loaded model (a
        stream session's, pinned across swaps) instead of the current one.
        Bad inputs fail the future with :class:`InputError`; a full queue
        raises :class:`QueueFull`."""
        try:
            arrays = self._prepare(inputs)
        except InputError as exc:
            future = EngineFuture()
            future.set_exception(exc)
            return future
        deadline = time.monotonic() + deadline_ms / 1000.0 if deadline_ms is not None else None
        return self._batcher.submit(arrays, self._key(arrays), deadline, model)

    def infer_async(
        self, inputs: Mapping[str, Any] | Sequence[Any] | Any, deadline_ms: float | None = None
    ) -> EngineFuture:
        """Submit a request; the future's ``result()`` (or ``get()``) is the output dict."""
        return self.submit(inputs, deadline_ms=deadline_ms)

    async def ainfer(
        self, inputs: Mapping[str, Any] | Sequence[Any] | Any, deadline_ms: float | None = None
    ) -> dict[str, np.ndarray]:
        """``await engine.ainfer(inputs)``: the async form of :meth:`infer`."""
        return await asyncio.wrap_future(self.infer_async(inputs, deadline_ms))

    def _key(self, arrays: dict[str, np.ndarray]) -> Hashable:
        """Requests with equal keys can share a batch."""
        if not self.batching:
            return self._batcher.solo_key()  # unbatched: every request alone
        specs = {s.name: s for s in self.manifest.inputs}
        key = []
        for name in sorted(arrays):
            spec, x = specs[name], arrays[name]
            dims = []
            for want, size in zip(spec.shape[1:], x.shape[1:]):
                padded = isinstance(want, str) and self.policy.pad
                dims.append(
                    ("b", length_bucket(size, self.policy.bucket_ratio)) if padded else size
                )
            key.append((name, tuple(dims)))
        return tuple(key)

    # -- observability and lifecycle ----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Latency percentiles (queue, compute, total), throughput, batch sizes, errors."""
        snapshot = self._stats.snapshot()
        snapshot.update(
            queue_depth=self._batcher.depth(),
            batching=self.batching,
            policy=asdict(self.policy),
            backend=self.backend.name,
            device=self.device,
            overlap=dict(self._batcher.overlap),
        )
        snapshot["sessions"] = {**self._table.stats(), "checkpoint": self._checkpoint}
        return snapshot

    def prometheus(self, model: str | None = None) -> Any:
        """A Prometheus collector of this engine's stats (for the server's /metrics),
        its series labelled ``model=<model>`` (default: the artifact's file name
        without its suffix, fixed at construction so a hot swap keeps the series)."""
        return self._stats.collector(self._batcher.depth, model or self._name)

    def close(self) -> None:
        """Finish queued requests, then stop the worker."""
        self._batcher.close()

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
