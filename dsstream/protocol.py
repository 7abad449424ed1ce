"""dsstream session protocol v1: a sans-I/O core.

Nothing here reads a socket, sleeps or touches asyncio.  The server feeds the
frames it received into :class:`ServerProtocol` and gets typed events back;
the client builds its messages and parses the server's with
:class:`ClientProtocol`.  Adapters (``server.py``, ``client.py``) only move
bytes.  The wire format is documented in ``docs/protocol.md``.

Text frames carry JSON objects with a ``type``; binary frames carry media: PCM
audio in an ``asr`` session, encoded images (JPEG, PNG, WebP) in a ``vqa``
session.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import numpy as np

from dsstream.errors import CloseCode, CodedError, ErrorCode
from dsstream.options import AsrOptions, VqaOptions, parse_task_options

__all__ = [
    "PROTOCOL_VERSION",
    "load_json_object",
    "ErrorCode",
    "CloseCode",
    "Limits",
    "State",
    "StartSession",
    "AudioChunk",
    "ImageData",
    "Question",
    "Flush",
    "End",
    "ClientRequest",
    "Word",
    "Hypothesis",
    "Started",
    "Partial",
    "Final",
    "Endpoint",
    "Answer",
    "Ended",
    "Error",
    "ServerEvent",
    "ServerProtocol",
    "ClientProtocol",
    "ProtocolError",
    "encode_event",
    "parse_server_event",
]

PROTOCOL_VERSION = 1


class ProtocolError(CodedError):
    """A client message that breaks the protocol; becomes an ``error`` event."""


@dataclass(frozen=True)
class Limits:
    """Per-session limits the server enforces and reports in ``started``."""

    max_frame_bytes: int = 1 << 20  # largest binary frame accepted (1 MiB)
    max_text_bytes: int = 256 << 10  # largest JSON control message (hotword lists fit)
    max_session_s: float = 3600.0  # wall-clock duration before the server ends the session
    idle_timeout_s: float = 30.0  # no frame at all for this long ends the session
    max_question_chars: int = 1000


class State(enum.Enum):
    AWAITING_START = "awaiting_start"
    STARTING = "starting"  # start parsed, waiting for the server to accept or reject it
    ACTIVE = "active"
    CLOSED = "closed"  # ended, or a fatal error was sent


# ---------------------------------------------------------------------------
# Client -> server requests (what ServerProtocol.receive_* yields)


@dataclass(frozen=True)
class StartSession:
    task: str
    options: AsrOptions | VqaOptions


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """Decoded audio of one binary frame.

    ``samples`` is float32 of shape ``[n]`` (mono, already downmixed), or
    ``[n, channels]`` in a session with ``split_channels``, in [-1, 1] for PCM
    input, at ``sample_rate`` Hz as declared in ``start``.
    """

    samples: np.ndarray
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class ImageData:
    """One encoded image (JPEG, PNG or WebP bytes); decoding is the pipeline's job."""

    data: bytes


@dataclass(frozen=True)
class Question:
    id: str
    text: str


@dataclass(frozen=True)
class Flush:
    """Finalize what was received so far and keep the session."""


@dataclass(frozen=True)
class End:
    """Finalize and close the session."""


ClientRequest = Union[StartSession, AudioChunk, ImageData, Question, Flush, End]


# ---------------------------------------------------------------------------
# Server -> client events


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds from the start of the stream
    end: float  # seconds from the start of the stream
    confidence: float  # in [0, 1]


@dataclass(frozen=True)
class Hypothesis:
    text: str
    score: float  # total log-score of the hypothesis (higher is better)


@dataclass(frozen=True)
class Started:
    session_id: str
    task: str
    options: dict[str, Any]  # the effective options, model name and rate included
    limits: dict[str, Any]
    protocol: int = PROTOCOL_VERSION
    type: str = field(default="started", init=False)


@dataclass(frozen=True)
class Partial:
    text: str
    segment: int  # index of the utterance within the stream, from 0
    time: float | None = None  # seconds of the stream's audio the partial covers
    channel: int | None = None  # with split_channels: the audio channel, from 0
    type: str = field(default="partial", init=False)


@dataclass(frozen=True)
class Final:
    text: str
    segment: int
    start: float  # seconds from the start of the stream
    end: float
    words: tuple[Word, ...] = ()
    nbest: tuple[Hypothesis, ...] = ()
    channel: int | None = None  # with split_channels: the audio channel, from 0
    type: str = field(default="final", init=False)


