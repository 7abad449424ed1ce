"""Dynamic batching: the pure scheduler with exact plans, then the engine
under concurrent load (batched == unbatched), masks from shape callbacks,
queue limits, deadlines, async forms, stats and hot swap."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from torch.export import Dim

from engine import (
    BatchPolicy,
    DeadlineExceeded,
    InferenceEngine,
    InputError,
    QueuedRequest,
    QueueFull,
    convert,
    plan,
)
from engine.batching import length_bucket

P = BatchPolicy(max_batch_size=4, max_queue_delay_ms=10.0)


def q(i, t, key="a", deadline=None):
    return QueuedRequest(i, t, key, deadline)


def test_plan_sends_full_batches_at_once_oldest_first():
    queue = [q(i, 0.0) for i in range(9)]
    out = plan(queue, 0.001, P)
    assert out.batches == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert out.expired == () and out.wait_s == pytest.approx(0.009)


def test_plan_waits_for_company_then_sends_what_it_has():
    queue = [q(0, 0.0), q(1, 0.004)]
    assert plan(queue, 0.005, P).batches == ()
    assert plan(queue, 0.005, P).wait_s == pytest.approx(0.005)
    assert plan(queue, 0.0101, P).batches == ((0, 1),)


def test_plan_groups_by_key_and_prefers_sizes():
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_ms=50.0, preferred_batch_sizes=(2, 4))
    queue = [q(0, 0.0, "x"), q(1, 0.0, "y"), q(2, 0.001, "x"), q(3, 0.002, "x")]
    out = plan(queue, 0.003, policy)
    assert out.batches == ((0, 2),)  # "x" reached preferred size 2; its third waits
    assert out.wait_s == pytest.approx(0.047)  # "y", waiting since 0.0, is due first


def test_plan_expires_requests_past_their_deadline():
    queue = [q(0, 0.0, deadline=0.002), q(1, 0.0, deadline=0.5), q(2, 0.001)]
    out = plan(queue, 0.003, P)
    assert out.expired == (0,) and out.batches == ()
    assert out.wait_s == pytest.approx(0.007)
    assert plan(queue, 0.011, P).batches == ((1, 2),)


def test_plan_on_empty_queue_waits_for_arrivals():
    assert plan([], 1.0, P).wait_s is None


def test_length_buckets():
    assert [length_bucket(n, 1.25) for n in (1, 2, 3, 4, 5)] == [1, 2, 3, 4, 5]
    buckets = {}
    for n in range(1, 2000):
        buckets.setdefault(length_bucket(n, 1.25), []).append(n)
    for bucket, lengths in buckets.items():
        assert max(lengths) <= bucket and max(lengths) / min(lengths) <= 1.25 + 1e-9
    assert len(buckets) < 40  # few buckets, so batches fill
    assert length_bucket(37, 1.0) == 37


@pytest.mark.parametrize("bad", [{"max_batch_size": 0}, {"preferred_batch_sizes": (17,)},
                                 {"max_queue_delay_ms": -1}, {"bucket_ratio": 0.5}])  # fmt: skip
def test_policy_validation(bad):
    with pytest.raises(ValueError):
        BatchPolicy(**bad)


class PerFrame(torch.nn.Module):
    """Frame-wise MLP: padding along T cannot change the valid frames."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(12, 24), torch.nn.GELU(), torch.nn.Linear(24, 5)
        )

    def forward(self, x):  # [batch, T, 12] -> [batch, T, 5]
        return self.net(x)


