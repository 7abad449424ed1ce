"""The WebSocket server and client over loopback, with the test pipelines."""

import asyncio
import json
import urllib.error
import urllib.request

import numpy as np
import pipelines
import pytest
import torch
import torchaudio
from conftest import async_test, png_bytes, running_server, tone
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from dsstream.client import BlockingClient, Client, ServerError
from dsstream.protocol import (
    Answer,
    AudioChunk,
    Ended,
    Endpoint,
    Error,
    ErrorCode,
    Final,
    Limits,
    Partial,
    Started,
)


async def _collect(client: Client) -> list:
    return [event async for event in client.events()]


def _of(events, kind):
    return [e for e in events if isinstance(e, kind)]


def _offline_count(samples: np.ndarray, rate: int) -> int:
    if rate == pipelines.MODEL_RATE:
        return len(samples)
    return torchaudio.functional.resample(torch.from_numpy(samples), rate, 16000).shape[-1]


# -- ASR sessions --------------------------------------------------------------


@async_test
async def test_asr_session_flush_and_end_semantics():
    audio = tone(1.0, 16000)
    async with running_server(pipelines.registry()) as server:
        async with Client(server.url) as client:
            started = await client.start("asr", sample_rate=16000)
            assert started.options["model"] == "counting"
            assert started.options["sample_rate"] == 16000
            assert started.limits["max_frame_bytes"] == Limits().max_frame_bytes
            await client.stream_audio(audio[:8000], 16000, chunk_ms=100)
            await client.flush()
            await client.stream_audio(iter(np.array_split(audio[8000:], 4)), 16000)
            await client.end()
            events = await _collect(client)
    finals = _of(events, Final)
    assert [f.text for f in finals] == ["8000", "8000"]
    assert [f.segment for f in finals] == [0, 1]
    assert (finals[0].start, finals[0].end, finals[1].end) == (0.0, 0.5, 1.0)
    assert len([p for p in _of(events, Partial) if p.segment == 1]) == 4
    assert [e.reason for e in _of(events, Endpoint)] == ["flush", "end"]
    # Partials of a segment come before its final, counting up.
    first = events.index(finals[0])
    partials0 = [int(p.text) for p in _of(events[:first], Partial)]
    assert partials0 == sorted(partials0) and partials0[-1] == 8000 and len(partials0) == 5
    assert isinstance(events[-1], Ended) and events[-1].reason == "client"
    assert events[-1].stats["audio_seconds"] == 1.0


@pytest.mark.parametrize(
    "rate, encoding, channels",
    [(44100, "pcm_s16le", 1), (8000, "f32le", 1), (48000, "f32le", 2), (22050, "pcm_s16le", 2)],
)
@async_test
async def test_asr_resamples_any_common_rate_exactly(rate, encoding, channels):
    audio = tone(0.73, rate, channels=channels)
    async with running_server(pipelines.registry()) as server:
        async with Client(server.url) as client:
            await client.start("asr", sample_rate=rate, encoding=encoding, channels=channels)
            for chunk in np.array_split(audio, 7):
                await client.send_audio(chunk.reshape(-1))  # interleaved when stereo
            await client.end()
            events = await _collect(client)
    mono = audio.mean(axis=1) if channels > 1 else audio
    (final,) = _of(events, Final)
    assert int(final.text) == _offline_count(mono.astype(np.float32), rate)


@async_test
async def test_twenty_four_concurrent_sessions_keep_their_own_ordered_events():
    async def one(url: str, n_chunks: int):
        async with Client(url) as client:
            await client.start("asr", sample_rate=16000)
            for _ in range(n_chunks):
                await client.send_audio(np.zeros(1600, np.float32))
                await asyncio.sleep(0)
            await client.flush()
            await client.send_audio(np.zeros(160 * n_chunks, np.float32))
            await client.end()
            return await _collect(client)

    async with running_server(pipelines.registry()) as server:
        sizes = list(range(1, 25))
        results = await asyncio.gather(*(one(server.url, n) for n in sizes))
        assert server.active_sessions == 0
    for n, events in zip(sizes, results):
        assert [f.text for f in _of(events, Final)] == [str(1600 * n), str(160 * n)]
        counts = [int(p.text) for p in _of(events, Partial) if p.segment == 0]
        assert counts == [1600 * (i + 1) for i in range(n)]
        assert isinstance(events[-1], Ended)


