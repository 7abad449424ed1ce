"""Prometheus metrics of the streaming server.

Each server owns its own ``CollectorRegistry`` so several servers (tests,
embedded use) never collide in the process-global registry.  Other
components (the engine) add their collectors with :meth:`ServerMetrics.include`.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.registry import Collector

__all__ = ["ServerMetrics", "StageTimes", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; streaming latencies of interest run from ~1 ms to a few seconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge(
            "dsstream_sessions_active", "Sessions now open", ["task"], registry=r
        )
        self.sessions = Counter("dsstream_sessions", "Sessions started", ["task"], registry=r)
        self.connections = Counter(
            "dsstream_connections", "WebSocket connections accepted", registry=r
        )
        self.frames = Counter("dsstream_frames_received", "Frames received", ["kind"], registry=r)
        self.bytes = Counter(
            "dsstream_bytes_received", "Payload bytes received", ["kind"], registry=r
        )
        self.events = Counter("dsstream_events_sent", "Events sent", ["type"], registry=r)
        self.errors = Counter("dsstream_errors", "Error events sent", ["code"], registry=r)
        self.step_latency = Histogram(
            "dsstream_step_seconds",
            "Pipeline compute time per frame",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_latency = Histogram(
            "dsstream_queue_seconds",
            "Time a frame waited in its session queue before processing",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.answer_latency = Histogram(
            "dsstream_answer_seconds",
            "VQA question-to-answer latency",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.session_seconds = Histogram(
            "dsstream_session_seconds",
            "Session wall-clock duration",
            ["task"],
            buckets=(1, 5, 15, 60, 300, 900, 3600),
            registry=r,
        )

        # Hot-path children resolved once: labels() validates and locks per call.
        self.text_frames = self.frames.labels("text")
        self.binary_frames = self.frames.labels("binary")
        self.text_bytes = self.bytes.labels("text")
        self.binary_bytes = self.bytes.labels("binary")
        self._event_children: dict[str, Any] = {}

    def event_sent(self, event_type: str) -> None:
        child = self._event_children.get(event_type)
        if child is None:
            child = self._event_children[event_type] = self.events.labels(event_type)
        child.inc()

    def include(self, collector: Collector) -> None:
        """Expose another component's collector (e.g. the engine's) on /metrics."""
        self.registry.register(collector)

    def exclude(self, collector: Collector) -> None:
        """Stop exposing a collector :meth:`include` added (a model unloaded)."""
        self.registry.unregister(collector)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StageTimes:
    """Seconds spent per pipeline stage, summed over all sessions (thread-safe),
    and their Prometheus collector (``dsstream_<task>_stage_seconds``,
    ``dsstream_<task>_audio_seconds``).

    For the ASR pipeline: CPU seconds of the session's thread (``time.thread_time``) for resample,
    VAD, frontend and decoder, so threads waiting on each other or on the GIL
    do not count; ``encoder`` is the wall time a stream waits for its batched
    model step (queueing included), since the forward pass runs on the engine's
    thread, whose own stats give the compute time.
    """

    def __init__(self, stages: tuple[str, ...], task: str = "asr") -> None:
        self.task = task
        self._lock = threading.Lock()
        self.seconds = dict.fromkeys(stages, 0.0)
        self.audio_s = 0.0  # audio processed, seconds at the model rate

    def add(self, local: dict[str, float], audio_s: float) -> None:
        with self._lock:
            for stage, t in local.items():
                self.seconds[stage] += t
            self.audio_s += audio_s

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"audio_s": self.audio_s, "seconds": dict(self.seconds)}

    def collector(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        times, task = self, self.task

        class _Collector:
            def collect(self) -> Any:
                snap = times.snapshot()
                stages = CounterMetricFamily(
                    f"dsstream_{task}_stage_seconds", f"Time per {task} pipeline stage",
                    labels=["stage"],
                )  # fmt: skip
                for stage, t in snap["seconds"].items():
                    stages.add_metric([stage], t)
                yield stages
                yield CounterMetricFamily(
                    f"dsstream_{task}_audio_seconds", f"Audio processed by the {task} pipeline",
                    snap["audio_s"],
                )  # fmt: skip

            def describe(self) -> list[Any]:
                return []

        return _Collector()
