"""In-process sessions: the server's pipelines without a server.

:class:`LocalSession` drives a pipeline through the same ``begin``/``step``/
``end`` calls the server makes, so embedding code gets the same events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dsstream.options import AsrOptions, OptionsError, parse_task_options
from dsstream.pipelines.base import PipelineError, PipelineRegistry
from dsstream.protocol import (
    Answer,
    AudioChunk,
    ErrorCode,
    Flush,
    ImageData,
    Question,
    ServerEvent,
)

__all__ = ["LocalSession"]


class LocalSession:
    """One session run in this process.

    ``options`` are the same as a ``start`` message's.  Raises
    :class:`dsstream.pipelines.ModelUnavailable` when the task's model is not
    installed, ``ValueError`` for invalid options, and
    :class:`dsstream.pipelines.PipelineError` for bad input.
    """

    def __init__(self, task: str, registry: PipelineRegistry | None = None, **options: Any):
        if registry is None:
            from dsstream.pipelines.defaults import default_registry

            registry = default_registry()
        try:
            self.options = parse_task_options(task, options)
        except OptionsError as exc:
            raise ValueError(str(exc)) from None
        self.task = task
        factory = registry.resolve(task, self.options.model)
        self.pipeline = factory.create()
        self.effective = self.pipeline.begin(self.options)
        self._questions = 0
        self._ended = False

    def send_audio(self, samples: np.ndarray) -> list[ServerEvent]:
        """Feed float32 mono samples ``[n]`` at the ``sample_rate`` given at start."""
        if not isinstance(self.options, AsrOptions):
            raise PipelineError(ErrorCode.BAD_MESSAGE, "audio belongs to an asr session")
        chunk = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(chunk)):
            raise PipelineError(ErrorCode.BAD_AUDIO, "audio contains NaN or infinity")
        return self._step(AudioChunk(chunk, self.options.sample_rate))

    def send_image(self, image: bytes | str | Path) -> list[ServerEvent]:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        return self._step(ImageData(data))

    def ask(self, text: str) -> Answer:
        """Ask about the latest image and return the answer."""
        self._questions += 1
        for event in self._step(Question(f"q{self._questions}", text)):
            if isinstance(event, Answer):
                return event
        raise PipelineError(ErrorCode.INTERNAL, "the pipeline produced no answer")

    def flush(self) -> list[ServerEvent]:
        return self._step(Flush())

    def end(self) -> list[ServerEvent]:
        if self._ended:
            return []
        self._ended = True
        return self.pipeline.end()

    def _step(self, frame: Any) -> list[ServerEvent]:
        if self._ended:
            raise PipelineError(ErrorCode.BAD_MESSAGE, "session has ended")
        return self.pipeline.step(frame)

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()
