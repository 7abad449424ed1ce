"""Split channels: one mono stream per audio channel, behind one pipeline.

A session started with ``split_channels`` (a call recorded with each party on
its own channel) sends audio ``[n, channels]``; :class:`SplitChannels` begins
one mono pipeline per channel, gives each its column, and tags every
transcript event with the channel it came from.  It wraps any pipeline that
takes mono samples (``begin``, ``accept``, ``flush``, ``end``), so the mono
pipeline knows nothing of channels.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Protocol

import numpy as np

from dsstream.options import AsrOptions
from dsstream.pipelines.base import PipelineError
from dsstream.protocol import Endpoint, ErrorCode, Final, Partial, ServerEvent

__all__ = ["MonoStream", "SplitChannels"]


class MonoStream(Protocol):
    """What SplitChannels needs of each channel's pipeline."""

    def begin(self, options: Any) -> dict[str, Any]: ...

    def accept(self, samples: np.ndarray, sample_rate: int | None = None) -> list[ServerEvent]: ...

    def flush(self) -> list[ServerEvent]: ...

    def end(self) -> list[ServerEvent]: ...


class SplitChannels:
    """``make()`` gives a fresh mono pipeline; ``begin(options)`` starts one per
    channel of ``options.channels``, each with the options of a mono session."""

    def __init__(self, make: Callable[[], MonoStream]) -> None:
        self.make = make
        self.parts: list[MonoStream] = []

    def begin(self, options: AsrOptions) -> dict[str, Any]:
        """Begin every channel's stream (none stays begun if one refuses);
        the last channel's effective options."""
        mono = replace(options, channels=1, split_channels=False)
        effective: dict[str, Any] = {}
        try:
            for _ in range(options.channels):
                part = self.make()
                effective = part.begin(mono)
                self.parts.append(part)
        except PipelineError:
            for part in self.parts:
                part.end()
            self.parts = []
            raise
        return effective

    def accept(self, samples: np.ndarray) -> list[ServerEvent]:
        """Audio ``[n, channels]``: each column to its channel's stream."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.parts):
            raise PipelineError(
                ErrorCode.BAD_AUDIO,
                f"a session with split_channels takes audio [n, {len(self.parts)}], "
                f"got shape {list(x.shape)}",
            )
        return self._each(lambda part, i: part.accept(x[:, i]))

    def flush(self) -> list[ServerEvent]:
        return self._each(lambda part, _: part.flush())

    def end(self) -> list[ServerEvent]:
        """End every channel's stream, even after one failed to (then raise its error)."""
        events: list[ServerEvent] = []
        failure: Exception | None = None
        for i, part in enumerate(self.parts):
            try:
                events += _tagged(part.end(), i)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return events

    def _each(self, call: Callable[[MonoStream, int], list[ServerEvent]]) -> list[ServerEvent]:
        return [e for i, part in enumerate(self.parts) for e in _tagged(call(part, i), i)]


def _tagged(events: list[ServerEvent], channel: int) -> list[ServerEvent]:
    """``events`` with each transcript event marked as channel ``channel``'s."""
    return [
        replace(e, channel=channel) if isinstance(e, (Partial, Final, Endpoint)) else e
        for e in events
    ]
