"""INT8 quantization (engine.quant): observer math on hand-computed cases,
quantize-dequantize round trips, a quantized model within a bound of the float
one, calibration determinism, QAT, sensitivity and mixed precision, and the
artifact round trip through both backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine import ConversionError, InferenceEngine, convert
from engine.artifact import read_manifest
from engine.quant import (
    MinMaxObserver,
    MseObserver,
    PercentileObserver,
    QuantConfig,
    calibrate,
    enable_fake,
    fake_quantize,
    freeze,
    prepare,
    qparams_from_range,
    quant_layers,
    quantize,
    sensitivity,
)
from engine.quant.modules import QuantLayer


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 12, 64),
        nn.ReLU(), nn.Linear(64, 10),
    ).eval()  # fmt: skip


def _batches(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, 12, generator=g),) for _ in range(n)]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- observer math


def test_minmax_symmetric_and_asymmetric_by_hand():
    obs = MinMaxObserver(symmetric=True)
    obs.update(torch.tensor([-2.0, 1.0, 0.5]))
    qp = obs.qparams()
    assert float(qp.scale) == pytest.approx(2 / 127) and int(qp.zero_point) == 0
    assert (qp.qmin, qp.qmax) == (-127, 127)
    obs = MinMaxObserver(symmetric=False)
    obs.update(torch.tensor([-1.0, 3.0]))
    qp = obs.qparams()
    # scale = (3 - -1) / 255; zero = -128 - round(-1 / scale) = -128 + round(63.75) = -64
    assert float(qp.scale) == pytest.approx(4 / 255) and int(qp.zero_point) == -64
    assert float(fake_quantize(torch.tensor([0.0]), qp)) == 0.0  # zero is exact


def test_range_always_includes_zero_and_per_channel_is_per_row():
    qp = qparams_from_range(torch.tensor(1.0), torch.tensor(2.0), symmetric=False)
    assert float(fake_quantize(torch.tensor([0.0]), qp)) == 0.0
    obs = MinMaxObserver(symmetric=True, axis=0)
    obs.update(torch.tensor([[1.0, -4.0], [0.5, 0.25]]))
    assert obs.qparams().scale.tolist() == pytest.approx([4 / 127, 0.5 / 127])


def test_percentile_ignores_outliers():
    values = torch.linspace(-1, 1, 10001)
    values[0] = -1000.0  # one outlier
    p = PercentileObserver(symmetric=True, percentile=99.9)
    p.update(values)
    assert float(p.qparams().scale) * 127 == pytest.approx(1.0, abs=0.01)


def test_mse_observer_minimizes_the_quantization_error():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(20000, generator=g)
    m, mm = MseObserver(symmetric=True), MinMaxObserver(symmetric=True)
    m.update(values)
    mm.update(values)
    top = float(values.abs().max())

    def err(qp):
        return float((fake_quantize(values, qp) - values).pow(2).mean())

    def clipped(frac):
        return qparams_from_range(torch.tensor(-top * frac), torch.tensor(top * frac), True)

    best_on_grid = min(err(clipped(f)) for f in np.linspace(0.05, 1.0, 96))
    assert float(m.qparams().scale) <= float(mm.qparams().scale)
    assert err(m.qparams()) <= err(mm.qparams())
    assert err(m.qparams()) <= 1.02 * best_on_grid


def test_observer_without_data_is_a_clear_error():
    with pytest.raises(ValueError, match="saw no data"):
        MinMaxObserver(symmetric=True).qparams()


def test_quantize_dequantize_round_trip():
    qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), symmetric=True)
    grid = torch.arange(-127, 128, dtype=torch.float32) * qp.scale
    assert torch.equal(fake_quantize(grid, qp), grid)  # on-grid values are exact
    x = torch.rand(1000) * 2 - 1
    assert (fake_quantize(x, qp) - x).abs().max() <= float(qp.scale) / 2 + 1e-7
    assert float(fake_quantize(torch.tensor([5.0]), qp)) == pytest.approx(127 * float(qp.scale))


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(observer="percentile"),
                                    QuantConfig(observer="mse", weight_observer="mse"),
                                    QuantConfig(per_channel=False), QuantConfig(mode="dynamic"),
                                    QuantConfig(act_symmetric=True)])  # fmt: skip
def test_quantized_model_stays_close_to_float(config):
    model, data = _mlp(), _batches()
    q = quantize(model, data, config)
    x = _batches(1, seed=9)[0][0]
    with torch.no_grad():
        assert _rel(q(x), model(x)) < 0.03
    layers = quant_layers(q)
    assert len(layers) == 3 and all(layer.mode == "frozen" for layer in layers.values())
    assert all(layer.get_buffer("w_int8").dtype == torch.int8 for layer in layers.values())


def test_calibration_is_deterministic():
    model, data = _mlp(), _batches()
    cfg = QuantConfig(observer="percentile")
    a, b = quantize(model, data, cfg), quantize(model, data, cfg)
    for (name, la), lb in zip(quant_layers(a).items(), quant_layers(b).values()):
        assert la.act_qp == lb.act_qp or torch.equal(la.act_qp.scale, lb.act_qp.scale), name
        assert torch.equal(la.get_buffer("w_int8"), lb.get_buffer("w_int8"))


def test_clear_errors_for_unsupported_layers_and_empty_calibration():
    model = _mlp()
    with pytest.raises(ValueError, match="calibration set is empty"):
        quantize(model, [], QuantConfig())
    with pytest.raises(ValueError, match="not quantizable"):
        prepare(model, QuantConfig(skip=("1",)))  # a ReLU
    with pytest.raises(ValueError, match="names no layer"):
        prepare(model, QuantConfig(skip=("nope",)))
    with pytest.raises(ValueError, match="no Linear, Conv1d or Conv2d"):
        prepare(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="cannot quantize LSTM"):
        QuantLayer(nn.LSTM(4, 4), QuantConfig())
    with pytest.raises(ValueError, match="mode"):
        QuantConfig(mode="int4")


def test_sensitivity_ranks_layers_and_mixed_precision_keeps_them_float():
    model, data = _mlp(), _batches(4)
    ranking = sensitivity(model, data)
    assert [name for name, _ in ranking] and len(ranking) == 3
    assert ranking[0][1] >= ranking[-1][1] > 0
    x = _batches(1, seed=9)[0][0]
    full = quantize(model, data)
    mixed = quantize(model, data, QuantConfig(skip=(ranking[0][0],)))
    assert ranking[0][0] not in quant_layers(mixed)
    with torch.no_grad():
        assert _rel(mixed(x), model(x)) <= _rel(full(x), model(x)) + 1e-6


def test_quantization_aware_training_learns_and_freezes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(256, 4)
    y = (x**2).sum(-1, keepdim=True)
    qat = prepare(model, QuantConfig())
    calibrate(qat, [(x,)])
    enable_fake(qat).train()
    opt = torch.optim.Adam(qat.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = nn.functional.mse_loss(qat(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]  # gradients flow through the fake quantizers
    with torch.no_grad():
        fake = qat.eval()(x)
        frozen = freeze(qat)(x)
    assert _rel(frozen, fake) < 0.02  # the int8 model computes what QAT trained


# ---------------------------------------------------------------- artifacts


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_artifact_round_trip_through_both_backends(tmp_path, mode):
    model, data = _mlp(), _batches()
    x = data[0][0]
    fp32 = convert(model, (x,), output=tmp_path / "fp32.ds")
    int8 = convert(model, (x,), output=tmp_path / "int8.ds", quantize=QuantConfig(mode=mode),
                   calibration=data)  # fmt: skip
    manifest, _ = read_manifest(int8)
    info = manifest.extra["quantization"]
    assert info["config"]["mode"] == mode and len(info["layers"]) == 3
    if mode == "static":
        assert info["calibration_batches"] == len(data)
        assert all("act" in layer for layer in info["layers"].values())
    assert info["int8_weight_bytes"] == sum(p.numel() for n, p in model.named_parameters()
                                            if n.endswith("weight"))  # fmt: skip
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    with torch.no_grad():
        want = model(x).numpy()
        q_eager = quantize(model, data, QuantConfig(mode=mode))(x).numpy()
    for backend in ("onnx", "torch"):
        got = InferenceEngine(int8, backend=backend).infer([x])["output_0"]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03
        if backend == "torch" or mode == "static":
            # The same QDQ arithmetic; an activation on a rounding tie may land one
            # step apart after a different float summation order in the layer before.
            np.testing.assert_allclose(got, q_eager, atol=1e-2 * np.abs(want).max())


def test_int8_artifact_loads_on_the_torch_backend_in_a_fresh_process(tmp_path):
    """Its program calls torch.ops.quantized_decomposed.*, registered only when
    torch's module for them is imported: the backend imports it (a process that
    never quantized anything could not load an INT8 artifact before)."""
    import subprocess
    import sys

    model, data = _mlp(), _batches()
    x = data[0][0]
    int8 = convert(model, (x,), output=tmp_path / "int8.ds", quantize=QuantConfig(),
                   calibration=data)  # fmt: skip
    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import sys, numpy as np; from engine import InferenceEngine; "
            f"x = np.load({str(tmp_path / 'x.npy')!r}); "
            f"print(float(InferenceEngine({str(int8)!r}, backend='torch').infer([x])"
            "['output_0'].sum())); assert 'engine.quant' not in sys.modules")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    want = InferenceEngine(int8, backend="onnx").infer([x.numpy()])["output_0"].sum()
    assert float(run.stdout.split()[-1]) == pytest.approx(float(want), rel=2e-2)


def test_convert_accepts_a_model_quantized_by_the_caller(tmp_path):
    model, data = _mlp(), _batches()
    qat = prepare(model)
    calibrate(qat, data)
    enable_fake(qat)
    x = data[0][0]
    path = convert(qat, (x,), output=tmp_path / "qat.ds")
    info = read_manifest(path)[0].extra["quantization"]
    assert info["config"] == {"prequantized": True, "mode": "static", "per_channel": True}
    got = InferenceEngine(path, backend="onnx").infer([x])["output_0"]
    with torch.no_grad():
        assert np.linalg.norm(got - model(x).numpy()) / np.linalg.norm(model(x).numpy()) < 0.03


def test_convert_quantize_errors_are_clear(tmp_path):
    model, data = _mlp(), _batches()
    x = data[0][0]
    with pytest.raises(ConversionError, match="calibration set is empty"):
        convert(model, (x,), output=tmp_path / "a.ds", quantize=True)
    with pytest.raises(ConversionError, match="precision='fp32'"):
        convert(model, (x,), output=tmp_path / "b.ds", quantize=True, precision="fp16",
                calibration=data)  # fmt: skip


def test_torch_backend_runs_int8_layers_on_integer_kernels(tmp_path):
    # On a GPU the PyTorch backend swaps each QDQ Linear for dsstream::int8_linear
    # (the Triton int8 GEMM); forced here, the CPU path (torch._int_mm) runs it.
    from engine.artifact import read_member
    from engine.backends import TorchBackend

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    data = [(torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    x = data[0][0]
    path = convert(model, (x,), output=tmp_path / "q.ds", quantize=QuantConfig(), calibration=data)
    program = read_member(path, "torch/program.pt2", read_manifest(path)[1])
    fused = TorchBackend(program, fuse_kernels=True)
    assert fused.fused == 2 and "int8_linear" in str(fused.module.graph)
    want = TorchBackend(program).run([x.numpy()])[0]  # the QDQ graph in float
    got = fused.run([x.numpy()])[0]
    # Integer accumulation is exact where the float matmul of dequantized values rounds.
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_a_dynamic_model_quantized_by_the_caller_exports_with_integer_kernels(tmp_path):
    import zipfile

    import onnx

    from engine.quant import dequantized_copy

    model, data = _mlp(), _batches()
    q = quantize(model, None, QuantConfig(mode="dynamic"))
    x = data[0][0]
    twin = dequantized_copy(q)  # float weights that re-quantize to the same int8
    requant = quantize(twin, None, QuantConfig(mode="dynamic"))
    for a, b in zip(quant_layers(q).values(), quant_layers(requant).values()):
        assert torch.equal(a.get_buffer("w_int8"), b.get_buffer("w_int8"))
    path = convert(q, (x,), output=tmp_path / "dyn.ds")
    info = read_manifest(path)[0].extra["quantization"]
    assert info["config"]["mode"] == "dynamic"
    graph = onnx.load_from_string(zipfile.ZipFile(path).read("onnx/model.onnx")).graph
    assert "MatMulInteger" in {n.op_type for n in graph.node}
    got = InferenceEngine(path, backend="onnx").infer([x])["output_0"]
    with torch.no_grad():
        assert np.linalg.norm(got - model(x).numpy()) / np.linalg.norm(model(x).numpy()) < 0.03


def test_int8_dot_saturation_is_detected_from_the_cpu_flags():
    from engine.backends import int8_dot_saturates

    assert int8_dot_saturates("flags\t\t: fpu sse2 avx avx2 fma bmi2\n")  # AVX2 only: VPMADDUBSW
    assert not int8_dot_saturates("flags\t\t: avx2 avx512f avx512_vnni\n")
    assert not int8_dot_saturates("flags\t\t: avx2 avx_vnni\n")
    assert not int8_dot_saturates("processor: 0\n")  # no flags: ONNX Runtime's fusions stay
