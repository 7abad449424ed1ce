"""Engine statistics: latency percentiles split into queue and compute time,
throughput, batch-size histogram, queue depth and errors; plus a Prometheus
collector over the same numbers."""

from __future__ import annotations

import collections
import functools
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["EngineStats", "median_ms"]

WINDOW = 10_000  # latencies kept for percentiles
THROUGHPUT_WINDOW_S = 10.0


class EngineStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue_s: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._compute_s: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._done_at: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.requests = 0
        self.compute_total_s = 0.0  # forward-pass seconds (each batch counted once)
        # CPU seconds of the thread that ran the forward passes: all of ONNX
        # Runtime's with one intra-op thread; wall time also counts waits for
        # the CPU and the GIL, which a busy server has plenty of.
        self.compute_cpu_s = 0.0
        self.errors = 0
        self.swaps = 0
        self.queue_depth = 0
        self.started = time.monotonic()

    def record(self, queue_s: float, compute_s: float, batch_size: int) -> None:
        with self._lock:
            self._queue_s.append(queue_s)
            self._compute_s.append(compute_s)
            self._done_at.append(time.monotonic())
            self.batch_sizes[batch_size] += 1
            self.requests += 1
            self.compute_total_s += compute_s / batch_size

    def record_cpu(self, seconds: float) -> None:
        with self._lock:
            self.compute_cpu_s += seconds

    def record_error(self) -> None:
        with self._lock:
            self.errors += 1

    @staticmethod
    def _percentiles(values: list[float]) -> dict[str, float]:
        if not values:
            return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0}
        arr = np.asarray(values) * 1000.0
        p50, p95, p99 = np.percentile(arr, [50, 95, 99])
        return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99),
                "mean_ms": float(arr.mean())}  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            queue = list(self._queue_s)
            compute = list(self._compute_s)
            now = time.monotonic()
            recent = [t for t in self._done_at if now - t <= THROUGHPUT_WINDOW_S]
            batches = dict(sorted(self.batch_sizes.items()))
            requests, errors, swaps = self.requests, self.errors, self.swaps
            compute_total, compute_cpu = self.compute_total_s, self.compute_cpu_s
        span = min(THROUGHPUT_WINDOW_S, max(now - self.started, 1e-9))
        total = [q + c for q, c in zip(queue, compute)]
        return {
            "requests": requests,
            "compute_seconds": compute_total,
            "compute_cpu_seconds": compute_cpu,
            "errors": errors,
            "swaps": swaps,
            "throughput_rps": len(recent) / span,
            "latency": {
                "queue": self._percentiles(queue),
                "compute": self._percentiles(compute),
                "total": self._percentiles(total),
            },
            "batch_size_histogram": batches,  # requests served per batch size
        }

    def collector(self, depth: Callable[[], int], model: str = "engine") -> Any:
        """A prometheus_client collector exposing this engine's numbers, every
        series labelled ``model=<model>`` so that the engines of one server
        (ASR, the VQA stages) are distinct series rather than duplicates."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        stats = self
        label = ["model"]

        def labelled(family_type: Any, name: str, doc: str, value: float) -> Any:
            family = family_type(name, doc, labels=label)
            family.add_metric([model], value)
            return family

        counter = functools.partial(labelled, CounterMetricFamily)
        gauge = functools.partial(labelled, GaugeMetricFamily)

        class _Collector:
            def collect(self) -> Iterator[Any]:
                snap = stats.snapshot()
                yield counter("engine_requests", "Requests served", snap["requests"])
                yield counter("engine_errors", "Failed requests", snap["errors"])
                yield counter(
                    "engine_compute_seconds", "Forward-pass time, each batch once",
                    snap["compute_seconds"],
                )  # fmt: skip
                yield counter(
                    "engine_compute_cpu_seconds",
                    "CPU time of the thread running the forward passes",
                    snap["compute_cpu_seconds"],
                )  # fmt: skip
                yield gauge("engine_queue_depth", "Requests waiting", depth())
                yield gauge(
                    "engine_throughput_rps", "Requests per second (10 s window)",
                    snap["throughput_rps"],
                )  # fmt: skip
                for part in ("queue", "compute", "total"):
                    lat = snap["latency"][part]
                    yield gauge(
                        f"engine_latency_{part}_p95_seconds",
                        f"95th percentile {part} latency", lat["p95_ms"] / 1000,
                    )  # fmt: skip
                batches = GaugeMetricFamily(
                    "engine_batch_size_requests", "Requests served per batch size",
                    labels=["model", "size"],
                )  # fmt: skip
                for size, count in snap["batch_size_histogram"].items():
                    batches.add_metric([model, str(size)], count)
                yield batches

            def describe(self) -> list[Any]:
                return []

        return _Collector()


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls, after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000