class MaskedMean(torch.nn.Module):
    """Mean over valid frames: needs the mask a shape callback derives."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 3)

    def forward(self, x, mask):  # x [batch, T, 12], mask [batch, T] float
        y = self.proj(x) * mask[..., None]
        return y.sum(1) / mask.sum(1, keepdim=True)


DYN = {0: Dim("batch", min=1, max=64), 1: Dim("T", min=1, max=300)}


@pytest.fixture(scope="module")
def per_frame(tmp_path_factory):
    torch.manual_seed(1)
    model = PerFrame().eval()
    path = tmp_path_factory.mktemp("b") / "pf.ds"
    convert(model, (torch.randn(2, 10, 12),), dynamic_shapes=(DYN,), output=path)
    return model, path


def _requests(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, int(rng.integers(1, 200)), 12)).astype(np.float32)
            for _ in range(n)]  # fmt: skip


def _from_threads(engine, requests):
    """Requests from many threads, then the engine closed (every request answered)."""
    results = [None] * len(requests)

    def client(i):
        results[i] = engine.infer({"x": requests[i]})["output_0"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = engine.stats()
    engine.close()
    return results, stats


def test_concurrent_requests_are_batched_and_equal_unbatched(per_frame):
    model, path = per_frame
    requests = _requests(64)
    engine = InferenceEngine(path, policy=BatchPolicy(max_batch_size=16, max_queue_delay_ms=20))
    assert engine.batching
    results, stats = _from_threads(engine, requests)
    assert stats["requests"] == 64 and stats["errors"] == 0
    assert max(stats["batch_size_histogram"]) > 1  # really batched
    model64 = PerFrame().double()
    model64.load_state_dict(model.state_dict())
    for x, y in zip(requests, results):
        ref = model64(torch.from_numpy(x).double()).detach().numpy()
        eager = model(torch.from_numpy(x)).detach().numpy()
        assert y.shape == ref.shape  # unpadded back to the request's length
        assert np.abs(y - ref).max() <= 4 * np.abs(eager - ref).max() + 1e-6


def test_shape_callback_supplies_masks_for_padded_batches(tmp_path):
    torch.manual_seed(2)
    model = MaskedMean().eval()
    path = tmp_path / "mm.ds"
    example = (torch.randn(2, 10, 12), torch.ones(2, 10))
    convert(model, example, dynamic_shapes=(DYN, {0: DYN[0], 1: DYN[1]}), output=path)
    engine = InferenceEngine(path, policy=BatchPolicy(max_batch_size=8, max_queue_delay_ms=50))

    def masks(info):
        t = info.shapes["x"][1]
        return {"mask": np.array([[1.0] * n + [0.0] * (t - n) for n in info.lengths["T"]],
                                 dtype=np.float32)}  # fmt: skip

    engine.register_shape_callback(masks)
    requests = _requests(8, seed=3)
    futures = [engine.infer_async({"x": x}) for x in requests]
    outs = [f.get(timeout=30)["output_0"] for f in futures]
    assert max(engine.stats()["batch_size_histogram"]) > 1
    engine.close()
    for x, y in zip(requests, outs):
        ref = model(torch.from_numpy(x), torch.ones(1, x.shape[1])).detach().numpy()
        assert np.allclose(y, ref, atol=1e-5)


def test_full_queue_rejects_and_deadlines_expire(per_frame):
    _, path = per_frame
    engine = InferenceEngine(
        path, policy=BatchPolicy(max_batch_size=8, max_queue_delay_ms=300, max_queue_size=3)
    )
    x = _requests(1)[0]
    expiring = engine.infer_async({"x": x}, deadline_ms=20)
    engine.infer_async({"x": x})
    engine.infer_async({"x": x})
    with pytest.raises(QueueFull, match="full"):
        engine.infer_async({"x": x})
    with pytest.raises(DeadlineExceeded):
        expiring.result(timeout=5)
    engine.close()
    assert engine.stats()["errors"] == 2


def test_async_forms(per_frame):
    model, path = per_frame
    engine = InferenceEngine(path, batch_size=4)
    x = _requests(1)[0]
    expected = model(torch.from_numpy(x)).detach().numpy()

    async def main():
        outs = await asyncio.gather(*(engine.ainfer([x]) for _ in range(6)))
        return [o["output_0"] for o in outs]

    for y in asyncio.run(main()):
        assert np.allclose(y, expected, atol=1e-5)
    assert np.allclose(engine.infer_async({"x": x}).get(timeout=10)["output_0"], expected,
                       atol=1e-5)  # fmt: skip
    bad = engine.infer_async({"x": x.astype(np.float64)})
    with pytest.raises(ValueError, match="float32"):
        bad.result(timeout=5)
    engine.close()


def _affine_artifact(tmp_path, offset):
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
        model.bias.fill_(offset)
    path = tmp_path / f"plus{offset}.ds"
    convert(model.eval(), (torch.zeros(2, 4),), dynamic_shapes=({0: Dim("batch", max=64)},),
            output=path)  # fmt: skip
    return path


def test_hot_swap_under_load_loses_nothing(tmp_path):
    a, b = _affine_artifact(tmp_path, 1.0), _affine_artifact(tmp_path, 2.0)
    engine = InferenceEngine(a, policy=BatchPolicy(max_batch_size=8, max_queue_delay_ms=1))
    new = InferenceEngine(b)
    stop = threading.Event()
    seen, failures = [], []

    def client():
        x = np.zeros((1, 4), np.float32)
        while not stop.is_set():
            try:
                seen.append(float(engine.infer([x])["output_0"][0, 0]))
            except Exception as exc:  # pragma: no cover - the test fails on any
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()

    def wait_for(n):
        give_up = time.monotonic() + 60
        while len(seen) < n and not failures and time.monotonic() < give_up:
            time.sleep(0.005)

    wait_for(200)
    engine.swap(new)
    after = float(engine.infer([np.zeros((1, 4), np.float32)])["output_0"][0, 0])
    wait_for(len(seen) + 200)
    stop.set()
    for t in threads:
        t.join()
    engine.close()
    assert not failures
    assert set(seen) == {1.0, 2.0} and after == 2.0
    assert engine.stats()["swaps"] == 1
    with pytest.raises(ValueError, match="differ"):
        engine.swap(_mismatched(tmp_path))


def _mismatched(tmp_path):
    path = tmp_path / "other.ds"
    convert(torch.nn.Linear(4, 4).eval(), (torch.zeros(1, 4),), input_names=["y"], output=path)
    return path


def test_stats_prometheus_and_overlap(per_frame):
    from prometheus_client import CollectorRegistry, generate_latest

    _, path = per_frame
    engine = InferenceEngine(path, batch_size=4)
    for x in _requests(5):
        engine.infer({"x": x})
    stats = engine.stats()
    assert stats["requests"] == 5 and stats["latency"]["total"]["p50_ms"] > 0
    assert set(stats["latency"]) == {"queue", "compute", "total"}
    assert engine.enable_overlap(buffer_size=4) is False
    overlap = engine.stats()["overlap"]
    assert overlap["active"] is False and "no CUDA device" in overlap["reason"]
    with pytest.raises(ValueError, match="buffer_size"):
        engine.enable_overlap(buffer_size=0)
    registry = CollectorRegistry()
    registry.register(engine.prometheus("m"))
    text = generate_latest(registry).decode()
    assert 'engine_requests_total{model="m"} 5.0' in text
    assert 'engine_queue_depth{model="m"} 0.0' in text
    engine.close()


@pytest.mark.parametrize("batch", [1, 8])
def test_the_copy_compute_pipeline_equals_the_plain_engine(per_frame, batch):
    """The two-thread pipeline of enable_overlap, run with the host stager (the
    CUDA stager's streams need a GPU: test_overlap_on_cuda)."""
    from engine.overlap import HostStager

    model, path = per_frame
    requests = _requests(24, seed=5)
    policy = BatchPolicy(max_batch_size=batch, max_queue_delay_ms=10)
    plain, _ = _from_threads(InferenceEngine(path, policy=policy, backend="torch"), requests)
    engine = InferenceEngine(path, policy=policy, backend="torch")
    engine._start_overlap(HostStager(), buffer_size=2)
    with pytest.raises(RuntimeError, match="already"):
        engine._start_overlap(HostStager(), buffer_size=2)
    bad = engine.infer_async({"x": np.zeros((1, 5, 3), np.float32)})  # wrong feature size
    with pytest.raises(InputError):
        bad.result(timeout=10)
    piped, stats = _from_threads(engine, requests)
    assert stats["overlap"]["active"] and stats["overlap"]["staged_batches"] >= 24 // batch
    assert stats["requests"] == 24 and stats["errors"] == 0
    for a, b in zip(plain, piped):
        # Same program; batches may group differently, so allow float rounding only.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    engine.close()  # closing twice is harmless


@pytest.mark.cuda
def test_overlap_on_cuda(per_frame):
    model, path = per_frame
    requests = _requests(32, seed=6)
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_ms=10)
    engine = InferenceEngine(path, device="cuda:0", policy=policy)
    assert engine.enable_overlap(buffer_size=3) is True
    results, stats = _from_threads(engine, requests)
    assert stats["overlap"]["active"] and stats["errors"] == 0
    model64 = PerFrame().double()
    model64.load_state_dict(model.state_dict())
    for x, y in zip(requests, results):
        ref = model64(torch.from_numpy(x).double()).detach().numpy()
        eager = model(torch.from_numpy(x)).detach().numpy()
        assert y.shape == ref.shape
        assert np.abs(y - ref).max() <= 4 * np.abs(eager - ref).max() + 1e-5