@async_test
async def test_slow_session_does_not_stall_the_others():
    slow_factory = pipelines.StaticFactory("asr", "slow", lambda: pipelines.CountingAsr(0.3))
    registry = pipelines.registry()
    registry.register(slow_factory)
    order: list[str] = []

    async def session(url, model, chunks, tag):
        async with Client(url) as client:
            await client.start("asr", model=model)
            for _ in range(chunks):
                await client.send_audio(np.zeros(160, np.float32))
            await client.end()
            await _collect(client)
            order.append(tag)

    async with running_server(registry) as server:
        slow = asyncio.create_task(session(server.url, "slow", 8, "slow"))
        await asyncio.sleep(0.2)  # the slow session is busy in its pipeline
        await asyncio.gather(*(session(server.url, "counting", 5, f"fast{i}") for i in range(5)))
        await slow
    assert order[-1] == "slow" and len(order) == 6


@async_test
async def test_backpressure_bounds_what_the_server_reads_ahead():
    seen: list[tuple[int, int]] = []
    server_ref = {}

    def on_step(pipe):
        frames = server_ref["s"].metrics.frames.labels("binary")._value.get()
        seen.append((int(frames), pipe.steps))

    registry = pipelines.registry(asr=lambda: pipelines.CountingAsr(0.02, on_step=on_step))
    async with running_server(registry, session_queue_frames=2) as server:
        server_ref["s"] = server
        async with Client(server.url) as client:
            await client.start("asr")
            for _ in range(40):
                await client.send_audio(np.zeros(1600, np.float32))
            await client.end()
            events = await _collect(client)
    assert _of(events, Final)[0].text == str(40 * 1600)
    # read ahead = frames read by the server minus frames the pipeline has begun:
    # a batch taken from the queue (at most 2), the refilled queue (2), and one
    # the reader holds while blocked on the full queue.  Unbounded, it was 38.
    assert max(read - done for read, done in seen) <= 2 * 2 + 1


# -- limits -----------------------------------------------------------------------


@async_test
async def test_oversized_frame_is_refused_and_the_session_goes_on():
    limits = Limits(max_frame_bytes=4000)
    async with running_server(pipelines.registry(), limits=limits) as server:
        async with Client(server.url) as client:
            await client.start("asr")
            await client.send_audio(np.zeros(2001, np.float32))  # 4002 bytes as pcm_s16le
            error = await client.recv(timeout=5)
            assert isinstance(error, Error) and error.code is ErrorCode.TOO_LARGE
            assert not error.fatal
            await client.send_audio(np.zeros(100, np.float32))
            await client.end()
            events = await _collect(client)
    assert _of(events, Final)[0].text == "100"


@async_test
async def test_frames_far_above_the_limit_close_the_connection_without_reading():
    limits = Limits(max_frame_bytes=1000, max_text_bytes=1000)
    async with running_server(pipelines.registry(), limits=limits) as server:
        async with connect(server.url, compression=None) as ws:
            await ws.send(json.dumps({"type": "start", "task": "asr"}))
            json.loads(await ws.recv())
            await ws.send(b"\0" * 10_000)
            with pytest.raises(Exception):
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1009
        async with Client(server.url) as client:  # the server goes on
            await client.start("asr")


@async_test
async def test_too_many_sessions_gives_busy_with_a_retry_hint():
    async with running_server(pipelines.registry(), max_sessions=2) as server:
        async with Client(server.url) as a, Client(server.url) as b, Client(server.url) as c:
            await a.start("asr")
            await b.start("asr")
            with pytest.raises(ServerError) as info:
                await c.start("asr")
            assert info.value.code is ErrorCode.BUSY
            assert info.value.event.fatal and info.value.event.retry_after_ms == 2000
            assert await c.recv(timeout=5) is None
            assert c.ws.close_code == 1013
            await a.end()
            await _collect(a)
        async with Client(server.url) as d:  # a slot is free again
            assert isinstance(await d.start("asr"), Started)


