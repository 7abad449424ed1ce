"""The Vosk-server-compatible endpoint: the translation core, and a client
written the way Vosk's own test client is (one reply per message) against the
sample model over loopback."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from conftest import running_server
from websockets.asyncio.client import connect

from dsstream.local import transcribe
from dsstream.pipelines.defaults import SAMPLES_DIR, default_registry
from dsstream.protocol import Final, Hypothesis, Partial, Word
from dsstream.vosk import VoskError, VoskTranslator

CLIPS = SAMPLES_DIR / "asr" / "clips"
REFS = dict(line.split("\t") for line in (CLIPS / "transcripts.tsv").read_text().splitlines())

# -- the translation core ----------------------------------------------------------


def test_config_becomes_options_and_bad_messages_say_why():
    vosk = VoskTranslator()
    assert vosk.text('{"config": {"sample_rate": 8000.0, "words": false, "max_alternatives": 3,'
                     ' "phrase_list": ["yes", "no", "[unk]"]}}') is None  # fmt: skip
    options = vosk.options()
    assert (options.sample_rate, options.encoding, options.word_timestamps) == (
        8000, "pcm_s16le", False)  # fmt: skip
    assert options.nbest == 3 and options.grammar == ("yes", "no", "[unk]")
    assert options.grammar_sequence and options.partial_interval_ms == 0
    assert vosk.text('{"eof" : 1}') == "eof"
    for bad, message in [
        ("not json", "JSON"),
        ("[1]", "objects"),
        ('{"hello": 1}', "unknown message"),
        ('{"config": {"sample_rate": "fast"}}', "numbers"),
        ('{"config": {"phrase_list": "yes"}}', "list of strings"),
    ]:
        with pytest.raises(VoskError, match=message):
            VoskTranslator().text(bad)
    vosk.started = True
    with pytest.raises(VoskError, match="before the audio"):
        vosk.text('{"config": {}}')
    with pytest.raises(VoskError, match="sample_rate"):
        VoskTranslator(sample_rate=4000).options()
    with pytest.raises(VoskError, match="whole number"):
        VoskTranslator().audio(b"\x00\x01\x02", VoskTranslator().options())


def test_any_message_is_a_config_an_eof_or_a_vosk_error():
    """Seeded junk: every text message either applies, ends, or raises VoskError
    (the reply ``{"error": ...}``), never anything else; so for audio bytes."""
    rng = np.random.default_rng(5)
    values = [None, True, 0, -3, 1e9, "8000", "x", [], ["a", 1], {}, {"a": 1}, 3.5]
    keys = ["sample_rate", "words", "max_alternatives", "phrase_list", "other"]
    for _ in range(300):
        vosk = VoskTranslator()
        config = {str(k): values[int(rng.integers(len(values)))] for k in
                  rng.choice(keys, int(rng.integers(0, 4)), replace=False)}  # fmt: skip
        for message in (json.dumps({"config": config}), json.dumps(values[int(rng.integers(12))]),
                        bytes(rng.integers(0, 256, int(rng.integers(0, 40)), np.uint8)).decode(
                            "latin-1")):  # fmt: skip
            try:
                vosk.text(message)
            except VoskError:
                pass
        try:
            options = vosk.options()
        except VoskError:
            continue
        data = bytes(rng.integers(0, 256, int(rng.integers(0, 9)), np.uint8))
        try:
            chunk = vosk.audio(data, options)
            assert chunk.samples.shape == (len(data) // 2,)
        except VoskError:
            assert len(data) % 2


def test_replies_repeat_the_partial_until_a_result():
    vosk = VoskTranslator()
    assert vosk.reply([]) == {"partial": ""}
    assert vosk.reply([Partial("hel", 0), Partial("hello", 0)]) == {"partial": "hello"}
    assert vosk.reply([]) == {"partial": "hello"}  # unchanged: said again
    words = (Word("hello", 0.5, 0.9, 0.75), Word("world", 1.0, 1.4, 0.5))
    result = vosk.reply([Final("hello world", 0, 0.0, 1.5, words), Final("", 1, 1.5, 2.0)])
    assert result == {
        "result": [
            {"conf": 0.75, "end": 0.9, "start": 0.5, "word": "hello"},
            {"conf": 0.5, "end": 1.4, "start": 1.0, "word": "world"},
        ],
        "text": "hello world",
    }
    assert vosk.reply([]) == {"partial": ""}  # a new utterance
    assert VoskTranslator(words=False).result([]) == {"text": ""}
    alts = VoskTranslator(alternatives=2).result(
        [
            Final(
                "a b",
                0,
                0,
                1,
                (),
                (Hypothesis("a b", -1.0), Hypothesis("a c", -2.0), Hypothesis("a d", -3.0)),
            )
        ]  # fmt: skip
    )
    assert alts == {"alternatives": [{"text": "a b", "confidence": -1.0},
                                     {"text": "a c", "confidence": -2.0}]}  # fmt: skip


# -- over loopback with the sample model ---------------------------------------------

pytestmark_model = pytest.mark.skipif(
    not (SAMPLES_DIR / "asr" / "model.ds").exists(), reason="no sample ASR model"
)


async def _vosk_client(url: str, audio: np.ndarray, rate: int, config: dict | None) -> list:
    """As Vosk's test client: config, then each chunk followed by reading its reply."""
    pcm = (np.clip(audio, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()
    replies = []
    async with connect(url) as ws:
        if config is not None:
            await ws.send(json.dumps({"config": config}))
        for i in range(0, len(pcm), 8000):
            await ws.send(pcm[i : i + 8000])
            replies.append(json.loads(await ws.recv()))
        await ws.send('{"eof" : 1}')
        replies.append(json.loads(await ws.recv()))
        await ws.wait_closed()  # the server closes after eof
    assert len(replies) == -(-len(pcm) // 8000) + 1  # one reply per message
    return replies


@pytestmark_model
def test_a_vosk_client_gets_the_pipelines_transcript_one_reply_per_message():
    registry = default_registry()
    audio, rate = sf.read(CLIPS / "heldout-espeak-david.flac", dtype="float32")
    tel = AF.resample(torch.from_numpy(audio), rate, 8000).numpy()
    tel = np.concatenate([tel, np.zeros(8000, np.float32)])
    # The samples a Vosk client sends (16-bit), so both paths decode the same audio.
    tel = (np.clip(tel, -1, 32767 / 32768) * 32768).astype("<i2").astype(np.float32) / 32768
    expected = transcribe(tel, 8000, registry=registry)

    async def main():
        async with running_server(registry) as server:
            url = server.http_url.replace("http", "ws") + "vosk"
            plain = await _vosk_client(url, tel, 8000, {"sample_rate": 8000})
            grammar = await _vosk_client(url, tel, 8000, {
                "sample_rate": 8000, "phrase_list": [REFS["heldout-espeak-david.flac"], "yes",
                                                     "[unk]"]})  # fmt: skip
            bad = []
            async with connect(url) as ws:
                await ws.send('{"config": {"sample_rate": 16000}}')
                await ws.send(b"\x00\x01\x02")  # not whole 16-bit samples
                bad.append(json.loads(await ws.recv()))
                await ws.send(np.zeros(1600, "<i2").tobytes())
                bad.append(json.loads(await ws.recv()))
            return plain, grammar, bad

    plain, grammar, bad = asyncio.run(main())
    results = [r for r in plain if "result" in r]
    assert " ".join(r["text"] for r in results if r["text"]) == expected.text
    words = [w for r in results for w in r["result"]]
    assert [w["word"] for w in words] == [w.word for w in expected.words]
    assert all({"partial"} == set(r) or {"result", "text"} == set(r) for r in plain)
    assert any(r.get("partial") for r in plain)  # partials while the audio comes
    texts = [r["text"] for r in grammar if "text" in r and r["text"]]
    assert texts == [REFS["heldout-espeak-david.flac"]]
    assert "whole number" in bad[0]["error"] and bad[1] == {"partial": ""}


@pytestmark_model
def test_a_shutdown_sends_a_vosk_client_its_last_result_then_closes():
    registry = default_registry()
    audio, rate = sf.read(CLIPS / "heldout-espeak-david.flac", dtype="float32")
    pcm = (audio * 32767).astype("<i2").tobytes()
    # Offline on the samples the server decodes from the 16-bit frames.
    heard = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
    expected = transcribe(heard, rate, registry=registry).text

    async def main():
        async with running_server(registry) as server:
            url = server.http_url.replace("http", "ws") + "vosk"
            async with connect(url) as ws:
                for i in range(0, len(pcm), 16000):
                    await ws.send(pcm[i : i + 16000])
                    await ws.recv()
                closing = asyncio.ensure_future(server.shutdown())
                last = json.loads(await ws.recv())
                await ws.wait_closed()
                await closing
                return last

    last = asyncio.run(main())
    assert last["text"] == expected  # the audio so far, finalized


@pytestmark_model
def test_an_idle_vosk_client_gets_its_last_result_and_is_closed():
    from dsstream.protocol import Limits

    async def main():
        async with running_server(default_registry(), Limits(idle_timeout_s=0.5)) as server:
            url = server.http_url.replace("http", "ws") + "vosk"
            async with connect(url) as ws:
                await ws.send(np.zeros(1600, "<i2").tobytes())
                first = json.loads(await ws.recv())
                last = json.loads(await asyncio.wait_for(ws.recv(), 10))  # nothing sent
                await asyncio.wait_for(ws.wait_closed(), 10)
                return first, last, server.active_sessions

    first, last, active = asyncio.run(main())
    assert first == {"partial": ""} and last == {"result": [], "text": ""} and active == 0


def test_bad_configs_are_refused_when_they_arrive_and_change_nothing():
    """Issue 30, defects 2-4: deep nesting, Infinity, out-of-range or unknown
    config values get an error reply at once (never an exception from the
    adapter), and the config before them stays."""
    vosk = VoskTranslator()
    assert vosk.text('{"config": {"sample_rate": "8000", "max_alternatives": 2}}') is None
    for bad, message in [
        ("[" * 2000, "nested too deeply"),
        ('{"config": {"sample_rate": Infinity}}', "whole number"),
        ('{"config": {"sample_rate": NaN}}', "whole number"),
        ('{"config": {"sample_rate": 1e400}}', "whole number"),
        ('{"config": {"sample_rate": -1}}', r"sample_rate must be in \[8000, 192000\]"),
        ('{"config": {"sample_rate": 2147483648}}', "sample_rate must be in"),
        ('{"config": {"sample_rate": 16000.5}}', "whole number"),
        ('{"config": {"sample_rate": true}}', "numbers"),
        ('{"config": {"max_alternatives": 1099511627776}}', r"max_alternatives must be in \[0"),
        ('{"config": {"words": 7}}', "words is true or false"),
        ('{"config": {"model": ""}}', "model is a model name"),
        ('{"config": {"sample_rate": 8000, "beam": 3}}', "unknown config key"),
        ('{"config": {"sample_rate": ' + "9" * 5000 + "}}", "malformed JSON"),
    ]:
        with pytest.raises(VoskError, match=message):
            vosk.text(bad)
    options = vosk.options()
    assert (options.sample_rate, options.nbest) == (8000, 2)
