"""Stateful streaming sessions on top of the engine.

A streaming model declares its state in the artifact (``StateSpec``: the
model input that carries a state tensor into a step and the output that
carries it out, as NVIDIA Triton's implicit state management does).  A
session holds its state between steps; steps from many sessions that arrive
together go through the engine's batcher, so their states are stacked, run in
one forward pass and unstacked.  State memory comes from a pool with a byte
cap: opening a session beyond it is refused (``SessionPoolFull``, the server's
``busy``), idle sessions are evicted, and a step on an evicted or closed
session is a clear error.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from engine.artifact import Manifest
from engine.runner import LoadedModel

__all__ = [
    "StateSpec",
    "SessionPool",
    "SessionTable",
    "Submit",
    "StreamSession",
    "SessionError",
    "SessionPoolFull",
    "SessionClosed",
    "SessionEvicted",
    "state_specs",
    "validate_state",
]


@dataclass(frozen=True)
class StateSpec:
    name: str  # the state's name, e.g. "kv0"
    input: str  # model input that carries it into a step
    output: str  # model output that carries it out (the next step's input)


class SessionError(RuntimeError):
    """A session operation that cannot be done."""


class SessionPoolFull(SessionError):
    """The state pool is at its byte cap (the server answers ``busy``)."""


class SessionClosed(SessionError):
    """The session was closed."""


class SessionEvicted(SessionError):
    """The session was evicted after being idle too long."""


def state_specs(manifest: Manifest) -> tuple[StateSpec, ...]:
    return tuple(StateSpec(**s) for s in manifest.extra.get("state", ()))


def validate_state(manifest: Manifest, states: Sequence[StateSpec]) -> None:
    """Each state's input and output exist, agree in dtype and shape, and have a
    fixed per-session shape (a leading batch dim, all other dims fixed)."""
    inputs = {s.name: s for s in manifest.inputs}
    outputs = {s.name: s for s in manifest.outputs}
    for st in states:
        if st.input not in inputs or st.output not in outputs:
            raise ValueError(
                f"state {st.name!r}: input {st.input!r} or output {st.output!r} is not in the model"
            )
        a, b = inputs[st.input], outputs[st.output]
        if a.dtype != b.dtype or len(a.shape) != len(b.shape):
            raise ValueError(f"state {st.name!r}: input and output differ in dtype or rank")
        if not all(isinstance(d, int) for d in a.shape[1:]) or a.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"state {st.name!r} needs a fixed per-session shape after the batch dim, "
                f"got input {list(a.shape)} and output {list(b.shape)}"
            )


class SessionPool:
    """Byte-capped admission and idle eviction; pure bookkeeping with an injectable clock."""

    def __init__(
        self, cap_bytes: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cap_bytes = cap_bytes
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.used_bytes = 0
        self.sessions: dict[int, tuple[int, float]] = {}  # id -> (bytes, last use)
        self.evictions = 0
        self.refusals = 0

    def evict_idle(self) -> list[int]:
        now = self.clock()
        idle = [sid for sid, (_, last) in self.sessions.items()
                if now - last > self.idle_timeout_s]  # fmt: skip
        for sid in idle:
            self.free(sid)
            self.evictions += 1
        return idle

    def reserve(self, sid: int, nbytes: int) -> list[int]:
        """Reserve ``nbytes`` for ``sid``; returns ids evicted to make room (idle ones)."""
        evicted = self.evict_idle()
        if self.used_bytes + nbytes > self.cap_bytes:
            self.refusals += 1
            raise SessionPoolFull(
                f"session state pool is full ({self.used_bytes} of {self.cap_bytes} bytes in "
                f"{len(self.sessions)} sessions; a session needs {nbytes}); retry later"
            )
        self.sessions[sid] = (nbytes, self.clock())
        self.used_bytes += nbytes
        return evicted

    def touch(self, sid: int) -> None:
        nbytes, _ = self.sessions[sid]
        self.sessions[sid] = (nbytes, self.clock())

    def free(self, sid: int) -> None:
        nbytes, _ = self.sessions.pop(sid)
        self.used_bytes -= nbytes

    def stats(self) -> dict[str, Any]:
        per = [b for b, _ in self.sessions.values()]
        return {
            "sessions": len(self.sessions),
            "used_bytes": self.used_bytes,
            "cap_bytes": self.cap_bytes,
            "state_bytes_per_session": per[0] if per else 0,
            "evictions": self.evictions,
            "refusals": self.refusals,
        }


class SessionTable:
    """The open streams of one engine: admission against the pool, idle
    eviction and release, safe to call from any thread."""

    def __init__(self, pool: SessionPool) -> None:
        self.pool = pool
        self._lock = threading.Lock()
        self._open: dict[int, StreamSession] = {}

    def open(self, session: StreamSession) -> None:
        """Admit ``session`` (idle ones may be evicted to make room); raises
        :class:`SessionPoolFull`."""
        with self._lock:
            for sid in self.pool.reserve(session.id, session.nbytes):
                self._open.pop(sid).evicted = True
            self._open[session.id] = session

    def touch(self, session: StreamSession) -> None:
        """Mark ``session`` used now (evicting idle ones); raises
        :class:`SessionEvicted` when it was itself evicted."""
        with self._lock:
            for sid in self.pool.evict_idle():
                self._open.pop(sid).evicted = True
            if session.evicted:
                raise SessionEvicted(
                    f"session {session.id} was evicted after {self.pool.idle_timeout_s:g} s idle"
                )
            self.pool.touch(session.id)

    def close(self, session: StreamSession) -> None:
        with self._lock:
            if self._open.pop(session.id, None) is not None:
                self.pool.free(session.id)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self.pool.stats()


# The engine's one entry for a step: checked inputs and the pinned model in,
# a future of the outputs out (InferenceEngine.submit).
Submit = Callable[[Mapping[str, Any], LoadedModel], Future]


class StreamSession:
    """One stream's state; ``step(inputs)`` returns the step's non-state outputs."""

    _ids = itertools.count(1)

    def __init__(
        self, submit: Submit, table: SessionTable, model: LoadedModel, specs: Sequence[StateSpec]
    ) -> None:
        self.id = next(self._ids)
        self._submit = submit
        self._table = table
        self.model = model  # pinned: a swap does not move an open session
        self.specs = tuple(specs)
        inputs = {s.name: s for s in model.manifest.inputs}
        # validate_state guarantees fixed int dims after the batch dim.
        self.state = {
            st.name: np.zeros(
                (1, *(int(d) for d in inputs[st.input].shape[1:])), dtype=inputs[st.input].dtype
            )
            for st in self.specs
        }
        self.closed = False
        self.evicted = False
        self.steps = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state.values())

    def _check(self) -> None:
        if self.evicted:
            idle = self._table.pool.idle_timeout_s
            raise SessionEvicted(f"session {self.id} was evicted after {idle:g} s idle")
        if self.closed:
            raise SessionClosed(f"session {self.id} is closed")

    def _feeds(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """``inputs`` with the session's state, after checking it may step."""
        self._check()
        self._table.touch(self)
        feeds = dict(inputs)
        for st in self.specs:
            feeds[st.input] = self.state[st.name]
        return feeds

    def step_async(self, inputs: Mapping[str, Any]) -> Any:
        """Submit one step; the future resolves to the outputs (state updated first)."""
        future = self._submit(self._feeds(inputs), self.model)
        done: Any = type(future)()

        def finish(f: Any) -> None:
            try:
                out = dict(f.result())
            except BaseException as exc:
                done.set_exception(exc)
                return
            for st in self.specs:
                self.state[st.name] = out.pop(st.output)
            self.steps += 1
            done.set_result(out)

        future.add_done_callback(finish)
        return done

    def step(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return self.step_async(inputs).result()

    def peek(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run a step without keeping its new state (a look at what the stream
        would give if its input ended here, e.g. to finalize a partial chunk)."""
        out = dict(self._submit(self._feeds(inputs), self.model).result())
        for st in self.specs:
            out.pop(st.output)
        return out

    async def astep(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        import asyncio

        return await asyncio.wrap_future(self.step_async(inputs))

    def close(self) -> None:
        """Free the state; closing twice is harmless."""
        if not self.closed and not self.evicted:
            self._table.close(self)
        self.closed = True
