"""Every kernel against its plain-torch reference and a float64 reference, on odd
shapes, re-run per implementation by subclassing: ``cpu`` (always), ``triton``
(under TRITON_INTERPRET=1 on the CPU, as CI runs it) and ``gpu`` (the default
GPU path on CUDA tensors; marked, skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DTYPES, assert_close_to_reference, device_for

from kernels import (
    chunk_attention,
    chunk_attention_ref,
    conv3x3,
    ctc_topk,
    ctc_topk_ref,
    int8_matmul,
    int8_matmul_ref,
    layernorm_linear,
    layernorm_linear_ref,
    quantize_rows,
    winograd_conv2d,
    winograd_conv2d_ref,
)


def _randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


class _Impl:
    impl: str | None = "cpu"

    @property
    def device(self) -> torch.device:
        return device_for(self.impl)

    @property
    def run_impl(self) -> str | None:
        return None if self.impl == "gpu" else self.impl


# ---------------------------------------------------------------- chunk attention


class ChunkAttentionCases(_Impl):
    @pytest.mark.parametrize("dim", [64, 80])
    @pytest.mark.parametrize("chunk,left", [(1, 17), (8, 97), (5, 1025), (17, 0)])
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_matches_reference(self, dim, chunk, left, dtype):
        if self.impl == "triton" and left > 97 and dtype != torch.float32:
            pytest.skip("the interpreter is slow; float32 covers the long cache")
        b, h = 3, 2
        q, k, v = (_randn(b, h, chunk, dim, seed=i, dtype=dtype) for i in range(3))
        ck, cv = (_randn(b, h, left, dim, seed=5 + i, dtype=dtype) for i in range(2))
        filled = torch.tensor([0, left, left // 3])  # different fill levels per session
        scale = dim**-0.5
        ref64 = chunk_attention_ref(*(t.double() for t in (q, k, v, ck, cv)), filled, scale)
        plain = chunk_attention_ref(q, k, v, ck, cv, filled, scale)
        dev = self.device
        got = chunk_attention(*(t.to(dev) for t in (q, k, v, ck, cv, filled)), impl=self.run_impl)
        assert got.shape == q.shape and got.dtype == dtype
        assert_close_to_reference(got, plain, ref64, dtype)

    def test_equals_the_asr_encoders_attention_step(self):
        from apps.asr.model import ChunkedAttention, ModelConfig

        cfg = ModelConfig(d_model=64, heads=4, left=12)
        attn = ChunkedAttention(cfg).eval()
        x = _randn(2, 8, 64, seed=3)
        cache_k, cache_v = _randn(2, 12, 64, seed=4), _randn(2, 12, 64, seed=5)
        filled = torch.tensor([[0], [7]])
        with torch.no_grad():
            want, _, _ = attn.step(x, cache_k, cache_v, filled, cfg.left)
            q, k, v = attn.qkv(attn.norm(x)).chunk(3, dim=-1)
            split = attn._split
            ctx = chunk_attention(
                *(split(t).to(self.device) for t in (q, k, v, cache_k, cache_v)),
                filled[:, 0].to(self.device),
                impl=self.run_impl,
            ).cpu()
            got = attn.out(ctx.transpose(1, 2).reshape(2, 8, 64))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


class TestChunkAttentionCpu(ChunkAttentionCases):
    impl = "cpu"


class TestChunkAttentionTriton(ChunkAttentionCases):
    impl = "triton"


@pytest.mark.cuda
class TestChunkAttentionGpu(ChunkAttentionCases):
    impl = "gpu"


# ---------------------------------------------------------------- LayerNorm + Linear


class LayerNormLinearCases(_Impl):
    @pytest.mark.parametrize("m,k,n", [(1, 64, 17), (37, 80, 97), (130, 256, 64)])
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_matches_reference(self, m, k, n, dtype):
        x, r = _randn(m, k, seed=1, scale=3.0) + 1.0, _randn(m, k, seed=2)
        gamma, beta = _randn(k, seed=3), _randn(k, seed=4)
        w, b = _randn(n, k, seed=5, scale=k**-0.5), _randn(n, seed=6)
        ref64 = layernorm_linear_ref(*(t.double() for t in (x + r, gamma, beta, w, b)), 1e-5)
        low = [t.to(dtype) for t in (x, gamma, beta, w, b)]
        rl = r.to(dtype)
        # Plain torch at this precision: torch's LayerNorm then Linear.
        plain = F.linear(F.layer_norm(low[0] + rl, (k,), low[1], low[2]), low[3], low[4])
        dev = self.device
        y, h = layernorm_linear(*(t.to(dev) for t in low), residual=rl.to(dev), impl=self.run_impl)
        assert y.shape == (m, n) and y.dtype == dtype
        torch.testing.assert_close(h.cpu(), low[0] + rl)  # the residual stream, returned
        assert_close_to_reference(y, plain, ref64, dtype)

    def test_without_residual_and_bias_over_leading_dims(self):
        x = _randn(2, 3, 40, seed=7)
        gamma, beta, w = _randn(40, seed=8), _randn(40, seed=9), _randn(24, 40, seed=10)
        dev = self.device
        y = layernorm_linear(*(t.to(dev) for t in (x, gamma, beta, w)), impl=self.run_impl)
        want = F.linear(F.layer_norm(x, (40,), gamma, beta), w)
        torch.testing.assert_close(y.cpu(), want, atol=1e-5, rtol=1e-4)


class TestLayerNormLinearCpu(LayerNormLinearCases):
    impl = "cpu"


class TestLayerNormLinearTriton(LayerNormLinearCases):
    impl = "triton"


@pytest.mark.cuda
class TestLayerNormLinearGpu(LayerNormLinearCases):
    impl = "gpu"


# ---------------------------------------------------------------- int8 matmul


class Int8MatmulCases(_Impl):
    @pytest.mark.parametrize("m,k,n", [(1, 64, 17), (17, 80, 97), (97, 200, 33)])
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_float_activations_match_reference(self, m, k, n, dtype):
        w_q, w_scale = quantize_rows(_randn(n, k, seed=1))
        x, bias = _randn(m, k, seed=2).to(dtype), _randn(n, seed=3)
        ref64 = int8_matmul_ref(x, w_q, w_scale, bias)
        # Plain torch at this precision: dequantize to the activation dtype, matmul.
        plain = F.linear(x, (w_q.float() * w_scale[:, None]).to(dtype), bias.to(dtype))
        dev = self.device
        got = int8_matmul(*(t.to(dev) for t in (x, w_q, w_scale, bias)), impl=self.run_impl)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        assert_close_to_reference(got, plain, ref64, dtype)

    @pytest.mark.parametrize("m,k,n", [(1, 64, 17), (33, 80, 97)])
    def test_int8_activations_are_exact_up_to_the_scales(self, m, k, n):
        w_q, w_scale = quantize_rows(_randn(n, k, seed=4))
        x_q, x_scale = quantize_rows(_randn(m, k, seed=5))
        want = int8_matmul_ref(x_q, w_q, w_scale, None, x_scale)
        dev = self.device
        got = int8_matmul(x_q.to(dev), w_q.to(dev), w_scale.to(dev), None, x_scale.to(dev),
                          impl=self.run_impl)  # fmt: skip
        # int32 accumulation is exact; only the two float32 rescales round.
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-6)

    def test_transposed_weight_views_and_the_zero_point_linear(self):
        from kernels import int8_linear

        w_q, w_scale = quantize_rows(_randn(24, 40, seed=6))
        x_q, x_scale = quantize_rows(_randn(19, 40, seed=7))
        stored = w_q.T.contiguous()  # [K, N], as engine.quant stores Linear weights
        dev = self.device
        got = int8_matmul(x_q.to(dev), stored.T.to(dev), w_scale.to(dev), None,
                          x_scale.to(dev), impl=self.run_impl)  # fmt: skip
        torch.testing.assert_close(got.cpu(), int8_matmul_ref(x_q, w_q, w_scale, None, x_scale))
        # int8_linear: one activation scale and a zero point, as a QDQ Linear has.
        zero, scale = -11, 0.02
        want = ((x_q.double() - zero) * scale) @ (stored.double() * w_scale.double())
        y = int8_linear(x_q.to(dev), scale, zero, stored.to(dev), w_scale.to(dev))
        torch.testing.assert_close(y.cpu().double(), want, atol=1e-4, rtol=1e-5)


class TestInt8MatmulCpu(Int8MatmulCases):
    impl = "cpu"


class TestInt8MatmulTriton(Int8MatmulCases):
    impl = "triton"


@pytest.mark.cuda
class TestInt8MatmulGpu(Int8MatmulCases):
    impl = "gpu"


# ---------------------------------------------------------------- CTC log-softmax + top-k


class CtcTopkCases(_Impl):
    @pytest.mark.parametrize("frames,vocab,k", [(1, 29, 1), (17, 29, 8), (97, 1025, 16)])
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_matches_reference(self, frames, vocab, k, dtype):
        logits = _randn(2, frames, vocab, seed=frames, scale=4.0).to(dtype)
        values, ids = ctc_topk(logits.to(self.device), k, impl=self.run_impl)
        values, ids = values.cpu(), ids.cpu()
        assert values.shape == ids.shape == (2, frames, k)
        ref_values, _ = ctc_topk_ref(logits.reshape(-1, vocab), k)
        plain_values, _ = logits.log_softmax(-1).topk(k, -1)
        ref64 = ref_values.reshape(2, frames, k).double()
        assert_close_to_reference(values, plain_values.float(), ref64, dtype)
        # The ids hold those values (ties may come in either order).
        exact = logits.double().log_softmax(-1).gather(-1, ids)
        torch.testing.assert_close(exact, ref64, atol=1e-5, rtol=1e-5)
        assert (values[..., :-1] >= values[..., 1:]).all()

    def test_ties_go_to_the_lower_id(self):
        logits = torch.zeros(1, 10)
        logits[0, 7] = logits[0, 3] = 5.0
        _, ids = ctc_topk(logits.to(self.device), 2, impl=self.run_impl)
        assert sorted(ids.cpu()[0].tolist()) == [3, 7]

    def test_bad_k_is_a_clear_error(self):
        with pytest.raises(ValueError, match="k must lie"):
            ctc_topk(torch.zeros(3, 5), 6, impl=self.run_impl)


class TestCtcTopkCpu(CtcTopkCases):
    impl = "cpu"


class TestCtcTopkTriton(CtcTopkCases):
    impl = "triton"

    def test_ties_go_to_the_lower_id(self):
        logits = torch.zeros(1, 10)
        logits[0, 7] = logits[0, 3] = 5.0
        _, ids = ctc_topk(logits, 2, impl="triton")
        assert ids[0].tolist() == [3, 7]  # the kernel's own order is defined


@pytest.mark.cuda
class TestCtcTopkGpu(CtcTopkCases):
    impl = "gpu"


# ---------------------------------------------------------------- Winograd


@pytest.mark.parametrize(
    "n,c,o,h,w,padding", [(1, 1, 5, 7, 9, 0), (2, 3, 4, 17, 11, 1), (1, 8, 16, 6, 6, 1),
                          (2, 16, 8, 3, 4, 0), (1, 2, 3, 97, 5, 1)],
)  # fmt: skip
def test_winograd_matches_direct_convolution(n, c, o, h, w, padding):
    x, weight, bias = _randn(n, c, h, w, seed=1), _randn(o, c, 3, 3, seed=2), _randn(o, seed=3)
    ref64 = winograd_conv2d_ref(x, weight, bias, padding)
    plain = F.conv2d(x, weight, bias, padding=padding)
    got = winograd_conv2d(x, weight, bias, padding)
    assert got.shape == plain.shape
    assert_close_to_reference(got, plain, ref64, torch.float32)


def test_conv3x3_picks_torch_where_winograd_does_not_apply_or_win():
    x, weight = _randn(1, 4, 9, 9, seed=4), _randn(6, 4, 3, 3, seed=5)
    for stride in (1, 2):
        want = F.conv2d(x, weight, stride=stride, padding=1)
        torch.testing.assert_close(conv3x3(x, weight, padding=1, stride=stride), want)
    torch.testing.assert_close(
        conv3x3(x, weight, padding=1, impl="winograd"), F.conv2d(x, weight, padding=1),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
    with pytest.raises(ValueError, match="stride-1"):
        conv3x3(x, weight, stride=2, impl="winograd")
    with pytest.raises(ValueError, match="input channels"):
        conv3x3(x[:, :3], weight)


# ---------------------------------------------------------------- registration and dispatch


def test_every_op_exports_through_its_fake_implementation():
    class Uses(torch.nn.Module):
        def forward(self, logits, x, w_q, w_scale, q, ck, filled):
            values, ids = torch.ops.dsstream.ctc_topk(logits, 4)
            y = torch.ops.dsstream.int8_matmul(x, w_q, w_scale, None, None)
            a = torch.ops.dsstream.chunk_attention(q, q, q, ck, ck, filled, 0.25)
            return values, ids, y, a

    w_q, w_scale = quantize_rows(_randn(6, 16, seed=1))
    args = (_randn(5, 29), _randn(3, 16), w_q, w_scale, _randn(1, 2, 4, 16), _randn(1, 2, 6, 16),
            torch.tensor([3]))  # fmt: skip
    ep = torch.export.export(Uses(), args)
    names = " ".join(str(n.target) for n in ep.graph.nodes)
    for op in ("ctc_topk", "int8_matmul", "chunk_attention"):
        assert op in names
    for got, want in zip(ep.module()(*args), Uses()(*args)):
        torch.testing.assert_close(got, want)


def test_forcing_an_implementation_that_cannot_run_is_a_clear_error():
    x = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="unknown implementation"):
        ctc_topk(x, 2, impl="fast")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ctc_topk(x, 2, impl="cuda")


def test_bad_shapes_are_clear_errors():
    w_q, w_scale = quantize_rows(_randn(6, 16))
    with pytest.raises(ValueError, match="need x_scale"):
        int8_matmul(w_q[:2], w_q, w_scale)
    with pytest.raises(ValueError, match="w_q must be int8"):
        int8_matmul(_randn(2, 16), w_q.float(), w_scale)
    with pytest.raises(ValueError, match="filled must lie"):
        chunk_attention(*(_randn(1, 1, 2, 8),) * 3, *(_randn(1, 1, 4, 8),) * 2, torch.tensor([5]))
    with pytest.raises(ValueError, match="weight must be"):
        layernorm_linear(_randn(2, 8), _randn(8), _randn(8), _randn(4, 7))


def test_engine_torch_backend_swaps_in_the_fused_layernorm_linear(tmp_path):
    from engine import convert
    from engine.artifact import read_manifest, read_member
    from engine.backends import TorchBackend

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)
            self.ln2, self.fc2 = torch.nn.LayerNorm(8), torch.nn.Linear(8, 4, bias=False)

        def forward(self, x):
            return self.fc2(self.ln2(torch.relu(self.fc(self.ln(x)))))

    net = Net().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    x = _randn(2, 5, 16, seed=11)
    path = str(tmp_path / "net.ds")
    convert(net, (x,), output=path)
    _, sums = read_manifest(path)
    program = read_member(path, "torch/program.pt2", sums)
    fused = TorchBackend(program, fuse_kernels=True)
    assert fused.fused == 2
    graph = str(fused.module.graph) if hasattr(fused.module, "graph") else ""
    assert "layernorm_linear" in graph
    assert TorchBackend(program).fused == 0  # on the CPU it gains nothing: off by default
    with torch.no_grad():
        want = net(x)
    torch.testing.assert_close(torch.from_numpy(fused.run([x.numpy()])[0]), want,
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_gpu_paths_that_cannot_run_fall_back_to_the_reference_with_one_warning(monkeypatch):
    import warnings

    import kernels._build as build
    import kernels._dispatch as dispatch

    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: False)
    cuda = torch.device("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.choose("ctc_topk", None, cuda, gpu="triton") == "ref"
        assert dispatch.choose("ctc_topk", None, cuda, gpu="triton") == "ref"
        assert dispatch.choose("paged_attention", None, cuda, gpu="cuda") == "cuda"

        def broken(verbose=False):
            raise RuntimeError("the CUDA kernels need nvcc")

        monkeypatch.setattr(build, "load_extension", broken)
        assert build.extension_or_none("paged_attention") is None
        assert build.extension_or_none("paged_attention") is None
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert "Triton is not installed" in messages[0] and "nvcc" in messages[1]
    assert dispatch.choose("ctc_topk", None, torch.device("cpu"), gpu="triton") == "cpu"
