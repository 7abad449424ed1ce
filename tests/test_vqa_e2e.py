"""The shipped VQA model: sample scenes answered as the model card says, in
process and over loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import running_server

from dsstream.client import Client
from dsstream.local import LocalSession
from dsstream.pipelines.defaults import SAMPLES_DIR, default_registry

VQA = Path(SAMPLES_DIR) / "vqa"
# Accuracy of the shipped model on the shipped sample questions (samples/vqa/MODEL.md).
CARD_SAMPLE_ACCURACY = 1.0

pytestmark = pytest.mark.skipif(
    not (VQA / "fuser.ds").exists(), reason="the sample VQA model is not in samples/vqa"
)


def _questions() -> list[tuple[str, str, str, str]]:
    lines = (VQA / "images" / "questions.tsv").read_text().strip().splitlines()[1:]
    return [tuple(line.split("\t")) for line in lines]  # type: ignore[misc]


def test_sample_questions_score_as_the_model_card_says():
    registry = default_registry()
    right = 0
    rows = _questions()
    by_image: dict[str, list] = {}
    for image, question, kind, answer in rows:
        by_image.setdefault(image, []).append((question, answer))
    for image, qas in by_image.items():
        with LocalSession("vqa", registry) as session:
            session.send_image(VQA / "images" / image)
            for question, answer in qas:
                got = session.ask(question)
                right += got.text == answer
                assert 0.0 < got.score <= 1.0 and got.latency_ms >= 0
    assert right / len(rows) >= CARD_SAMPLE_ACCURACY


def test_loopback_answers_equal_in_process():
    image, question, _, _ = _questions()[0]
    registry = default_registry()
    with LocalSession("vqa", registry) as session:
        session.send_image(VQA / "images" / image)
        local = session.ask(question)

    async def remote():
        async with running_server(registry) as server, Client(server.url) as client:
            await client.start("vqa")
            await client.send_image(VQA / "images" / image)
            return await client.ask(question)

    answer = asyncio.run(remote())
    assert (answer.text, round(answer.score, 3)) == (local.text, round(local.score, 3))


def test_model_card_reports_both_accuracies():
    card = (VQA / "MODEL.md").read_text()
    for key in ("non-relational", "relational", "test"):
        assert key in card


def test_spoken_questions_are_matched_to_the_models_question_forms():
    """A held-out synthetic voice asks a question (samples/vqa/clips). Free text
    hears no question form; matched to the 150 question forms the fuser's
    artifact lists, it is always one of them, answered as that form typed.
    The sample ASR model trained on real speech (2026-12-07) hears this clip's
    "green" as "red" even with the forms: one of the 12 of 158 held-out voices'
    spoken questions it gets wrong with them (docs/vqa.md)."""
    import soundfile as sf

    from apps.vqa.scenes import all_template_texts
    from dsstream.protocol import Answer, Ended

    name, said = (VQA / "clips" / "transcripts.tsv").read_text().strip().split("\t")
    audio, rate = sf.read(VQA / "clips" / name, dtype="float32")
    image = VQA / "images" / _questions()[0][0]

    async def ask(url: str, heard: str, **options) -> tuple[dict, Answer, Answer]:
        async with Client(url) as client:
            started = await client.start("vqa", speech={"sample_rate": rate}, **options)
            await client.send_image(image)
            typed = await client.ask(heard)
            await client.stream_audio(audio, rate)
            await client.flush()
            await client.end()
            events = [e async for e in client.events()]
        assert isinstance(events[-1], Ended)
        (spoken,) = [e for e in events if isinstance(e, Answer)]
        return started.options, typed, spoken

    async def main():
        async with running_server(default_registry()) as server:
            return await ask(server.url, heard), await ask(server.url, said, question_forms=False)

    heard = "is the red object a square or a circle"  # what the forms make of it (above)
    forms = set(all_template_texts())
    (options, typed, spoken), (free_options, _, free) = asyncio.run(main())
    assert options["question_forms"] == 150 and free_options["question_forms"] == 0
    assert spoken.transcript in forms and said in forms
    assert spoken.transcript == heard and (spoken.text, spoken.score) == (typed.text, typed.score)
    assert free.transcript not in forms  # free text is no question at all
