"""What a connection may use of the server, and nothing more.

A :class:`SessionHost` is the narrow surface that the per-connection runners
(:class:`dsstream.session.SessionRunner`, :func:`dsstream.vosk.serve_vosk`)
take instead of the whole server: it admits a session (a :class:`Lease` that
holds the models the session pinned, and gives them back once), runs blocking
work on the pipeline pool, and exposes the session limits, the metrics and
the event that says a graceful shutdown has begun.  The server owns sockets,
HTTP and reloads; it swaps models in through :meth:`SessionHost.swap`.

Everything here is synchronous and runs on the event loop's thread (no
locks): ``admit`` and ``release`` are plain counters, so concurrent starts
cannot overshoot ``max_sessions``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from dsstream.metrics import ServerMetrics
from dsstream.pipelines.base import PipelineFactory, PipelineRegistry
from dsstream.protocol import Limits

__all__ = ["Connection", "Lease", "SessionHost", "SessionSettings"]

log = logging.getLogger("dsstream.server")


class Connection(Protocol):
    """The WebSocket a runner drives: websockets' server connection, or an
    adapter of another server's (:class:`dsstream.asgi.AsgiConnection`).

    ``recv`` may be cancelled without losing a message, and ``recv`` and
    ``send`` raise ``websockets.exceptions.ConnectionClosed`` once the
    connection is closed."""

    async def recv(self) -> str | bytes: ...

    async def send(self, message: str | bytes) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


@dataclass(frozen=True)
class SessionSettings:
    """The server settings a session runner reads (from ``ServerConfig``)."""

    limits: Limits = field(default_factory=Limits)
    max_sessions: int = 128  # concurrent sessions; beyond it, ``busy``
    session_queue_frames: int = 64  # per-session queue; full means the reader pauses
    max_frames_per_call: int = 16  # queued frames that go to the pool in one call
    shutdown_grace_s: float = 30.0  # time open sessions get to finish on shutdown
    busy_retry_after_ms: int = 2000  # the retry hint sent with ``busy``


class Lease:
    """One admitted session's slot and the models it pinned (``registry``),
    kept until :meth:`release`, even across a reload."""

    def __init__(self, host: SessionHost, task: str, registry: PipelineRegistry) -> None:
        self.host = host
        self.task = task
        self.registry = registry
        self.admitted = time.monotonic()
        self.released = False

    def resolve(self, model: str | None = None) -> PipelineFactory:
        """The factory of ``model`` (default: the task's) among the pinned models;
        raises ModelUnavailable."""
        return self.registry.resolve(self.task, model)

    def release(self) -> None:
        """Give the slot back (once; later calls do nothing)."""
        if not self.released:
            self.released = True
            self.host._release(self)


class SessionHost:
    """Admission, the pipeline pool, limits, metrics and the stopping event
    for the sessions of one server process."""

    def __init__(
        self,
        registry: PipelineRegistry,
        settings: SessionSettings | None = None,
        metrics: ServerMetrics | None = None,
        worker_threads: int = 64,
    ) -> None:
        self.registry = registry  # the models new sessions get
        self.settings = settings or SessionSettings()
        self.metrics = metrics or ServerMetrics()
        self.executor = ThreadPoolExecutor(worker_threads, "dsstream-pipeline")
        self.stopping = asyncio.Event()  # set when a graceful shutdown begins
        self.active_sessions = 0
        # Sessions per registry generation (by id): a registry replaced by a
        # swap is closed once the last session that started on it has ended.
        self._pins: dict[int, int] = {}
        self._retired: dict[int, PipelineRegistry] = {}
        self._adopted: dict[int, Any] = {}  # the collectors on /metrics, by id

    @property
    def limits(self) -> Limits:
        return self.settings.limits

    # -- admission ---------------------------------------------------------------

    def admit(self, task: str) -> Lease | None:
        """A session slot for ``task`` with the current models, or None at
        ``max_sessions``."""
        if self.active_sessions >= self.settings.max_sessions:
            return None
        self.active_sessions += 1
        self.metrics.sessions_active.labels(task).inc()
        registry = self.registry
        self._pins[id(registry)] = self._pins.get(id(registry), 0) + 1
        return Lease(self, task, registry)

    def _release(self, lease: Lease) -> None:
        self.active_sessions -= 1
        self.metrics.sessions_active.labels(lease.task).dec()
        key = id(lease.registry)
        self._pins[key] -= 1
        if not self._pins[key]:
            del self._pins[key]
        self._close_if_unused(lease.registry)

    # -- work ----------------------------------------------------------------------

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` on the pipeline pool, awaitable from the event loop."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- models --------------------------------------------------------------------

    def adopt_metrics(self, factory: Any) -> None:
        """Expose a loaded model's collectors (engine, pipeline stages) on /metrics,
        once; a model a swap replaced is left off (its successor has the names)."""
        if not any(f is factory for f in self.registry.factories()):
            return
        for collector in _collectors(factory):
            if id(collector) not in self._adopted:
                self._adopted[id(collector)] = collector
                self.metrics.include(collector)

    def swap(self, new: PipelineRegistry) -> None:
        """Serve new sessions from ``new`` (already loaded); the models it
        replaces are closed when the last session pinned to them ends."""
        old, self.registry = self.registry, new
        for factory in old.factories():
            for collector in _collectors(factory):
                if self._adopted.pop(id(collector), None) is not None:
                    self.metrics.exclude(collector)
        for factory in new.factories():
            self.adopt_metrics(factory)
        self._retired[id(old)] = old
        self._close_if_unused(old)

    def _close_if_unused(self, registry: PipelineRegistry) -> None:
        if id(registry) in self._retired and id(registry) not in self._pins:
            del self._retired[id(registry)]
            # Closing joins the engines' threads: off the event loop.
            closing = asyncio.get_running_loop().run_in_executor(
                None, registry.close, self.registry
            )
            closing.add_done_callback(_log_failure("releasing the replaced models"))

    def close(self) -> None:
        """Stop the pool; calls still queued on it are cancelled."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def _collectors(factory: Any) -> list[Any]:
    """A factory's Prometheus collectors (none for factories without any)."""
    return list(getattr(factory, "collectors", lambda: [])())


def _log_failure(what: str) -> Callable[[asyncio.Future[Any]], None]:
    def check(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("%s failed: %s", what, future.exception())

    return check
