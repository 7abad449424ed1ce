"""One client connection on the server: read frames, run the pipeline, send events.

The reader task parses frames through the sans-I/O :class:`ServerProtocol` and
puts requests on a bounded queue; when the queue is full the reader stops
reading, so a client that outruns its pipeline is throttled by TCP flow control
instead of being buffered without bound.  A pump task drains the queue in
order and runs each pipeline call on the server's thread pool, so a slow
session never blocks the event loop or the other sessions.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from websockets.exceptions import ConnectionClosed

from dsstream.errors import close_code_for
from dsstream.host import Connection, Lease, SessionHost
from dsstream.logs import session_logger
from dsstream.options import options_dict
from dsstream.pipelines.base import ModelUnavailable, Pipeline, PipelineError
from dsstream.protocol import (
    Answer,
    AudioChunk,
    CloseCode,
    End,
    Error,
    ErrorCode,
    ImageData,
    Question,
    ServerEvent,
    ServerProtocol,
    StartSession,
    State,
    encode_event,
)

__all__ = ["SessionRunner"]


@dataclass(frozen=True)
class _Finish:
    reason: str  # "client", "timeout", "shutdown", "disconnect", "error"


class _Stop(Exception):
    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message


# Longer than our ~250-line bound (~300, a third docstrings): one connection's
# reader, pump and sender share its socket, protocol state, queue and pipeline;
# the parts that need none of that live in host.py and protocol.py.
class SessionRunner:
    """Drives one WebSocket connection (one session) to completion."""

    def __init__(self, host: SessionHost, ws: Connection) -> None:
        self.host = host
        self.ws = ws
        self.config = host.settings
        self.metrics = host.metrics
        self.protocol = ServerProtocol(self.config.limits, host.registry.tasks)
        self.session_id = uuid.uuid4().hex[:12]
        self.log = session_logger("dsstream.session", self.session_id)
        self.queue: asyncio.Queue[tuple[Any, float]] = asyncio.Queue(
            self.config.session_queue_frames
        )
        self.pipeline: Pipeline | None = None
        self.task: str | None = None
        self.close_code = CloseCode.NORMAL
        self.opened = time.monotonic()
        self.stats = {"frames": 0, "audio_seconds": 0.0, "images": 0, "questions": 0}
        self._stop: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pump: asyncio.Task[None] | None = None
        self._lease: Lease | None = None  # the slot and the models this session uses
        self._timeout_message = ""

    # -- lifecycle -----------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask the reader to stop (server shutdown, a failed pipeline call); idempotent."""
        if not self._stop.done():
            self._stop.set_result(reason)

    async def run(self) -> None:
        try:
            reason = await self._read_loop()
            await self._finish(reason)
        finally:
            if self._pump and not self._pump.done():
                self._pump.cancel()
            self._release()
            await self.ws.close(self.close_code)

    async def _finish(self, reason: str) -> None:
        if self._pump is None:
            return
        if not self._pump.done():
            await self.queue.put((_Finish(reason), time.monotonic()))
            grace = self.config.shutdown_grace_s if reason == "shutdown" else None
            try:
                await asyncio.wait_for(asyncio.shield(self._pump), grace)
            except TimeoutError:
                self.log.warning("session did not finish within %.1f s of shutdown", grace)
        if reason == "shutdown":
            self.close_code = CloseCode.GOING_AWAY

    def _release(self) -> None:
        if self._lease is not None and not self._lease.released:
            self._lease.release()
            self.metrics.session_seconds.labels(self.task).observe(time.monotonic() - self.opened)

    # -- reading -------------------------------------------------------------

    async def _recv(self) -> str | bytes:
        limits = self.config.limits
        now = time.monotonic()
        left = self.opened + limits.max_session_s - now
        if left <= 0:
            raise _Stop("timeout", f"maximum session duration of {limits.max_session_s:g} s")
        timeout = min(limits.idle_timeout_s, left)
        if self._stop.done():
            raise _Stop(self._stop.result())
        recv: asyncio.Future[Any] = asyncio.ensure_future(self.ws.recv())
        waiters: set[asyncio.Future[Any]] = {recv, self._stop}
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if recv in done:
            return recv.result()
        recv.cancel()  # safe: websockets keeps the message for the next recv()
        if self._stop.done():
            raise _Stop(self._stop.result())
        if timeout == limits.idle_timeout_s:
            raise _Stop("timeout", f"no frame received for {limits.idle_timeout_s:g} s")
        raise _Stop("timeout", f"maximum session duration of {limits.max_session_s:g} s")

    async def _read_loop(self) -> str:
        """Read until the session should finish; return why."""
        while True:
            try:
                message = await self._recv()
            except ConnectionClosed:
                return "disconnect"
            except _Stop as stop:
                if stop.reason == "timeout":
                    await self._fail_timeout(stop.message)
                return stop.reason
            reason = await self._dispatch(message)
            if reason:
                return reason

    async def _fail_timeout(self, message: str) -> None:
        # Finals come first (in _finish); a session never started just gets the error.
        if self._pump is None:
            await self.send(self.protocol.fail(ErrorCode.TIMEOUT, message))
        else:
            self._timeout_message = message

    async def _dispatch(self, message: str | bytes) -> str | None:
        if isinstance(message, str):
            self.metrics.text_frames.inc()
            self.metrics.text_bytes.inc(len(message))
            items = self.protocol.receive_text(message)
        else:
            self.metrics.binary_frames.inc()
            self.metrics.binary_bytes.inc(len(message))
            items = self.protocol.receive_binary(message)
        for item in items:
            if self._stop.done():
                return self._stop.result()
            if isinstance(item, Error):
                await self.send(item)
                if item.fatal:
                    return "error"
            elif isinstance(item, StartSession):
                if not await self._start(item):
                    return "error"
            elif isinstance(item, End):
                return "client"
            else:
                self._count(item)
                await self.queue.put((item, time.monotonic()))
        return None

    def _count(self, item: Any) -> None:
        self.stats["frames"] += 1
        if isinstance(item, AudioChunk):
            self.stats["audio_seconds"] += item.duration_s
        elif isinstance(item, ImageData):
            self.stats["images"] += 1
        elif isinstance(item, Question):
            self.stats["questions"] += 1

    # -- start -----------------------------------------------------------------

    async def _start(self, request: StartSession) -> bool:
        """Admit, create and begin the pipeline; False when the session must close."""
        # The slot is taken before awaiting, so concurrent starts cannot overshoot;
        # the models it comes with stay until this session ends, across a reload.
        lease = self.host.admit(request.task)
        if lease is None:
            await self._fatal(
                ErrorCode.BUSY,
                f"server is at its limit of {self.config.max_sessions} sessions; retry later",
                self.config.busy_retry_after_ms,
            )
            return False
        try:
            factory = lease.resolve(request.options.model)
        except ModelUnavailable as exc:
            lease.release()
            await self._fatal(ErrorCode.MODEL_UNAVAILABLE, str(exc))
            return False
        self.task, self._lease = request.task, lease
        try:
            self.pipeline = await self._call(factory.create)
            self.host.adopt_metrics(factory)
            effective = await self._call(self.pipeline.begin, request.options)
        except PipelineError as exc:
            self._release()
            await self.send(self.protocol.reject_start(exc.code, exc.message, exc.fatal))
            return not exc.fatal
        except ModelUnavailable as exc:
            await self._fatal(ErrorCode.MODEL_UNAVAILABLE, str(exc))
            return False
        except Exception:
            self.log.exception("pipeline failed to start")
            await self._fatal(ErrorCode.INTERNAL, "the pipeline failed to start")
            return False
        started = self.protocol.accept_start(
            self.session_id, {**options_dict(request.options), **effective}
        )
        self.metrics.sessions.labels(request.task).inc()
        self._step_latency = self.metrics.step_latency.labels(request.task)
        self._queue_latency = self.metrics.queue_latency.labels(request.task)
        self.log.info("started %s session (%s)", request.task, effective.get("model", "?"))
        await self.send(started)
        self._pump = asyncio.create_task(self._work())
        return True

    async def _fatal(self, code: ErrorCode, message: str, retry_ms: int | None = None) -> None:
        if self.protocol.state is State.STARTING:
            error = self.protocol.reject_start(code, message, True, retry_ms)
        else:
            error = self.protocol.fail(code, message, retry_ms)
        self.close_code = close_code_for(code)
        await self.send(error)

    # -- working ---------------------------------------------------------------

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await self.host.run(fn, *args)

    async def _work(self) -> None:
        """Drain the queue in order; frames already waiting go to the pool in one call."""
        assert self.pipeline is not None
        while True:
            batch = [await self.queue.get()]
            while (
                len(batch) < self.config.max_frames_per_call
                and not self.queue.empty()
                and not isinstance(batch[-1][0], _Finish)
            ):
                batch.append(self.queue.get_nowait())
            finish = batch.pop()[0] if isinstance(batch[-1][0], _Finish) else None
            if batch:
                now = time.monotonic()
                for _, queued_at in batch:
                    self._queue_latency.observe(now - queued_at)
                outcomes = await self._call(self._run_steps, [item for item, _ in batch])
                if not await self._deliver(outcomes):
                    return
            if finish is not None:
                await self._end(finish.reason)
                return

    def _run_steps(self, items: list[Any]) -> list[Any]:
        """Pool side: each item's events, or the exception it raised (stops at a fatal one)."""
        assert self.pipeline is not None
        outcomes: list[Any] = []
        for item in items:
            t0 = time.monotonic()
            try:
                outcomes.append(self.pipeline.step(item))
            except Exception as exc:
                outcomes.append(exc)
                if not isinstance(exc, PipelineError) or exc.fatal:
                    break
            self._step_latency.observe(time.monotonic() - t0)
        return outcomes

    async def _deliver(self, outcomes: list[Any]) -> bool:
        """Send what the steps produced; False when the session failed and must close."""
        for outcome in outcomes:
            if isinstance(outcome, PipelineError):
                await self.send(Error(outcome.code, outcome.message, outcome.fatal))
                if outcome.fatal:
                    self.close_code = close_code_for(outcome.code)
                    await self._abort("error")
                    return False
            elif isinstance(outcome, Exception):
                self.log.error("pipeline step failed", exc_info=outcome)
                await self._fatal(ErrorCode.INTERNAL, "internal error while processing a frame")
                await self._abort("error")
                return False
            else:
                for event in outcome:
                    await self.send(event)
        return True

    async def _abort(self, reason: str) -> None:
        """Release the pipeline after a fatal error and stop the reader."""
        try:
            await self._call(self.pipeline.end)  # type: ignore[union-attr]
        except Exception:
            self.log.exception("pipeline end failed during abort")
        self.request_stop(reason)
        while not self.queue.empty():  # unblock a reader waiting on a full queue
            self.queue.get_nowait()

    async def _end(self, reason: str) -> None:
        try:
            events = await self._call(self.pipeline.end)  # type: ignore[union-attr]
        except PipelineError as exc:
            events = [Error(exc.code, exc.message, False)]
        except Exception:
            self.log.exception("pipeline end failed")
            await self._fatal(ErrorCode.INTERNAL, "internal error while finalizing")
            return
        if reason == "disconnect":
            return
        for event in events:
            await self.send(event)
        if reason == "timeout":
            await self.send(Error(ErrorCode.TIMEOUT, self._timeout_message, True))
        stats = {
            **self.stats,
            "audio_seconds": round(self.stats["audio_seconds"], 3),
            "duration_s": round(time.monotonic() - self.opened, 3),
        }
        self._release()  # before `ended`: a client that saw it may start again at once
        await self.send(self.protocol.ended(self.session_id, reason, stats))
        self.log.info("ended (%s) after %.1f s", reason, stats["duration_s"])

    # -- sending -----------------------------------------------------------------

    async def send(self, event: ServerEvent) -> None:
        self.metrics.event_sent(event.type)
        if isinstance(event, Error):
            self.metrics.errors.labels(event.code.value).inc()
            if event.code is not ErrorCode.TIMEOUT:
                self.log.info("error %s: %s", event.code.value, event.message)
        elif isinstance(event, Answer):
            self.metrics.answer_latency.observe(event.latency_ms / 1000.0)
        try:
            await self.ws.send(encode_event(event))
        except ConnectionClosed:
            pass  # the reader sees the close and finishes the session
