"""Test pipelines: real pipelines with trivially checkable outputs.

``CountingAsr`` resamples to 16 kHz with the real streaming resampler and
"transcribes" a segment as the number of samples it received, so every test
can compute the exact expected text.  ``SizeVqa`` decodes the image with the
real decoder and answers with its size.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dsstream.audio import ResampleError, StreamingResampler
from dsstream.media import ImageError, decode_image
from dsstream.options import AsrOptions
from dsstream.pipelines.base import Pipeline, PipelineError, PipelineRegistry
from dsstream.protocol import (
    Answer,
    AudioChunk,
    Endpoint,
    ErrorCode,
    Final,
    Flush,
    ImageData,
    Partial,
    Question,
)

MODEL_RATE = 16000


class CountingAsr:
    def __init__(self, delay_s: float = 0.0, crash_at: int | None = None, on_step=None):
        self.delay_s = delay_s
        self.crash_at = crash_at
        self.on_step = on_step
        self.steps = 0
        self.ended = False

    def begin(self, options: AsrOptions) -> dict[str, Any]:
        try:
            self.resampler = StreamingResampler(options.sample_rate, MODEL_RATE)
        except ResampleError as exc:
            raise PipelineError(ErrorCode.UNSUPPORTED, str(exc)) from None
        self.options = options
        self.segment = 0
        self.count = 0
        self.total = 0
        return {"model": "counting", "model_sample_rate": MODEL_RATE}

    def step(self, frame):
        self.steps += 1
        if self.on_step:
            self.on_step(self)
        if self.crash_at is not None and self.steps >= self.crash_at:
            raise RuntimeError("simulated pipeline crash")
        if self.delay_s:
            time.sleep(self.delay_s)
        if isinstance(frame, AudioChunk):
            out = self.resampler.process(frame.samples)
            self.count += len(out)
            return [Partial(str(self.count), self.segment)] if self.options.partials else []
        if isinstance(frame, Flush):
            return self._final("flush")
        raise PipelineError(ErrorCode.BAD_MESSAGE, f"unexpected {type(frame).__name__}")

    def _final(self, reason: str):
        start = self.total / MODEL_RATE
        self.total += self.count
        events = [
            Final(str(self.count), self.segment, start, self.total / MODEL_RATE),
            Endpoint(self.segment, self.total / MODEL_RATE, reason),
        ]
        self.segment += 1
        self.count = 0
        return events

    def end(self):
        self.ended = True
        self.count += len(self.resampler.finish())
        return self._final("end")


class SizeVqa:
    def __init__(self) -> None:
        self.size: tuple[int, int] | None = None

    def begin(self, options) -> dict[str, Any]:
        return {"model": "size"}

    def step(self, frame):
        t0 = time.monotonic()
        if isinstance(frame, ImageData):
            try:
                self.size = decode_image(frame.data).size
            except ImageError as exc:
                raise PipelineError(ErrorCode.BAD_IMAGE, str(exc)) from None
            return []
        if isinstance(frame, Question):
            if self.size is None:
                raise PipelineError(ErrorCode.NO_IMAGE, "no image yet: send an image first")
            w, h = self.size
            latency = (time.monotonic() - t0) * 1000
            return [Answer(frame.id, f"{w}x{h} {frame.text}", 1.0, latency)]
        return []

    def end(self):
        return []


@dataclass
class StaticFactory:
    task: str
    name: str
    make: Callable[[], Pipeline]
    created: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def unavailable_reason(self) -> str | None:
        return None

    def create(self) -> Pipeline:
        pipeline = self.make()
        with self.lock:
            self.created.append(pipeline)
        return pipeline


def registry(asr: Callable[[], Pipeline] = CountingAsr, vqa=SizeVqa) -> PipelineRegistry:
    return PipelineRegistry(
        [StaticFactory("asr", "counting", asr), StaticFactory("vqa", "size", vqa)]
    )
