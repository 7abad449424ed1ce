"""dsstream::paged_attention (decode and chunked prefill over the engine's block
KV cache) against its plain-torch reference and a float64 reference, on odd
shapes; per implementation by subclassing (CPU here, the CUDA C++ kernel on a
GPU); the fake implementation lets models export; the CUDA C++ source compiles
wherever nvcc is."""

import os
import shutil

import pytest
import torch
from kernel_checks import DTYPES, assert_close_to_reference, device_for

from engine.kv_cache import BlockPool, KVCacheConfig
from kernels import paged_attention, paged_attention_ref


def _case(seed, lens, heads, dim, block_size, dtype=torch.float32, chunk=0):
    g = torch.Generator().manual_seed(seed)
    pool = BlockPool(KVCacheConfig(block_size, 4 + sum(-(-n // block_size) for n in lens)))
    tables = [pool.allocate(i, list(range(n))) for i, n in enumerate(lens)]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    nb = pool.config.num_blocks
    k = torch.randn(nb, block_size, heads, dim, generator=g).to(dtype)
    v = torch.randn(nb, block_size, heads, dim, generator=g).to(dtype)
    shape = (len(lens), heads, dim) if not chunk else (len(lens), chunk, heads, dim)
    q = torch.randn(*shape, generator=g).to(dtype)
    return q, k, v, block_tables, torch.tensor(lens, dtype=torch.int32)


class PagedAttentionCases:
    impl: str | None = "cpu"

    def _run(self, q, k, v, tables, ctx):
        dev = device_for(self.impl)
        impl = None if self.impl == "gpu" else self.impl
        return paged_attention(*(t.to(dev) for t in (q, k, v, tables, ctx)), impl=impl).cpu()

    @pytest.mark.parametrize("dim", [64, 80])
    @pytest.mark.parametrize("lens", [[1], [17, 1, 97], [1025, 3]])
    @pytest.mark.parametrize("block_size", [16, 7])
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_decode_matches_reference(self, dim, lens, block_size, dtype):
        q, k, v, tables, ctx = _case(len(lens) + dim, lens, 3, dim, block_size, dtype)
        scale = dim**-0.5
        q4 = q.unsqueeze(1)
        ref64 = paged_attention_ref(q4.double(), k.double(), v.double(), tables, ctx, scale)
        plain = paged_attention_ref(q4, k, v, tables, ctx, scale)
        got = self._run(q, k, v, tables, ctx)
        assert got.shape == q.shape and got.dtype == dtype
        assert_close_to_reference(got, plain.squeeze(1), ref64.squeeze(1), dtype)

    @pytest.mark.parametrize("chunk,lens", [(1, [5]), (4, [17, 4, 40]), (17, [97, 1025])])
    def test_chunked_prefill_matches_reference(self, chunk, lens):
        q, k, v, tables, ctx = _case(chunk, lens, 2, 80, 16, chunk=chunk)
        ref64 = paged_attention_ref(q.double(), k.double(), v.double(), tables, ctx, 80**-0.5)
        plain = paged_attention_ref(q, k, v, tables, ctx, 80**-0.5)
        assert_close_to_reference(self._run(q, k, v, tables, ctx), plain, ref64, torch.float32)

    def test_prefill_is_causal_decode_step_by_step(self):
        # A chunk of 3 queries equals 3 decode steps over growing contexts.
        q, k, v, tables, ctx = _case(9, [11], 2, 64, 4, chunk=3)
        chunked = self._run(q, k, v, tables, ctx)
        for c in range(3):
            step = self._run(q[:, c], k, v, tables, ctx - 2 + c)
            torch.testing.assert_close(chunked[:, c], step, atol=1e-5, rtol=1e-5)

    def test_matches_dense_attention_on_contiguous_tokens(self):
        q, k, v, tables, ctx = _case(0, [37], 2, 8, 8)
        keys = k[tables[0].long()].reshape(-1, 2, 8)[:37]
        vals = v[tables[0].long()].reshape(-1, 2, 8)[:37]
        dense = torch.nn.functional.scaled_dot_product_attention(
            q[0][:, None, :], keys.transpose(0, 1), vals.transpose(0, 1)
        )[:, 0, :]
        torch.testing.assert_close(self._run(q, k, v, tables, ctx)[0], dense)


class TestPagedAttentionCpu(PagedAttentionCases):
    impl = "cpu"


@pytest.mark.cuda
class TestPagedAttentionCuda(PagedAttentionCases):
    impl = "gpu"


def test_op_exports_through_its_fake_implementation():
    class Decoder(torch.nn.Module):
        def forward(self, q, k, v, tables, ctx):
            return torch.ops.dsstream.paged_attention(q, k, v, tables, ctx, 0.125)

    q, *rest = _case(1, [5, 9], 2, 64, 4, chunk=2)
    args = (q, *rest)
    ep = torch.export.export(Decoder(), args)
    assert any("paged_attention" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(*args), paged_attention(*args[:5], 0.125))


def test_bad_shapes_are_clear_errors():
    q, k, v, tables, ctx = _case(2, [5], 2, 8, 4)
    with pytest.raises(ValueError, match="heads/dim"):
        paged_attention(q[:, :1], k, v, tables, ctx)
    with pytest.raises(ValueError, match="one row per sequence"):
        paged_attention(q, k, v, tables, ctx[:0])
    with pytest.raises(ValueError, match="int32"):
        paged_attention(q, k, v, tables.long(), ctx)
    q4, k, v, tables, ctx = _case(2, [2], 2, 8, 4, chunk=3)
    with pytest.raises(ValueError, match="cover the chunk"):
        paged_attention(q4, k, v, tables, ctx)


NVCC = os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/nvcc"


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.exists(NVCC) or shutil.which("nvcc")), reason="needs nvcc")
def test_cuda_extension_compiles(tmp_path, monkeypatch):
    # Compiles the CUDA C++ kernels for sm_80 and sm_90 and imports the module
    # (importing needs no GPU); running them is TestPagedAttentionCuda's job.
    import kernels._build as build

    if os.environ.get("DSSTREAM_CACHE") is None:
        monkeypatch.setenv("DSSTREAM_CACHE", str(tmp_path))
    module = build.load_extension()
    assert callable(module.paged_attention)
    assert list(build.build_dir().glob("*.so"))