@dataclass(frozen=True)
class Endpoint:
    segment: int  # the segment this endpoint closes
    time: float  # seconds from the start of the stream
    reason: str  # "trailing_silence", "no_speech", "max_length", "flush" or "end"
    channel: int | None = None  # with split_channels: the audio channel, from 0
    type: str = field(default="endpoint", init=False)


@dataclass(frozen=True)
class Answer:
    id: str
    text: str
    score: float  # probability of the answer, in [0, 1]
    latency_ms: float  # from question received to answer ready
    transcript: str | None = None  # for a spoken question: what was recognized
    type: str = field(default="answer", init=False)


@dataclass(frozen=True)
class Ended:
    session_id: str
    reason: str  # "client", "timeout", "shutdown", "error"
    stats: dict[str, Any] = field(default_factory=dict)
    type: str = field(default="ended", init=False)


@dataclass(frozen=True)
class Error:
    code: ErrorCode
    message: str
    fatal: bool = False
    retry_after_ms: int | None = None  # with ``busy``: when trying again makes sense
    type: str = field(default="error", init=False)


ServerEvent = Union[Started, Partial, Final, Endpoint, Answer, Ended, Error]


def _event_dict(event: ServerEvent) -> dict[str, Any]:
    # Shallow field copy, not dataclasses.asdict: asdict deep-copies and was the
    # largest cost of sending a partial (profiled on the loopback benchmark).
    out: dict[str, Any] = {"type": event.type}
    out.update((k, v) for k, v in vars(event).items() if v is not None and k != "type")
    if isinstance(event, Final):
        out["words"] = [vars(w) for w in event.words]
        out["nbest"] = [vars(h) for h in event.nbest]
    elif isinstance(event, Error):
        out["code"] = event.code.value
    return out


def encode_event(event: ServerEvent) -> str:
    """Serialize a server event to the JSON text of one WebSocket frame."""
    return json.dumps(_event_dict(event), separators=(",", ":"))


def _parse_final(obj: dict[str, Any]) -> Final:
    words = tuple(Word(**w) for w in obj.get("words", ()))
    nbest = tuple(Hypothesis(**h) for h in obj.get("nbest", ()))
    return Final(
        text=obj["text"],
        segment=obj["segment"],
        start=obj["start"],
        end=obj["end"],
        words=words,
        nbest=nbest,
        channel=obj.get("channel"),
    )


def parse_server_event(text: str) -> ServerEvent:
    """Parse one server text frame into its event (the client side).

    Raises ``ValueError`` on anything that is not a valid v1 server event.
    """
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("server event is not a JSON object")
    kind = obj.pop("type", None)
    try:
        if kind == "started":
            return Started(**obj)
        if kind == "partial":
            return Partial(**obj)
        if kind == "final":
            return _parse_final(obj)
        if kind == "endpoint":
            return Endpoint(**obj)
        if kind == "answer":
            return Answer(**obj)
        if kind == "ended":
            return Ended(**obj)
        if kind == "error":
            obj["code"] = ErrorCode(obj["code"])
            return Error(**obj)
    except (TypeError, KeyError) as exc:
        raise ValueError(f"invalid {kind!r} event: {exc}") from exc
    raise ValueError(f"unknown server event type {kind!r}")


# ---------------------------------------------------------------------------
# Audio decoding of binary frames

_SAMPLE_BYTES = {"pcm_s16le": 2, "f32le": 4}

# With spoken questions on, a vqa session's binary frames start with a kind byte.
KIND_IMAGE, KIND_AUDIO = 1, 2


def decode_audio(data: bytes, options: AsrOptions) -> np.ndarray:
    """Decode one binary frame into mono float32 samples, shape ``[n]``
    (``[n, channels]`` with ``split_channels``).

    Raises :class:`ProtocolError` (``bad_audio``) when the byte count does not
    fit the encoding and channel count, or float samples are not finite.
    """
    width = _SAMPLE_BYTES[options.encoding] * options.channels
    if len(data) % width:
        raise ProtocolError(
            ErrorCode.BAD_AUDIO,
            f"{len(data)} bytes is not a whole number of {options.encoding} frames "
            f"of {options.channels} channel(s) ({width} bytes each)",
        )
    if options.encoding == "pcm_s16le":
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    else:
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(samples)):
            raise ProtocolError(ErrorCode.BAD_AUDIO, "f32le audio contains NaN or infinity")
    if options.channels > 1:
        samples = samples.reshape(-1, options.channels)
        if not options.split_channels:  # documented: interleaved channels averaged to mono
            samples = samples.mean(axis=1, dtype=np.float32)
    return samples