@async_test
async def test_idle_timeout_finalizes_then_reports_timeout():
    limits = Limits(idle_timeout_s=0.3)
    async with running_server(pipelines.registry(), limits=limits) as server:
        async with Client(server.url) as client:
            await client.start("asr")
            await client.send_audio(np.zeros(320, np.float32))
            events = await _collect(client)
        async with Client(server.url) as idle:  # never started
            error = await idle.recv(timeout=5)
    assert _of(events, Final)[0].text == "320"
    (timeout,) = _of(events, Error)
    assert timeout.code is ErrorCode.TIMEOUT and timeout.fatal
    assert events[-1].reason == "timeout"
    assert isinstance(error, Error) and error.code is ErrorCode.TIMEOUT


@async_test
async def test_max_session_duration_ends_the_session():
    limits = Limits(max_session_s=0.5, idle_timeout_s=10)
    async with running_server(pipelines.registry(), limits=limits) as server:
        async with Client(server.url) as client:
            await client.start("asr")

            async def keep_sending():
                for _ in range(40):
                    await client.send_audio(np.zeros(160, np.float32))
                    await asyncio.sleep(0.05)

            sender = asyncio.create_task(keep_sending())
            events = await _collect(client)
            sender.cancel()
    errors = _of(events, Error)
    assert errors[-1].code is ErrorCode.TIMEOUT and "maximum session duration" in errors[-1].message
    assert isinstance(events[-1], Ended) and events[-1].reason == "timeout"


@pytest.mark.parametrize("token", [None, "wrong"])
@async_test
async def test_wrong_or_missing_token_is_unauthorized(token):
    """Refused before the upgrade (HTTP 401 with WWW-Authenticate), which the
    client raises as the ``unauthorized`` error the body carries."""
    async with running_server(pipelines.registry(), token="s3cret") as server:
        with pytest.raises(ServerError) as refused:
            async with Client(server.url, token=token):
                pass
        assert refused.value.code is ErrorCode.UNAUTHORIZED and refused.value.event.fatal
        assert "token" in refused.value.event.message
        with pytest.raises(InvalidStatus) as raw:
            async with connect(server.url):
                pass
        assert raw.value.response.status_code == 401
        assert raw.value.response.headers["WWW-Authenticate"].startswith("Bearer")
        # An empty Bearer header is a wrong token, not a reason to read the query.
        with pytest.raises(InvalidStatus):
            async with connect(server.url + "?token=s3cret",
                               additional_headers={"Authorization": "Bearer "}):  # fmt: skip
                pass
        async with Client(server.url, token="s3cret") as client:
            assert isinstance(await client.start("asr"), Started)
        async with Client(server.url + "?token=s3cret") as client:  # browsers use the query
            assert isinstance(await client.start("asr"), Started)
        with pytest.raises(InvalidStatus):  # the Vosk endpoint too
            async with connect(server.url.replace("/v1/stream", "/vosk")):
                pass


@async_test
async def test_with_a_token_metrics_need_it_and_healthz_says_only_whether_it_is_up():
    async with running_server(pipelines.registry(), token="s3cret") as server:
        base = server.url.replace("ws://", "http://").replace("/v1/stream", "")

        def get(path, token=None):
            request = urllib.request.Request(base + path)
            if token:
                request.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        status, body = await asyncio.to_thread(get, "/metrics")
        assert status == 401 and "token" in json.loads(body)["message"]
        status, body = await asyncio.to_thread(get, "/metrics", "s3cret")
        assert status == 200 and "dsstream_connections_total" in body
        assert json.loads((await asyncio.to_thread(get, "/healthz"))[1]) == {"status": "ok"}
        full = json.loads((await asyncio.to_thread(get, "/healthz", "s3cret"))[1])
        assert full["status"] == "ok" and "models" in full and "limits" in full
    async with running_server(pipelines.registry(), token="s3cret", metrics_public=True) as s:
        url = s.url.replace("ws://", "http://").replace("/v1/stream", "/metrics")
        with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as response:
            assert response.status == 200


