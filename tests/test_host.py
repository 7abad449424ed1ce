"""SessionHost: admission, leases, model swaps and the pool, without sockets."""

import asyncio
import threading
from dataclasses import dataclass, field

import pipelines
from conftest import async_test

from dsstream.host import SessionHost, SessionSettings
from dsstream.pipelines.base import PipelineRegistry


@dataclass
class ClosingFactory(pipelines.StaticFactory):
    closed: threading.Event = field(default_factory=threading.Event)

    def close(self):
        self.closed.set()


def _registry() -> tuple[PipelineRegistry, ClosingFactory]:
    factory = ClosingFactory("asr", "counting", pipelines.CountingAsr)
    return PipelineRegistry([factory]), factory


def _active(host: SessionHost, task: str) -> float:
    return host.metrics.sessions_active.labels(task)._value.get()


@async_test
async def test_admission_stops_at_the_limit_and_a_lease_gives_back_once():
    host = SessionHost(pipelines.registry(), SessionSettings(max_sessions=2))
    try:
        a, b = host.admit("asr"), host.admit("vqa")
        assert a is not None and b is not None
        assert host.admit("asr") is None  # at max_sessions
        assert host.active_sessions == 2 and _active(host, "asr") == 1
        a.release()
        a.release()  # a second release is a no-op, not a slot given twice
        assert host.active_sessions == 1 and _active(host, "asr") == 0
        c = host.admit("asr")
        assert c is not None and c.resolve().name == "counting"
        b.release()
        c.release()
        assert host.active_sessions == 0
    finally:
        host.close()


@async_test
async def test_a_swapped_out_registry_closes_when_its_last_lease_ends():
    old, old_factory = _registry()
    new, new_factory = _registry()
    host = SessionHost(old)
    try:
        pinned = host.admit("asr")
        assert pinned is not None
        host.swap(new)
        assert host.registry is new
        assert pinned.registry is old  # an open session keeps the models it started on
        later = host.admit("asr")
        assert later is not None and later.registry is new
        await asyncio.sleep(0.05)
        assert not old_factory.closed.is_set()
        pinned.release()
        assert await asyncio.to_thread(old_factory.closed.wait, 5.0)
        later.release()
        assert not new_factory.closed.is_set()  # the current models stay loaded
    finally:
        host.close()


@async_test
async def test_an_unused_registry_closes_at_the_swap_and_work_runs_on_the_pool():
    old, old_factory = _registry()
    host = SessionHost(old, worker_threads=2)
    try:
        host.swap(_registry()[0])
        assert await asyncio.to_thread(old_factory.closed.wait, 5.0)
        name = await host.run(lambda: threading.current_thread().name)
        assert name.startswith("dsstream-pipeline")
    finally:
        host.close()
