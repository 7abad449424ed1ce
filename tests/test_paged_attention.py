"""dsstream::paged_attention against its plain-torch reference and a float64
reference, on odd shapes; the fake implementation lets models export."""

import pytest
import torch

from engine.kv_cache import BlockPool, KVCacheConfig
from kernels import paged_attention, paged_attention_ref


def _case(seed, lens, heads, dim, block_size, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pool = BlockPool(KVCacheConfig(block_size, 4 + sum(-(-n // block_size) for n in lens)))
    tables = [pool.allocate(i, list(range(n))) for i, n in enumerate(lens)]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    nb = pool.config.num_blocks
    k = torch.randn(nb, block_size, heads, dim, generator=g, dtype=dtype)
    v = torch.randn(nb, block_size, heads, dim, generator=g, dtype=dtype)
    q = torch.randn(len(lens), heads, dim, generator=g, dtype=dtype)
    return q, k, v, block_tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dim", [64, 80])
@pytest.mark.parametrize("lens", [[1], [17, 1, 97], [1025, 3]])
@pytest.mark.parametrize("block_size", [16, 7])
def test_cpu_op_matches_reference_within_twice_torch_error(dim, lens, block_size):
    q, k, v, tables, ctx = _case(len(lens) + dim, lens, 3, dim, block_size)
    scale = dim**-0.5
    ref64 = paged_attention_ref(q.double(), k.double(), v.double(), tables, ctx, scale)
    got = paged_attention(q, k, v, tables, ctx)
    plain = paged_attention_ref(q, k, v, tables, ctx, scale)
    err = (got.double() - ref64).abs().max().item()
    torch_err = (plain.double() - ref64).abs().max().item()
    assert err <= 2 * torch_err + 1e-6


def test_matches_dense_attention_on_contiguous_tokens():
    q, k, v, tables, ctx = _case(0, [37], 2, 8, 8)
    n = 37
    keys = k[tables[0].long()].reshape(-1, 2, 8)[:n]
    vals = v[tables[0].long()].reshape(-1, 2, 8)[:n]
    dense = torch.nn.functional.scaled_dot_product_attention(
        q[0][:, None, :], keys.transpose(0, 1), vals.transpose(0, 1)
    )[:, 0, :]
    torch.testing.assert_close(paged_attention(q, k, v, tables, ctx)[0], dense)


def test_op_exports_through_its_fake_implementation():
    class Decoder(torch.nn.Module):
        def forward(self, q, k, v, tables, ctx):
            return torch.ops.dsstream.paged_attention(q, k, v, tables, ctx, 0.125)

    args = _case(1, [5, 9], 2, 64, 4)
    ep = torch.export.export(Decoder(), args)
    assert any("paged_attention" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(*args), paged_attention(*args[:5], 0.125))


def test_bad_shapes_are_clear_errors():
    q, k, v, tables, ctx = _case(2, [5], 2, 8, 4)
    with pytest.raises(ValueError, match="heads/dim"):
        paged_attention(q[:, :1], k, v, tables, ctx)
    with pytest.raises(ValueError, match="one row per sequence"):
        paged_attention(q, k, v, tables, ctx[:0])