# -- seed APIs and multi-stage pipelines -----------------------------------------------


def test_model_converter_seed_api(tmp_path):
    from engine import ModelConverter

    model = torch.nn.Sequential(torch.nn.Linear(6, 3)).eval()
    x = torch.randn(2, 6)
    ts = tmp_path / "bert.pt"
    torch.jit.trace(model, (x,)).save(str(ts))
    converter = ModelConverter(input_model=str(ts), output_format="ds-engine", example_inputs=(x,),
                               output=tmp_path / "bert.ds")  # fmt: skip
    path = converter.convert(quantize=False, precision="fp32")
    assert np.allclose(InferenceEngine(path).infer([x])["output_0"], model(x).detach(), atol=1e-5)
    from engine import ConversionError

    with pytest.raises(ConversionError, match="precision='fp32'"):
        converter.convert(quantize=True, precision="fp16")
    with pytest.raises(ConversionError, match="needs an nn.Module"):
        converter.convert(quantize=True)  # a TorchScript file carries no layers to wrap
    module_converter = ModelConverter(input_model=model, example_inputs=(x,),
                                      output=tmp_path / "int8.ds")  # fmt: skip
    int8 = module_converter.convert(quantize=True)  # no calibration set: dynamic INT8
    got = InferenceEngine(int8).infer([x])["output_0"]
    assert np.abs(got - model(x).detach().numpy()).max() < 0.05
    with pytest.raises(ValueError, match="ds-engine"):
        ModelConverter(input_model=str(ts), output_format="tflite", example_inputs=(x,))


