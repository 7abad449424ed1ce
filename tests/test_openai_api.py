"""OpenAI's transcription API, the pure part (dsstream.openai_api): the form's
fields checked as OpenAI checks them, each response format from a real
transcript, parsed by the official ``openai`` package's own types."""

from __future__ import annotations

import json

import pytest
from test_asr_e2e import CLIPS

from dsstream.captions import to_srt, to_vtt
from dsstream.local import transcribe
from dsstream.openai_api import (
    ApiError,
    TranscriptionRequest,
    models_document,
    parse_request,
    prompt_hotwords,
    render,
)

MODELS = ["sample-asr", "other-asr"]
LJ = CLIPS / "LJ001-0011.flac"


@pytest.fixture(scope="module")
def transcript():
    return transcribe(LJ)


def test_a_request_from_the_form():
    request = parse_request({"model": ["whisper-1"], "response_format": ["verbose_json"],
                             "timestamp_granularities[]": ["word", "segment", "word"],
                             "temperature": ["0.2"], "prompt": ["Printing, Caxton"],
                             "language": ["EN"]}, MODELS)  # fmt: skip
    assert request.model is None  # an OpenAI name: the default model
    assert request.granularities == ("word", "segment") and request.temperature == 0.2
    assert request.asr_options() == {"hotwords": [{"phrase": "printing", "boost": 3.0},
                                                   {"phrase": "caxton", "boost": 3.0}]}  # fmt: skip
    assert parse_request({"model": ["other-asr"]}, MODELS).asr_options() == {"model": "other-asr"}
    assert parse_request({"model": ["sample-asr"]}, MODELS).model is None


@pytest.mark.parametrize(
    "fields, status, param, code",
    [
        ({}, 400, "model", None),
        ({"model": ["nope"]}, 404, "model", "model_not_found"),
        ({"model": ["whisper-1"], "response_format": ["xml"]}, 400, "response_format", None),
        ({"model": ["whisper-1"], "language": ["de"]}, 400, "language", "unsupported_language"),
        ({"model": ["whisper-1"], "temperature": ["hot"]}, 400, "temperature", None),
        ({"model": ["whisper-1"], "temperature": ["2"]}, 400, "temperature", None),
        ({"model": ["whisper-1"], "timestamp_granularities[]": ["word"]}, 400,
         "timestamp_granularities", None),
        ({"model": ["whisper-1"], "response_format": ["verbose_json"],
          "timestamp_granularities[]": ["phoneme"]}, 400, "timestamp_granularities", None),
        ({"model": ["whisper-1", "whisper-1"]}, 400, "model", None),
    ],
)  # fmt: skip
def test_bad_fields_are_refused_as_openai_does(fields, status, param, code):
    with pytest.raises(ApiError) as caught:
        parse_request(fields, MODELS)
    error = caught.value
    assert (error.status, error.param, error.code) == (status, param, code)
    body = json.loads(error.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


def test_prompt_hotwords_skip_short_words_and_repeats():
    words = [h["phrase"] for h in prompt_hotwords("The Caxton press; the CAXTON type, o'brien's")]
    assert words == ["caxton", "press", "type", "o'brien's"]
    assert prompt_hotwords("") == []


def test_each_response_format(transcript):
    from openai.types.audio import Transcription, TranscriptionVerbose

    duration = 4.512
    body, ctype = render(TranscriptionRequest(None, "json"), transcript, duration)
    parsed = Transcription.model_validate_json(body)
    assert parsed.text == transcript.text and ctype == "application/json"
    assert json.loads(body)["usage"] == {"type": "duration", "seconds": 5}
    body, ctype = render(TranscriptionRequest(None, "text"), transcript, duration)
    assert body.decode() == transcript.text + "\n" and ctype.startswith("text/plain")
    assert render(TranscriptionRequest(None, "srt"), transcript, duration)[0].decode() == to_srt(
        transcript.segments
    )
    vtt, ctype = render(TranscriptionRequest(None, "vtt"), transcript, duration)
    assert vtt.decode() == to_vtt(transcript.segments) and ctype.startswith("text/vtt")

    request = TranscriptionRequest(None, "verbose_json", granularities=("word", "segment"))
    verbose = TranscriptionVerbose.model_validate_json(render(request, transcript, duration)[0])
    assert verbose.text == transcript.text and verbose.language == "english"
    assert [w.word for w in verbose.words] == [w.word for w in transcript.words]
    assert [(w.start, w.end) for w in verbose.words] == [
        (round(w.start, 3), round(w.end, 3)) for w in transcript.words
    ]
    assert " ".join(s.text for s in verbose.segments) == transcript.text
    assert all(s.avg_logprob <= 0 for s in verbose.segments)
    words_only = TranscriptionRequest(None, "verbose_json", granularities=("word",))
    doc = json.loads(render(words_only, transcript, duration)[0])
    assert "segments" not in doc and len(doc["words"]) == len(transcript.words)
    default = json.loads(render(TranscriptionRequest(None, "verbose_json"), transcript, 4.5)[0])
    assert "words" not in default and len(default["segments"]) >= 1  # segments by default


def test_models_document():
    from openai.types import Model

    doc = models_document(MODELS)
    assert doc["object"] == "list"
    assert [Model.model_validate(m).id for m in doc["data"]] == MODELS


def test_punctuate_is_a_form_flag():
    assert parse_request({"model": ["whisper-1"]}, MODELS).punctuate is None
    off = parse_request({"model": ["whisper-1"], "punctuate": ["false"]}, MODELS)
    assert off.punctuate is False and off.asr_options() == {"punctuate": False}
    assert parse_request({"model": ["whisper-1"], "punctuate": ["True"]}, MODELS).punctuate
    with pytest.raises(ApiError) as caught:
        parse_request({"model": ["whisper-1"], "punctuate": ["maybe"]}, MODELS)
    assert caught.value.status == 400 and caught.value.param == "punctuate"
