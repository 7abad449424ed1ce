"""Cold start of ``dsstream transcribe FILE``, split: imports, model, LM, VAD,
then the audio itself (docs/benchmarks.md, "Lean runtime").  Run it in a fresh
interpreter of the environment to measure:

    python tests/bench/coldstart.py clip.flac
"""

import time

T0 = time.perf_counter()  # before any other import: imports are what is measured

import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

marks: dict[str, float] = {}


def timed(path: str, label: str) -> None:
    """Add the time of every ``path.__init__`` call to ``marks[label]``."""
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    original = cls.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        original(self, *args, **kwargs)
        marks[label] = marks.get(label, 0.0) + time.perf_counter() - t

    cls.__init__ = init


def main() -> None:
    t = time.perf_counter()
    for module in ("dsstream.cli", "dsstream.local", "dsstream.audio",
                   "dsstream.pipelines.defaults", "dsstream.pipelines.asr"):  # fmt: skip
        importlib.import_module(module)  # what transcribe imports
    marks["imports"] = time.perf_counter() - t
    timed("engine.engine.InferenceEngine", "model (ONNX Runtime session)")
    timed("dsstream.decoding.lm.KenLM", "LM (KenLM)")
    timed("dsstream.vad.SileroVad", "VAD (ONNX Runtime session)")
    local = importlib.import_module("dsstream.local")
    send, first_audio = local.LocalSession.send_audio, []

    def send_audio(self: Any, *args: Any, **kwargs: Any) -> Any:
        first_audio.append(time.perf_counter())
        return send(self, *args, **kwargs)

    local.LocalSession.send_audio = send_audio
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        importlib.import_module("dsstream.cli").main(["transcribe", sys.argv[1]])
    end = time.perf_counter()
    print("torch imported:", "torch" in sys.modules)
    for label, seconds in marks.items():
        print(f"{label:36s} {seconds:6.3f} s")
    print(f"{'start-up before audio (in-process)':36s} {first_audio[0] - T0:6.3f} s")
    print(f"{'whole transcribe (in-process)':36s} {end - T0:6.3f} s")
    print("text:", out.getvalue().strip()[:100])


if __name__ == "__main__":
    main()
