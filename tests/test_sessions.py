"""Streaming sessions: state through the artifact, batched == alone,
streaming == offline with the equivalent chunk mask, the state pool, eviction,
misuse errors and hot swap pinning."""

import math
import threading

import numpy as np
import pytest
import torch
from torch.export import Dim

from engine import (
    BatchPolicy,
    InferenceEngine,
    SessionClosed,
    SessionError,
    SessionEvicted,
    SessionPoolFull,
    StateSpec,
    convert,
    read_manifest,
)
from engine.sessions import SessionPool

CHUNK, LEFT, DIM = 4, 8, 16


class ChunkedAttention(torch.nn.Module):
    """One chunk of frames attends to itself and to the last LEFT frames.

    State: keys and values of the last LEFT frames and how many are filled.
    """

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(DIM, DIM) for _ in range(4))

    def forward(self, x, cache_k, cache_v, filled):
        # x [B, CHUNK, DIM]; cache_k/v [B, LEFT, DIM]; filled [B, 1] (float count)
        k = torch.cat([cache_k, self.k(x)], dim=1)
        v = torch.cat([cache_v, self.v(x)], dim=1)
        scores = self.q(x) @ k.transpose(1, 2) / math.sqrt(DIM)  # [B, CHUNK, LEFT+CHUNK]
        slot = torch.arange(LEFT + CHUNK, dtype=x.dtype)[None, None, :]
        empty = slot < (LEFT - filled)[:, :, None]  # cache slots never filled
        scores = scores.masked_fill(empty, float("-inf"))
        y = self.o(scores.softmax(-1) @ v) + x
        return y, k[:, -LEFT:], v[:, -LEFT:], torch.clamp(filled + CHUNK, max=LEFT)


def offline(model: ChunkedAttention, x: torch.Tensor) -> torch.Tensor:
    """The whole utterance at once with the equivalent chunked attention mask."""
    t = x.shape[1]
    q, k, v = model.q(x), model.k(x), model.v(x)
    scores = q @ k.transpose(1, 2) / math.sqrt(DIM)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    chunk_end = (i // CHUNK + 1) * CHUNK
    allowed = (j < chunk_end) & (j >= chunk_end - CHUNK - LEFT)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return model.o(scores.softmax(-1) @ v) + x


STATES = [
    StateSpec("k", "cache_k", "new_k"),
    StateSpec("v", "cache_v", "new_v"),
    StateSpec("filled", "filled", "new_filled"),
]


@pytest.fixture(scope="module")
def streaming(tmp_path_factory):
    torch.manual_seed(0)
    model = ChunkedAttention().eval()
    batch = Dim("batch", min=1, max=64)
    example = (torch.randn(2, CHUNK, DIM), torch.randn(2, LEFT, DIM), torch.randn(2, LEFT, DIM),
               torch.full((2, 1), float(LEFT)))  # fmt: skip
    path = convert(
        model, example, dynamic_shapes=tuple({0: batch} for _ in example),
        output_names=["y", "new_k", "new_v", "new_filled"],
        output=tmp_path_factory.mktemp("s") / "stream.ds", state=STATES,
    )  # fmt: skip
    return model, path


def _utterance(chunks: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, chunks * CHUNK, DIM)).astype(np.float32)


def test_state_round_trips_through_the_artifact(streaming):
    _, path = streaming
    manifest, _ = read_manifest(path)
    assert manifest.extra["state"] == [
        {"name": "k", "input": "cache_k", "output": "new_k"},
        {"name": "v", "input": "cache_v", "output": "new_v"},
        {"name": "filled", "input": "filled", "output": "new_filled"},
    ]
    engine = InferenceEngine(path)
    session = engine.open_session()
    assert session.state["k"].shape == (1, LEFT, DIM) and session.nbytes == (2 * LEFT * DIM + 1) * 4
    session.close()


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_streaming_equals_offline_with_the_chunk_mask(streaming, backend):
    model, path = streaming
    engine = InferenceEngine(path, backend=backend)
    x = _utterance(7, 0)
    session = engine.open_session()
    ys = [session.step({"x": x[:, c * CHUNK : (c + 1) * CHUNK]})["y"] for c in range(7)]
    streamed = np.concatenate(ys, axis=1)
    with torch.no_grad():
        ref = offline(model.double(), torch.from_numpy(x).double()).numpy()
        eager = offline(model.float(), torch.from_numpy(x)).numpy()
    assert np.abs(streamed - ref).max() <= 4 * np.abs(eager - ref).max() + 1e-6
    session.close()


