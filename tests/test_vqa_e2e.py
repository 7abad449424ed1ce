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