@async_test
async def test_origins_default_to_the_servers_own_and_loopback():
    """A page elsewhere may not drive the server; the demo page (its own
    origin, by whatever host name) and loopback pages may; --origin adds."""
    async with running_server(pipelines.registry()) as server:
        port = server.port
        for allowed in (f"http://127.0.0.1:{port}", "http://localhost:3000", "HTTP://LOCALHOST",
                        None):  # fmt: skip
            async with connect(server.url, origin=allowed) as ws:
                await ws.send(json.dumps({"type": "start", "task": "vqa"}))
                assert json.loads(await ws.recv())["type"] == "started"
        for refused in ("http://evil.example", "null", "http://127.0.0.1.evil.example"):
            with pytest.raises(InvalidStatus) as err:
                async with connect(server.url, origin=refused):
                    pass
            body = json.loads(err.value.response.body)
            assert err.value.response.status_code == 403
            assert body["code"] == "unauthorized" and "origin" in body["message"]
    async with running_server(pipelines.registry(), allowed_origins=("https://App.Example",)) as s:
        async with connect(s.url, origin="https://app.example:443") as ws:
            await ws.send(json.dumps({"type": "start", "task": "vqa"}))
            assert json.loads(await ws.recv())["type"] == "started"
        with pytest.raises(InvalidStatus) as raw:
            async with connect(s.url, origin="http://evil.example"):
                pass
        assert raw.value.response.status_code == 403
    async with running_server(pipelines.registry(), allowed_origins=("*",)) as s:
        async with connect(s.url, origin="http://evil.example") as ws:
            await ws.send(json.dumps({"type": "start", "task": "vqa"}))
            assert json.loads(await ws.recv())["type"] == "started"


# -- bad input -----------------------------------------------------------------------

BAD_INPUTS = [
    ("asr", "{oops", ErrorCode.BAD_MESSAGE),
    ("asr", json.dumps({"type": "dance"}), ErrorCode.BAD_MESSAGE),
    ("asr", b"\x01\x02\x03", ErrorCode.BAD_AUDIO),
    ("asr", json.dumps({"type": "question", "text": "hi"}), ErrorCode.BAD_MESSAGE),
    ("vqa", b"this is not an image", ErrorCode.BAD_IMAGE),
    ("vqa", png_bytes()[:40], ErrorCode.BAD_IMAGE),
    ("vqa", b"\xff\xd8\xff\xe0garbage-jpeg", ErrorCode.BAD_IMAGE),
    ("vqa", json.dumps({"type": "question", "id": 1, "text": " "}), ErrorCode.BAD_MESSAGE),
]


@pytest.mark.parametrize("task, payload, code", BAD_INPUTS)
@async_test
async def test_bad_input_gets_its_code_and_the_session_goes_on(task, payload, code):
    async with running_server(pipelines.registry()) as server:
        async with Client(server.url) as other, Client(server.url) as client:
            await other.start("asr")
            await client.start(task)
            await client.ws.send(payload)
            error = await client.recv(timeout=5)
            assert isinstance(error, Error) and error.code is code and not error.fatal
            if task == "asr":
                await client.send_audio(np.zeros(1600, np.float32))
                assert isinstance(await client.recv(timeout=5), Partial)
            else:
                await client.send_image(png_bytes(10, 20))
                assert (await client.ask("size?")).text == "10x20 size?"
            await other.send_audio(np.zeros(160, np.float32))
            await other.end()
            assert _of(await _collect(other), Final)[0].text == "160"


