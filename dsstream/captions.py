"""Subtitles from recognition results: SRT and WebVTT cues timed by the words.

Pure functions over ``Final`` events (a live session's or
:func:`dsstream.transcribe`'s segments).  A segment is split into cues of at
most ``max_chars`` characters and ``max_seconds`` each, at word boundaries,
each cue from its first word's start to its last word's end; a segment
without word times (``word_timestamps`` off) is one cue over the segment.
With ``split_channels`` a cue starts with its channel, ``[0]`` or ``[1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from dsstream.protocol import Final, Word

__all__ = ["Cue", "cues", "to_srt", "to_vtt"]


@dataclass(frozen=True)
class Cue:
    start: float  # seconds
    end: float  # seconds
    text: str


def cues(finals: Iterable[Final], max_chars: int = 42, max_seconds: float = 6.0) -> list[Cue]:
    """Caption cues, in time order.  42 characters is the usual line length of
    broadcast subtitles; a single longer word gets a cue of its own."""
    if max_chars < 1 or not max_seconds > 0:
        raise ValueError("max_chars must be at least 1 and max_seconds above 0")
    out: list[Cue] = []
    for final in finals:
        if not final.text:
            continue
        label = f"[{final.channel}] " if final.channel is not None else ""
        if not final.words:
            out.append(Cue(final.start, max(final.end, final.start), label + final.text))
            continue
        group: list[Word] = []
        for word in final.words:
            text = " ".join(w.word for w in [*group, word])
            if group and (len(text) > max_chars or word.end - group[0].start > max_seconds):
                out.append(_cue(group, label))
                group = []
            group.append(word)
        out.append(_cue(group, label))
    return sorted(out, key=lambda c: c.start)  # channels' segments interleave in time


def _cue(words: list[Word], label: str) -> Cue:
    return Cue(words[0].start, max(words[-1].end, words[0].start),
               label + " ".join(w.word for w in words))  # fmt: skip


def _clock(seconds: float, decimal: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def to_srt(finals: Iterable[Final], max_chars: int = 42, max_seconds: float = 6.0) -> str:
    """SubRip text: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``."""
    blocks = [
        f"{i}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n{c.text}\n"
        for i, c in enumerate(cues(finals, max_chars, max_seconds), 1)
    ]
    return "\n".join(blocks)


def to_vtt(finals: Iterable[Final], max_chars: int = 42, max_seconds: float = 6.0) -> str:
    """WebVTT text (``HH:MM:SS.mmm``), for HTML ``<track>`` elements."""
    blocks = [
        f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n{c.text}\n"
        for c in cues(finals, max_chars, max_seconds)
    ]
    return "\n".join(["WEBVTT\n", *blocks])
