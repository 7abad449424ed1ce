"""Engine against its peers in the same run: eager PyTorch, a raw ONNX Runtime
session on the same ONNX graph, and the engine with each backend; then dynamic
batching on vs off under 1-64 concurrent clients.

Models: a small transformer encoder and a conformer-like encoder (conv
subsampling x4, then macaron feed-forward, self-attention and a depthwise
convolution module), a few million parameters each, on 4 s of 80-dim features.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from engine import BatchPolicy, InferenceEngine, convert

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_ms  # noqa: E402

from engine.artifact import read_manifest, read_member

FRAMES = 400  # 4 s of 10 ms feature frames
RUNS = 30


class TransformerEncoder(torch.nn.Module):
    def __init__(self, d: int = 256, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(80, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = torch.nn.Linear(d, 29)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [batch, T, 80] -> [batch, T, 29]
        return self.out(self.encoder(self.proj(feats))).log_softmax(-1)


class ConformerBlock(torch.nn.Module):
    def __init__(self, d: int, heads: int, kernel: int = 15) -> None:
        super().__init__()
        self.ff1 = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 4 * d),
                                       torch.nn.SiLU(), torch.nn.Linear(4 * d, d))  # fmt: skip
        self.norm_att = torch.nn.LayerNorm(d)
        self.att = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm_conv = torch.nn.LayerNorm(d)
        self.pw1 = torch.nn.Conv1d(d, 2 * d, 1)
        self.dw = torch.nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.bn = torch.nn.BatchNorm1d(d)
        self.pw2 = torch.nn.Conv1d(d, d, 1)
        self.ff2 = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 4 * d),
                                       torch.nn.SiLU(), torch.nn.Linear(4 * d, d))  # fmt: skip
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        a = self.norm_att(x)
        x = x + self.att(a, a, a, need_weights=False)[0]
        c = self.norm_conv(x).transpose(1, 2)
        c = torch.nn.functional.glu(self.pw1(c), dim=1)
        c = self.pw2(torch.nn.functional.silu(self.bn(self.dw(c))))
        x = x + c.transpose(1, 2)
        return self.norm(x + 0.5 * self.ff2(x))


class ConformerEncoder(torch.nn.Module):
    def __init__(self, d: int = 144, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.subsample = torch.nn.Sequential(
            torch.nn.Conv2d(1, d, 3, stride=2), torch.nn.ReLU(),
            torch.nn.Conv2d(d, d, 3, stride=2), torch.nn.ReLU(),
        )  # fmt: skip
        self.proj = torch.nn.Linear(d * 19, d)
        self.blocks = torch.nn.ModuleList(ConformerBlock(d, heads) for _ in range(layers))
        self.out = torch.nn.Linear(d, 29)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [batch, T, 80] -> [batch, T', 29]
        x = self.subsample(feats.unsqueeze(1))  # [batch, d, T', 19]
        b, c, t, f = x.shape
        x = self.proj(x.permute(0, 2, 1, 3).reshape(b, t, c * f))
        for block in self.blocks:
            x = block(x)
        return self.out(x).log_softmax(-1)


def _median_ms(fn, runs: int = RUNS) -> float:
    return median_ms(fn, runs)


def _compare(name: str, model: torch.nn.Module, tmp: Path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model.eval()
    x = torch.randn(1, FRAMES, 80)
    dyn = ({0: Dim("batch", min=1, max=64), 1: Dim("T", min=16, max=3000)},)
    path = convert(
        model, (torch.randn(2, FRAMES, 80),), dynamic_shapes=dyn, output=tmp / f"{name}.ds"
    )
    manifest, checksums = read_manifest(path)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    raw = ort.InferenceSession(read_member(path, "onnx/model.onnx", checksums),
                               providers=["CPUExecutionProvider"])  # fmt: skip
    xn = x.numpy()
    rows = {}
    with torch.inference_mode():
        rows["eager PyTorch"] = _median_ms(lambda: model(x))
    rows["raw ONNX Runtime session"] = _median_ms(lambda: raw.run(None, {"feats": xn}))
    for backend in ("onnx", "torch"):
        engine = InferenceEngine(path, backend=backend)
        rows[f"engine ({backend} backend)"] = _median_ms(lambda: engine.infer({"feats": xn}))
    print(f"\n{name}: {params:.1f} M parameters, input [1, {FRAMES}, 80] (4 s), "
          f"passes {[p['name'] for p in manifest.passes if p['changed']]}")  # fmt: skip
    print("runner                         median ms   req/s   vs eager")
    eager = rows["eager PyTorch"]
    for runner, ms in rows.items():
        print(f"{runner:29s}  {ms:9.2f}  {1000 / ms:6.1f}  {eager / ms:7.2f}x")
    overhead = rows["engine (onnx backend)"] / rows["raw ONNX Runtime session"] - 1
    print(f"engine overhead over the raw ONNX Runtime session: {overhead:+.1%}")


def test_bench_engine_vs_eager_and_onnxruntime():
    with tempfile.TemporaryDirectory() as tmp:
        _compare("transformer encoder", TransformerEncoder(), Path(tmp))
        _compare("conformer-like encoder", ConformerEncoder(), Path(tmp))


def _load(engine: InferenceEngine, clients: int, per_client: int, frames: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, frames, 80)).astype(np.float32)
    latencies: list[float] = []
    lock = threading.Lock()

    def client():
        for _ in range(per_client):
            t0 = time.perf_counter()
            engine.infer({"feats": x})
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return len(latencies) / wall, np.percentile(lat, 50), np.percentile(lat, 95)


def test_bench_dynamic_batching():
    # 16 frames: a 160 ms streaming chunk, the server's workload; 100: 1 s utterances.
    for frames in (16, 100):
        _batching(frames)


def _batching(frames: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        dyn = ({0: Dim("batch", min=1, max=64), 1: Dim("T", min=16, max=3000)},)
        path = convert(TransformerEncoder().eval(), (torch.randn(2, 100, 80),),
                       dynamic_shapes=dyn, output=Path(tmp) / "enc.ds")  # fmt: skip
        off = InferenceEngine(path, batch_size=1)
        on = InferenceEngine(path, policy=BatchPolicy(max_batch_size=64, max_queue_delay_ms=0))
        print(f"\ndynamic batching, transformer encoder, [1, {frames}, 80] per request")
        print("clients   off: req/s   p50 ms   p95 ms    on: req/s   p50 ms   p95 ms   speedup")
        for clients in (1, 4, 16, 64):
            per_client = max(4, 256 // clients)
            a = _load(off, clients, per_client, frames)
            b = _load(on, clients, per_client, frames)
            print(f"{clients:7d}  {a[0]:11.1f}  {a[1]:7.1f}  {a[2]:7.1f}  {b[0]:11.1f}  "
                  f"{b[1]:7.1f}  {b[2]:7.1f}  {b[0] / a[0]:7.2f}x")  # fmt: skip
        on.close()
        off.close()