@async_test
async def test_binary_before_start_and_bad_sample_rate():
    async with running_server(pipelines.registry()) as server:
        async with Client(server.url) as client:
            await client.ws.send(b"\0\0")
            error = await client.recv(timeout=5)
            assert error.code is ErrorCode.BAD_MESSAGE and "before" in error.message
            with pytest.raises(ServerError) as info:
                await client.start("asr", sample_rate=1000)
            assert info.value.code is ErrorCode.UNSUPPORTED
            # A rate the options accept but the resampler refuses (huge reduced ratio).
            with pytest.raises(ServerError) as info:
                await client.start("asr", sample_rate=8001)
            assert info.value.code is ErrorCode.UNSUPPORTED and "common rate" in str(info.value)
            assert isinstance(await client.start("asr", sample_rate=8000), Started)


@async_test
async def test_pipeline_crash_is_internal_and_the_server_goes_on():
    registry = pipelines.registry(asr=lambda: pipelines.CountingAsr(crash_at=3))
    async with running_server(registry) as server:
        async with Client(server.url) as client:
            await client.start("asr")
            for _ in range(5):
                await client.send_audio(np.zeros(160, np.float32))
            events = await _collect(client)
            assert client.ws.close_code == 1011
        assert server.registry.resolve("asr").created[0].ended  # resources released
        async with Client(server.url) as client:
            await client.start("vqa")
            await client.send_image(png_bytes())
            assert (await client.ask("ok?")).text.startswith("32x24")
            await client.end()
            await _collect(client)
        assert server.active_sessions == 0
    errors = _of(events, Error)
    fatal = [e for e in errors if e.fatal]
    assert [e.code for e in fatal] == [ErrorCode.INTERNAL]
    # Frames already in flight when the session died are refused, not processed.
    for late in errors[errors.index(fatal[0]) + 1 :]:
        assert late.code is ErrorCode.BAD_MESSAGE and late.message == "session is closed"
    assert [p.text for p in _of(events, Partial)] == ["160", "320"]


@async_test
async def test_missing_model_is_named_in_the_error(tmp_path):
    from dsstream.pipelines import default_registry

    async with running_server(default_registry(tmp_path)) as server:
        async with Client(server.url) as client:
            with pytest.raises(ServerError) as info:
                await client.start("asr")
    assert info.value.code is ErrorCode.MODEL_UNAVAILABLE
    assert str(tmp_path / "asr" / "model.ds") in info.value.event.message
    assert "apps/asr" in info.value.event.message


# -- VQA ------------------------------------------------------------------------------


@async_test
async def test_vqa_questions_about_the_latest_image():
    async with running_server(pipelines.registry()) as server:
        async with Client(server.url) as client:
            await client.start("vqa")
            with pytest.raises(ServerError) as info:
                await client.ask("anything?")
            assert info.value.code is ErrorCode.NO_IMAGE
            await client.send_image(png_bytes(30, 20))
            answer = await client.ask("what size?")
            assert isinstance(answer, Answer) and answer.text == "30x20 what size?"
            await client.send_image(png_bytes(7, 9, "WEBP"))
            assert (await client.ask("now?", qid="x9")).id == "x9"
            await client.send_image(png_bytes(5, 6, "JPEG"))
            assert (await client.ask("jpeg?")).text == "5x6 jpeg?"
            await client.end()
            events = await _collect(client)
    assert events[-1].stats["images"] == 3 and events[-1].stats["questions"] == 4


@async_test
async def test_decompression_bomb_is_bad_image():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")  # ~50 KB on the wire, 400 Mpx decoded
    async with running_server(pipelines.registry()) as server:
        async with Client(server.url) as client:
            await client.start("vqa")
            await client.send_image(buf.getvalue())
            error = await client.recv(timeout=10)
    assert error.code is ErrorCode.BAD_IMAGE and "exceeds" in error.message


# -- shutdown, HTTP ---------------------------------------------------------------------


