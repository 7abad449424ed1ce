"""The dsstream command line, in-process and against a loopback server."""

import json
import subprocess
import sys
from pathlib import Path

import pipelines
import pytest
import soundfile as sf
from conftest import png_bytes, server_thread, tone

from dsstream import __version__
from dsstream.cli import _hotword, main

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsstream.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def server_url():
    """A server with the test pipelines, run in a background thread."""
    with server_thread(pipelines.registry()) as url:
        yield url


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"dsstream {__version__}"


def test_transcribe_against_a_server_prints_finals(tmp_path, server_url):
    wav = tmp_path / "clip.wav"
    sf.write(wav, tone(0.75, 22050), 22050, subtype="PCM_16")
    result = _cli("transcribe", str(wav), "--server", server_url)
    assert result.returncode == 0, result.stderr
    # 0.75 s at 22050 Hz resampled to 16 kHz: ceil(16537 * 320 / 441) samples.
    assert result.stdout.split() == ["12000"]
    events = _cli("transcribe", str(wav), "--server", server_url, "--json").stdout.splitlines()
    kinds = [json.loads(line)["type"] for line in events]
    assert kinds[0] == "partial" and kinds[-2:] == ["endpoint", "ended"] and "final" in kinds


def test_transcribe_in_process_without_a_model_names_what_is_missing(tmp_path):
    wav = tmp_path / "clip.wav"
    sf.write(wav, tone(0.1, 16000), 16000)
    result = _cli("transcribe", str(wav), "--samples", str(tmp_path / "none"))
    assert result.returncode == 2
    assert "not installed" in result.stderr and "model.ds" in result.stderr


def test_transcribe_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....garbage")
    result = _cli("transcribe", str(bad), "--server", "ws://127.0.0.1:9")
    assert result.returncode == 2 and "cannot read audio file" in result.stderr


def test_ask_against_a_server(tmp_path, server_url):
    image = tmp_path / "scene.png"
    image.write_bytes(png_bytes(75, 75))
    result = _cli("ask", str(image), "what is it?", "--server", server_url, "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["text"] == "75x75 what is it?" and answer["type"] == "answer"


def test_ask_in_process_without_a_model(tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes(png_bytes())
    result = _cli("ask", str(image), "what?", "--samples", str(tmp_path))
    assert result.returncode == 2 and "vqa model" in result.stderr


def test_serve_starts_and_serves_without_sample_models(tmp_path):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsstream.cli",
            "serve",
            "--port",
            str(port),
            "--samples",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("server did not come up")
        assert "not installed" in health["models"]["asr"]["sample-asr"]
    finally:
        proc.send_signal(2)  # SIGINT: graceful shutdown
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"ws://127.0.0.1:{port}/v1/stream" in out
    assert "shutting down" in err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("kenlm", {"phrase": "kenlm"}),
        ("new york:7.5", {"phrase": "new york", "boost": 7.5}),
        ("ratio 3:2", {"phrase": "ratio 3", "boost": 2.0}),
        ("a:b", {"phrase": "a:b"}),
    ],
)
def test_hotword_argument(text, expected):
    assert _hotword(text) == expected


def test_serve_beam_reaches_the_asr_decoder(capsys):
    from dsstream.cli import build_parser
    from dsstream.options import AsrOptions
    from dsstream.pipelines.defaults import default_registry

    assert build_parser().parse_args(["serve", "--beam", "12"]).beam == 12
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--beam", "0"])
    assert "must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="beam_width"):
        default_registry(beam_width=0)
    factory = default_registry(beam_width=12).resolve("asr")
    if factory.unavailable_reason() is not None:
        pytest.skip("no sample ASR model")
    pipe = factory.create()
    pipe.begin(AsrOptions())
    assert pipe.decoder.search.cfg.beam_width == 12
    pipe.end()


def test_the_decoder_mode_reaches_the_sample_pipeline(tmp_path, capsys):
    """serve --decoder-mode sets every session's default; transcribe --decoder-mode
    is one session's choice (the sample model with its LM)."""
    from dsstream.cli import _asr_options, build_parser, main
    from dsstream.options import AsrOptions
    from dsstream.pipelines.defaults import default_registry

    assert build_parser().parse_args(["serve", "--decoder-mode", "lexicon"]).decoder_mode == (
        "lexicon"
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--decoder-mode", "closed"])
    args = build_parser().parse_args(["transcribe", "x.wav", "--decoder-mode", "lexicon"])
    assert _asr_options(args)["decoder_mode"] == "lexicon"
    factory = default_registry(decoder_mode="lexicon").resolve("asr")
    if factory.unavailable_reason() is not None:
        pytest.skip("no sample ASR model")
    pipe = factory.create()
    assert pipe.begin(AsrOptions())["decoder_mode"] == "lexicon"
    assert pipe.decoder.search.cfg.mode == "lexicon"
    pipe.end()
    clip = ROOT / "samples" / "asr" / "clips" / "LJ001-0011.flac"
    assert main(["transcribe", str(clip), "--decoder-mode", "lexicon"]) == 0
    words = capsys.readouterr().out.split()
    vocab = factory.create().runtime.decoder.lm.vocab
    assert words and set(words) <= vocab


def test_serve_threads_default_and_checked(capsys):
    """The default serves the measured load (docs/benchmarks.md: 8 pipeline threads
    capped the encoder's batches and 64 streams fell behind); 0 threads is refused."""
    from dsstream.cli import build_parser
    from dsstream.server import ServerConfig

    assert build_parser().parse_args(["serve"]).threads == ServerConfig().worker_threads == 64
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--threads", "0"])
    assert "--threads: must be at least 1, got 0" in capsys.readouterr().err
