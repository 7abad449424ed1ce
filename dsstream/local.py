"""In-process sessions: the server's pipelines without a server.

:class:`LocalSession` drives a pipeline through the same ``begin``/``step``/
``end`` calls the server makes, so embedding code gets the same events.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from dsstream.options import AsrOptions, parse_task_options
from dsstream.pipelines.base import PipelineError, PipelineRegistry
from dsstream.protocol import (
    Answer,
    AudioChunk,
    ErrorCode,
    Final,
    Flush,
    ImageData,
    Question,
    ServerEvent,
    Word,
)

__all__ = [
    "PIECE_SECONDS", "LocalSession", "Transcript", "file_pieces", "transcribe", "transcribe_pieces",
]  # fmt: skip


class LocalSession:
    """One session run in this process.

    ``options`` are the same as a ``start`` message's.  Raises
    :class:`dsstream.pipelines.ModelUnavailable` when the task's model is not
    installed, ``ValueError`` for invalid options, and
    :class:`dsstream.pipelines.PipelineError` for bad input.
    """

    def __init__(self, task: str, registry: PipelineRegistry | None = None, **options: Any):
        if registry is None:
            registry = _shared_registry()
        self.options = parse_task_options(task, options)  # OptionsError is a ValueError
        self.task = task
        factory = registry.resolve(task, self.options.model)
        self.pipeline = factory.create()
        self.effective = self.pipeline.begin(self.options)
        self._questions = 0
        self._ended = False

    def send_audio(self, samples: np.ndarray) -> list[ServerEvent]:
        """Feed float32 mono samples ``[n]`` (``[n, channels]`` with
        ``split_channels``) at the ``sample_rate`` given at start."""
        if not isinstance(self.options, AsrOptions):
            raise PipelineError(ErrorCode.BAD_MESSAGE, "audio belongs to an asr session")
        chunk = np.asarray(samples, dtype=np.float32)
        if not self.options.split_channels:
            chunk = chunk.reshape(-1)
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


_registry: PipelineRegistry | None = None
_registry_lock = threading.Lock()


def _shared_registry() -> PipelineRegistry:
    """The sample models, loaded once per process however many sessions use them."""
    global _registry
    with _registry_lock:
        if _registry is None:
            from dsstream.pipelines.defaults import default_registry

            _registry = default_registry()
        return _registry


@dataclass(frozen=True)
class Transcript:
    """A whole recording's recognition: one ``Final`` per segment (endpoints split them)."""

    text: str  # the segments' texts joined by spaces
    segments: tuple[Final, ...]

    @property
    def words(self) -> tuple[Word, ...]:
        return tuple(w for seg in self.segments for w in seg.words)


def transcribe(
    audio: str | Path | np.ndarray,
    sample_rate: int | None = None,
    registry: PipelineRegistry | None = None,
    **options: Any,
) -> Transcript:
    """Transcribe a file or an array in this process, with the sample model by default.

    ``audio`` is a path (any format soundfile reads; multichannel is averaged)
    or float samples ``[n]`` or ``[n, channels]`` at ``sample_rate`` Hz
    (default 16000).  ``options`` are those of a ``start`` message (hotwords,
    nbest, lm_weight, endpointing...); with ``split_channels=True`` each
    channel of a stereo recording is recognized on its own, and the segments
    (in time order) carry their channel.  The audio is streamed through the
    same pipeline as the server's, so the result equals a live session's finals.
    """
    from dsstream.audio import channel_options, load_audio

    split = bool(options.get("split_channels"))
    if isinstance(audio, (str, Path)):
        if sample_rate is not None:
            raise ValueError("sample_rate is read from the file; pass it only with an array")
        samples, rate = load_audio(audio, mono=not split)
    else:
        samples = np.asarray(audio, dtype=np.float32)
        if samples.ndim not in (1, 2):
            raise ValueError(f"audio must be [n] or [n, channels], got shape {samples.shape}")
        rate = 16000 if sample_rate is None else int(sample_rate)
    if samples.ndim == 2 and not split:
        samples = samples.mean(axis=1)
    options = channel_options(samples, options)
    step = rate * PIECE_SECONDS
    pieces = (samples[i : i + step] for i in range(0, len(samples), step))
    return transcribe_pieces(pieces, rate, registry, **options)


# Audio goes into a session in pieces of this many seconds: memory stays flat on
# long recordings, and every caller that cuts the same pieces gets the same result.
PIECE_SECONDS = 10


def file_pieces(audio: Any, mono: bool = True) -> Iterator[np.ndarray]:
    """An open ``soundfile.SoundFile`` read in :data:`PIECE_SECONDS` pieces,
    float32 ``[n]`` (channels averaged) or ``[n, channels]``: the pieces
    :func:`transcribe` cuts from the whole array, without holding it."""
    size = audio.samplerate * PIECE_SECONDS
    while True:
        block = audio.read(size, dtype="float32", always_2d=True)
        if not len(block):
            return
        yield block.mean(axis=1, dtype=np.float32) if mono else block


def transcribe_pieces(
    pieces: Iterable[np.ndarray],
    sample_rate: int,
    registry: PipelineRegistry | None = None,
    **options: Any,
) -> Transcript:
    """Transcribe audio that arrives in pieces (float32 ``[n]``, or ``[n, channels]``
    with ``split_channels=True, channels=c`` as in a start message), e.g. a long
    file read block by block, so it is never held whole.  :func:`transcribe` cuts
    an array into :data:`PIECE_SECONDS` pieces and calls this; equal pieces give
    equal results."""
    split = bool(options.get("split_channels"))
    finals: list[Final] = []
    session = LocalSession("asr", registry, sample_rate=sample_rate, **options)
    try:
        for piece in pieces:
            finals += [e for e in session.send_audio(piece) if isinstance(e, Final)]
    finally:
        finals += [e for e in session.end() if isinstance(e, Final)]
    if split:  # each channel's segments are in order; the call's are by time
        finals.sort(key=lambda f: (f.start, f.channel or 0))
    text = " ".join(f.text for f in finals if f.text)
    return Transcript(text, tuple(finals))
