"""GPU kernels against the plain-torch reference and the best torch equivalent
(``scaled_dot_product_attention``, ``torch._int_mm``, cuBLAS matmul), at
realistic sizes, as achieved bandwidth or TFLOP/s and a fraction of the GPU's
peak.  Skipped without a GPU; tests/gpu/run_all.sh runs it on the H200."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from engine.kv_cache import BlockPool, KVCacheConfig
from kernels import (
    chunk_attention,
    chunk_attention_ref,
    ctc_topk,
    int8_matmul,
    layernorm_linear,
    paged_attention,
    quantize_rows,
)

pytestmark = pytest.mark.cuda

# H200 SXM datasheet peaks: HBM3e bandwidth, dense fp16/bf16 and int8 tensor-core rates.
PEAK = {"GB/s": 4800.0, "TFLOP/s": 989.0, "TOP/s": 1979.0}
RESULTS: list[dict] = []


def _ms(fn, runs: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(runs):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _report(op: str, runner: str, ms: float, amount: float, unit: str) -> None:
    """``amount``: bytes moved (GB/s) or operations done (TFLOP/s, TOP/s) per call."""
    scale = 1e9 if unit == "GB/s" else 1e12
    rate = amount / (ms / 1000) / scale
    row = {"op": op, "runner": runner, "ms": round(ms, 4), unit: round(rate, 1),
           "of_peak": round(rate / PEAK[unit], 3)}  # fmt: skip
    RESULTS.append(row)
    print(f"{op:34s} {runner:26s} {ms:9.4f} ms {rate:9.1f} {unit:8s} {rate / PEAK[unit]:6.1%}")


def test_paged_attention_decode():
    seqs, ctx, heads, dim, bs = 64, 2048, 32, 128, 16
    pool = BlockPool(KVCacheConfig(bs, seqs * ctx // bs + 1))
    tables = [pool.allocate(i, list(range(ctx))) for i in range(seqs)]
    dev, dt = "cuda", torch.float16
    block_tables = torch.tensor(tables, dtype=torch.int32, device=dev)
    k = torch.randn(pool.config.num_blocks, bs, heads, dim, device=dev, dtype=dt)
    v = torch.randn_like(k)
    q = torch.randn(seqs, heads, dim, device=dev, dtype=dt)
    lens = torch.full((seqs,), ctx, dtype=torch.int32, device=dev)
    moved = 2 * seqs * ctx * heads * dim * 2  # K and V, fp16
    _report("paged_attention decode", "cuda kernel", _ms(
        lambda: paged_attention(q, k, v, block_tables, lens)), moved, "GB/s")  # fmt: skip
    # Best torch equivalent: SDPA over already-contiguous K/V (no paging at all).
    kd = k[block_tables.long()].reshape(seqs, ctx, heads, dim).transpose(1, 2).contiguous()
    vd = v[block_tables.long()].reshape(seqs, ctx, heads, dim).transpose(1, 2).contiguous()
    _report("paged_attention decode", "SDPA on dense K/V", _ms(
        lambda: F.scaled_dot_product_attention(q[:, :, None], kd, vd)), moved, "GB/s")  # fmt: skip
    _report("paged_attention decode", "torch gather + SDPA", _ms(
        lambda: F.scaled_dot_product_attention(
            q[:, :, None], k[block_tables.long()].reshape(seqs, ctx, heads, dim).transpose(1, 2),
            v[block_tables.long()].reshape(seqs, ctx, heads, dim).transpose(1, 2))),
        moved, "GB/s")  # fmt: skip


def test_chunk_attention():
    b, h, c, left, d = 256, 4, 8, 64, 64
    dev, dt = "cuda", torch.float16
    q, k, v = (torch.randn(b, h, c, d, device=dev, dtype=dt) for _ in range(3))
    ck, cv = (torch.randn(b, h, left, d, device=dev, dtype=dt) for _ in range(2))
    filled = torch.randint(0, left + 1, (b,), device=dev)
    moved = (3 * b * h * c * d + 2 * b * h * left * d + b * h * c * d) * 2
    _report("chunk_attention", "triton", _ms(
        lambda: chunk_attention(q, k, v, ck, cv, filled)), moved, "GB/s")  # fmt: skip
    _report("chunk_attention", "torch reference", _ms(
        lambda: chunk_attention_ref(q, k, v, ck, cv, filled, d**-0.5)), moved, "GB/s")  # fmt: skip
    _report("chunk_attention", "cat + masked SDPA", _ms(
        lambda: chunk_attention(q, k, v, ck, cv, filled, impl="ref")), moved, "GB/s")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layernorm_linear(dtype):
    m, k, n = 8192, 1024, 4096
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    g, b = torch.randn(k, device="cuda", dtype=dtype), torch.randn(k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / 32
    flops = 2 * m * k * n
    name = f"layernorm_linear {str(dtype)[6:]}"
    _report(name, "triton fused", _ms(lambda: layernorm_linear(x, g, b, w)), flops, "TFLOP/s")
    _report(name, "F.layer_norm + cuBLAS", _ms(
        lambda: F.linear(F.layer_norm(x, (k,), g, b), w)), flops, "TFLOP/s")  # fmt: skip


def test_int8_matmul():
    m = k = n = 4096
    w_q, w_s = quantize_rows(torch.randn(n, k, device="cuda"))
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    x_q, x_s = quantize_rows(x.float())
    ops = 2 * m * k * n
    _report("int8_matmul int8 x", "triton", _ms(
        lambda: int8_matmul(x_q, w_q, w_s, None, x_s)), ops, "TOP/s")  # fmt: skip
    wt = w_q.T.contiguous()
    _report(
        "int8_matmul int8 x", "torch._int_mm", _ms(lambda: torch._int_mm(x_q, wt)), ops, "TOP/s"
    )
    _report("int8_matmul fp16 x", "triton", _ms(
        lambda: int8_matmul(x, w_q, w_s)), ops, "TFLOP/s")  # fmt: skip
    wf = (w_q.float() * w_s[:, None]).half()
    _report("int8_matmul fp16 x", "cuBLAS fp16 matmul", _ms(lambda: x @ wf.T), ops, "TFLOP/s")


@pytest.mark.parametrize("vocab", [29, 5000])
def test_ctc_topk(vocab):
    frames = 64 * 500  # 64 streams x 20 s of 40 ms frames
    logits = torch.randn(frames, vocab, device="cuda", dtype=torch.float16)
    moved = frames * vocab * 2
    _report(f"ctc_topk V={vocab}", "triton fused", _ms(lambda: ctc_topk(logits, 8)), moved, "GB/s")
    _report(f"ctc_topk V={vocab}", "log_softmax + topk", _ms(
        lambda: logits.float().log_softmax(-1).topk(8, -1)), moved, "GB/s")  # fmt: skip


def test_zz_write_results():
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu-bench.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": RESULTS}, f, indent=1)
