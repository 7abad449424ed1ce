"""Session options: frozen dataclasses validated from a ``start`` message.

Every field has a unit in its name or comment.  Validation is strict: an
unknown option is an error, so a client's typo never silently falls back to a
default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dsstream.errors import CodedError, ErrorCode

__all__ = [
    "ENCODINGS",
    "MIN_SAMPLE_RATE",
    "MAX_SAMPLE_RATE",
    "Hotword",
    "EndpointOptions",
    "AsrOptions",
    "VqaOptions",
    "OptionsError",
    "parse_task_options",
    "options_dict",
]

ENCODINGS = ("pcm_s16le", "f32le")
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
MAX_HOTWORDS = 5000
MAX_HOTWORD_CHARS = 100
DECODER_MODES = ("free", "lexicon")  # as dsstream.decoding.search.MODES
MAX_GRAMMAR_PHRASES = 1000  # phrases in a grammar (the ASR pipeline passes it to the decoder)


class OptionsError(CodedError, ValueError):
    """Invalid start options; ``code`` is ``bad_message`` or ``unsupported``.
    A ``ValueError`` too, for in-process callers (``transcribe(..., beam_width=0)``)."""

    def __init__(self, message: str, code: ErrorCode | str = ErrorCode.BAD_MESSAGE) -> None:
        super().__init__(code, message)


@dataclass(frozen=True)
class Hotword:
    phrase: str  # one or more words
    boost: float = 5.0  # log-score bonus per word when the phrase is completed


@dataclass(frozen=True)
class EndpointOptions:
    """Endpoint rules, after sherpa-onnx's three rules."""

    enabled: bool = True
    trailing_silence_ms: int = 800  # silence after speech that closes an utterance
    silence_without_speech_ms: int = 5000  # silence with nothing recognized yet
    max_utterance_ms: int = 20000  # an utterance is cut at this length


@dataclass(frozen=True)
class AsrOptions:
    encoding: str = "pcm_s16le"  # "pcm_s16le" or "f32le", little endian
    sample_rate: int = 16000  # Hz of the audio the client sends
    channels: int = 1  # 1, or 2 interleaved (averaged to mono unless split_channels)
    # Each channel recognized on its own (a call's two parties); events carry their channel.
    split_channels: bool = False
    partials: bool = True  # send partial results
    partial_interval_ms: int = 200  # at most one partial per this much audio
    word_timestamps: bool = True  # words with start/end/confidence in finals
    nbest: int = 1  # hypotheses listed in finals (1..10)
    hotwords: tuple[Hotword, ...] = ()  # phrases to favour, each with its boost
    # Command-and-control: each final is one of these phrases (or empty); none: free text.
    grammar: tuple[str, ...] = ()
    grammar_sequence: bool = False  # a final may be several phrases in a row (digits)
    lm_weight: float | None = None  # LM weight (alpha); None: the model's default
    # "free": any spelling (names, rare words); "lexicon": only words of the LM's
    # vocabulary (no misspellings) and hotwords; None: the model's default.
    decoder_mode: str | None = None
    endpointing: EndpointOptions = field(default_factory=EndpointOptions)
    model: str | None = None  # a model name; None: the server's default
    # Marks and capitals in finals (partials stay raw); None: the endpoint's
    # default: off for WebSocket sessions, on for REST uploads and captions.
    punctuate: bool | None = None


@dataclass(frozen=True)
class VqaOptions:
    model: str | None = None  # a model name; None: the server's default
    # Spoken questions: the ASR options of the question audio; None: typed only.
    # With speech on, each binary frame starts with a kind byte (1 image, 2 audio).
    speech: AsrOptions | None = None
    # Spoken questions are matched to the model's question forms (a grammar) where
    # its artifact lists them and ``speech`` brings no grammar of its own.
    question_forms: bool = True


def options_dict(options: AsrOptions | VqaOptions) -> dict[str, Any]:
    """Options as plain JSON-able data (for ``started``)."""
    out = asdict(options)
    if isinstance(options, AsrOptions):
        out["hotwords"] = [asdict(h) for h in options.hotwords]
    return out


