"""Streaming sessions: how many streams one machine keeps in real time with
steps batched across sessions vs one forward pass per stream, and the memory
of the kv_cache checkpoint strategy against keeping activations.

Model: a small streaming encoder (4 layers, d 144, chunked self-attention over
a 32-frame left context, feed-forward 4x), 40 ms frames (after x4
subsampling), chunks of 8 frames = 320 ms of audio per step.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from engine import BatchPolicy, InferenceEngine, StateSpec, convert

D, LAYERS, LEFT, CHUNK, FRAME_S = 144, 4, 32, 8, 0.04


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.o = torch.nn.Linear(D, D)
        self.ff = torch.nn.Sequential(torch.nn.Linear(D, 4 * D), torch.nn.SiLU(),
                                      torch.nn.Linear(4 * D, D))  # fmt: skip

    def forward(self, x, ck, cv, filled):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        k, v = torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        scores = q @ k.transpose(1, 2) / math.sqrt(D)
        slot = torch.arange(LEFT + CHUNK, dtype=x.dtype)[None, None, :]
        scores = scores.masked_fill(slot < (LEFT - filled)[:, :, None], float("-inf"))
        x = x + self.o(scores.softmax(-1) @ v)
        return x + self.ff(self.norm2(x)), k[:, -LEFT:], v[:, -LEFT:]


class StreamingEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(LAYERS))
        self.out = torch.nn.Linear(D, 29)

    def forward(self, x, cache_k, cache_v, filled):  # caches [B, LAYERS, LEFT, D]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cache_k[:, i], cache_v[:, i], filled)
            new_k.append(k)
            new_v.append(v)
        return (self.out(x).log_softmax(-1), torch.stack(new_k, 1), torch.stack(new_v, 1),
                torch.clamp(filled + CHUNK, max=LEFT))  # fmt: skip


def _artifact(tmp: Path) -> Path:
    torch.manual_seed(0)
    example = (torch.randn(2, CHUNK, D), torch.randn(2, LAYERS, LEFT, D),
               torch.randn(2, LAYERS, LEFT, D), torch.full((2, 1), float(LEFT)))  # fmt: skip
    batch = Dim("batch", min=1, max=128)
    return convert(
        StreamingEncoder().eval(), example, dynamic_shapes=tuple({0: batch} for _ in example),
        output_names=["logp", "new_k", "new_v", "new_filled"], output=tmp / "stream.ds",
        state=[StateSpec("k", "cache_k", "new_k"), StateSpec("v", "cache_v", "new_v"),
               StateSpec("filled", "filled", "new_filled")],
    )  # fmt: skip


def _serve(engine: InferenceEngine, streams: int, rounds: int, batched: bool) -> float:
    sessions = [engine.open_session() for _ in range(streams)]
    chunk = np.random.default_rng(0).standard_normal((1, CHUNK, D)).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(rounds):
        if batched:
            engine.step_sessions([(s, {"x": chunk}) for s in sessions])
        else:
            for s in sessions:
                s.step({"x": chunk})
    wall = time.perf_counter() - t0
    for s in sessions:
        s.close()
    return streams * rounds * CHUNK * FRAME_S / wall  # audio seconds per wall second


def _activation_bytes(model: StreamingEncoder) -> int:
    """Bytes of every layer's activations for LEFT frames: what recomputing the
    left context from kept activations would need (hooks on every module)."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    x = torch.randn(1, LEFT, D)
    with torch.no_grad():
        h = x
        for layer in model.layers:
            q, k, v = layer.qkv(layer.norm1(h)).chunk(3, dim=-1)
            att = (q @ k.transpose(1, 2) / math.sqrt(D)).softmax(-1) @ v
            h = h + layer.o(att)
            h = h + layer.ff(layer.norm2(h))
    for handle in handles:
        handle.remove()
    return total


def test_bench_sessions():
    with tempfile.TemporaryDirectory() as tmp:
        path = _artifact(Path(tmp))
        batched = InferenceEngine(path, policy=BatchPolicy(max_batch_size=128))
        single = InferenceEngine(path, batch_size=1)
        print(f"\nstreaming encoder: {LAYERS} layers, d {D}, left context {LEFT} frames, "
              f"chunk {CHUNK} frames ({CHUNK * FRAME_S * 1000:.0f} ms)")  # fmt: skip
        print("streams   per-stream audio s/s   batched audio s/s   speedup   batched keeps up")
        for streams in (1, 8, 32, 64):
            rounds = max(8, 256 // streams)
            a = _serve(single, streams, rounds, batched=False)
            b = _serve(batched, streams, rounds, batched=True)
            print(
                f"{streams:7d}  {a:21.1f}  {b:18.1f}  {b / a:7.2f}x   "
                f"{'yes' if b >= streams else 'no'} ({b / streams:.1f}x real time each)"
            )
        s = batched.open_session()
        state = s.nbytes
        acts = _activation_bytes(StreamingEncoder())
        print(
            f"state per session (kv_cache strategy): {state} bytes; keeping every layer's "
            f"activations for the same left context: {acts} bytes; saved {1 - state / acts:.0%}"
        )
        s.close()
        batched.close()
        single.close()
