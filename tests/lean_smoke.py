"""Smoke test of the core install, without torch: ``dsstream serve`` with the
shipped sample models, one WebSocket session that transcribes a shipped clip,
``dsstream transcribe`` (raw and punctuated) and ``dsstream ask`` in this
process; torch is never imported.

``.ci/run`` runs it in a second environment built from the clone with the core
install only (``pip install .``: torch is not there at all);
tests/test_lean.py runs it in the full environment with ``--block-torch``
(torch and the convert extra's packages made unimportable, in this process
and in the server's), so the default suite catches a torch import on these
paths too.

    python tests/lean_smoke.py [--block-torch]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ROOT / "samples" / "asr" / "clips"
IMAGES = ROOT / "samples" / "vqa" / "images"
# Word errors the served INT8 model may make on each clip (its card's count).
CLIP, CLIP_WER = "LJ001-0011.flac", 3 / 15
# The packages a core install must run without: the convert extra's.
EXTRA_ONLY = ("torch", "torchaudio", "onnx", "onnxscript")
BLOCK = (
    "import sys\n"
    f"for name in {EXTRA_ONLY!r}:\n"
    "    sys.modules[name] = None  # import raises ImportError, as if not installed\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(args: list[str]) -> tuple[int, str]:
    """``dsstream ARGS`` in this process: (exit code, stdout)."""
    from dsstream.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(args)
    return code, out.getvalue()


def _reference(name: str) -> str:
    for line in (CLIPS / "transcripts.tsv").read_text().splitlines():
        clip, text = line.split("\t", 1)
        if clip == name:
            return text
    raise KeyError(name)


def _check_text(what: str, text: str) -> None:
    from dsstream.evaluation import wer

    error = wer([_reference(CLIP)], [text])
    print(f"{what}: {text!r} (WER {error:.2%})")
    if error > CLIP_WER + 1e-9:
        raise SystemExit(f"{what}: WER {error:.2%} above the card's {CLIP_WER:.2%}")


def _finals(stdout: str) -> str:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return " ".join(e["text"] for e in events if e.get("type") == "final" and e.get("text"))


def _serve(block: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    code = (BLOCK if block else "") + (
        "from dsstream.cli import main\n"
        f"sys.exit(main(['serve', '--host', '127.0.0.1', '--port', '{port}']))\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Not from the checkout's folder: a core install runs its installed package.
    argv = [sys.executable, "-c", "import sys\n" + code]
    proc = subprocess.Popen(argv, cwd=tempfile.gettempdir(), env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"dsstream serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("dsstream serve did not answer /healthz within 120 s")


def main(argv: list[str] | None = None) -> int:
    # A core install has the packages in site-packages; the models stay here.
    os.environ.setdefault("DSSTREAM_SAMPLES", str(ROOT / "samples"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-torch", action="store_true")
    args = parser.parse_args(argv)
    if args.block_torch:
        exec(BLOCK)
    elif importlib.util.find_spec("torch") is not None:
        raise SystemExit("torch is installed here: run with --block-torch, or in a core install")

    server, port = _serve(args.block_torch)
    try:
        code, out = _cli(["transcribe", "--server", f"ws://127.0.0.1:{port}/v1/stream",
                          "--json", str(CLIPS / CLIP)])  # fmt: skip
        if code != 0:
            raise SystemExit(f"transcribe through the server failed ({code})")
        _check_text("served session", _finals(out))
    finally:
        server.terminate()
        server.wait(30)

    code, out = _cli(["transcribe", "--json", str(CLIPS / CLIP)])
    if code != 0:
        raise SystemExit(f"dsstream transcribe failed ({code})")
    _check_text("dsstream transcribe", _finals(out))
    # Punctuation runs in the core install too (its model through ONNX Runtime).
    code, out = _cli(["transcribe", "--json", "--punctuate", str(CLIPS / CLIP)])
    written = _finals(out)
    if code != 0 or not written[:1].isupper():
        raise SystemExit(f"dsstream transcribe --punctuate failed ({code}): {written!r}")
    _check_text("punctuated", " ".join(w.strip(".,?!").lower() for w in written.split()))

    image, question, _, answer = (IMAGES / "questions.tsv").read_text().splitlines()[1].split("\t")
    code, out = _cli(["ask", "--json", str(IMAGES / image), question])
    got = json.loads(out.strip().splitlines()[-1]).get("text", "")
    print(f"dsstream ask: {question!r} -> {got!r} (expected {answer!r})")
    if code != 0 or got != answer:
        raise SystemExit("dsstream ask did not answer the sample question")

    loaded = sorted(name for name in EXTRA_ONLY if sys.modules.get(name) is not None)
    if loaded:
        raise SystemExit(f"imported without need: {', '.join(loaded)}")
    print("core install: serve, a streamed session, transcribe and ask ran without torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
