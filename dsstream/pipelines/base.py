"""The pipeline interface the server and the in-process SDK drive.

A pipeline is one session's worth of model work behind a streaming call
shape: ``begin(options)``, then ``step(frame)`` for each client frame, then
``end()``.  Each call returns the server events it produced.  Pipelines never
see sockets; the server never sees models.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Union

from dsstream.options import AsrOptions, VqaOptions
from dsstream.protocol import AudioChunk, ErrorCode, Flush, ImageData, Question, ServerEvent

__all__ = [
    "Frame",
    "Pipeline",
    "PipelineError",
    "PipelineFactory",
    "ArtifactPipelineFactory",
    "PipelineRegistry",
    "ModelUnavailable",
]

Frame = Union[AudioChunk, ImageData, Question, Flush]


class PipelineError(Exception):
    """Bad input a pipeline refuses; becomes an ``error`` event.

    Non-fatal errors (the default) keep the session: the frame is dropped and
    the next one is processed.
    """

    def __init__(self, code: ErrorCode | str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.fatal = fatal


class ModelUnavailable(Exception):
    """The requested task or model is not installed; the message says what is missing."""


class Pipeline(Protocol):
    def begin(self, options: AsrOptions | VqaOptions) -> dict[str, Any]:
        """Start a session; return the effective options (model name, rates...)."""

    def step(self, frame: Frame) -> list[ServerEvent]:
        """Process one frame; return the events it produced, in order."""

    def end(self) -> list[ServerEvent]:
        """Finalize; return the last events.  The pipeline is not reused."""


class PipelineFactory(Protocol):
    task: str  # "asr" or "vqa"
    name: str  # the model name clients may ask for

    def unavailable_reason(self) -> str | None:
        """None when ``create`` will work; otherwise what is missing, for the user."""

    def create(self) -> Pipeline:
        """A fresh pipeline for one session (shared weights are loaded once)."""

    def collectors(self) -> list[Any]:
        """Prometheus collectors of the loaded model (none before the first ``create``)."""


@dataclass
class ArtifactPipelineFactory:
    """A factory for a pipeline backed by model files on disk.

    ``entry`` is ``"module:callable"``; the callable receives ``files`` and
    ``name`` as keyword arguments once (lazily, on the first session) and returns a
    zero-argument callable that makes one pipeline per session, so weights are
    loaded once per process.  If that callable has a ``collectors()`` method,
    the server exposes them on /metrics.
    """

    task: str
    name: str
    files: dict[str, Path]
    entry: str
    hint: str = ""  # how to obtain the missing files
    extra: dict[str, Any] = field(default_factory=dict)  # more keyword arguments for entry
    _make: Callable[[], Pipeline] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def unavailable_reason(self) -> str | None:
        missing = [str(p) for p in self.files.values() if not Path(p).exists()]
        if missing:
            hint = f"; {self.hint}" if self.hint else ""
            return (
                f"{self.task} model {self.name!r} is not installed: missing "
                f"{', '.join(missing)}{hint}"
            )
        module = self.entry.partition(":")[0]
        if importlib.util.find_spec(module) is None:
            return f"{self.task} pipeline module {module!r} is not available in this install"
        return None

    def create(self) -> Pipeline:
        with self._lock:
            if self._make is None:
                reason = self.unavailable_reason()
                if reason:
                    raise ModelUnavailable(reason)
                module, _, attr = self.entry.partition(":")
                loader = getattr(importlib.import_module(module), attr)
                files = {k: Path(v) for k, v in self.files.items()}
                self._make = loader(name=self.name, **files, **self.extra)
        return self._make()

    def collectors(self) -> list[Any]:
        collectors = getattr(self._make, "collectors", None)
        return list(collectors()) if collectors is not None else []


class PipelineRegistry:
    """The pipelines a server or SDK offers, by task and model name.

    The first factory registered for a task is that task's default.
    """

    def __init__(self, factories: list[PipelineFactory] | tuple[PipelineFactory, ...] = ()):
        self._by_task: dict[str, dict[str, PipelineFactory]] = {}
        for factory in factories:
            self.register(factory)

    def register(self, factory: PipelineFactory) -> None:
        self._by_task.setdefault(factory.task, {})[factory.name] = factory

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self._by_task)

    def resolve(self, task: str, model: str | None = None) -> PipelineFactory:
        """The factory for ``task`` (and ``model``), or raise :class:`ModelUnavailable`."""
        models = self._by_task.get(task)
        if not models:
            raise ModelUnavailable(f"no {task} model is installed on this server")
        if model is None:
            factory = next(iter(models.values()))
        elif model in models:
            factory = models[model]
        else:
            raise ModelUnavailable(
                f"{task} model {model!r} is not installed; available: {', '.join(models)}"
            )
        reason = factory.unavailable_reason()
        if reason:
            raise ModelUnavailable(reason)
        return factory

    def describe(self) -> dict[str, dict[str, str]]:
        """``{task: {model: "ok" or the reason it is unavailable}}`` for /healthz."""
        return {
            task: {name: f.unavailable_reason() or "ok" for name, f in models.items()}
            for task, models in self._by_task.items()
        }
