"""OpenAI's audio transcription API as pure functions (no I/O).

``POST /v1/audio/transcriptions`` (multipart: ``file``, ``model``, optional
``language``, ``prompt``, ``response_format``, ``temperature``,
``timestamp_granularities[]``; dsstream's own ``punctuate``, true or false,
default true where the model has punctuation) and ``GET /v1/models``, as the official
``openai`` SDKs and the tools that take a base URL call them.  This module
turns the form's fields into a :class:`TranscriptionRequest` (or an
:class:`ApiError` with OpenAI's status, type, param and code), a transcript
into each response format, and errors into OpenAI's error body.  Reading the
upload, decoding the audio and running the pipeline belong to the HTTP
adapter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsstream.captions import to_srt, to_vtt
from dsstream.local import Transcript

__all__ = [
    "RESPONSE_FORMATS",
    "GRANULARITIES",
    "OPENAI_MODEL_NAMES",
    "ApiError",
    "TranscriptionRequest",
    "parse_request",
    "prompt_hotwords",
    "render",
    "models_document",
]

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
# Names clients hard-code for OpenAI's service; they get the default model.
OPENAI_MODEL_NAMES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
LANGUAGES = {"en": "english"}  # ISO-639-1 code -> the name verbose_json reports

_CONTENT_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "text/plain; charset=utf-8",  # as OpenAI's service sends it
    "vtt": "text/vtt; charset=utf-8",
}
# Prompt words become hotwords (Whisper's prompt steers spelling and names):
# words of at least this many letters, at most this many, at this boost.
PROMPT_MIN_LETTERS = 4
PROMPT_MAX_HOTWORDS = 100
PROMPT_BOOST = 3.0


class ApiError(Exception):
    """An error as OpenAI's API reports it: HTTP ``status`` and the body
    ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type,
        )  # fmt: skip

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param,
                 "code": self.code}  # fmt: skip
        return json.dumps({"error": error}).encode()


@dataclass(frozen=True)
class TranscriptionRequest:
    """A transcription request's fields, checked.  ``model`` is the served
    model's name (an OpenAI model name maps to the default, None)."""

    model: str | None
    response_format: str = "json"
    language: str = "en"
    prompt: str = ""
    temperature: float = 0.0  # accepted and ignored: the search is deterministic
    granularities: tuple[str, ...] = ()
    # dsstream's own field: marks and capitals (None: on where the model has them)
    punctuate: bool | None = None

    def asr_options(self) -> dict[str, Any]:
        """The ASR session's options: the model, the prompt's hotwords and
        ``punctuate`` where the form set it."""
        options: dict[str, Any] = {}
        if self.model is not None:
            options["model"] = self.model
        if self.punctuate is not None:
            options["punctuate"] = self.punctuate
        hotwords = prompt_hotwords(self.prompt)
        if hotwords:
            options["hotwords"] = hotwords
        return options


def _one(fields: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = fields.get(name) or ()
    if len(values) > 1:
        raise ApiError(400, f"'{name}' was given {len(values)} times", name)
    return values[0] if values else None


def parse_request(
    fields: Mapping[str, Sequence[str]], models: Sequence[str]
) -> TranscriptionRequest:
    """The form's text fields (each name to its values) as a request, for a
    server whose ASR models are ``models`` (the first is the default)."""
    model = _one(fields, "model")
    if not model:
        raise ApiError(400, "you must provide a model parameter", "model")
    if model not in models and model not in OPENAI_MODEL_NAMES:
        raise ApiError(404, f"The model '{model}' does not exist; this server has: "
                       f"{', '.join(models) or 'none'}", "model", "model_not_found")  # fmt: skip
    chosen = model if model in models and model != (models[0] if models else None) else None
    response_format = _one(fields, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}; "
                       f"got '{response_format}'", "response_format")  # fmt: skip
    language = (_one(fields, "language") or "en").lower()
    if language not in LANGUAGES:
        raise ApiError(400, f"language '{language}' is not supported; this server "
                       f"transcribes: {', '.join(LANGUAGES)}", "language",
                       "unsupported_language")  # fmt: skip
    temperature = _temperature(_one(fields, "temperature"))
    granularities = tuple(fields.get("timestamp_granularities[]") or ())
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise ApiError(400, f"timestamp_granularities[] are 'word' and 'segment', not "
                       f"{unknown}", "timestamp_granularities")  # fmt: skip
    if granularities and response_format != "verbose_json":
        raise ApiError(400, "timestamp_granularities[] need response_format=verbose_json",
                       "timestamp_granularities")  # fmt: skip
    return TranscriptionRequest(
        chosen, response_format, language, _one(fields, "prompt") or "", temperature,
        tuple(dict.fromkeys(granularities)), _flag(fields, "punctuate"),
    )  # fmt: skip


