"""``InferenceEngine``: load a ``.ds`` artifact and serve requests, merging
concurrent ones into batches, with async calls, stats and atomic hot swap."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from engine.artifact import Manifest, TensorSpec, read_manifest
from engine.backends import Backend, load_backend
from engine.batching import BatchPolicy, QueuedRequest, length_bucket, plan
from engine.overlap import Staged, Stager
from engine.sessions import (
    SessionError,
    SessionEvicted,
    SessionPool,
    StreamSession,
    state_specs,
)
from engine.stats import EngineStats

__all__ = [
    "InferenceEngine",
    "InputError",
    "QueueFull",
    "DeadlineExceeded",
    "EngineFuture",
    "BatchInfo",
]


class InputError(ValueError):
    """Inputs that do not match the artifact's declared names, dtypes or shapes."""


class QueueFull(RuntimeError):
    """The batching queue is at ``max_queue_size``; retry later."""


class DeadlineExceeded(TimeoutError):
    """A request could not start before its deadline."""


class EngineFuture(Future):
    """A ``concurrent.futures.Future``; ``get()`` is the seed API's name for ``result()``."""

    def get(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        return self.result(timeout)


@dataclass(frozen=True)
class BatchInfo:
    """What a shape callback sees: padded shapes and each row's true lengths."""

    shapes: dict[str, tuple[int, ...]]  # input name -> padded batch shape
    lengths: dict[str, list[int]]  # dynamic dim name -> true size per row


ShapeCallback = Callable[[BatchInfo], Mapping[str, np.ndarray]]


def _as_array(x: Any) -> np.ndarray:
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


@dataclass
class _Model:
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
class _Pending:
    meta: QueuedRequest
    arrays: dict[str, np.ndarray]  # user inputs by name
    future: EngineFuture
    rows: int
    model: _Model | None = None  # pinned (a session's model), or None: the current one


@dataclass
class _Request:
    arrays: dict[str, np.ndarray]
    lengths: dict[str, int] = field(default_factory=dict)


@dataclass
class _Job:
    """A formed batch: its inputs assembled (and, in overlap mode, on their way
    to the device), waiting for the forward pass."""

    live: list[_Pending]
    requests: list[_Request]
    rows: list[int]
    model: _Model
    feeds: list[np.ndarray] | Staged
    started: float


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
    ) -> None:
        self.device = device
        self.cpu_threads = cpu_threads
        self.backend_choice = backend
        self.compile = compile
        self.policy = policy or BatchPolicy(max_batch_size=max(1, batch_size))
        self.batch_size = self.policy.max_batch_size
        self._model = self._load(str(model_path))
        self._name = Path(model_path).stem
        self._callback: ShapeCallback | None = None
        self._stats = EngineStats()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: list[_Pending] = []
        self._ids = itertools.count()
        self._closed = False
        self._worker: threading.Thread | None = None
        self._overlap: dict[str, Any] = {"active": False}
        self._stager: Stager | None = None
        self._jobs: queue.Queue[_Job | None] | None = None
        self._computer: threading.Thread | None = None
        self._stream: Any = None  # the compute stream of overlap mode
        self.sessions = SessionPool(session_pool_bytes, session_idle_timeout_s)
        self._open: dict[int, StreamSession] = {}
        self._checkpoint = "kv_cache"

    # -- model --------------------------------------------------------------------

    def _load(self, path: str) -> _Model:
        manifest, checksums = read_manifest(path)
        backend = load_backend(
            path, manifest, checksums, self.device, self.backend_choice, self.compile,
            self.cpu_threads,
        )  # fmt: skip
        return _Model(manifest, backend, path)

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
        with self._lock:
            self._model = model
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
        session = StreamSession(self, model, specs)
        with self._lock:
            for sid in self.sessions.admit(session.id, session.nbytes):
                self._open.pop(sid).evicted = True
            self._open[session.id] = session
        return session

    def step_sessions(
        self, steps: Sequence[tuple[StreamSession, Mapping[str, Any]]]
    ) -> list[dict[str, np.ndarray]]:
        """Step several sessions at once: submitted together, they share batches."""
        futures = [session.step_async(inputs) for session, inputs in steps]
        return [f.result() for f in futures]

    def _touch_session(self, session: StreamSession) -> None:
        with self._lock:
            for sid in self.sessions.evict_idle():
                self._open.pop(sid).evicted = True
            if session.evicted:
                raise SessionEvicted(
                    f"session {session.id} was evicted after "
                    f"{self.sessions.idle_timeout_s:g} s idle"
                )
            self.sessions.touch(session.id)

    def _release_session(self, session: StreamSession) -> None:
        with self._lock:
            if self._open.pop(session.id, None) is not None:
                self.sessions.release(session.id)

    def set_checkpoint_strategy(self, strategy: str) -> None:
        """``"kv_cache"`` (seed API): streaming keeps only the declared state (attention
        keys/values, convolution context), never full activations."""
        if strategy != "kv_cache":
            raise ValueError(f"unknown checkpoint strategy {strategy!r}; supported: 'kv_cache'")
        self._checkpoint = strategy

    def register_shape_callback(self, fn: ShapeCallback) -> None:
        """``fn(BatchInfo) -> {input name: array}`` derives inputs (e.g. masks) per batch."""
        self._callback = fn

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
        self._overlap = {"active": False, "buffer_size": buffer_size}
        if not self.device.startswith("cuda"):
            self._overlap["reason"] = "no CUDA device: host and device memory are the same"
            return False
        if not hasattr(self.backend, "run_tensors"):
            self._overlap["reason"] = f"the {self.backend.name} backend takes host arrays only"
            return False
        from engine.overlap import DeviceStager

        stager = DeviceStager(self.device, copy_stream, compute_stream, buffer_size)
        self._start_overlap(stager, buffer_size, stager.compute_stream)
        return True

    def _start_overlap(self, stager: Stager, buffer_size: int, stream: Any = None) -> None:
        """Run batches as a copy/compute pipeline through ``stager`` (the CUDA one
        from :meth:`enable_overlap`, or :class:`engine.overlap.HostStager`, which
        runs the same two threads without a GPU)."""
        with self._lock:
            if self._stager is not None:
                raise RuntimeError("overlap is already enabled")
            self._stager = stager
            self._stream = stream
            self._jobs = queue.Queue(maxsize=buffer_size)
            self._overlap = {"active": True, "buffer_size": buffer_size, "staged_batches": 0}
            self._computer = threading.Thread(
                target=self._compute_loop, name="engine-compute", daemon=True
            )
            self._computer.start()

    # -- requests -------------------------------------------------------------------

    def _prepare(self, inputs: Mapping[str, Any] | Sequence[Any] | Any) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in self.manifest.inputs}
        if isinstance(inputs, Mapping):
            arrays = {k: _as_array(v) for k, v in inputs.items()}
        else:
            seq = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
            if len(seq) > len(specs):
                raise InputError(
                    f"expected at most {len(specs)} input(s) {list(specs)}, got {len(seq)}"
                )
            arrays = {name: _as_array(x) for name, x in zip(specs, seq)}
        extra = sorted(set(arrays) - set(specs))
        missing = [n for n in specs if n not in arrays]
        if extra or (missing and self._callback is None):
            raise InputError(f"inputs must be {list(specs)}; missing {missing}, unexpected {extra}")
        for name, x in arrays.items():
            check_input(specs[name], x)
        return arrays

    def infer(
        self, inputs: Mapping[str, Any] | Sequence[Any] | Any, deadline_ms: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run one request and wait for it; raises :class:`InputError` for bad inputs."""
        if self.batching or self._stager is not None:
            return self.infer_async(inputs, deadline_ms).result()
        arrays = self._prepare(inputs)
        t0 = time.monotonic()
        try:
            out = self._run([_Request(arrays)], self._model)[0]
        except Exception:
            self._stats.record_error()
            raise
        t1 = time.monotonic()
        self._stats.record(0.0, t1 - t0, 1)
        return out

    def infer_async(
        self,
        inputs: Mapping[str, Any] | Sequence[Any] | Any,
        deadline_ms: float | None = None,
        _model: _Model | None = None,
    ) -> EngineFuture:
        """Submit a request; the future's ``result()`` (or ``get()``) is the output dict."""
        future = EngineFuture()
        try:
            arrays = self._prepare(inputs)
        except InputError as exc:
            future.set_exception(exc)
            return future
        if not self.batching:
            self._ensure_worker()
        now = time.monotonic()
        deadline = now + deadline_ms / 1000.0 if deadline_ms is not None else None
        with self._cond:
            if self._closed:
                raise RuntimeError("engine is closed")
            if len(self._queue) >= self.policy.max_queue_size:
                self._stats.record_error()
                raise QueueFull(
                    f"engine queue is full ({self.policy.max_queue_size} requests); retry later"
                )
            # Requests pinned to another model never share its batches.
            key = (id(_model) if _model is not None else 0, self._key(arrays))
            meta = QueuedRequest(next(self._ids), now, key, deadline)
            rows = next(iter(arrays.values())).shape[0] if arrays else 1
            self._queue.append(_Pending(meta, arrays, future, rows, _model))
            self._cond.notify()
        self._ensure_worker()
        return future

    async def ainfer(
        self, inputs: Mapping[str, Any] | Sequence[Any] | Any, deadline_ms: float | None = None
    ) -> dict[str, np.ndarray]:
        """``await engine.ainfer(inputs)``: the async form of :meth:`infer`."""
        return await asyncio.wrap_future(self.infer_async(inputs, deadline_ms))

    def _key(self, arrays: dict[str, np.ndarray]) -> tuple[Any, ...]:
        """Requests with equal keys can share a batch."""
        if not self.batching:
            return ("solo", next(self._ids))  # unbatched: every request alone
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

    # -- worker ---------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            with self._lock:
                if self._worker is None or not self._worker.is_alive():
                    self._worker = threading.Thread(
                        target=self._loop, name="engine-batcher", daemon=True
                    )
                    self._worker.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                # Unbatchable models still queue (for infer_async) but never wait for company.
                policy = (
                    self.policy
                    if self.batching
                    else replace(self.policy, max_batch_size=1, preferred_batch_sizes=())
                )
                while True:
                    if self._closed and not self._queue:
                        return
                    decision = plan([p.meta for p in self._queue], time.monotonic(), policy)
                    if decision.batches or decision.expired:
                        break
                    self._cond.wait(decision.wait_s)
                by_id = {p.meta.id: p for p in self._queue}
                taken = set(decision.expired) | {i for b in decision.batches for i in b}
                self._queue = [p for p in self._queue if p.meta.id not in taken]
                model = self._model  # the model every batch of this plan runs on
                self._stats.queue_depth = len(self._queue)
            for i in decision.expired:
                by_id[i].future.set_exception(
                    DeadlineExceeded("the request's deadline passed before it could run")
                )
                self._stats.record_error()
            for batch in decision.batches:
                pending = [by_id[i] for i in batch]
                job = self._begin(pending, pending[0].model or model)
                if job is None:
                    continue
                if self._jobs is not None:  # overlap: the compute thread runs it
                    self._jobs.put(job)  # blocks while buffer_size batches wait
                else:
                    self._complete(job)

    def _fail(self, live: list[_Pending], exc: BaseException) -> None:
        for p in live:
            p.future.set_exception(exc)
            self._stats.record_error()

    def _finish(
        self, live: list[_Pending], outs: list[dict[str, np.ndarray]], started: float
    ) -> None:
        done = time.monotonic()
        for p, out in zip(live, outs):
            self._stats.record(started - p.meta.arrival_s, done - started, len(live))
            p.future.set_result(out)

    def _begin(self, batch: list[_Pending], model: _Model) -> _Job | None:
        """Batching thread: the batch's live requests with their inputs assembled
        and, in overlap mode, their copy to the device started."""
        started = time.monotonic()
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not live:
            return None
        requests = [_Request(p.arrays) for p in live]
        try:
            feeds, rows = self._assemble(requests, model)
            if self._stager is not None:
                self._overlap["staged_batches"] += 1
                return _Job(live, requests, rows, model, self._stager.stage(feeds), started)
        except Exception as exc:
            self._fail(live, exc)
            return None
        return _Job(live, requests, rows, model, feeds, started)

    def _complete(self, job: _Job) -> None:
        """Run a job's forward pass and answer its requests."""
        try:
            outs = self._outputs(job.requests, job.rows, job.model, job.feeds)
        except Exception as exc:
            self._fail(job.live, exc)
            return
        self._finish(job.live, outs, job.started)

    def _compute_loop(self) -> None:
        assert self._jobs is not None
        while (job := self._jobs.get()) is not None:
            self._complete(job)

    # -- batch assembly ----------------------------------------------------------------

    def _run(self, requests: list[_Request], model: _Model) -> list[dict[str, np.ndarray]]:
        """Pad, stack, derive callback inputs, run once, unstack and unpad."""
        feeds, rows = self._assemble(requests, model)
        return self._outputs(requests, rows, model, feeds)

    def _outputs(
        self,
        requests: list[_Request],
        rows: list[int],
        model: _Model,
        feeds: list[np.ndarray] | Staged,
    ) -> list[dict[str, np.ndarray]]:
        """The forward pass over assembled (or staged) inputs, split per request."""
        cpu0 = time.thread_time()
        if isinstance(feeds, Staged):
            assert self._stager is not None
            backend: Any = model.backend  # a TorchBackend: enable_overlap checked
            outputs = backend.run_tensors(self._stager.ready(feeds), self._stream)
        else:
            outputs = model.backend.run(feeds)
        self._stats.record_cpu(time.thread_time() - cpu0)
        return self._split(outputs, model.manifest.outputs, requests, rows, len(requests) > 1)

    def _assemble(
        self, requests: list[_Request], model: _Model
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
            parts = [_pad(r.arrays[name], specs[name], padded_dims) for r in requests]
            feeds[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        rows = [next(iter(r.arrays.values())).shape[0] for r in requests]
        if self._callback is not None:
            lengths = {d: [r.lengths[d] for r, n in zip(requests, rows) for _ in range(n)]
                       for d in padded_dims}  # fmt: skip
            shapes = {n: tuple(a.shape) for n, a in feeds.items()}
            for name, value in self._callback(BatchInfo(shapes, lengths)).items():
                if name not in specs:
                    raise InputError(f"shape callback returned unknown input {name!r}")
                arr = _as_array(value)
                check_input(specs[name], arr)
                feeds[name] = arr
        missing = [n for n in specs if n not in feeds]
        if missing:
            raise InputError(f"inputs {missing} are missing (neither given nor derived)")
        return [feeds[s.name] for s in manifest.inputs], rows

    @staticmethod
    def _split(
        outputs: list[np.ndarray],
        specs: Sequence[TensorSpec],
        requests: list[_Request],
        rows: list[int],
        batched: bool,
    ) -> list[dict[str, np.ndarray]]:
        results: list[dict[str, np.ndarray]] = [{} for _ in requests]
        offsets = np.cumsum([0, *rows])
        for spec, out in zip(specs, outputs):
            for i, req in enumerate(requests):
                part = out[offsets[i] : offsets[i + 1]] if batched else out
                index = tuple(
                    slice(0, req.lengths[d])
                    if isinstance(d, str) and d in req.lengths
                    else slice(None)
                    for d in spec.shape[1:]
                )
                results[i][spec.name] = np.ascontiguousarray(part[(slice(None), *index)])
        return results

    # -- observability and lifecycle ----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Latency percentiles (queue, compute, total), throughput, batch sizes, errors."""
        with self._lock:
            depth = len(self._queue)
        snapshot = self._stats.snapshot()
        snapshot.update(
            queue_depth=depth,
            batching=self.batching,
            policy=asdict(self.policy),
            backend=self.backend.name,
            device=self.device,
            overlap=dict(self._overlap),
        )
        with self._lock:
            snapshot["sessions"] = {**self.sessions.stats(), "checkpoint": self._checkpoint}
        return snapshot

    def prometheus(self, model: str | None = None) -> Any:
        """A Prometheus collector of this engine's stats (for the server's /metrics),
        its series labelled ``model=<model>`` (default: the artifact's file name
        without its suffix, fixed at construction so a hot swap keeps the series)."""
        return self._stats.collector(lambda: len(self._queue), model or self._name)

    def close(self) -> None:
        """Finish queued requests, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join()
        if self._jobs is not None and self._computer is not None:
            self._jobs.put(None)  # after every staged batch: they all finish
            self._computer.join()
            self._computer = None

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pad(x: np.ndarray, spec: TensorSpec, targets: dict[str, int]) -> np.ndarray:
    widths = [(0, 0)]
    for want, size in zip(spec.shape[1:], x.shape[1:]):
        widths.append((0, targets[want] - size) if isinstance(want, str) else (0, 0))
    if all(w == (0, 0) for w in widths):
        return x
    return np.pad(x, widths)
