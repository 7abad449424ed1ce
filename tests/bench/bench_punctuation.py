"""Punctuation cost per final: the shipped artifact on both engine backends
(ONNX Runtime, the CPU default, and the exported program in eager PyTorch,
the peer), one thread each, a final alone and after 32 words of context.

Finals are LJ001's reference clips (the recipe's scoring set), each the
recognizer's words of one clip.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsstream.pipelines.defaults import SAMPLES_DIR

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_ms  # noqa: E402

PUNCT = Path(SAMPLES_DIR) / "punct" / "punct.ds"
LJ001 = Path(__file__).resolve().parents[3] / "shared" / "data" / "speech" / "lj001"

pytestmark = pytest.mark.skipif(
    not (PUNCT.is_file() and LJ001.is_dir()),
    reason="samples/punct/punct.ds or ../shared/data/speech/lj001 missing",
)


def _finals() -> list[list[str]]:
    from dsstream.punctuation import labels_of

    lines = (LJ001 / "transcripts.tsv").read_text(encoding="utf-8").splitlines()
    return [list(labels_of(line.split("\t")[-1]).words) for line in lines]


def test_punctuation_cost_per_final():
    from dsstream.punctuation import Punctuator, encode

    finals = [f for f in _finals() if f]
    rows = []
    for backend in ("onnxruntime", "torch"):
        punctuator = Punctuator(PUNCT)
        if backend == "torch":
            import torch

            from engine import EngineConfig, InferenceEngine

            torch.set_num_threads(1)
            punctuator.engine.close()
            punctuator.engine = InferenceEngine(PUNCT, config=EngineConfig(backend="torch"))
        alone, with_context = [], []
        context: list[str] = []
        for words in finals:
            t0 = time.perf_counter()
            punctuator.label([], words)
            alone.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            punctuator.label(context, words)
            with_context.append(time.perf_counter() - t0)
            context = (context + words)[-punctuator.context :]
        tokens, segment, _ = encode(punctuator.vocab, finals[0][:32], finals[1], 96)
        single = median_ms(lambda: punctuator._run(tokens, segment), 200, warmup=10)
        rows.append((backend, np.mean(alone) * 1e3, np.mean(with_context) * 1e3,
                     np.percentile(with_context, 95) * 1e3, single))  # fmt: skip
        punctuator.close()
    words = np.mean([len(f) for f in finals])
    print(f"\npunctuation per final, {len(finals)} LJ001 finals ({words:.1f} words on average),"
          " one thread (ms)")  # fmt: skip
    print("| backend | alone, mean | after 32 words of context, mean | p95 | one call, p50 |")
    print("|---|---:|---:|---:|---:|")
    for backend, a, c, p95, single in rows:
        print(f"| {backend} | {a:.3f} | {c:.3f} | {p95:.3f} | {single:.3f} |")
    ratio = rows[1][2] / rows[0][2]
    print(f"ONNX Runtime is {ratio:.1f}x faster per final than eager PyTorch")
    assert all(r[2] > 0 for r in rows)
