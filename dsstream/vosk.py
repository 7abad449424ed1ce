"""Vosk-server-compatible WebSocket endpoint (``/vosk``): clients written for
Vosk's WebSocket server work against dsstream unchanged.

Vosk's protocol, as its server speaks it: an optional text message
``{"config": {"sample_rate": 8000, "words": true, "max_alternatives": 0,
"phrase_list": [...]}}`` (no reply), then binary 16-bit PCM mono audio, then
``{"eof" : 1}``.  Every audio message gets exactly one reply: ``{"partial":
"..."}``, or ``{"result": [{"conf", "end", "start", "word"}...], "text":
"..."}`` when an utterance ended in it (``{"alternatives": [{"text",
"confidence"}...]}`` with ``max_alternatives``); ``eof`` gets the last
utterance's result and the server closes the connection.  Clients send the
next message after reading the reply, or stream and read concurrently;
either way replies pair with messages one to one.

:class:`VoskTranslator` is the protocol core (no I/O): Vosk messages to
dsstream options and frames, dsstream events to Vosk replies.
:func:`serve_vosk` is the thin asyncio adapter the server runs.  A
``phrase_list`` becomes a grammar (``grammar_sequence``: any sequence of the
phrases, ``"[unk]"`` as in Vosk); the ASR pipeline is the same as on
``/v1/stream``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsstream.host import Lease, SessionHost
from dsstream.options import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AsrOptions,
    OptionsError,
    parse_task_options,
)
from dsstream.pipelines.base import ModelUnavailable, Pipeline, PipelineError
from dsstream.protocol import (
    AudioChunk,
    Final,
    Partial,
    ProtocolError,
    ServerEvent,
    decode_audio,
    load_json_object,
)

if TYPE_CHECKING:
    from dsstream.host import Connection


__all__ = ["VoskTranslator", "VoskError", "serve_vosk", "DEFAULT_SAMPLE_RATE"]

log = logging.getLogger("dsstream.vosk")

DEFAULT_SAMPLE_RATE = 16000  # Vosk's server defaults to its model's; ours is 16 kHz
EOF = "eof"
# The config keys Vosk's server reads; anything else is refused, not ignored.
CONFIG_KEYS = frozenset({"sample_rate", "words", "max_alternatives", "phrase_list", "model"})


class VoskError(ValueError):
    """A message the Vosk protocol does not allow; the reply is ``{"error": ...}``."""


@dataclass
class VoskTranslator:
    """One connection's protocol state: the options its config set, the last
    partial (Vosk repeats it until the utterance ends)."""

    sample_rate: int = DEFAULT_SAMPLE_RATE
    words: bool = True
    alternatives: int = 0
    phrase_list: tuple[str, ...] = ()
    model: str | None = None  # a model name; None: the server's default
    last_partial: str = ""
    started: bool = False  # audio came: the config is fixed

    def text(self, message: str) -> str | None:
        """A text message: ``"eof"``, or None for a config (applied here)."""
        try:
            obj = load_json_object(message)  # the one safe parse both endpoints use
        except ProtocolError as exc:
            raise VoskError(
                f'{exc.message}; text messages are JSON objects: a config or {{"eof" : 1}}'
            ) from None
        if "eof" in obj:
            return EOF
        if "config" in obj:
            self._config(obj["config"])
            return None
        raise VoskError(f"unknown message with keys {sorted(obj)}: expected config or eof")

    def _config(self, config: Any) -> None:
        """Apply a config, checked at once: a bad one is answered now (and
        changes nothing), not at the next audio message."""
        if self.started:
            raise VoskError("config must come before the audio")
        if not isinstance(config, dict):
            raise VoskError("config is an object")
        unknown = sorted(set(config) - CONFIG_KEYS)
        if unknown:
            raise VoskError(f"unknown config key(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(CONFIG_KEYS))}")  # fmt: skip
        rate = _config_number(config, "sample_rate", self.sample_rate, MIN_SAMPLE_RATE,
                              MAX_SAMPLE_RATE)  # fmt: skip
        alternatives = _config_number(config, "max_alternatives", self.alternatives, 0, 10)
        words = config.get("words", self.words)
        if not isinstance(words, (bool, int)) or isinstance(words, int) and words not in (0, 1):
            raise VoskError("words is true or false")
        phrases = config.get("phrase_list", list(self.phrase_list))
        if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
            raise VoskError("phrase_list is a list of strings")
        model = config.get("model", self.model)
        if model is not None and (not isinstance(model, str) or not model):
            raise VoskError("model is a model name")
        self.sample_rate, self.alternatives, self.words = rate, alternatives, bool(words)
        self.phrase_list, self.model = tuple(phrases), model

    def options(self) -> AsrOptions:
        """The dsstream ASR options the config asks for."""
        raw: dict[str, Any] = {
            "sample_rate": self.sample_rate,
            "encoding": "pcm_s16le",
            "partials": True,
            "partial_interval_ms": 0,  # every reply carries the newest partial
            "word_timestamps": self.words,
            "nbest": max(self.alternatives, 1),
            "model": self.model,
        }
        if self.phrase_list:
            raw |= {"grammar": list(self.phrase_list), "grammar_sequence": True}
        try:
            options = parse_task_options("asr", raw)
        except OptionsError as exc:
            raise VoskError(str(exc)) from None
        assert isinstance(options, AsrOptions)
        return options

    def audio(self, data: bytes, options: AsrOptions) -> AudioChunk:
        try:
            return AudioChunk(decode_audio(data, options), options.sample_rate)
        except ProtocolError as exc:
            raise VoskError(str(exc)) from None

    def reply(self, events: list[ServerEvent]) -> dict[str, Any]:
        """The one reply to an audio message: a result if an utterance ended in
        it (several are joined), else the newest partial."""
        finals = [e for e in events if isinstance(e, Final)]
        if finals:
            self.last_partial = ""
            return self.result(finals)
        for event in events:
            if isinstance(event, Partial):
                self.last_partial = event.text
        return {"partial": self.last_partial}

    def result(self, finals: list[Final]) -> dict[str, Any]:
        """Vosk's result of the utterances ``finals`` (empty text for none)."""
        text = " ".join(f.text for f in finals if f.text)
        if self.alternatives > 0:
            if len(finals) == 1 and finals[0].nbest:
                alts = [{"text": h.text, "confidence": h.score} for h in finals[0].nbest]
            else:
                alts = [{"text": text, "confidence": 0.0}]
            return {"alternatives": alts[: self.alternatives]}
        out: dict[str, Any] = {}
        if self.words:
            out["result"] = [
                {"conf": w.confidence, "end": w.end, "start": w.start, "word": w.word}
                for f in finals
                for w in f.words
            ]
        out["text"] = text
        return out


