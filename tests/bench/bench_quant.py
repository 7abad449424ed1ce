"""INT8 against float32 on the shipped sample models, ONNX Runtime on this CPU:
artifact size and latency of the ASR streaming step (1, 16 and 64 sessions per
call) and of the VQA stages (image encode; 1 and 18 questions).  Accuracy deltas
come from the recipes (python -m apps.asr.quantize, python -m apps.vqa.quantize)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_ms  # noqa: E402

from engine import InferenceEngine  # noqa: E402
from engine.artifact import read_manifest  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
PAIRS = {
    "asr step": (SAMPLES / "asr" / "model.ds", SAMPLES / "asr" / "model-int8.ds"),
    "vqa image": (SAMPLES / "vqa" / "image.ds", SAMPLES / "vqa" / "image-int8.ds"),
    "vqa fuser": (SAMPLES / "vqa" / "fuser.ds", SAMPLES / "vqa" / "fuser-int8.ds"),
}


def _zeros(path: Path, batch: int) -> list[np.ndarray]:
    manifest, _ = read_manifest(path)
    feeds = []
    for spec in manifest.inputs:
        shape = [batch if isinstance(d, str) else d for d in spec.shape]
        feeds.append(np.zeros(shape, dtype=np.dtype(spec.dtype)))
    return feeds


def test_bench_int8_vs_fp32():
    missing = [str(p) for pair in PAIRS.values() for p in pair if not p.exists()]
    if missing:
        pytest.skip(f"missing artifacts: {missing}")
    print("\nINT8 vs float32, ONNX Runtime CPU, median of 30")
    print(f"{'model':12s} {'fp32 MB':>8s} {'int8 MB':>8s} {'smaller':>8s}")
    for name, (fp, q) in PAIRS.items():
        a, b = fp.stat().st_size / 1e6, q.stat().st_size / 1e6
        print(f"{name:12s} {a:8.2f} {b:8.2f} {1 - b / a:8.1%}")
    print(f"\n{'call':34s} {'fp32 ms':>8s} {'int8 ms':>8s} {'speedup':>8s}")
    engines = {p: InferenceEngine(p, backend="onnx") for pair in PAIRS.values() for p in pair}
    fp, q = PAIRS["asr step"]
    for batch in (1, 16, 64):
        ms = [median_ms(lambda p=p: engines[p].infer(_zeros(p, batch)), 30) for p in (fp, q)]
        print(f"{'asr step, ' + str(batch) + ' sessions':34s} {ms[0]:8.3f} {ms[1]:8.3f} "
              f"{ms[0] / ms[1]:7.2f}x")  # fmt: skip
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, 75, 75), dtype=np.float32)
    for label, fp_path, q_path in [("vqa image encode", *PAIRS["vqa image"])]:
        ms = [median_ms(lambda p=p: engines[p].infer([image]), 30) for p in (fp_path, q_path)]
        print(f"{label:34s} {ms[0]:8.3f} {ms[1]:8.3f} {ms[0] / ms[1]:7.2f}x")
    fp_f, q_f = PAIRS["vqa fuser"]
    for questions in (1, 18):
        tokens = rng.integers(1, 50, (questions, 12)).astype(np.int64)
        ms = []
        for img_path, fuser_path in ((PAIRS["vqa image"][0], fp_f), (PAIRS["vqa image"][1], q_f)):
            kv = np.repeat(engines[img_path].infer([image])["kv"], questions, 0)
            ms.append(median_ms(lambda f=fuser_path, kv=kv: engines[f].infer([tokens, kv]), 30))
        print(f"{'vqa ' + str(questions) + ' question(s)':34s} {ms[0]:8.3f} {ms[1]:8.3f} "
              f"{ms[0] / ms[1]:7.2f}x")  # fmt: skip
