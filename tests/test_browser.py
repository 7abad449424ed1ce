"""The demo page in a real browser: headless Chromium with a fake microphone
fed from a shipped clip transcribes it live through the sample model.

Needs Debian's ``chromium`` (.ci/run installs it) and the shipped model; the
screenshot is kept in artifacts/test/ for a person to look at.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from browser import Browser, chromium_path
from conftest import async_test, running_server

from dsstream.evaluation import wer
from dsstream.pipelines.defaults import SAMPLES_DIR, default_registry

ROOT = Path(__file__).resolve().parents[1]
CLIP = SAMPLES_DIR / "asr" / "clips" / "heldout-espeak-david.flac"
REFERENCE = "sherlock holmes had sprung out and seized the intruder by the collar"


@contextlib.asynccontextmanager
async def page(flags: list[str], name: str):
    """A browser; if the test fails inside, a screenshot of the page goes to
    artifacts/test/<name>-failure.png for a person to look at."""
    async with Browser(flags) as browser:
        try:
            yield browser
        except BaseException:
            with contextlib.suppress(Exception):
                await browser.screenshot(ROOT / "artifacts" / "test" / f"{name}-failure.png")
            raise


def fake_microphone(wav: Path) -> list[str]:
    """Chromium's flags for a microphone that plays ``wav`` (looped), allowed."""
    return [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
    ]


async def open_ready(browser: Browser, url: str) -> None:
    """The demo page, once /healthz says the models are ready."""
    await browser.open(url)
    await browser.wait_for("document.getElementById('health').textContent.includes('ready')")


async def start_listening(browser: Browser) -> None:
    await browser.eval("document.getElementById('mic-start').click()")
    await browser.wait_for(
        "document.getElementById('asr-status').textContent.startsWith('listening')"
    )


pytestmark = [
    pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed"),
    pytest.mark.skipif(
        not (SAMPLES_DIR / "asr" / "model.ds").exists(), reason="no sample ASR model"
    ),
]