async def serve_vosk(host: SessionHost, ws: Connection) -> None:
    """Run one Vosk-protocol connection to its end (the host's admission,
    models and pipeline threads; one reply per message)."""
    loop, call = asyncio.get_running_loop(), host.run
    lease = host.admit("asr")
    if lease is None:
        await ws.send(json.dumps({"error": "the server is at its session limit; retry later"}))
        return
    vosk = VoskTranslator()
    pipeline: Pipeline | None = None
    limits, deadline = host.limits, loop.time() + host.limits.max_session_s
    try:
        while True:
            wait = min(limits.idle_timeout_s, deadline - loop.time())
            message = await _next_message(ws, host.stopping, max(wait, 0.0))
            if message is None:  # shutdown, idle or too long: the last result, then close
                message = '{"eof" : 1}'
            if isinstance(message, str):
                try:
                    if vosk.text(message) != EOF:
                        continue  # a config: no reply, as Vosk's server
                except VoskError as exc:
                    await ws.send(json.dumps({"error": str(exc)}))
                    continue
                events = await call(pipeline.end) if pipeline is not None else []
                pipeline = None
                finals = [e for e in events if isinstance(e, Final)]
                await ws.send(json.dumps(vosk.result(finals)))
                break
            host.metrics.binary_frames.inc()
            host.metrics.binary_bytes.inc(len(message))
            if pipeline is None:
                try:
                    options = vosk.options()
                    pipeline = await call(_recognizer, lease, options)
                except (VoskError, PipelineError, ModelUnavailable) as exc:
                    await ws.send(json.dumps({"error": _message(exc)}))
                    break  # no recognizer: nothing can be answered
                host.metrics.sessions.labels("asr").inc()
                vosk.started = True
            try:
                events = await call(pipeline.step, vosk.audio(message, options))
                reply = vosk.reply(events)
            except (VoskError, PipelineError) as exc:  # a bad frame: the session goes on
                reply = {"error": _message(exc)}
            except Exception:
                log.exception("vosk session: the pipeline failed")
                await ws.send(json.dumps({"error": "internal error while processing audio"}))
                break
            await ws.send(json.dumps(reply))
    except _Closed:
        pass  # the client went away: its pipeline is released below
    finally:
        if pipeline is not None:
            try:
                await call(pipeline.end)
            except Exception:
                log.exception("ending a vosk session failed")
        lease.release()


class _Closed(Exception):
    pass


async def _next_message(
    ws: Connection, stopping: asyncio.Event, timeout: float
) -> str | bytes | None:
    """The client's next message; None once ``stopping`` is set or after
    ``timeout`` seconds without one; a closed connection ends the session
    (``_Closed``)."""
    from websockets.exceptions import ConnectionClosed

    if stopping.is_set():
        return None
    receive = asyncio.ensure_future(ws.recv())
    stop = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait(
        {receive, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    stop.cancel()
    if receive not in done:
        receive.cancel()
        return None
    try:
        return receive.result()
    except ConnectionClosed:
        raise _Closed from None


def _recognizer(lease: Lease, options: AsrOptions) -> Pipeline:
    """A begun ASR pipeline (pool side); raises what refuses it."""
    pipeline = lease.resolve(options.model).create()
    pipeline.begin(options)
    return pipeline


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, PipelineError) else str(exc)


def _config_number(config: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    """``config[key]`` as a whole number in [lo, hi]; Vosk's server takes numbers
    and numeric strings (it calls ``float()``/``int()`` on them)."""
    value = config.get(key, default)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise VoskError(
                f"sample_rate and max_alternatives are numbers: {key} is {value[:40]!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VoskError(f"sample_rate and max_alternatives are numbers: {key} is not")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise VoskError(f"{key} is a whole number")
    if not lo <= value <= hi:
        raise VoskError(f"{key} must be in [{lo}, {hi}]")
    return int(value)
