"""In-process sessions give the same events as the server, and structured logs."""

import json
import logging

import numpy as np
import pipelines
import pytest
from conftest import png_bytes, tone

from dsstream.local import LocalSession
from dsstream.logs import configure_logging, session_logger
from dsstream.pipelines import ModelUnavailable, PipelineError
from dsstream.protocol import Final, Partial


def test_local_asr_session_matches_server_semantics():
    with LocalSession("asr", pipelines.registry(), sample_rate=16000) as session:
        events = []
        for chunk in np.array_split(tone(0.5, 16000), 5):
            events += session.send_audio(chunk)
        events += session.flush()
        events += session.end()
        assert session.end() == []  # ending twice is harmless
    assert [e.text for e in events if isinstance(e, Partial)] == [
        "1600",
        "3200",
        "4800",
        "6400",
        "8000",
    ]
    assert [e.text for e in events if isinstance(e, Final)] == ["8000", "0"]


def test_local_vqa_session():
    session = LocalSession("vqa", pipelines.registry())
    with pytest.raises(PipelineError, match="no image"):
        session.ask("what?")
    session.send_image(png_bytes(12, 8))
    assert session.ask("size?").text == "12x8 size?"


def test_local_session_errors(tmp_path):
    with pytest.raises(ValueError, match="sample_rte"):
        LocalSession("asr", pipelines.registry(), sample_rte=1)
    with pytest.raises(ModelUnavailable, match="model.ds"):
        from dsstream.pipelines import default_registry

        LocalSession("asr", default_registry(tmp_path))
    session = LocalSession("asr", pipelines.registry())
    with pytest.raises(PipelineError, match="NaN"):
        session.send_audio(np.array([np.nan], np.float32))
    session.end()
    with pytest.raises(PipelineError, match="ended"):
        session.flush()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_logs_carry_the_session_id(fmt, capsys):
    configure_logging("INFO", fmt)
    try:
        session_logger("dsstream.test", "abc123").info("hello %s", "there")
        line = capsys.readouterr().err.strip()
    finally:
        logging.getLogger("dsstream").handlers.clear()
        logging.getLogger("dsstream").propagate = True
    if fmt == "json":
        record = json.loads(line)
        assert record["session"] == "abc123" and record["message"] == "hello there"
    else:
        assert "dsstream.test [abc123]: hello there" in line