@async_test
async def test_graceful_shutdown_finishes_open_sessions():
    server_cm = running_server(pipelines.registry())
    server = await server_cm.__aenter__()
    clients = [await Client(server.url).connect() for _ in range(3)]
    for i, client in enumerate(clients):
        await client.start("asr")
        await client.send_audio(np.zeros(1000 * (i + 1), np.float32))
        assert isinstance(await client.recv(timeout=5), Partial)
    await server.shutdown()
    for i, client in enumerate(clients):
        events = await _collect(client)
        assert _of(events, Final)[0].text == str(1000 * (i + 1))
        assert events[-1].reason == "shutdown"
        assert client.ws.close_code == 1001
    await server_cm.__aexit__(None, None, None)


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read()


@async_test
async def test_healthz_and_metrics():
    async with running_server(pipelines.registry()) as server:
        async with Client(server.url) as client:
            await client.start("asr")
            await client.ws.send("{bad")
            await client.send_audio(np.zeros(160, np.float32))
            await client.end()
            await _collect(client)
        loop = asyncio.get_running_loop()
        status, ctype, body = await loop.run_in_executor(None, _get, server.http_url + "healthz")
        health = json.loads(body)
        _, mtype, metrics = await loop.run_in_executor(None, _get, server.http_url + "metrics")
    assert status == 200 and ctype == "application/json"
    assert health["status"] == "ok" and health["models"]["asr"] == {"counting": "ok"}
    text = metrics.decode()
    assert mtype.startswith("text/plain")
    assert 'dsstream_sessions_total{task="asr"} 1.0' in text
    assert 'dsstream_errors_total{code="bad_message"} 1.0' in text
    assert 'dsstream_events_sent_total{type="final"} 1.0' in text
    assert 'dsstream_step_seconds_count{task="asr"} 1.0' in text
    assert 'dsstream_sessions_active{task="asr"} 0.0' in text


def test_blocking_client_transcribes_from_a_thread():
    from conftest import server_thread

    with server_thread(pipelines.registry()) as url:
        with BlockingClient(url) as client:
            events = list(client.transcribe((tone(0.5, 8000), 8000), chunk_ms=50))
        with BlockingClient(url) as client:
            client.start("vqa")
            client.send_image(png_bytes(3, 4))
            assert client.ask("size?").text == "3x4 size?"
    assert _of(events, Final)[0].text == "8000"
    assert len(_of(events, Partial)) == 10


def test_a_reloaded_registry_copies_model_factories_and_what_refers_to_them(tmp_path):
    """PipelineRegistry.reloaded: artifact factories copied unloaded (a VQA
    model's ASR for spoken questions pointing at the ASR copy), others shared;
    close(keep=...) releases only what the registry kept does not share."""
    from dsstream.pipelines.base import ArtifactPipelineFactory, PipelineRegistry

    asr = ArtifactPipelineFactory("asr", "a", {"model": tmp_path / "a.ds"}, "m:load")
    vqa = ArtifactPipelineFactory("vqa", "v", {"image": tmp_path / "i.ds"}, "m:load",
                                  extra={"asr": asr, "engine_threads": 2})  # fmt: skip
    shared = pipelines.StaticFactory("asr", "counting", pipelines.CountingAsr)
    old = PipelineRegistry([asr, shared, vqa])
    asr._make = vqa._make = lambda: None  # as if loaded
    new = old.reloaded()
    asr2, shared2, vqa2 = new.factories()
    assert asr2 is not asr and vqa2 is not vqa and shared2 is shared
    assert (asr2.files, vqa2.files) == (asr.files, vqa.files)
    assert asr2._make is None and vqa2._make is None  # loaded again, from the files
    assert vqa2.extra == {"asr": asr2, "engine_threads": 2} and vqa.extra["asr"] is asr
    assert new.tasks == old.tasks and new.resolve("asr", "counting") is shared
    old.close(keep=new)
    assert asr._make is None and vqa._make is None


