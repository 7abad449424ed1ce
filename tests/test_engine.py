"""The engine core: conversion, graph passes against eager, artifact checks,
both backends, dynamic shapes and input validation."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.export import Dim, export

from engine import (
    ArtifactError,
    BackendError,
    ConversionError,
    InferenceEngine,
    InputError,
    convert,
    read_manifest,
    run_passes,
)

torch.manual_seed(0)


class ConvBnLnNet(torch.nn.Module):
    """conv -> batchnorm -> layernorm -> linear, plus a weight-only computation."""

    def __init__(self, conv_bias: bool = True) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(16, 16, 3, padding=1, bias=conv_bias)
        self.bn = torch.nn.BatchNorm1d(16)
        self.ln = torch.nn.LayerNorm(16)
        self.fc = torch.nn.Linear(16, 8)
        self.register_buffer("scale", torch.tensor(1.5))
        with torch.no_grad():
            for p in (self.bn.weight, self.bn.bias, self.ln.weight, self.ln.bias):
                p.uniform_(0.5, 1.5)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, T, 16]
        y = self.bn(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.fc(self.ln(y)).relu() * (self.scale * 2)


DYN = ({0: Dim("batch", min=1, max=32), 1: Dim("T", min=2, max=512)},)


def _ops(ep) -> list[str]:
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


def _error_vs_float64(model, x, run) -> tuple[float, float]:
    """(error of ``run``, error of eager fp32), both against a float64 reference."""
    ref = model.double()(x.double()).detach()
    model.float()
    eager = model(x).detach().double()
    got = torch.as_tensor(np.asarray(run(x)), dtype=torch.float64)
    return float((got - ref).abs().max()), float((eager - ref).abs().max())


@pytest.mark.parametrize("conv_bias", [True, False])
def test_passes_fold_and_match_eager(conv_bias):
    model = ConvBnLnNet(conv_bias).eval()
    ep = export(model, (torch.randn(2, 10, 16),), dynamic_shapes=DYN)
    ep, applied = run_passes(ep, ["fold_batchnorm_into_conv", "fold_layernorm_into_linear",
                                  "constant_folding", "dead_code_elimination"])  # fmt: skip
    changed = {a["name"]: a["changed"] for a in applied}
    assert changed["fold_batchnorm_into_conv"] == 1 and changed["fold_layernorm_into_linear"] == 1
    assert changed["constant_folding"] == 1 and changed["dead_code_elimination"] > 0
    ops = _ops(ep)
    assert "aten.batch_norm.default" not in ops
    ln = next(n for n in ep.graph.nodes if n.target == torch.ops.aten.layer_norm.default)
    assert ln.args[2] is None and ln.args[3] is None  # affine moved into the linear
    for shape in [(1, 2, 16), (3, 37, 16), (5, 101, 16)]:
        x = torch.randn(*shape)
        err, eager_err = _error_vs_float64(model, x, lambda t: ep.module()(t).detach())
        assert err <= 4 * eager_err + 1e-6


def test_a_pass_that_does_not_apply_leaves_the_graph_unchanged():
    class Shared(torch.nn.Module):  # the layernorm feeds two linears: no fold
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(8)
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
            self.bn = torch.nn.BatchNorm1d(8)  # batchnorm without a conv before it

        def forward(self, x):
            y = self.ln(self.bn(x))
            return self.a(y) + self.b(y)

    model = Shared().eval()
    ep = export(model, (torch.randn(4, 8),))
    before = ep.graph_module.code
    ep, applied = run_passes(ep, ["fold_batchnorm_into_conv", "fold_layernorm_into_linear"])
    assert [a["changed"] for a in applied] == [0, 0]
    assert ep.graph_module.code == before


def test_unknown_pass_is_an_error():
    ep = export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    with pytest.raises(ValueError, match="unknown pass"):
        run_passes(ep, ["fold_everything"])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = ConvBnLnNet(conv_bias=False).eval()
    path = tmp_path_factory.mktemp("ds") / "net.ds"
    convert(model, (torch.randn(2, 10, 16),), dynamic_shapes=DYN, output=path,
            extra={"note": "test"})  # fmt: skip
    return model, path


def test_manifest_describes_the_model(artifact):
    _, path = artifact
    manifest, checksums = read_manifest(path)
    (inp,) = manifest.inputs
    assert (inp.name, inp.dtype, inp.shape) == ("x", "float32", ("batch", "T", 16))
    assert inp.dims == {"batch": (1, 32), "T": (2, 512)}
    assert manifest.outputs[0].shape == ("batch", "T", 8)
    assert manifest.precision == "fp32" and manifest.backends == ("torch", "onnx")
    assert manifest.versions["torch"] == torch.__version__
    assert set(manifest.conversion_error) == {"torch", "onnx"}
    assert all(e["max_abs"] < 1e-4 for e in manifest.conversion_error.values())
    assert [p["name"] for p in manifest.passes][:2] == [
        "fold_batchnorm_into_conv",
        "fold_layernorm_into_linear",
    ]
    assert len(manifest.source_hash) == 64 and manifest.extra == {"note": "test"}
    assert set(checksums) == {"torch/program.pt2", "onnx/model.onnx"}


def test_update_extra_adds_facts_and_keeps_the_model(artifact, tmp_path):
    import shutil

    from engine.artifact import update_extra

    _, path = artifact
    copy = shutil.copy(path, tmp_path / "net.ds")
    update_extra(copy, questions=["what is it"], note="replaced")
    before, sums = read_manifest(path)
    after, sums_after = read_manifest(copy)
    assert after.extra == {"note": "replaced", "questions": ["what is it"]}
    assert sums_after == sums and after.inputs == before.inputs
    x = torch.randn(1, 20, 16).numpy()
    with InferenceEngine(path) as a, InferenceEngine(copy) as b:
        np.testing.assert_array_equal(a.infer({"x": x})["output_0"], b.infer({"x": x})["output_0"])


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_backends_match_eager_on_dynamic_shapes(artifact, backend):
    model, path = artifact
    engine = InferenceEngine(path, backend=backend)
    assert engine.backend.name == backend
    for shape in [(1, 2, 16), (4, 77, 16), (32, 512, 16)]:
        x = torch.randn(*shape)
        err, eager_err = _error_vs_float64(
            model, x, lambda t: engine.infer({"x": t.numpy()})["output_0"]
        )
        assert err <= 4 * eager_err + 1e-6
    # positional and torch inputs work too
    x = torch.randn(2, 9, 16)
    assert np.allclose(engine.infer([x])["output_0"], engine.infer(x)["output_0"])


def test_auto_backend_is_onnx_on_cpu(artifact):
    assert InferenceEngine(artifact[1]).backend.name == "onnx"


def test_cpu_threads_set_onnx_runtimes_pool_and_keep_the_results(artifact):
    x = np.random.default_rng(0).standard_normal((3, 20, 16)).astype(np.float32)
    default, single = InferenceEngine(artifact[1]), InferenceEngine(artifact[1], cpu_threads=1)
    assert single.backend.session.get_session_options().intra_op_num_threads == 1
    assert default.backend.session.get_session_options().intra_op_num_threads == 0  # ORT's own
    assert np.allclose(single.infer(x)["output_0"], default.infer(x)["output_0"], atol=1e-6)
    single.swap(artifact[1])  # a model swapped in by path keeps the engine's threads
    assert single.backend.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match="cpu_threads must be at least 1"):
        InferenceEngine(artifact[1], cpu_threads=0)


@pytest.mark.parametrize(
    "inputs, match",
    [
        ({"x": np.zeros((2, 600, 16), np.float32)}, r"dim 1 \(T\) must be in \[2, 512\]"),
        ({"x": np.zeros((2, 10, 15), np.float32)}, "dim 2 must be 16"),
        ({"x": np.zeros((2, 10, 16), np.float64)}, "must be float32, got float64"),
        ({"x": np.zeros((10, 16), np.float32)}, "must have 3 dims"),
        ({"y": np.zeros((2, 10, 16), np.float32)}, r"missing \['x'\], unexpected \['y'\]"),
        ([np.zeros((1, 4, 16), np.float32)] * 2, "expected at most 1 input"),
    ],
)
def test_inputs_outside_the_declared_specs_are_clear_errors(artifact, inputs, match):
    with pytest.raises(InputError, match=match):
        InferenceEngine(artifact[1]).infer(inputs)


def test_cuda_device_without_cuda_is_a_clear_error(artifact):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendError, match="CUDA is not available"):
        InferenceEngine(artifact[1], device="cuda:0")
    with pytest.raises(BackendError, match="unknown device"):
        InferenceEngine(artifact[1], device="tpu")


def test_corrupt_foreign_and_missing_files_are_refused(artifact, tmp_path):
    _, path = artifact
    data = bytearray(path.read_bytes())
    corrupt = tmp_path / "corrupt.ds"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(corrupt, "w") as dst:
        for item in src.infolist():
            blob = src.read(item)
            if item.filename == "onnx/model.onnx":
                blob = blob[:-10] + b"\0" * 10
            dst.writestr(item, blob)
    with pytest.raises(ArtifactError, match="checksum"):
        InferenceEngine(corrupt)
    truncated = tmp_path / "truncated.ds"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError):
        InferenceEngine(truncated)
    foreign = tmp_path / "foreign.ds"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("manifest.json", '{"format": "something-else"}')
    with pytest.raises(ArtifactError, match="not a dsstream-engine artifact"):
        read_manifest(foreign)
    old = tmp_path / "old.ds"
    with zipfile.ZipFile(old, "w") as zf:
        zf.writestr("manifest.json", '{"format": "dsstream-engine", "format_version": 99}')
    with pytest.raises(ArtifactError, match="format version 99"):
        read_manifest(old)
    text = tmp_path / "model.ds"
    text.write_text("hello")
    with pytest.raises(ArtifactError, match="not a .ds artifact"):
        read_manifest(text)
    with pytest.raises(ArtifactError, match="not found"):
        read_manifest(tmp_path / "nope.ds")


def test_convert_from_saved_exported_program_and_torchscript(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()).eval()
    x = torch.randn(3, 6)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(export(model, (x,)), str(pt2))
    ts = tmp_path / "m.pt"
    torch.jit.trace(model, (x,)).save(str(ts))
    for source in (pt2, ts):
        out = convert(source, (x,), output=tmp_path / f"{source.suffix[1:]}.ds")
        y = InferenceEngine(out).infer([x.numpy()])["output_0"]
        assert np.allclose(y, model(x).detach().numpy(), atol=1e-5)
    with pytest.raises(ConversionError, match="not found"):
        convert(tmp_path / "missing.pt", (x,))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(ConversionError, match="neither a TorchScript"):
        convert(junk, (x,))


def test_fp16_and_bad_conversion_arguments(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 8)
    path = convert(model, (x,), precision="fp16", backends=("torch",), output=tmp_path / "h.ds")
    manifest, _ = read_manifest(path)
    assert manifest.precision == "fp16" and manifest.inputs[0].dtype == "float16"
    y = InferenceEngine(path).infer([x.half().numpy()])["output_0"]
    assert y.dtype == np.float16
    assert np.allclose(y.astype(np.float32), model(x).detach().numpy(), atol=1e-2)
    with pytest.raises(BackendError, match="no onnx backend"):
        InferenceEngine(path, backend="onnx")
    with pytest.raises(ConversionError, match="precision"):
        convert(model, (x,), precision="int4", output=tmp_path / "q.ds")
    with pytest.raises(ConversionError, match="backends"):
        convert(model, (x,), backends=("tensorrt",), output=tmp_path / "q.ds")


def test_torch_compile_option_matches_eager(tmp_path):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    model.eval()
    path = convert(model, (torch.randn(2, 8),), dynamic_shapes=({0: Dim("batch", max=64)},),
                   output=tmp_path / "c.ds")  # fmt: skip
    engine = InferenceEngine(path, compile=True)
    assert engine.backend.name == "torch"  # compile implies the PyTorch backend
    for rows in (1, 5, 33):
        x = torch.randn(rows, 8)
        err, eager_err = _error_vs_float64(model, x, lambda t: engine.infer([t])["output_0"])
        assert err <= 4 * eager_err + 1e-6


def test_engine_metrics_reach_the_server_exposition(artifact):
    from dsstream.metrics import ServerMetrics

    engine = InferenceEngine(artifact[1])
    engine.infer([np.zeros((1, 4, 16), np.float32)])
    metrics = ServerMetrics()
    metrics.include(engine.prometheus())
    text = metrics.exposition().decode()
    stem = Path(artifact[1]).stem
    assert f'engine_requests_total{{model="{stem}"}} 1.0' in text
    assert "dsstream_sessions_active" in text


def test_engines_of_one_server_are_distinct_series(artifact):
    """Two engines on one /metrics (ASR and the VQA stages share a server): every
    sample is a distinct series, each engine's under its own ``model`` label."""
    from prometheus_client.parser import text_string_to_metric_families

    from dsstream.metrics import ServerMetrics

    busy, idle = InferenceEngine(artifact[1]), InferenceEngine(artifact[1])
    for _ in range(3):
        busy.infer([np.zeros((1, 4, 16), np.float32)])
    metrics = ServerMetrics()
    metrics.include(busy.prometheus("asr"))
    metrics.include(idle.prometheus("vqa-fuser"))
    samples = [s for f in text_string_to_metric_families(metrics.exposition().decode())
               for s in f.samples]  # fmt: skip
    keys = [(s.name, tuple(sorted(s.labels.items()))) for s in samples]
    assert len(keys) == len(set(keys))
    value = {k: s.value for k, s in zip(keys, samples)}
    assert value[("engine_requests_total", (("model", "asr"),))] == 3
    assert value[("engine_requests_total", (("model", "vqa-fuser"),))] == 0
    wall = value[("engine_compute_seconds_total", (("model", "asr"),))]
    cpu = value[("engine_compute_cpu_seconds_total", (("model", "asr"),))]
    assert 0 < cpu <= wall  # the calling thread's CPU within the passes' wall time
    assert value[("engine_compute_cpu_seconds_total", (("model", "vqa-fuser"),))] == 0


def test_half_precisions_on_this_cpu(tmp_path):
    """fp16 runs on both backends; bf16 on the PyTorch backend (float32 arrays in and
    out, as NumPy has no bfloat16) and is refused for ONNX Runtime with the reason."""
    from engine import ConversionError, InferenceEngine, convert

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    want = model(x).detach().numpy()
    fp16 = convert(model, (x,), precision="fp16", output=tmp_path / "h.ds")
    for backend in ("onnx", "torch"):
        got = InferenceEngine(fp16, backend=backend).infer([x.numpy().astype(np.float16)])
        assert np.abs(got["output_0"].astype(np.float32) - want).max() < 2e-2
    with pytest.raises(ConversionError, match="no bfloat16 kernels"):
        convert(model, (x,), precision="bf16", output=tmp_path / "b.ds")
    bf16 = convert(model, (x,), precision="bf16", output=tmp_path / "b.ds", backends=("torch",))
    got = InferenceEngine(bf16).infer([x.numpy()])["output_0"]
    assert got.dtype == np.float32 and np.abs(got - want).max() < 0.1
