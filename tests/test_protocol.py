"""The sans-I/O protocol core, driven by message fixtures."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from dsstream.options import options_dict
from dsstream.protocol import (
    Answer,
    ClientProtocol,
    Ended,
    Endpoint,
    Error,
    ErrorCode,
    Final,
    Hypothesis,
    Partial,
    ServerProtocol,
    Started,
    StartSession,
    State,
    Word,
    encode_event,
    parse_server_event,
)

CASES = json.loads((Path(__file__).parent / "fixtures" / "protocol_cases.json").read_text())


def _feed(proto: ServerProtocol, send):
    if isinstance(send, str):
        return proto.receive_text(send)
    if "binary_hex" in send:
        return proto.receive_binary(bytes.fromhex(send["binary_hex"]))
    if "binary_len" in send:
        return proto.receive_binary(b"\0" * send["binary_len"])
    return proto.receive_text(json.dumps(send))


def _subset(expected, actual):
    if isinstance(expected, dict):
        return all(_subset(v, actual[k]) for k, v in expected.items())
    return expected == actual


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture(case):
    proto = ServerProtocol()
    for message in case["setup"]:
        (item,) = _feed(proto, message)
        assert isinstance(item, StartSession)
        proto.accept_start("s1", {})
    (item,) = _feed(proto, case["send"])
    expect = case["expect"]
    if "error" in expect:
        assert isinstance(item, Error), item
        assert item.code == ErrorCode(expect["error"])
        assert expect["match"] in item.message
        assert item.fatal is False
        return
    assert type(item).__name__ == expect["request"]
    if "task" in expect:
        assert item.task == expect["task"]
    if "options" in expect:
        assert _subset(expect["options"], options_dict(item.options))
    if "samples" in expect:
        np.testing.assert_array_equal(item.samples, np.array(expect["samples"], np.float32))
        assert item.samples.dtype == np.float32
    for key in ("id", "text"):
        if key in expect:
            assert getattr(item, key) == expect[key]


def test_fixtures_cover_every_error_code_the_core_emits():
    codes = {c["expect"]["error"] for c in CASES if "error" in c["expect"]}
    assert codes == {"bad_message", "bad_audio", "too_large", "unsupported"}
    requests = {c["expect"]["request"] for c in CASES if "request" in c["expect"]}
    assert requests == {"StartSession", "AudioChunk", "ImageData", "Question", "Flush", "End"}


def test_rejected_start_can_be_retried_and_fatal_rejection_closes():
    proto = ServerProtocol()
    proto.receive_text('{"type":"start","task":"asr"}')
    err = proto.reject_start(ErrorCode.UNSUPPORTED, "no", fatal=False)
    assert not err.fatal and proto.state is State.AWAITING_START
    (item,) = proto.receive_text('{"type":"start","task":"vqa"}')
    assert isinstance(item, StartSession) and item.task == "vqa"
    err = proto.reject_start(ErrorCode.MODEL_UNAVAILABLE, "missing x", fatal=True)
    assert err.fatal and proto.state is State.CLOSED
    (item,) = proto.receive_text('{"type":"flush"}')
    assert isinstance(item, Error) and "closed" in item.message


def test_accept_start_reports_effective_options_and_limits():
    proto = ServerProtocol()
    proto.receive_text('{"type":"start","task":"asr","sample_rate":8000}')
    started = proto.accept_start("abc", {"model": "m", "sample_rate": 8000})
    assert started.session_id == "abc" and started.task == "asr"
    assert started.limits["max_frame_bytes"] == proto.limits.max_frame_bytes
    assert proto.state is State.ACTIVE


EVENTS = [
    Started("s1", "asr", {"model": "m", "sample_rate": 16000}, {"max_frame_bytes": 10}),
    Partial("hello wor", 0),
    Final(
        "hello world",
        0,
        0.0,
        1.5,
        (Word("hello", 0.1, 0.5, 0.9), Word("world", 0.6, 1.2, 0.75)),
        (Hypothesis("hello world", -3.5), Hypothesis("hello word", -4.25)),
    ),
    Final("", 1, 1.5, 2.0),
    Endpoint(0, 1.5, "trailing_silence"),
    Answer("q1", "circle", 0.97, 12.5),
    Answer("q2", "left", 0.5, 3.0, transcript="is the red object on the left"),
    Ended("s1", "client", {"frames": 3}),
    Error(ErrorCode.BUSY, "full", True, 2000),
    Error(ErrorCode.BAD_AUDIO, "odd"),
]


@pytest.mark.parametrize("event", EVENTS, ids=[f"{e.type}{i}" for i, e in enumerate(EVENTS)])
def test_server_event_round_trip(event):
    text = encode_event(event)
    obj = json.loads(text)
    assert obj["type"] == event.type
    assert parse_server_event(text) == event


def test_error_wire_format():
    obj = json.loads(encode_event(Error(ErrorCode.TOO_LARGE, "big", False)))
    assert obj == {"type": "error", "code": "too_large", "message": "big", "fatal": False}


@pytest.mark.parametrize(
    "text", ['{"type":"nope"}', "[]", '{"type":"partial"}', '{"type":"error","code":"x"}']
)
def test_parse_server_event_rejects_invalid(text):
    with pytest.raises(ValueError):
        parse_server_event(text)


def test_client_protocol_builds_messages_the_server_accepts():
    client, server = ClientProtocol(), ServerProtocol()
    (start,) = server.receive_text(client.start("asr", sample_rate=8000, encoding="f32le"))
    assert isinstance(start, StartSession) and start.options.sample_rate == 8000
    server.accept_start("s", {})
    samples = np.array([0.25, -0.5, 1.0], np.float32)
    (chunk,) = server.receive_binary(client.audio(samples, "f32le"))
    np.testing.assert_array_equal(chunk.samples, samples)
    (flush,) = server.receive_text(client.flush())
    (end,) = server.receive_text(client.end())
    assert type(flush).__name__ == "Flush" and type(end).__name__ == "End"


def test_client_pcm_encoding_round_trips_within_one_lsb():
    client, server = ClientProtocol(), ServerProtocol()
    server.receive_text(client.start("asr"))
    server.accept_start("s", {})
    samples = np.linspace(-1, 1, 101).astype(np.float32)
    (chunk,) = server.receive_binary(client.audio(samples, "pcm_s16le"))
    assert np.max(np.abs(chunk.samples - samples)) <= 1 / 32768


def test_client_question_ids_and_state_tracking():
    client = ClientProtocol()
    qid, message = client.question("what?")
    assert qid == "c1" and json.loads(message) == {"type": "question", "id": "c1", "text": "what?"}
    assert client.question("again?", "mine")[0] == "mine"
    client.receive(encode_event(EVENTS[0]))
    assert client.started == EVENTS[0]
    client.receive(encode_event(Ended("s1", "client")))
    assert client.ended is not None


def test_started_options_are_json_serializable():
    proto = ServerProtocol()
    (item,) = proto.receive_text('{"type":"start","task":"asr","hotwords":["a b"]}')
    started = proto.accept_start("s", options_dict(item.options))
    assert parse_server_event(encode_event(started)).options["hotwords"] == [
        {"phrase": "a b", "boost": 5.0}
    ]
    assert asdict(item.options)["endpointing"]["enabled"] is True


def test_vqa_with_speech_tags_binary_frames_by_kind():
    from dsstream.protocol import AudioChunk, Error, ImageData

    client, server = ClientProtocol(), ServerProtocol()
    (start,) = server.receive_text(client.start("vqa", speech={"sample_rate": 8000}))
    assert start.options.speech.sample_rate == 8000
    server.accept_start("s", {})
    (image,) = server.receive_binary(client.image(b"\x89PNG...", tagged=True))
    assert isinstance(image, ImageData) and image.data == b"\x89PNG..."
    samples = np.array([0.5, -0.25], np.float32)
    (audio,) = server.receive_binary(client.audio(samples, "pcm_s16le", tagged=True))
    assert isinstance(audio, AudioChunk) and audio.sample_rate == 8000
    np.testing.assert_allclose(audio.samples, samples, atol=1 / 32768)
    for bad in (b"\x07abc", b"\x01", b"\x02\x00"):  # unknown kind, empty image, odd pcm
        (err,) = server.receive_binary(bad)
        assert isinstance(err, Error) and not err.fatal
    assert server.state.value == "active"
    # Without speech, an image frame is the image bytes, untagged.
    plain = ServerProtocol()
    plain.receive_text(client.start("vqa"))
    plain.accept_start("s", {})
    (image,) = plain.receive_binary(b"\x01\x02")
    assert isinstance(image, ImageData) and image.data == b"\x01\x02"


@pytest.mark.parametrize("speech", [True, {"encoding": "f32le"}, False, None])
def test_vqa_speech_option_forms(speech):
    from dsstream.options import parse_task_options

    opts = parse_task_options("vqa", {"speech": speech})
    if speech:
        assert opts.speech.encoding == (speech.get("encoding", "pcm_s16le") if isinstance(
            speech, dict) else "pcm_s16le")  # fmt: skip
    else:
        assert opts.speech is None


def test_vqa_speech_option_is_validated():
    from dsstream.options import OptionsError, parse_task_options

    with pytest.raises(OptionsError, match="speech"):
        parse_task_options("vqa", {"speech": "yes"})
    with pytest.raises(OptionsError, match="sample_rte"):
        parse_task_options("vqa", {"speech": {"sample_rte": 1}})


def test_grammar_option_is_validated_and_echoed():
    from dsstream.options import OptionsError, parse_task_options

    options = parse_task_options("asr", {"grammar": ["turn  on the light", "[unk]"]})
    assert options.grammar == ("turn on the light", "[unk]")
    assert parse_task_options("asr", {}).grammar == ()
    proto = ServerProtocol()
    (item,) = proto.receive_text('{"type":"start","task":"asr","grammar":["yes","no"]}')
    started = proto.accept_start("s", options_dict(item.options))
    assert parse_server_event(encode_event(started)).options["grammar"] == ["yes", "no"]
    for bad, message in [
        ("yes", "list of phrases"),
        ([1, 2], "list of phrases"),
        (["yes", " "], "empty"),
        (["x" * 101], "longer than"),
        ([f"p{i}" for i in range(1001)], "at most 1000"),
    ]:
        with pytest.raises(OptionsError, match=message):
            parse_task_options("asr", {"grammar": bad})
    with pytest.raises(OptionsError, match="do not combine"):
        parse_task_options("asr", {"grammar": ["yes"], "hotwords": ["no"]})
    with pytest.raises(OptionsError, match="needs a 'grammar'"):
        parse_task_options("asr", {"grammar_sequence": True})
    assert parse_task_options(
        "asr", {"grammar": ["one"], "grammar_sequence": True}
    ).grammar_sequence


def test_split_channels_keep_the_channels_and_events_say_which():
    from dsstream.options import OptionsError, parse_task_options
    from dsstream.protocol import decode_audio

    with pytest.raises(OptionsError, match="needs 'channels': 2"):
        parse_task_options("asr", {"split_channels": True})
    with pytest.raises(OptionsError, match="one voice"):
        parse_task_options("vqa", {"speech": {"channels": 2, "split_channels": True}})
    split = parse_task_options("asr", {"channels": 2, "split_channels": True,
                                       "encoding": "f32le"})  # fmt: skip
    frames = np.array([[0.5, -0.25], [0.125, 1.0]], np.float32)
    np.testing.assert_array_equal(decode_audio(frames.tobytes(), split), frames)
    mixed = parse_task_options("asr", {"channels": 2, "encoding": "f32le"})
    np.testing.assert_array_equal(decode_audio(frames.tobytes(), mixed), frames.mean(axis=1))
    final = Final("hi", 0, 0.0, 1.0, channel=1)
    assert json.loads(encode_event(final))["channel"] == 1
    assert parse_server_event(encode_event(final)) == final
    assert "channel" not in json.loads(encode_event(Final("hi", 0, 0.0, 1.0)))
    for event in (Partial("h", 0, 0.5, channel=0), Endpoint(0, 1.0, "end", channel=1)):
        assert parse_server_event(encode_event(event)) == event


HUGE = "9" * 400  # an integer past the float range: JSON allows any number of digits


@pytest.mark.parametrize(
    "start",
    [
        '{"type": "start", "task": "asr", "lm_weight": %s}' % HUGE,
        '{"type": "start", "task": "asr", "hotwords": [{"phrase": "a", "boost": %s}]}' % HUGE,
        '{"type": "start", "task": "asr", "lm_weight": -%s}' % HUGE,
        '{"type": "start", "task": "vqa", "speech": {"lm_weight": %s}}' % HUGE,
        '{"type": "start", "task": "asr", "lm_weight": NaN}',
        '{"type": "start", "task": "asr", "lm_weight": Infinity}',
        '{"type": "start", "task": "asr", "lm_weight": 1e400}',
        '{"type": "start", "task": "asr", "lm_weight": true}',
        '{"type": "start", "task": "asr", "nbest": 2.0}',
        '{"type": "start", "task": "asr", "sample_rate": %s}' % ("1" * 5000),
        '{"type": "start", "task": "asr", "encoding": null}',
        '{"type": "start", "task": "asr", "grammar": null}',
        '{"type": "start", "task": "asr", "partials": null}',
        '{"type": "start", "task": "asr", "endpointing": {"enabled": null}}',
        '{"type": "start", "task": "asr", "hotwords": [{"phrase": "a", "boost": null}]}',
        '{"type": "start", "task": "vqa", "question_forms": null}',
    ],
)
def test_numbers_of_any_size_and_nulls_are_answered_bad_message(start):
    """Issue 30, defects 1 and 6: no number (huge, NaN, Infinity, a bool) and
    no null where the option has a non-null default raises; each is a
    non-fatal ``bad_message`` that names the option, and the session can still start."""
    proto = ServerProtocol()
    [error] = proto.receive_text(start)
    assert isinstance(error, Error) and error.code is ErrorCode.BAD_MESSAGE, error
    assert not error.fatal and len(error.message) < 400
    [ok] = proto.receive_text('{"type": "start", "task": "asr"}')
    assert isinstance(ok, StartSession)


def test_a_huge_sample_rate_is_unsupported_like_any_rate_out_of_range():
    [error] = ServerProtocol().receive_text('{"type": "start", "task": "asr", "sample_rate": %s}'
                                            % HUGE)  # fmt: skip
    assert error.code is ErrorCode.UNSUPPORTED and "400 digits" in error.message


def test_null_means_the_default_where_the_default_is_null_and_minus_zero_is_zero():
    [start] = ServerProtocol().receive_text(
        '{"type": "start", "task": "asr", "lm_weight": null, "model": null,'
        ' "hotwords": [{"phrase": "a", "boost": -0.0}]}'
    )
    assert start.options.lm_weight is None and start.options.model is None
    assert str(start.options.hotwords[0].boost) == "0.0"
    [vqa] = ServerProtocol().receive_text('{"type": "start", "task": "vqa", "speech": null}')
    assert vqa.options.speech is None


def test_decoder_mode_option_is_validated_and_matches_the_decoder():
    from dsstream.decoding.search import MODES
    from dsstream.options import DECODER_MODES, OptionsError, parse_task_options

    assert DECODER_MODES == MODES  # the protocol's names are the decoder's
    assert parse_task_options("asr", {}).decoder_mode is None
    assert parse_task_options("asr", {"decoder_mode": None}).decoder_mode is None
    assert parse_task_options("asr", {"decoder_mode": "lexicon"}).decoder_mode == "lexicon"
    for bad in ("closed", "", 1, True, ["free"]):
        with pytest.raises(OptionsError, match="'decoder_mode' must be one of free, lexicon"):
            parse_task_options("asr", {"decoder_mode": bad})