def _speech(value: Any) -> AsrOptions | None:
    if value is None or value is False:
        return None
    if value is True:
        return AsrOptions()
    if not isinstance(value, dict):
        raise OptionsError("option 'speech' must be true, false or an object of asr options")
    speech = _asr(value)
    if speech.split_channels:
        raise OptionsError("spoken questions are one voice: 'speech' takes no 'split_channels'")
    return speech


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: int | float) -> str:
    """A number for a message: a 400-digit integer is shown by its size."""
    text = repr(value) if isinstance(value, float) or abs(value) < 10**30 else ""
    return text or f"<an integer of {len(str(abs(value)))} digits>"


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionsError(f"option {name!r} must be true or false")
    return value


def _int(name: str, value: Any, lo: int, hi: int, code: str = "bad_message") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise OptionsError(f"option {name!r} must be an integer")
    if not lo <= value <= hi:
        raise OptionsError(f"option {name!r}={_shown(value)} is outside [{lo}, {hi}]", code)
    return value


def _float(name: str, value: Any, lo: float, hi: float) -> float:
    # An int is compared exactly: one past the float range (JSON allows any
    # number of digits) must be refused, not overflow in a conversion.
    if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
        raise OptionsError(f"option {name!r} must be a finite number")
    if not lo <= value <= hi:
        raise OptionsError(f"option {name!r}={_shown(value)} is outside [{lo}, {hi}]")
    return float(value) + 0.0  # + 0.0: -0.0 becomes 0.0


def _check_nulls(where: str, raw: dict[str, Any], cls: type) -> None:
    """``null`` is accepted only where it is the option's default (it then
    means the default, as in the ``started`` echo); anywhere else it is a
    wrong type, answered ``bad_message`` like any other."""
    defaults = {f.name: f.default for f in fields(cls)}
    for name, value in raw.items():
        if value is None and defaults.get(name) is not None:
            raise OptionsError(f"{where} option {name!r} may not be null; leave it out for "
                               "the default")  # fmt: skip


