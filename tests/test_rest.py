"""POST /v1/audio/transcriptions on the streaming server's port, driven by the
official ``openai`` package (its base_url at the test server on 127.0.0.1):
each response format, the formats users upload, and bad requests answered
with OpenAI-shaped errors and statuses."""

from __future__ import annotations

import contextlib
import io
import json
import re
import urllib.request

import numpy as np
import pytest
import soundfile as sf
from conftest import server_thread
from test_asr_e2e import CLIPS, REFS

from dsstream.captions import to_srt
from dsstream.local import transcribe
from dsstream.pipelines.defaults import default_registry

openai = pytest.importorskip("openai")
LJ = CLIPS / "LJ001-0011.flac"


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture(scope="module")
def base(registry):
    with server_thread(registry) as url:
        yield url.replace("ws://", "http://").rsplit("/v1/", 1)[0]


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    return transcribe(LJ, punctuate=True)  # uploads are punctuated unless asked not to


def test_json_and_text(client, reference):
    with open(LJ, "rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert result.text == reference.text
    with open(LJ, "rb") as f:
        text = client.audio.transcriptions.create(model="sample-asr", file=f,
                                                  response_format="text")  # fmt: skip
    assert text.strip() == reference.text


def test_verbose_json_with_words_and_segments(client, reference):
    with open(LJ, "rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json",
            timestamp_granularities=["word", "segment"], temperature=0.4,
        )  # fmt: skip
    assert result.text == reference.text and result.language == "english"
    assert [w.word for w in result.words] == [w.word for w in reference.words]
    assert result.duration == pytest.approx(sf.info(LJ).duration, abs=1e-3)
    assert " ".join(s.text for s in result.segments) == reference.text


def test_subtitles(client, reference):
    with open(LJ, "rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-1", file=f,
                                                 response_format="srt")  # fmt: skip
    assert srt == to_srt(reference.segments)
    with open(LJ, "rb") as f:
        vtt = client.audio.transcriptions.create(model="whisper-1", file=f,
                                                 response_format="vtt")  # fmt: skip
    assert vtt.startswith("WEBVTT")


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_formats_rates_and_stereo(client, fmt):
    audio, rate = sf.read(LJ, dtype="float32")
    stereo = np.stack([audio, audio], axis=1)
    buf = io.BytesIO()
    subtype = {"OGG": "OPUS", "MP3": "MPEG_LAYER_III"}.get(fmt)
    out_rate = 48000 if fmt == "OGG" else 44100  # any rate: resampled by the server
    resampled = np.interp(np.arange(0, len(audio), rate / out_rate),
                          np.arange(len(audio)), audio).astype(np.float32)  # fmt: skip
    sf.write(buf, np.stack([resampled, resampled], axis=1) if fmt != "WAV" else stereo,
             out_rate if fmt != "WAV" else rate, format=fmt, subtype=subtype)  # fmt: skip
    buf.seek(0)
    result = client.audio.transcriptions.create(model="whisper-1",
                                                file=(f"clip.{fmt.lower()}", buf))  # fmt: skip
    assert len(_words(result.text) & set(transcribe(LJ).text.split())) >= 8, result.text


def test_prompt_words_become_hotwords(client):
    """The words of the clip the model misses, given as the prompt, come out."""
    with open(LJ, "rb") as f:
        plain = client.audio.transcriptions.create(model="whisper-1", file=f).text
    missed = [w for w in REFS[LJ.name].split() if w not in _words(plain)]
    if not missed:
        pytest.skip("the model already gets every word of the clip")
    with open(LJ, "rb") as f:
        prompted = client.audio.transcriptions.create(
            model="whisper-1", file=f, prompt=" ".join(["importance", *missed])
        ).text  # fmt: skip
    assert set(missed) & _words(prompted), (plain, prompted)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_punctuation_is_on_for_uploads_unless_the_form_says_false(client, reference):
    raw = transcribe(LJ)
    assert reference.text != raw.text and reference.text[0].isupper()
    assert re.sub(r"[^a-z' ]", "", reference.text.lower()) == raw.text
    with open(LJ, "rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f,
                                                    extra_body={"punctuate": "false"})  # fmt: skip
    assert result.text == raw.text


def _error(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.body


def test_bad_requests_get_openai_errors(client, tmp_path):
    def create(**kw):
        kw.setdefault("model", "whisper-1")
        kw.setdefault("file", ("clip.flac", LJ.read_bytes()))
        return client.audio.transcriptions.create(**kw)

    status, body = _error(lambda: create(model="no-such-model"))
    assert status == 404 and body["code"] == "model_not_found"
    status, body = _error(lambda: create(response_format="xml"))
    assert status == 400 and body["param"] == "response_format"
    status, body = _error(lambda: create(file=("notes.wav", b"RIFF no audio here")))
    assert status == 400 and body["code"] == "invalid_file_format"
    status, body = _error(lambda: create(language="fr"))
    assert status == 400 and body["param"] == "language"
    status, body = _error(lambda: create(extra_body={"punctuate": "maybe"}))
    assert status == 400 and body["param"] == "punctuate"


def test_limits_auth_busy_and_models(registry, tmp_path):
    with server_thread(registry, token="s3cret", max_upload_bytes=100_000,
                       max_sessions=1) as url:  # fmt: skip
        base = url.replace("ws://", "http://").rsplit("/v1/", 1)[0]
        anonymous = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        status, _ = _error(lambda: anonymous.audio.transcriptions.create(
            model="whisper-1", file=("clip.flac", LJ.read_bytes())))  # fmt: skip
        assert status == 401
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        big = ("big.wav", b"RIFF" + bytes(200_000))
        status, body = _error(lambda: client.audio.transcriptions.create(model="whisper-1",
                                                                         file=big))  # fmt: skip
        assert status == 413 and body["code"] == "file_too_large"
        assert [m.id for m in client.models.list().data] == ["sample-asr"]
        # The one session slot held by a WebSocket session: the upload is refused, 429.
        from websockets.sync.client import connect

        with connect(url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            ws.send(json.dumps({"type": "start", "task": "asr", "sample_rate": 16000}))
            assert json.loads(ws.recv())["type"] == "started"
            request = urllib.request.Request(
                f"{base}/v1/audio/transcriptions", method="POST",
                data=b"--x\r\n", headers={"Authorization": "Bearer s3cret",
                                            "Content-Type": "multipart/form-data; boundary=x"},
            )  # fmt: skip
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=30)
            assert caught.value.code == 429 and caught.value.headers["Retry-After"] == "2"
            with contextlib.suppress(Exception):
                ws.send(json.dumps({"type": "end"}))


def test_a_client_gone_mid_transcription_keeps_its_slot_until_the_work_ends(registry):
    """The pool cannot stop a transcription half-way: its session slot stays
    taken until it ends, so admission still counts the work being done."""
    import socket
    import time

    audio, rate = sf.read(LJ, dtype="float32")
    long = io.BytesIO()
    sf.write(long, np.tile(audio, 40), rate, format="FLAC")  # 3 minutes: seconds of work
    part = b'Content-Disposition: form-data; name="file"; filename="a.flac"\r\n'
    body = (b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            b"--x\r\n" + part + b"Content-Type: audio/flac\r\n\r\n" + long.getvalue()
            + b"\r\n--x--\r\n")  # fmt: skip
    with server_thread(registry, max_sessions=1) as url:
        host, port = url.removeprefix("ws://").split("/", 1)[0].rsplit(":", 1)
        head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        with socket.create_connection((host, int(port))) as s:
            s.sendall(head.encode() + body)
            time.sleep(0.3)  # received whole: the transcription is running
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="x", max_retries=0)
        short = ("clip.flac", LJ.read_bytes())
        with pytest.raises(openai.RateLimitError):  # gone, but its work still holds the slot
            client.audio.transcriptions.create(model="whisper-1", file=short)
        deadline = time.monotonic() + 120
        while True:  # then free again
            try:
                client.audio.transcriptions.create(model="whisper-1", file=short)
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the slot was never freed"
                time.sleep(0.2)
