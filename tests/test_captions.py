"""Subtitles from finals: cue splitting and the SRT / WebVTT formats."""

import pytest

from dsstream.captions import Cue, cues, to_srt, to_vtt
from dsstream.protocol import Final, Word


def _final(text: str, start: float, step: float = 0.5, segment: int = 0) -> Final:
    words = tuple(
        Word(w, start + i * step, start + i * step + step * 0.8, 0.9)
        for i, w in enumerate(text.split())
    )
    return Final(text, segment, start, start + len(words) * step, words)


def test_cues_split_at_words_by_length_and_duration():
    long = _final("one two three four five six seven eight nine ten", 1.0)
    assert [c.text for c in cues([long], max_chars=14)] == [
        "one two three", "four five six", "seven eight", "nine ten"
    ]  # fmt: skip
    by_time = cues([long], max_seconds=1.2)  # words every 0.5 s, 0.4 s long
    assert [c.text for c in by_time] == [
        "one two", "three four", "five six", "seven eight", "nine ten"
    ]  # fmt: skip
    for cue in by_time:
        assert cue.end - cue.start <= 1.2 + 1e-9
    first = by_time[0]
    assert (first.start, first.end) == (1.0, pytest.approx(1.9))  # first word's start, last's end
    # A word longer than a line gets a cue of its own; empty finals none.
    odd = [_final("a incomprehensibilities b", 0.0), Final("", 1, 2.0, 3.0)]
    assert [c.text for c in cues(odd, max_chars=10)] == ["a", "incomprehensibilities", "b"]
    # Without word times, the segment is one cue.
    assert cues([Final("no words here", 0, 3.0, 4.5)]) == [Cue(3.0, 4.5, "no words here")]
    with pytest.raises(ValueError):
        cues([long], max_chars=0)


def test_srt_and_vtt_text():
    finals = [_final("hello world", 0.0, step=0.25), _final("again", 3725.4567, segment=1)]
    assert to_srt(finals) == (
        "1\n00:00:00,000 --> 00:00:00,450\nhello world\n\n2\n01:02:05,457 --> 01:02:05,857\nagain\n"
    )
    assert to_vtt(finals) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:00.450\nhello world\n\n"
        "01:02:05.457 --> 01:02:05.857\nagain\n"
    )
    assert to_srt([]) == "" and to_vtt([]) == "WEBVTT\n"
