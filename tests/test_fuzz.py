"""Fuzzing: generated messages of every shape, in every state, never raise.

The sans-I/O protocol core and the Vosk translator are driven with random
JSON (every type, huge and non-finite numbers, deep nesting, nulls), every
option with values of every type, and binary frames of every size; each
input must end in a request or a documented error code, never an exception.
Then a few hundred of the same against a live server over loopback: the
server answers each with a documented event and a fresh session still works.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsstream.options import AsrOptions, EndpointOptions, VqaOptions
from dsstream.protocol import (
    AudioChunk,
    End,
    Error,
    ErrorCode,
    Flush,
    ImageData,
    Question,
    ServerProtocol,
    StartSession,
)
from dsstream.vosk import CONFIG_KEYS, VoskError, VoskTranslator

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["pcm_s16le", "f32le", "asr", "vqa", "[unk]", "", "16000"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
OPTION_NAMES = sorted(
    {f for cls in (AsrOptions, VqaOptions, EndpointOptions) for f in cls.__dataclass_fields__}
    | {"phrase", "boost", "text", "id"}
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["start", "flush", "end", "question", "nope"]) | st.text(max_size=5)},
    optional={
        "task": st.sampled_from(["asr", "vqa"]) | values,
        **{name: values for name in OPTION_NAMES if name != "task"},
    },
)
texts = st.one_of(
    messages.map(json.dumps),
    values.map(json.dumps),
    st.text(max_size=60),
    st.integers(1, 3000).map(lambda n: "[" * n),
    st.just('{"type": "start", "task": "asr", "lm_weight": %s}' % ("9" * 5000)),
)
frames = st.one_of(texts, st.binary(max_size=64), st.integers(0, 5000).map(bytes))
REQUESTS = (StartSession, AudioChunk, ImageData, Question, Flush, End)


def drive_protocol(inputs: list[str | bytes], warm: bool) -> None:
    """Feed ``inputs`` to a fresh protocol core (inside a started session when
    ``warm``); every output must be a request or a coded error."""
    proto = ServerProtocol()
    if warm:  # the same inputs inside a started session
        [start] = proto.receive_text('{"type": "start", "task": "asr"}')
        proto.accept_start("s", {})
    for item in inputs:
        out = proto.receive_text(item) if isinstance(item, str) else proto.receive_binary(item)
        for event in out:
            assert isinstance(event, REQUESTS + (Error,)), event
            if isinstance(event, Error):
                assert isinstance(event.code, ErrorCode) and event.message
            if isinstance(event, StartSession):
                proto.accept_start("s", {})


@FUZZ
@given(st.lists(frames, max_size=8), st.booleans())
def test_the_protocol_core_answers_every_input_with_a_request_or_a_coded_error(inputs, warm):
    drive_protocol(inputs, warm)


vosk_configs = st.dictionaries(
    st.sampled_from(sorted(CONFIG_KEYS)) | st.text(max_size=6), values, max_size=4
)
vosk_texts = st.one_of(
    vosk_configs.map(lambda c: json.dumps({"config": c})),
    texts,
    st.just('{"eof" : 1}'),
)


def drive_vosk(messages_in: list[str], audio: bytes) -> None:
    """Feed a Vosk translator; it may raise only VoskError, with a message."""
    vosk = VoskTranslator()
    for message in messages_in:
        try:
            vosk.text(message)
        except VoskError as exc:
            assert str(exc)
    try:
        options = vosk.options()
    except VoskError:
        return
    try:
        chunk = vosk.audio(audio, options)
        assert chunk.samples.shape == (len(audio) // 2,)
    except VoskError:
        assert len(audio) % 2


@FUZZ
@given(st.lists(vosk_texts, max_size=5), st.binary(max_size=40))
def test_the_vosk_translator_raises_only_vosk_errors(messages_in, audio):
    drive_vosk(messages_in, audio)


def _junk(rng) -> str | bytes:
    """One seeded hostile message: JSON with known option names and values of
    every type, deep nesting, huge numbers, raw text or bytes."""
    pick = rng.random()
    pool = [None, True, -0.0, 10**400, float("nan"), "x", [], {}, [1, "a"], {"a": None}, 3, 1.5]
    if pick < 0.6:
        msg = {"type": rng.choice(["start", "flush", "end", "question", "x"])}
        msg["task"] = rng.choice(["asr", "vqa", None, 5])
        for name in rng.sample(OPTION_NAMES, rng.randint(0, 3)):
            msg[name] = rng.choice(pool)
        return json.dumps(msg)
    if pick < 0.7:
        return "[" * rng.randint(1, 3000)
    if pick < 0.85:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randint(0, 40)))


def test_a_live_server_answers_hostile_messages_with_documented_events():
    import asyncio
    import collections
    import random

    import pipelines
    from conftest import running_server
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from dsstream.protocol import parse_server_event

    async def run() -> None:
        rng = random.Random(30)
        async with running_server(pipelines.registry()) as server:
            sent, kinds = 0, collections.Counter()
            while sent < 300:
                async with connect(server.url) as ws:
                    try:
                        while sent < 300:
                            await ws.send(_junk(rng))
                            sent += 1
                            try:
                                reply = await asyncio.wait_for(ws.recv(), 0.05)
                            except TimeoutError:
                                continue  # e.g. audio in a session: no event yet
                            event = parse_server_event(reply)  # a documented event
                            kinds[event.type] += 1
                            if isinstance(event, Error):
                                assert isinstance(event.code, ErrorCode)
                    except ConnectionClosed as closed:
                        assert closed.rcvd is not None and closed.rcvd.code in (1000, 1008)
            assert kinds["error"] > 100 and kinds["started"] > 0, kinds  # it was exercised
            async with connect(server.url) as ws:  # the server still serves
                await ws.send('{"type": "start", "task": "asr"}')
                assert json.loads(await ws.recv())["type"] == "started"

    asyncio.run(run())