def test_engine_monitor(per_frame):
    from engine import EngineMonitor

    _, path = per_frame
    engine = InferenceEngine(path)
    stop = threading.Event()

    def load():
        x = _requests(1)[0]
        while not stop.is_set():
            engine.infer({"x": x})

    t = threading.Thread(target=load)
    t.start()
    sample = EngineMonitor(engine, metrics=["latency", "throughput", "gpu_util"]).collect(0.3)
    stop.set()
    t.join()
    assert sample["throughput_rps"] > 0 and sample["latency"]["total"]["p50_ms"] > 0
    assert sample["gpu_util"] == "unavailable" or isinstance(sample["gpu_util"], float)
    with pytest.raises(ValueError, match="unknown metric"):
        EngineMonitor(engine, metrics=["vibes"])


def _stage(tmp_path, name, fn, dims):
    class Stage(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    path = tmp_path / f"{name}.ds"
    convert(Stage().eval(), (torch.randn(2, dims),), dynamic_shapes=({0: Dim("batch", max=64)},),
            output=path)  # fmt: skip
    return InferenceEngine(path)


def test_pipeline_stages_run_concurrently_and_match_sequential(tmp_path):
    from engine import Pipeline

    enc = _stage(tmp_path, "enc", lambda x: torch.tanh(x) * 2, 5)
    dec = _stage(tmp_path, "dec", lambda x: x.sum(-1, keepdim=True), 5)
    stages: list[int] = []  # which stage ran, in order: the interleaving
    for i, engine in enumerate((enc, dec)):
        original = engine.infer

        def traced(inputs, _i=i, _orig=original):
            stages.append(_i)
            return _orig(inputs)

        engine.infer = traced
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((3, 5)).astype(np.float32)} for _ in range(12)]
    pipe = Pipeline([enc, dec], device_map=["cpu", "cpu"], memory_efficient=True)
    results = list(pipe.run(batches))
    assert len(results) == 12
    for b, r in zip(batches, results):
        expected = (np.tanh(b["x"]) * 2).sum(-1, keepdims=True)
        assert np.allclose(r["output_0"], expected, atol=1e-5) and list(r) == ["output_0"]
    # Concurrency: stage 0 started a later batch before stage 1 finished all earlier ones.
    assert stages != sorted(stages)
    kept = Pipeline([enc, dec], memory_efficient=False).infer(batches[0])
    assert set(kept) == {"stage0.output_0", "stage1.output_0", "output_0"}
    with pytest.raises(ValueError, match="device_map"):
        Pipeline([enc, dec], device_map=["cpu", "cuda:0"])


def test_engine_config_is_the_keywords_typed_and_refuses_two_answers(per_frame):
    from engine import EngineConfig

    _, path = per_frame
    config = EngineConfig(policy=BatchPolicy(max_batch_size=4), cpu_threads=1)
    typed = InferenceEngine(path, config=config)
    keywords = InferenceEngine(path, batch_size=4, cpu_threads=1)
    try:
        assert typed.config == keywords.config == config
        assert typed.batch_size == 4 and typed.batching
        requests = _requests(4)
        for r in requests:
            a, b = typed.infer({"x": r})["output_0"], keywords.infer({"x": r})["output_0"]
            np.testing.assert_allclose(a, b, atol=1e-6)
    finally:
        typed.close()
        keywords.close()
    with pytest.raises(ValueError, match="not both"):
        InferenceEngine(path, batch_size=2, config=config)
    with pytest.raises(ValueError, match="disagree"):
        InferenceEngine(path, batch_size=2, policy=BatchPolicy(max_batch_size=8))
