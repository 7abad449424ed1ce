"""The kernels' CPU implementations against their plain-torch references (and,
for the 3x3 convolution, Winograd against torch's own convolution) on this
machine, at the sizes the sample models use.  Prints median ms and ratios."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from timing import median_ms  # noqa: E402

from engine.kv_cache import BlockPool, KVCacheConfig  # noqa: E402
from kernels import (  # noqa: E402
    chunk_attention,
    chunk_attention_ref,
    ctc_topk,
    ctc_topk_ref,
    int8_matmul,
    int8_matmul_ref,
    layernorm_linear,
    layernorm_linear_ref,
    paged_attention,
    paged_attention_ref,
    quantize_rows,
    winograd_conv2d,
)

RUNS = 20


def _row(name: str, ref_ms: float, impl_ms: float, note: str = "") -> None:
    print(f"{name:44s} {ref_ms:9.3f} {impl_ms:9.3f} {ref_ms / impl_ms:7.2f}x  {note}")


def _paged(seqs: int, ctx: int, heads: int = 4, dim: int = 64, bs: int = 16):
    pool = BlockPool(KVCacheConfig(bs, seqs * (-(-ctx // bs)) + 1))
    tables = torch.tensor([pool.allocate(i, list(range(ctx))) for i in range(seqs)],
                          dtype=torch.int32)  # fmt: skip
    k = torch.randn(pool.config.num_blocks, bs, heads, dim)
    return (
        torch.randn(seqs, heads, dim),
        k,
        torch.randn_like(k),
        tables,
        torch.full((seqs,), ctx, dtype=torch.int32),
    )


def test_bench_kernels_cpu():
    torch.manual_seed(0)
    print(f"\nkernels on the CPU ({torch.get_num_threads()} threads), median of {RUNS}")
    print(f"{'op and size':44s} {'ref ms':>9s} {'impl ms':>9s} {'speedup':>8s}")
    # The VQA fuser's shape: 18 questions x 12 tokens over 100 image tokens, and decode.
    q, k, v, t, c = _paged(32, 100)
    _row("paged_attention decode 32 seqs x 100 tok", median_ms(
        lambda: paged_attention_ref(q[:, None], k, v, t, c, 0.125), RUNS), median_ms(
        lambda: paged_attention(q, k, v, t, c), RUNS))  # fmt: skip
    # The ASR encoder's step: 64 sessions, 4 heads, chunk 8, left context 64 (d 256).
    b, h, ch, left, d = 64, 4, 8, 64, 64
    qc, kc, vc = (torch.randn(b, h, ch, d) for _ in range(3))
    ck, cv = torch.randn(b, h, left, d), torch.randn(b, h, left, d)
    filled = torch.randint(0, left + 1, (b,))
    _row("chunk_attention 64 sessions, C 8, L 64", median_ms(
        lambda: chunk_attention_ref(qc, kc, vc, ck, cv, filled, d**-0.5), RUNS), median_ms(
        lambda: chunk_attention(qc, kc, vc, ck, cv, filled), RUNS))  # fmt: skip
    x, g, bta = torch.randn(512, 256), torch.randn(256), torch.randn(256)
    w, bias = torch.randn(1024, 256), torch.randn(1024)
    _row("layernorm_linear 512 x 256 -> 1024", median_ms(
        lambda: layernorm_linear_ref(x, g, bta, w, bias, 1e-5), RUNS), median_ms(
        lambda: layernorm_linear(x, g, bta, w, bias), RUNS))  # fmt: skip
    w_q, w_s = quantize_rows(w)
    x_q, x_s = quantize_rows(x)
    fp32_ms = median_ms(lambda: F.linear(x, w, bias), RUNS)
    _row("int8_matmul 512 x 256 -> 1024, float x", median_ms(
        lambda: int8_matmul_ref(x, w_q, w_s, bias), RUNS), median_ms(
        lambda: int8_matmul(x, w_q, w_s, bias), RUNS),
        f"(fp32 F.linear {fp32_ms:.3f} ms)")  # fmt: skip
    _row("int8_matmul 512 x 256 -> 1024, int8 x", median_ms(
        lambda: int8_matmul_ref(x_q, w_q, w_s, bias, x_s), RUNS), median_ms(
        lambda: int8_matmul(x_q, w_q, w_s, bias, x_s), RUNS), "(torch._int_mm)")  # fmt: skip
    logits = torch.randn(1, 500, 29)  # 20 s of ASR output frames
    _row("ctc_topk 500 frames x 29, k 8", median_ms(
        lambda: ctc_topk_ref(logits[0], 8), RUNS), median_ms(
        lambda: ctc_topk(logits, 8), RUNS))  # fmt: skip
    print("\n3x3 convolution, stride 1: torch (oneDNN) vs Winograd F(2x2, 3x3)")
    print(f"{'shape [N, C, H, W] -> O':44s} {'torch ms':>9s} {'wino ms':>9s} {'torch/wino':>8s}")
    for n, c, o, hh, ww in [(8, 1, 32, 130, 80), (8, 32, 32, 64, 40), (8, 64, 64, 64, 40),
                            (8, 128, 128, 32, 32), (4, 256, 256, 32, 32)]:  # fmt: skip
        xi, wi = torch.randn(n, c, hh, ww), torch.randn(o, c, 3, 3)
        _row(f"[{n}, {c}, {hh}, {ww}] -> {o}", median_ms(
            lambda: F.conv2d(xi, wi, padding=1), 10), median_ms(
            lambda: winograd_conv2d(xi, wi, None, 1), 10))  # fmt: skip
