"""The core install's promise (issue 31): serving, transcribe and ask run
without torch.  tests/lean_smoke.py with torch and the convert extra's
packages made unimportable; .ci/run also runs it in a real core-only
environment."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (ROOT / "samples" / "asr" / "model-int8.ds").exists(),
    reason="the sample models are not in samples/",
)


def test_serve_transcribe_and_ask_never_import_torch():
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "lean_smoke.py"), "--block-torch"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ran without torch" in run.stdout


def test_a_feature_of_a_missing_extra_names_the_extra(monkeypatch):
    import engine
    from engine.extras import MissingExtra

    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    monkeypatch.delitem(sys.modules, "engine.conversion", raising=False)
    # As in a fresh process; through __dict__, since getattr would run the lazy import.
    monkeypatch.delitem(engine.__dict__, "convert", raising=False)
    with pytest.raises(MissingExtra, match=r"pip install 'dsstream\[convert\]'"):
        engine.convert  # noqa: B018
