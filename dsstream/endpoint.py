"""Endpoint detection: when an utterance is over.  Pure data in, decision out.

The three rules follow sherpa-onnx's endpointing, with speech decided by a
voice activity detector rather than by decoded tokens (a cough decodes to
nothing but is not silence; noise decodes to junk but is not speech):

1. ``trailing_silence``: the segment held speech and has been silent for
   ``trailing_silence_ms`` since.
2. ``no_speech``: the segment has held no speech for ``silence_without_speech_ms``.
3. ``max_length``: the segment reached ``max_utterance_ms``.

Times are seconds from the stream start.  The caller feeds VAD flags of fixed
windows as they are computed and asks :meth:`Endpointer.check` at decision
points; only windows that end by the decision time count, so the decisions
depend on the audio, not on how it was chunked or how far the VAD ran ahead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dsstream.options import EndpointOptions

__all__ = ["Endpointer"]


@dataclass
class Endpointer:
    options: EndpointOptions
    window_s: float = 0.032  # seconds per VAD window
    min_speech_s: float = 0.25  # speech shorter than this in a segment does not count
    segment_start: float = 0.0
    speech_s: float = 0.0  # speech seen in the current segment
    last_speech_end: float | None = None
    _next_window: int = 0  # index of the next window to arrive
    _pending: deque[tuple[int, bool]] = field(default_factory=deque)

    def add(self, flags: list[bool]) -> None:
        """Append the speech flags of the next windows of the stream."""
        for flag in flags:
            self._pending.append((self._next_window, flag))
            self._next_window += 1

    def _consume(self, now: float) -> None:
        while self._pending and (self._pending[0][0] + 1) * self.window_s <= now + 1e-9:
            index, speech = self._pending.popleft()
            if speech:
                self.speech_s += self.window_s
                self.last_speech_end = (index + 1) * self.window_s

    @property
    def has_speech(self) -> bool:
        return self.speech_s >= self.min_speech_s

    def check(self, now: float) -> str | None:
        """The rule that ends the segment at time ``now``, or None."""
        self._consume(now)
        opts = self.options
        if not opts.enabled:
            return None
        length = now - self.segment_start
        if self.has_speech and self.last_speech_end is not None:
            if now - self.last_speech_end >= opts.trailing_silence_ms / 1000.0:
                return "trailing_silence"
        elif length >= opts.silence_without_speech_ms / 1000.0:
            return "no_speech"
        if length >= opts.max_utterance_ms / 1000.0:
            return "max_length"
        return None

    def reset(self, now: float) -> None:
        """Start a new segment at ``now`` (windows not yet consumed go to it)."""
        self._consume(now)
        self.segment_start = now
        self.speech_s = 0.0
        self.last_speech_end = None