def test_a_session_alone_equals_it_batched_with_15_others(streaming):
    _, path = streaming
    engine = InferenceEngine(path, policy=BatchPolicy(max_batch_size=16, max_queue_delay_ms=50))
    utterances = [_utterance(5, seed) for seed in range(16)]
    alone = engine.open_session()
    solo = [alone.step({"x": utterances[0][:, c * CHUNK : (c + 1) * CHUNK]})["y"]
            for c in range(5)]  # fmt: skip
    sessions = [engine.open_session() for _ in utterances]
    together = [[] for _ in utterances]
    for c in range(5):
        outs = engine.step_sessions([
            (s, {"x": u[:, c * CHUNK : (c + 1) * CHUNK]}) for s, u in zip(sessions, utterances)
        ])  # fmt: skip
        for i, out in enumerate(outs):
            together[i].append(out["y"])
    assert max(engine.stats()["batch_size_histogram"]) == 16  # really one pass for all 16
    for a, b in zip(solo, together[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_pool_cap_eviction_and_misuse(streaming):
    _, path = streaming
    per_session = (2 * LEFT * DIM + 1) * 4
    engine = InferenceEngine(path, session_pool_bytes=2 * per_session, session_idle_timeout_s=60)
    a, b = engine.open_session(), engine.open_session()
    with pytest.raises(SessionPoolFull, match="pool is full"):
        engine.open_session()
    a.close()
    a.close()  # twice is harmless
    with pytest.raises(SessionClosed):
        a.step({"x": _utterance(1, 0)})
    c = engine.open_session()
    stats = engine.stats()["sessions"]
    assert stats["sessions"] == 2 and stats["used_bytes"] == 2 * per_session
    assert stats["state_bytes_per_session"] == per_session and stats["refusals"] == 1
    # Idle eviction, with the pool's clock moved forward.
    now = [1000.0]
    engine.sessions.clock = lambda: now[0]
    for sid in list(engine.sessions.sessions):
        engine.sessions.sessions[sid] = (per_session, now[0])
    now[0] += 61
    d = engine.open_session()  # makes room by evicting the idle ones
    with pytest.raises(SessionEvicted, match="evicted"):
        b.step({"x": _utterance(1, 0)})
    with pytest.raises(SessionEvicted):
        c.step({"x": _utterance(1, 0)})
    assert engine.stats()["sessions"]["evictions"] == 2
    d.step({"x": _utterance(1, 1)})


def test_session_pool_bookkeeping_is_exact():
    clock = [0.0]
    pool = SessionPool(cap_bytes=100, idle_timeout_s=10, clock=lambda: clock[0])
    assert pool.reserve(1, 40) == [] and pool.reserve(2, 40) == []
    with pytest.raises(SessionPoolFull):
        pool.reserve(3, 40)
    clock[0] = 5
    pool.touch(2)
    clock[0] = 11  # 1 idle since 0 (> 10 s), 2 since 5
    assert pool.reserve(3, 40) == [1]
    assert pool.used_bytes == 80 and sorted(pool.sessions) == [2, 3] and pool.evictions == 1


def test_hot_swap_keeps_open_sessions_on_their_model(streaming, tmp_path):
    model, path = streaming
    engine = InferenceEngine(path)
    old_session = engine.open_session()
    torch.manual_seed(9)
    other = ChunkedAttention().eval()
    batch = Dim("batch", min=1, max=64)
    example = (torch.randn(2, CHUNK, DIM), torch.randn(2, LEFT, DIM), torch.randn(2, LEFT, DIM),
               torch.full((2, 1), float(LEFT)))  # fmt: skip
    new_path = convert(other, example, dynamic_shapes=tuple({0: batch} for _ in example),
                       output_names=["y", "new_k", "new_v", "new_filled"],
                       output=tmp_path / "new.ds", state=STATES)  # fmt: skip
    engine.swap(new_path)
    new_session = engine.open_session()
    x = _utterance(1, 3)
    with torch.no_grad():
        expect_old = offline(model, torch.from_numpy(x)).numpy()
        expect_new = offline(other, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(old_session.step({"x": x})["y"], expect_old, atol=1e-5)
    np.testing.assert_allclose(new_session.step({"x": x})["y"], expect_new, atol=1e-5)


def test_concurrent_sessions_from_threads(streaming):
    model, path = streaming
    engine = InferenceEngine(path, policy=BatchPolicy(max_batch_size=8, max_queue_delay_ms=2))
    results = {}

    def run(seed):
        x = _utterance(4, seed)
        session = engine.open_session()
        ys = [session.step({"x": x[:, c * CHUNK : (c + 1) * CHUNK]})["y"] for c in range(4)]
        session.close()
        results[seed] = (x, np.concatenate(ys, axis=1))

    threads = [threading.Thread(target=run, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, y in results.values():
        with torch.no_grad():
            np.testing.assert_allclose(y, offline(model, torch.from_numpy(x)).numpy(), atol=1e-5)
    assert engine.stats()["sessions"]["sessions"] == 0


def test_models_without_state_refuse_sessions_and_bad_state_specs(tmp_path):
    path = convert(torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),), output=tmp_path / "l.ds")
    with pytest.raises(SessionError, match="declares no streaming state"):
        InferenceEngine(path).open_session()
    with pytest.raises(ValueError, match="not in the model"):
        convert(torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),), output=tmp_path / "b.ds",
                state=[StateSpec("s", "nope", "output_0")])  # fmt: skip
    engine = InferenceEngine(path)
    with pytest.raises(ValueError, match="checkpoint"):
        engine.set_checkpoint_strategy("activations")
    engine.set_checkpoint_strategy("kv_cache")