# ---------------------------------------------------------------------------
# Server side


class ServerProtocol:
    """The state of one client connection, as seen by the server.

    Feed received frames to :meth:`receive_text` / :meth:`receive_binary`; each
    returns a list of items that are either client requests (to act on) or
    :class:`Error` events (to send).  Accepting or rejecting a ``start`` is the
    server's decision: it calls :meth:`accept_start` or :meth:`reject_start`.
    """

    def __init__(self, limits: Limits | None = None, tasks: tuple[str, ...] = ("asr", "vqa")):
        self.limits = limits or Limits()
        self.tasks = tasks
        self.state = State.AWAITING_START
        self.task: str | None = None
        self.options: AsrOptions | VqaOptions | None = None
        self._question_seq = 0

    # -- input ---------------------------------------------------------------

    def receive_text(self, text: str) -> list[ClientRequest | Error]:
        try:
            return [self._text(text)]
        except CodedError as exc:  # ProtocolError, or OptionsError from a start
            return [self._error(exc)]

    def receive_binary(self, data: bytes) -> list[ClientRequest | Error]:
        try:
            return [self._binary(data)]
        except CodedError as exc:
            return [self._error(exc)]

    # -- decisions from the server -------------------------------------------

    def accept_start(self, session_id: str, effective: dict[str, Any]) -> Started:
        """Move to ACTIVE and build the ``started`` event."""
        assert self.state is State.STARTING and self.task is not None
        self.state = State.ACTIVE
        return Started(session_id, self.task, effective, asdict(self.limits))

    def reject_start(
        self,
        code: ErrorCode,
        message: str,
        fatal: bool = False,
        retry_after_ms: int | None = None,
    ) -> Error:
        """Refuse the pending ``start``; non-fatal leaves the client free to retry."""
        assert self.state is State.STARTING
        self.state = State.CLOSED if fatal else State.AWAITING_START
        self.task = self.options = None
        return Error(code, message, fatal, retry_after_ms)

    def fail(self, code: ErrorCode, message: str, retry_after_ms: int | None = None) -> Error:
        """A fatal error decided by the server (busy, unauthorized, timeout, internal)."""
        self.state = State.CLOSED
        return Error(code, message, True, retry_after_ms)

    def ended(self, session_id: str, reason: str, stats: dict[str, Any]) -> Ended:
        self.state = State.CLOSED
        return Ended(session_id, reason, stats)

    # -- internals -----------------------------------------------------------

    def _error(self, exc: CodedError) -> Error:
        if exc.fatal:
            self.state = State.CLOSED
        return Error(exc.code, exc.message, exc.fatal)

    def _text(self, text: str) -> ClientRequest:
        self._check_open()
        if len(text.encode("utf-8", "surrogatepass")) > self.limits.max_text_bytes:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"text message larger than max_text_bytes={self.limits.max_text_bytes}",
            )
        msg = _load_json(text)
        kind = msg.get("type")
        if kind == "start":
            return self._start(msg)
        if kind in ("flush", "end"):
            self._expect_active(kind)
            _no_extra(msg, {"type"})
            return Flush() if kind == "flush" else End()
        if kind == "question":
            return self._question(msg)
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown message type {kind!r}")

    def _start(self, msg: dict[str, Any]) -> StartSession:
        if self.state is not State.AWAITING_START:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "session already started")
        task = msg.get("task")
        if task not in self.tasks:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"unknown task {task!r}; expected one of {', '.join(self.tasks)}",
            )
        raw = {k: v for k, v in msg.items() if k not in ("type", "task")}
        options = parse_task_options(task, raw)  # an OptionsError is sent as it is
        self.state, self.task, self.options = State.STARTING, task, options
        return StartSession(task, options)

    def _question(self, msg: dict[str, Any]) -> Question:
        self._expect_active("question")
        if self.task != "vqa":
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "questions belong to a vqa session")
        _no_extra(msg, {"type", "id", "text"})
        text = msg.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "question needs a non-empty 'text'")
        if len(text) > self.limits.max_question_chars:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"question longer than {self.limits.max_question_chars} characters",
            )
        qid = msg.get("id")
        if qid is None:
            self._question_seq += 1
            qid = f"q{self._question_seq}"
        elif isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "question 'id' must be a string or integer")
        return Question(str(qid), text)

    def _binary(self, data: bytes) -> AudioChunk | ImageData:
        self._check_open()
        if self.state is not State.ACTIVE:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "binary frame before the session started")
        if len(data) > self.limits.max_frame_bytes:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"frame of {len(data)} bytes exceeds max_frame_bytes={self.limits.max_frame_bytes}",
            )
        if not data:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "empty binary frame")
        if isinstance(self.options, AsrOptions):
            return AudioChunk(decode_audio(data, self.options), self.options.sample_rate)
        speech = self.options.speech if isinstance(self.options, VqaOptions) else None
        if speech is None:
            return ImageData(bytes(data))
        kind, body = data[0], data[1:]
        if kind == KIND_IMAGE and body:
            return ImageData(bytes(body))
        if kind == KIND_AUDIO:
            return AudioChunk(decode_audio(body, speech), speech.sample_rate)
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"with speech on, a binary frame starts with a kind byte ({KIND_IMAGE} image, "
            f"{KIND_AUDIO} audio), got {kind}" + (" and no image" if kind == KIND_IMAGE else ""),
        )

    def _check_open(self) -> None:
        if self.state is State.CLOSED:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "session is closed")

    def _expect_active(self, what: str) -> None:
        if self.state is not State.ACTIVE:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{what!r} before the session started")