def test_typed_factories_reload_with_their_declared_asr(tmp_path):
    """The built-in factories hold typed configs; a reloaded VQA factory's ASR
    (for spoken questions) is the reloaded registry's ASR copy."""
    from dsstream.pipelines import AsrConfig, AsrFactory, PipelineRegistry, VqaConfig, VqaFactory

    asr = AsrFactory("a", tmp_path / "a.ds", None, AsrConfig(beam_width=8))
    vqa = VqaFactory("v", tmp_path / "i.ds", tmp_path / "f.ds", VqaConfig(max_batch=4), asr=asr)
    assert (asr.task, vqa.task) == ("asr", "vqa")
    assert "a.ds" in asr.unavailable_reason() and "i.ds" in vqa.unavailable_reason()
    asr2, vqa2 = PipelineRegistry([asr, vqa]).reloaded().factories()
    assert asr2 is not asr and vqa2.asr is asr2 and vqa.asr is asr
    assert asr2.config.beam_width == 8 and vqa2.config.max_batch == 4
    with pytest.raises(ValueError, match="beam_width"):
        AsrConfig(beam_width=0)


@async_test
async def test_hostile_starts_are_answered_and_a_client_that_never_answers_close_is_dropped():
    """Issue 30, defects 1 and 5 over a live socket: a 400-digit lm_weight is a
    bad_message (the handler used to die and close 1000 without a word), and
    a client that keeps sending after ``end`` without answering the close
    frame is dropped after ``close_timeout_s``, not websockets' 10 s."""
    import time

    async with running_server(pipelines.registry(), close_timeout_s=0.5) as server:
        async with connect(server.url) as ws:
            await ws.send('{"type": "start", "task": "asr", "lm_weight": %s}' % ("9" * 400))
            error = json.loads(await ws.recv())
            assert (error["type"], error["code"], error["fatal"]) == ("error", "bad_message", False)
            await ws.send('{"type": "start", "task": "asr"}')
            assert json.loads(await ws.recv())["type"] == "started"
            await ws.send('{"type": "end"}')
            ws.transport.pause_reading()  # never reads the close frame, so never answers it
            t0 = time.monotonic()
            with pytest.raises(Exception):
                for _ in range(2000):
                    await ws.send(b"\0" * 3200)
                    await asyncio.sleep(0.005)
            assert time.monotonic() - t0 < 5.0  # 0.5 s plus scheduling; 10 s before the fix
        assert server.active_sessions == 0


class _SegmentingAsr(pipelines.CountingAsr):
    """CountingAsr with an endpoint every half second of audio."""

    def step(self, frame):
        events = super().step(frame)
        if isinstance(frame, AudioChunk) and self.count >= 8000:
            events += self._final("max_length")
        return events


@async_test
async def test_a_resumable_transcription_survives_a_dropped_connection():
    """A worker killed mid-stream drops the socket without a close frame; the
    client connects again and sends the audio from the end of the last final,
    so the finals count every sample exactly once, in one run of segments."""
    from dsstream.client import Reconnect, transcribe_resumable

    loop = asyncio.get_running_loop()
    audio = tone(3.0, 16000)
    steps = {"n": 0}

    def kill_at_twelve(pipeline):
        steps["n"] += 1
        if steps["n"] == 12:  # the first session's 12th frame: 2 finals done, 2 frames pending
            for runner in list(server.runners):
                loop.call_soon_threadsafe(runner.ws.transport.abort)

    def make():
        return _SegmentingAsr(delay_s=0.01, on_step=kill_at_twelve)

    async with running_server(pipelines.registry(asr=make)) as server:
        events = [e async for e in transcribe_resumable(
            server.url, (audio, 16000), reconnect=Reconnect(attempts=2, delay_s=0.05))]  # fmt: skip
    finals = _of(events, Final)
    assert sum(int(f.text) for f in finals) == len(audio)  # nothing lost, nothing twice
    assert [f.segment for f in finals] == list(range(len(finals)))
    assert finals[1].end == 1.0 and finals[2].start == 1.0 and finals[-1].end == 3.0
    assert all(a.end == b.start for a, b in zip(finals, finals[1:]))
    assert len(_of(events, Ended)) == 1 and events[-1].reason == "client"
    assert len(server.registry.resolve("asr").created) == 2  # a second session resumed