@async_test
async def test_demo_page_transcribes_a_fake_microphone(tmp_path, monkeypatch):
    import time

    from dsstream.pipelines.asr import AsrPipeline

    # A session that takes 1.5 s to start (a busy server): the page must hold the
    # audio it captures meanwhile, or the clip's first words are lost.
    begin = AsrPipeline.begin

    def slow_begin(self, options):
        time.sleep(1.5)
        return begin(self, options)

    monkeypatch.setattr(AsrPipeline, "begin", slow_begin)
    audio, rate = sf.read(CLIP, dtype="float32")
    # Chromium loops the file: silence after the speech lets the VAD close the segment.
    wav = tmp_path / "mic.wav"
    sf.write(wav, np.concatenate([np.zeros(rate // 2), audio, np.zeros(2 * rate)]), rate,
             subtype="PCM_16")  # fmt: skip
    async with running_server(default_registry()) as server:
        async with page(fake_microphone(wav), "browser-demo") as browser:
            await open_ready(browser, server.http_url)
            await start_listening(browser)
            # The level meter moves with the (fake) microphone's speech.
            await browser.wait_for("document.getElementById('level').value > 0.05")
            first = await browser.wait_for(
                "document.querySelector('#finals .final-segment')?.textContent", timeout=60
            )
            shot = await browser.screenshot(ROOT / "artifacts" / "test" / "browser-demo.png")
            status = await browser.eval("document.getElementById('asr-status').textContent")
            # Commands only: the page sends them as a grammar; the clip is one of them.
            # Stopped and started again at once (the old session's late close once
            # stopped the new capture).
            await browser.eval(
                "document.getElementById('mic-stop').click(); "
                f"document.getElementById('commands').value = 'lights on, {REFERENCE}'; "
                "document.getElementById('mic-start').click()"
            )
            exact = await browser.wait_for(
                "[...document.querySelectorAll('#finals .final-segment')]"
                f".some((e) => e.textContent === '{REFERENCE}')", timeout=60
            )  # fmt: skip
            again = await browser.eval("document.getElementById('asr-status').textContent")
    assert shot.stat().st_size > 10_000
    assert "Hz" in status  # the page reports the rate it captured at
    # The page's first final is the clip as the model heard it through the browser.
    # The card (INT8): 4 of 12 words; the browser's capture may cost up to 2 more.
    assert wer([REFERENCE], [spoken(first)]) <= 4 / 12 + 2 / 12, first
    assert first[0].isupper()  # the page asks for punctuation (its box is ticked)
    # Free text gets some words wrong; the grammar's final is the sentence itself.
    assert exact and again.startswith("listening")


def spoken(text: str) -> str:
    """Written text back to the recognizer's words (marks and capitals removed)."""
    return " ".join(w.strip(".,?!").lower() for w in text.split())


@async_test
async def test_demo_page_says_when_its_session_is_lost(tmp_path):
    """A session whose server process goes away (no ``ended``): the page says
    so with the clients' ``unavailable`` error instead of going quiet."""
    import asyncio

    audio, rate = sf.read(CLIP, dtype="float32")
    wav = tmp_path / "mic.wav"
    sf.write(wav, np.concatenate([audio, np.zeros(rate)]), rate, subtype="PCM_16")
    async with running_server(default_registry()) as server:
        async with page(fake_microphone(wav), "browser-lost") as browser:
            await open_ready(browser, server.http_url)
            await start_listening(browser)
            while not server.runners:
                await asyncio.sleep(0.05)
            for runner in list(server.runners):  # the socket drops, as when a process dies
                runner.ws.transport.abort()
            status = await browser.wait_for(
                "document.getElementById('asr-status').textContent.includes('unavailable') "
                "&& document.getElementById('asr-status').textContent",
                timeout=30,
            )
    assert status.startswith("error: unavailable: the connection was lost"), status


@async_test
async def test_demo_page_transcribes_a_dropped_file():
    """A file dropped on the page goes through POST /v1/audio/transcriptions;
    its words are shown, the low-confidence ones marked, with their times."""
    import base64

    from dsstream.local import transcribe

    clip = base64.b64encode((SAMPLES_DIR / "asr" / "clips" / "LJ001-0011.flac").read_bytes())
    drop = (
        "(async () => {"
        f"  const bytes = Uint8Array.from(atob('{clip.decode()}'), (c) => c.charCodeAt(0));"
        "  const data = new DataTransfer();"
        "  data.items.add(new File([bytes], 'clip.flac', { type: 'audio/flac' }));"
        "  const drop = document.getElementById('drop');"
        "  drop.dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true }));"
        "})()"
    )
    async with running_server(default_registry()) as server:
        async with page([], "browser-file") as browser:
            await open_ready(browser, server.http_url)
            await browser.eval(drop)
            status = await browser.wait_for(
                "document.getElementById('file-status').textContent.includes('words') "
                "&& document.getElementById('file-status').textContent", timeout=60
            )  # fmt: skip
            words = await browser.eval(
                "[...document.querySelectorAll('#file-words .word')].map((w) => "
                "[w.textContent, w.classList.contains('low'), w.title])"
            )
    # The page uploads through the REST endpoint, which punctuates by default.
    expected = transcribe(SAMPLES_DIR / "asr" / "clips" / "LJ001-0011.flac", punctuate=True).words
    assert [w[0] for w in words] == [w.word for w in expected], status
    assert [w[1] for w in words] == [w.confidence < 0.6 for w in expected]
    assert all(" s, confidence " in w[2] for w in words) and status.startswith("clip.flac: 4.5 s")


@async_test
async def test_demo_page_answers_about_a_clicked_sample_scene():
    """One VQA round: click a shipped scene, ask its sample question (filled in)."""
    async with running_server(default_registry()) as server:
        async with page([], "browser-vqa") as browser:
            await browser.open(server.http_url)
            await browser.wait_for("document.querySelectorAll('#scenes img').length === 4")
            await browser.eval("document.querySelector('#scenes img[alt=\"scene0.png\"]').click()")
            await browser.wait_for(
                "document.getElementById('vqa-status').textContent.startsWith('image sent')"
            )
            question = await browser.eval("document.getElementById('question').value")
            await browser.eval("document.getElementById('question-form').requestSubmit()")
            answer = await browser.wait_for(
                "document.querySelector('#answers li')?.textContent.includes('→') "
                "&& document.querySelector('#answers li').textContent"
            )
    assert question == "which shape does the red object have?"
    assert answer.startswith(question) and "→ square" in answer, answer
