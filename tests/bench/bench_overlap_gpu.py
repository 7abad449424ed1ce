"""Copy/compute overlap on the GPU (``InferenceEngine.enable_overlap``): the same
stream of large batches through the engine with and without it, as requests
per second and their ratio.  Skipped without a GPU; tests/gpu/run_all.sh runs it."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engine import BatchPolicy, Dim, InferenceEngine, convert

pytestmark = pytest.mark.cuda


class _Encoder(torch.nn.Module):
    """Convolutions over 224x224 images: about as long on an H200 as copying its input."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        channels = 3
        for out in (64, 64, 128, 128):
            layers += [torch.nn.Conv2d(channels, out, 3, padding=1), torch.nn.ReLU()]
            channels = out
        self.net = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _throughput(engine: InferenceEngine, batches: list[np.ndarray]) -> float:
    for x in batches[:3]:  # warm-up
        engine.infer_async({"x": x}).result()
    start = time.perf_counter()
    futures = [engine.infer_async({"x": x}) for x in batches]
    for f in futures:
        f.result()
    return len(batches) / (time.perf_counter() - start)


def test_bench_overlap(tmp_path):
    path = tmp_path / "enc.ds"
    convert(_Encoder().eval(), (torch.randn(2, 3, 224, 224),),
            dynamic_shapes=({0: Dim("batch", min=1, max=64)},), output=path)  # fmt: skip
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((32, 3, 224, 224), dtype=np.float32) for _ in range(40)]
    policy = BatchPolicy(max_batch_size=1)  # each request is a prepared batch of 32 images
    results = {}
    for overlap in (False, True):
        engine = InferenceEngine(path, device="cuda:0", policy=policy)
        if overlap:
            assert engine.enable_overlap(buffer_size=2)
        results[overlap] = _throughput(engine, batches)
        engine.close()
    mb, ratio = batches[0].nbytes / 1e6, results[True] / results[False]
    print(f"\n{mb:.1f} MB per batch: plain {results[False]:.1f} batches/s, "
          f"overlap {results[True]:.1f} batches/s, {ratio:.2f}x")  # fmt: skip
