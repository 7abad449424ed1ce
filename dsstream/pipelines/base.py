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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Union

from dsstream.errors import CodedError
from dsstream.options import AsrOptions, VqaOptions
from dsstream.protocol import AudioChunk, Flush, ImageData, Question, ServerEvent

__all__ = [
    "Frame",
    "Pipeline",
    "PipelineError",
    "PipelineFactory",
    "ArtifactPipelineFactory",
    "LoadOnce",
    "PipelineRegistry",
    "ModelUnavailable",
]

Frame = Union[AudioChunk, ImageData, Question, Flush]


class PipelineError(CodedError):
    """Bad input a pipeline refuses; becomes an ``error`` event.

    Non-fatal errors (the default) keep the session: the frame is dropped and
    the next one is processed.
    """


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


class LoadOnce:
    """What every file-backed factory shares: the model is loaded by the first
    ``create`` (once, under a lock; weights are shared by all sessions), it is
    unavailable while a file or its module is missing, its collectors go on
    /metrics, and ``close`` releases it.  Subclasses set ``task``, ``name``,
    ``files``, ``hint`` and ``_make``/``_lock``, and define ``_module`` (the
    module that must import) and ``_load`` (the per-session pipeline maker)."""

    task: str
    name: str
    files: Mapping[str, Path | None]
    hint: str
    _make: Callable[[], Pipeline] | None
    _lock: threading.Lock

    def _module(self) -> str:
        raise NotImplementedError

    def _load(self) -> Callable[[], Pipeline]:
        raise NotImplementedError

    def unavailable_reason(self) -> str | None:
        missing = [str(p) for p in self.files.values() if p is not None and not Path(p).exists()]
        if missing:
            hint = f"; {self.hint}" if self.hint else ""
            return (
                f"{self.task} model {self.name!r} is not installed: missing "
                f"{', '.join(missing)}{hint}"
            )
        module = self._module()
        if importlib.util.find_spec(module) is None:
            return f"{self.task} pipeline module {module!r} is not available in this install"
        return None

    def create(self) -> Pipeline:
        with self._lock:
            if self._make is None:
                reason = self.unavailable_reason()
                if reason:
                    raise ModelUnavailable(reason)
                self._make = self._load()
        return self._make()

    def collectors(self) -> list[Any]:
        collectors = getattr(self._make, "collectors", None)
        return list(collectors()) if collectors is not None else []

    def close(self) -> None:
        """Release the loaded model (its engines' threads), if any; a later
        ``create`` loads it again."""
        with self._lock:
            runtime, self._make = self._make, None
        close = getattr(runtime, "close", None)
        if close is not None:
            close()


@dataclass
class ArtifactPipelineFactory(LoadOnce):
    """A factory for a pipeline backed by model files on disk, wired by name
    (for pipelines outside this package; the built-in ones have typed
    factories, dsstream/pipelines/factories.py).

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

    def _module(self) -> str:
        return self.entry.partition(":")[0]

    def _load(self) -> Callable[[], Pipeline]:
        module, _, attr = self.entry.partition(":")
        loader = getattr(importlib.import_module(module), attr)
        files = {k: Path(v) for k, v in self.files.items()}
        return loader(name=self.name, **files, **self.extra)

    def reloaded(self, copies: Mapping[int, Any]) -> ArtifactPipelineFactory:
        """An unloaded copy that reads its files again on its first ``create``.

        Factories among ``extra``'s values (a VQA model's ASR for spoken
        questions) are replaced by their copies in ``copies`` (keyed by ``id``)."""
        extra = {k: copies.get(id(v), v) for k, v in self.extra.items()}
        return replace(self, extra=extra)


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

    def factories(self) -> list[PipelineFactory]:
        """Every registered factory, in registration order."""
        return [f for models in self._by_task.values() for f in models.values()]

    def load(self) -> dict[str, dict[str, str]]:
        """Load every installed model now (so no session waits for it); return
        :meth:`describe`.  A model that fails to load raises."""
        for factory in self.factories():
            if factory.unavailable_reason() is None:
                factory.create()
        return self.describe()

    def reloaded(self) -> PipelineRegistry:
        """The same models, none loaded yet: each reads its files again when
        loaded.  Factories that cannot be copied (no ``reloaded`` method) are
        shared with this registry."""
        copies: dict[int, Any] = {}
        for factory in self.factories():  # dependencies are registered first
            copy = getattr(factory, "reloaded", None)
            copies[id(factory)] = copy(copies) if copy is not None else factory
        return PipelineRegistry([copies[id(f)] for f in self.factories()])

    def close(self, keep: PipelineRegistry | None = None) -> None:
        """Release every loaded model but those ``keep`` shares."""
        kept = {id(f) for f in keep.factories()} if keep is not None else set()
        for factory in self.factories():
            close = getattr(factory, "close", None)
            if close is not None and id(factory) not in kept:
                close()

    def describe(self) -> dict[str, dict[str, str]]:
        """``{task: {model: "ok" or the reason it is unavailable}}`` for /healthz."""
        return {
            task: {name: f.unavailable_reason() or "ok" for name, f in models.items()}
            for task, models in self._by_task.items()
        }
