"""The long fuzz: the suite's generators (tests/test_fuzz.py) run for many
more examples than CI's minute allows.

    DSSTREAM_FUZZ_EXAMPLES=20000 pytest tests/bench/bench_fuzz.py -s -o python_files='bench_*.py'
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_fuzz import drive_protocol, drive_vosk, frames, vosk_texts  # noqa: E402

EXAMPLES = int(os.environ.get("DSSTREAM_FUZZ_EXAMPLES", "5000"))
LONG = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))  # fmt: skip


def _timed(name: str, run) -> None:
    t0 = time.monotonic()
    run()
    took = time.monotonic() - t0
    print(f"\n{name}: {EXAMPLES} examples in {took:.0f} s ({EXAMPLES / took:.0f}/s), no failure")


def test_long_fuzz_of_the_protocol_core():
    @LONG
    @given(st.lists(frames, max_size=12), st.booleans())
    def run(inputs, warm):
        drive_protocol(inputs, warm)

    _timed("protocol core", run)


def test_long_fuzz_of_the_vosk_translator():
    @LONG
    @given(st.lists(vosk_texts, max_size=8), st.binary(max_size=64))
    def run(messages_in, audio):
        drive_vosk(messages_in, audio)

    _timed("vosk translator", run)
