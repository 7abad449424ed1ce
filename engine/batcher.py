"""The batcher: a queue, a thread and futures around the pure ``plan``.

Requests wait here until :func:`engine.batching.plan` says which of them run
together; the batcher's thread takes each batch to the runner
(engine/runner.py).  In overlap mode a second thread runs the forward passes
while the first assembles and stages the next batch (engine/overlap.py).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Callable, Hashable

import numpy as np

from engine.batching import BatchPolicy, QueuedRequest, plan
from engine.overlap import Staged, Stager
from engine.runner import LoadedModel, Request, Runner
from engine.stats import EngineStats

__all__ = ["Batcher", "DeadlineExceeded", "EngineFuture", "QueueFull"]


class QueueFull(RuntimeError):
    """The batching queue is at ``max_queue_size``; retry later."""


class DeadlineExceeded(TimeoutError):
    """A request could not start before its deadline."""


class EngineFuture(Future):
    """A ``concurrent.futures.Future``; ``get()`` is the seed API's name for ``result()``."""

    def get(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        return self.result(timeout)


@dataclass
class _Pending:
    meta: QueuedRequest
    arrays: dict[str, np.ndarray]  # user inputs by name
    future: EngineFuture
    model: LoadedModel | None = None  # pinned (a session's model), or None: the current one


@dataclass
class _Job:
    """A formed batch: its inputs assembled (and, in overlap mode, on their way
    to the device), waiting for the forward pass."""

    live: list[_Pending]
    requests: list[Request]
    rows: list[int]
    model: LoadedModel
    feeds: list[np.ndarray] | Staged
    started: float


class Batcher:
    """Queue requests and run them in the batches the policy plans.

    ``current``: the model a batch runs on unless its requests are pinned to
    one (read when the batch is planned, so a swap takes effect at the next
    plan); ``batching``: whether requests may share a forward pass now."""

    def __init__(
        self,
        runner: Runner,
        policy: BatchPolicy,
        current: Callable[[], LoadedModel],
        batching: Callable[[], bool],
        stats: EngineStats,
    ) -> None:
        self.runner = runner
        self.policy = policy
        self._current = current
        self._batching = batching
        self._stats = stats
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: list[_Pending] = []
        self._ids = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.overlap: dict[str, Any] = {"active": False}
        self._jobs: queue.Queue[_Job | None] | None = None
        self._computer: threading.Thread | None = None

    def depth(self) -> int:
        """Requests waiting to be batched."""
        with self._lock:
            return len(self._queue)

    def submit(
        self,
        arrays: dict[str, np.ndarray],
        key: Hashable,
        deadline_s: float | None = None,
        model: LoadedModel | None = None,
    ) -> EngineFuture:
        """Queue checked inputs; requests with equal ``key`` (and the same pinned
        ``model``) may share a batch.  Raises :class:`QueueFull`."""
        future = EngineFuture()
        with self._cond:
            if self._closed:
                raise RuntimeError("engine is closed")
            if len(self._queue) >= self.policy.max_queue_size:
                self._stats.record_error()
                raise QueueFull(
                    f"engine queue is full ({self.policy.max_queue_size} requests); retry later"
                )
            # Requests pinned to another model never share its batches.
            meta = QueuedRequest(
                next(self._ids), time.monotonic(), (id(model) if model else 0, key), deadline_s
            )
            self._queue.append(_Pending(meta, arrays, future, model))
            self._cond.notify()
        self._ensure_thread()
        return future

    def solo_key(self) -> tuple[str, int]:
        """A key no other request has: the request runs alone."""
        return ("solo", next(self._ids))

    def start_overlap(self, stager: Stager, buffer_size: int, stream: Any = None) -> None:
        """Run batches as a copy/compute pipeline through ``stager`` (the CUDA one,
        or :class:`engine.overlap.HostStager`, which runs the same two threads
        without a GPU)."""
        with self._lock:
            if self.runner.stager is not None:
                raise RuntimeError("overlap is already enabled")
            self.runner.stager, self.runner.stream = stager, stream
            self._jobs = queue.Queue(maxsize=buffer_size)
            self.overlap = {"active": True, "buffer_size": buffer_size, "staged_batches": 0}
            self._computer = threading.Thread(
                target=self._compute_loop, name="engine-compute", daemon=True
            )
            self._computer.start()

    def close(self) -> None:
        """Finish queued requests, then stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._jobs is not None and self._computer is not None:
            self._jobs.put(None)  # after every staged batch: they all finish
            self._computer.join()
            self._computer = None

    # -- the batching thread -------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._loop, name="engine-batcher", daemon=True
                    )
                    self._thread.start()

    def _next_plan(self) -> tuple[list[_Pending], list[list[_Pending]], LoadedModel] | None:
        """Wait for work; the expired requests, the batches and the model they
        run on, taken off the queue.  None once closed and drained."""
        with self._cond:
            # Unbatchable models still queue (for infer_async) but never wait for company.
            policy = (
                self.policy
                if self._batching()
                else replace(self.policy, max_batch_size=1, preferred_batch_sizes=())
            )
            while True:
                if self._closed and not self._queue:
                    return None
                decision = plan([p.meta for p in self._queue], time.monotonic(), policy)
                if decision.batches or decision.expired:
                    break
                self._cond.wait(decision.wait_s)
            by_id = {p.meta.id: p for p in self._queue}
            taken = set(decision.expired) | {i for b in decision.batches for i in b}
            self._queue = [p for p in self._queue if p.meta.id not in taken]
            self._stats.queue_depth = len(self._queue)
            batches = [[by_id[i] for i in batch] for batch in decision.batches]
            return [by_id[i] for i in decision.expired], batches, self._current()

    def _loop(self) -> None:
        while (step := self._next_plan()) is not None:
            expired, batches, model = step
            for p in expired:
                p.future.set_exception(
                    DeadlineExceeded("the request's deadline passed before it could run")
                )
                self._stats.record_error()
            for pending in batches:
                job = self._begin(pending, pending[0].model or model)
                if job is None:
                    continue
                if self._jobs is not None:  # overlap: the compute thread runs it
                    self._jobs.put(job)  # blocks while buffer_size batches wait
                else:
                    self._complete(job)

    def _begin(self, batch: list[_Pending], model: LoadedModel) -> _Job | None:
        """Batching thread: the batch's live requests with their inputs assembled
        and, in overlap mode, their copy to the device started."""
        started = time.monotonic()
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not live:
            return None
        requests = [Request(p.arrays) for p in live]
        try:
            feeds, rows = self.runner.assemble(requests, model)
            if self.runner.stager is not None:
                self.overlap["staged_batches"] += 1
                staged = self.runner.stager.stage(feeds)
                return _Job(live, requests, rows, model, staged, started)
        except Exception as exc:
            self._fail(live, exc)
            return None
        return _Job(live, requests, rows, model, feeds, started)

    def _complete(self, job: _Job) -> None:
        """Run a job's forward pass and answer its requests."""
        try:
            outs = self.runner.outputs(job.requests, job.rows, job.model, job.feeds)
        except Exception as exc:
            self._fail(job.live, exc)
            return
        done = time.monotonic()
        for p, out in zip(job.live, outs):
            self._stats.record(job.started - p.meta.arrival_s, done - job.started, len(job.live))
            p.future.set_result(out)

    def _compute_loop(self) -> None:
        assert self._jobs is not None
        while (job := self._jobs.get()) is not None:
            self._complete(job)

    def _fail(self, live: list[_Pending], exc: BaseException) -> None:
        for p in live:
            p.future.set_exception(exc)
            self._stats.record_error()