def _check_keys(where: str, raw: dict[str, Any], cls: type) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise OptionsError(
            f"unknown {where} option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def _hotword(item: Any) -> Hotword:
    if isinstance(item, str):
        item = {"phrase": item}
    if not isinstance(item, dict):
        raise OptionsError("each hotword is a string or {'phrase': str, 'boost': number}")
    _check_keys("hotword", item, Hotword)
    _check_nulls("hotword", item, Hotword)
    phrase = item.get("phrase")
    if not isinstance(phrase, str) or not phrase.split():
        raise OptionsError("hotword 'phrase' must be a non-empty string")
    if len(phrase) > MAX_HOTWORD_CHARS:
        raise OptionsError(f"hotword longer than {MAX_HOTWORD_CHARS} characters")
    boost = _float("boost", item.get("boost", Hotword.boost), -50.0, 50.0)
    return Hotword(" ".join(phrase.split()), boost)


def _hotwords(value: Any) -> tuple[Hotword, ...]:
    if not isinstance(value, list):
        raise OptionsError("option 'hotwords' must be a list")
    if len(value) > MAX_HOTWORDS:
        raise OptionsError(f"at most {MAX_HOTWORDS} hotwords")
    return tuple(_hotword(item) for item in value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value not in choices:
        raise OptionsError(f"option {name!r} must be one of {', '.join(choices)} (or null)")
    return str(value)


def _grammar(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise OptionsError("option 'grammar' must be a list of phrases (strings)")
    if len(value) > MAX_GRAMMAR_PHRASES:
        raise OptionsError(f"at most {MAX_GRAMMAR_PHRASES} grammar phrases")
    phrases = tuple(" ".join(p.split()) for p in value)
    if not all(phrases):
        raise OptionsError("a grammar phrase is empty")
    if any(len(p) > MAX_HOTWORD_CHARS for p in phrases):
        raise OptionsError(f"grammar phrase longer than {MAX_HOTWORD_CHARS} characters")
    return phrases


def _endpointing(value: Any) -> EndpointOptions:
    if isinstance(value, bool):
        return EndpointOptions(enabled=value)
    if not isinstance(value, dict):
        raise OptionsError("option 'endpointing' must be true, false or an object")
    _check_keys("endpointing", value, EndpointOptions)
    _check_nulls("endpointing", value, EndpointOptions)
    d = EndpointOptions()
    return EndpointOptions(
        enabled=_bool("enabled", value.get("enabled", d.enabled)),
        trailing_silence_ms=_int(
            "trailing_silence_ms",
            value.get("trailing_silence_ms", d.trailing_silence_ms),
            100,
            60000,
        ),
        silence_without_speech_ms=_int(
            "silence_without_speech_ms",
            value.get("silence_without_speech_ms", d.silence_without_speech_ms),
            100,
            600000,
        ),
        max_utterance_ms=_int(
            "max_utterance_ms", value.get("max_utterance_ms", d.max_utterance_ms), 1000, 600000
        ),
    )


def _model(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise OptionsError("option 'model' must be a non-empty string")
    return value


def _asr(raw: dict[str, Any]) -> AsrOptions:
    _check_keys("asr", raw, AsrOptions)
    _check_nulls("asr", raw, AsrOptions)
    d = AsrOptions()
    encoding = raw.get("encoding", d.encoding)
    if not isinstance(encoding, str):
        raise OptionsError("option 'encoding' must be a string")
    if encoding not in ENCODINGS:
        raise OptionsError(
            f"encoding {encoding!r} is not supported; use one of {', '.join(ENCODINGS)}",
            "unsupported",
        )
    if raw.get("split_channels") is True and raw.get("channels", d.channels) == 1:
        raise OptionsError("option 'split_channels' needs 'channels': 2")
    if raw.get("grammar_sequence") is True and not raw.get("grammar"):
        raise OptionsError("option 'grammar_sequence' needs a 'grammar'")
    if raw.get("grammar") and raw.get("punctuate") is True:
        raise OptionsError("options 'grammar' and 'punctuate' do not combine: a grammar's "
                           "finals are its phrases as written in it")  # fmt: skip
    if raw.get("grammar") and raw.get("hotwords"):
        raise OptionsError("options 'grammar' and 'hotwords' do not combine: list the phrases")
    return AsrOptions(
        encoding=encoding,
        sample_rate=_int(
            "sample_rate",
            raw.get("sample_rate", d.sample_rate),
            MIN_SAMPLE_RATE,
            MAX_SAMPLE_RATE,
            "unsupported",
        ),
        channels=_int("channels", raw.get("channels", d.channels), 1, 2, "unsupported"),
        split_channels=_bool("split_channels", raw.get("split_channels", d.split_channels)),
        partials=_bool("partials", raw.get("partials", d.partials)),
        partial_interval_ms=_int(
            "partial_interval_ms", raw.get("partial_interval_ms", d.partial_interval_ms), 0, 60000
        ),
        word_timestamps=_bool("word_timestamps", raw.get("word_timestamps", d.word_timestamps)),
        nbest=_int("nbest", raw.get("nbest", d.nbest), 1, 10),
        hotwords=_hotwords(raw.get("hotwords", [])),
        grammar=_grammar(raw.get("grammar")),
        grammar_sequence=_bool("grammar_sequence", raw.get("grammar_sequence", d.grammar_sequence)),
        lm_weight=None
        if raw.get("lm_weight") is None
        else _float("lm_weight", raw["lm_weight"], 0.0, 10.0),
        decoder_mode=_choice("decoder_mode", raw.get("decoder_mode"), DECODER_MODES),
        endpointing=_endpointing(raw.get("endpointing", {})),
        model=_model(raw.get("model")),
        punctuate=None if raw.get("punctuate") is None else _bool("punctuate", raw["punctuate"]),
    )


def _vqa(raw: dict[str, Any]) -> VqaOptions:
    _check_keys("vqa", raw, VqaOptions)
    _check_nulls("vqa", raw, VqaOptions)
    return VqaOptions(
        model=_model(raw.get("model")),
        speech=_speech(raw.get("speech")),
        question_forms=_bool("question_forms", raw.get("question_forms", True)),
    )


def parse_task_options(task: str, raw: dict[str, Any]) -> AsrOptions | VqaOptions:
    """Validate the options of a ``start`` message for ``task``.

    Raises :class:`OptionsError` with a message naming the offending option.
    """
    if task == "asr":
        return _asr(raw)
    if task == "vqa":
        return _vqa(raw)
    raise OptionsError(f"unknown task {task!r}")