def _flag(fields: Mapping[str, Sequence[str]], name: str) -> bool | None:
    text = _one(fields, name)
    if text is None or text == "":
        return None
    if text.lower() not in ("true", "false", "1", "0"):
        raise ApiError(400, f"'{name}' must be true or false, got '{text}'", name)
    return text.lower() in ("true", "1")


def _temperature(text: str | None) -> float:
    if text is None or text == "":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ApiError(400, f"temperature must be a number from 0 to 1, got '{text}'",
                       "temperature")  # fmt: skip
    return value


def prompt_hotwords(prompt: str) -> list[dict[str, Any]]:
    """The prompt's distinct words of :data:`PROMPT_MIN_LETTERS` letters or more
    as hotwords (first :data:`PROMPT_MAX_HOTWORDS`, boost :data:`PROMPT_BOOST`):
    where Whisper reads its prompt as context that steers names and spelling,
    this search favours the words in it."""
    words = re.findall(r"[a-z][a-z']*", prompt.lower())
    keep = [w for w in dict.fromkeys(words) if sum(c.isalpha() for c in w) >= PROMPT_MIN_LETTERS]
    return [{"phrase": w, "boost": PROMPT_BOOST} for w in keep[:PROMPT_MAX_HOTWORDS]]


def render(
    request: TranscriptionRequest, transcript: Transcript, duration: float
) -> tuple[bytes, str]:
    """The response body and its content type for ``transcript`` of
    ``duration`` seconds of audio."""
    fmt = request.response_format
    if fmt == "text":
        body = transcript.text + "\n"
    elif fmt == "srt":
        body = to_srt(transcript.segments)
    elif fmt == "vtt":
        body = to_vtt(transcript.segments)
    elif fmt == "json":
        usage = {"type": "duration", "seconds": math.ceil(duration)}
        body = json.dumps({"text": transcript.text, "usage": usage})
    else:
        body = json.dumps(_verbose(request, transcript, duration))
    return body.encode(), _CONTENT_TYPES[fmt]


def _verbose(request: TranscriptionRequest, transcript: Transcript, duration: float) -> dict:
    doc: dict[str, Any] = {
        "task": "transcribe",
        "language": LANGUAGES[request.language],
        "duration": round(duration, 3),
        "text": transcript.text,
    }
    wanted = request.granularities or ("segment",)
    if "segment" in wanted:
        doc["segments"] = [_segment(i, seg) for i, seg in
                           enumerate(s for s in transcript.segments if s.text)]  # fmt: skip
    if "word" in wanted:
        # OpenAI's words carry word, start and end; confidence is this server's
        # addition (clients that do not know it ignore it).
        doc["words"] = [
            {"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
             "confidence": round(w.confidence, 3)}
            for w in transcript.words
        ]  # fmt: skip
    doc["usage"] = {"type": "duration", "seconds": math.ceil(duration)}
    return doc


def _segment(index: int, seg: Any) -> dict[str, Any]:
    confidences = [w.confidence for w in seg.words]
    # avg_logprob: the mean log word confidence (Whisper's is per token); the
    # other Whisper-specific fields get neutral values.
    avg = (
        sum(math.log(max(c, 1e-6)) for c in confidences) / len(confidences) if confidences else 0.0
    )
    return {
        "id": index, "seek": 0, "start": round(seg.start, 3), "end": round(seg.end, 3),
        "text": seg.text, "tokens": [], "temperature": 0.0, "avg_logprob": round(avg, 4),
        "compression_ratio": 1.0, "no_speech_prob": 0.0,
    }  # fmt: skip


def models_document(models: Sequence[str], created: int = 0) -> dict[str, Any]:
    """``GET /v1/models``: the served ASR models in OpenAI's list shape."""
    data = [{"id": name, "object": "model", "created": created, "owned_by": "dsstream"}
            for name in models]  # fmt: skip
    return {"object": "list", "data": data}