def load_json_object(text: str) -> dict[str, Any]:
    """A client's JSON text message as an object, or :class:`ProtocolError`
    (``bad_message``) for anything else: malformed JSON, nesting too deep for
    the parser, an integer past Python's digit limit, or a value that is not
    an object.  (``NaN`` and ``Infinity``, which Python's parser accepts, are
    left to the option checks, which name the option they were given for.)
    Every endpoint (/v1/stream, /vosk) parses through it."""
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"malformed JSON: {reason}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a control message must be a JSON object")
    return msg


def _load_json(text: str) -> dict[str, Any]:
    msg = load_json_object(text)
    if "type" not in msg:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "control message without a 'type'")
    return msg


def _no_extra(msg: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(msg) - allowed)
    if extra:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"unknown field(s) in {msg['type']!r}: {', '.join(extra)}"
        )


# ---------------------------------------------------------------------------
# Client side


class ClientProtocol:
    """Builds client messages and parses server events; no I/O.

    Tracks whether the session is started and ended so adapters can refuse
    misuse early with a Python exception instead of a round trip.
    """

    def __init__(self) -> None:
        self.started: Started | None = None
        self.ended: Ended | None = None
        self._question_seq = 0

    def start(self, task: str, **options: Any) -> str:
        return json.dumps({"type": "start", "task": task, **options})

    def flush(self) -> str:
        return '{"type":"flush"}'

    def end(self) -> str:
        return '{"type":"end"}'

    def question(self, text: str, qid: str | None = None) -> tuple[str, str]:
        """Return ``(question_id, message)``; ids default to ``c1``, ``c2``, ..."""
        if qid is None:
            self._question_seq += 1
            qid = f"c{self._question_seq}"
        return qid, json.dumps({"type": "question", "id": qid, "text": text})

    def audio(
        self, samples: np.ndarray | bytes, encoding: str = "pcm_s16le", tagged: bool = False
    ) -> bytes:
        """Encode float samples in [-1, 1] (or pass bytes through) for a binary frame;
        ``tagged`` prefixes the audio kind byte (a vqa session with speech)."""
        if tagged:
            return bytes([KIND_AUDIO]) + self.audio(samples, encoding)
        if isinstance(samples, (bytes, bytearray, memoryview)):
            return bytes(samples)
        arr = np.asarray(samples, dtype=np.float32)
        if encoding == "f32le":
            return arr.astype("<f4").tobytes()
        if encoding == "pcm_s16le":
            return (np.clip(arr, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2").tobytes()
        raise ValueError(f"unsupported encoding {encoding!r}")

    def image(self, data: bytes, tagged: bool = False) -> bytes:
        """An encoded image for a binary frame; ``tagged`` for a vqa session with speech."""
        return bytes([KIND_IMAGE]) + data if tagged else data

    def receive(self, text: str) -> ServerEvent:
        event = parse_server_event(text)
        if isinstance(event, Started):
            self.started = event
        elif isinstance(event, Ended):
            self.ended = event
        return event
