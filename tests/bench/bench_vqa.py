"""VQA latency: image encode, per question with the image's keys/values cached,
and per question when the image is re-encoded each time (what the cache saves).

Both engine backends are measured on the shipped artifacts: ONNX Runtime (the
CPU default) and the exported program in eager PyTorch (the peer).
"""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from dsstream.pipelines.defaults import SAMPLES_DIR

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_ms  # noqa: E402

VQA = Path(SAMPLES_DIR) / "vqa"
REPEATS = 200

pytestmark = pytest.mark.skipif(
    not (VQA / "fuser.ds").exists(), reason="the sample VQA model is not in samples/vqa"
)


def _p50_ms(fn) -> float:
    return median_ms(fn, REPEATS, warmup=10)


def test_vqa_latency():
    from apps.vqa.scenes import make_scene, render
    from dsstream.options import VqaOptions
    from dsstream.pipelines.vqa import VqaRuntime
    from dsstream.protocol import Question
    from engine import InferenceEngine

    buf = io.BytesIO()
    render(make_scene(random.Random(0))).save(buf, "PNG")
    png = buf.getvalue()
    rows = []
    for backend in ("onnx", "torch"):
        image = InferenceEngine(VQA / "image.ds", backend=backend)
        fuser = InferenceEngine(VQA / "fuser.ds", backend=backend)
        pixels = np.random.default_rng(0).random((1, 3, 75, 75), dtype=np.float32)
        kv = image.infer({"image": pixels})["kv"]
        tokens = np.array([[5, 9, 3, 7, 2, 8, 4, 6, 1]], np.int64)
        encode = _p50_ms(lambda: image.infer({"image": pixels}))
        ask = _p50_ms(lambda: fuser.infer({"tokens": tokens, "kv": kv}))
        rows.append((backend, encode, ask))
    runtime = VqaRuntime(VQA / "image.ds", VQA / "fuser.ds")
    pipe = runtime.pipeline()
    pipe.begin(VqaOptions())
    pipe.set_image(png)
    question = Question("q", "what is the shape of the object closest to the red object?")
    cached = _p50_ms(lambda: pipe.step(question))

    def uncached() -> None:
        runtime.fuser_engine.infer({"tokens": tokens, "kv": runtime.image_kv(
            runtime.encode_image(png))[None]})  # fmt: skip

    fresh = _p50_ms(uncached)
    print("\nVQA latency, batch 1, p50 over", REPEATS, "runs (ms)")
    print("| backend | image encode | question (cached image kv) |")
    print("|---|---:|---:|")
    for backend, encode, ask in rows:
        print(f"| {backend} | {encode:.2f} | {ask:.2f} |")
    print(f"pipeline question with the image cached: {cached:.2f} ms; decoding and "
          f"re-encoding the image for each question: {fresh:.2f} ms "
          f"(cache saves {fresh - cached:.2f} ms, {1 - cached / fresh:.0%})")  # fmt: skip
    pipe.end()
    runtime.close()
    assert cached < fresh
