"""Fused (residual add +) LayerNorm + Linear: ``y = LN(x + residual) @ W.T + b``.

The fusion the seed document describes: the normalized activations never go
to memory; on a GPU the LayerNorm is recomputed per output tile from the row
statistics, which costs a re-read of ``x`` (cheap: ``K`` values per row)
instead of a write and a read of the normalized ``[M, K]`` tensor.  Meant for
fp16/bf16 (``tl.dot`` on tensor cores, float32 statistics and accumulation);
float32 works too.

Shapes: x ``[..., K]``; ln_weight, ln_bias ``[K]`` or None (no affine); weight ``[N, K]``; bias
``[N]`` or None; residual like x or None.  Returns y ``[..., N]``, and with a
residual also the sum ``x + residual`` (the residual stream for the next block).

Layers: :func:`layernorm_linear_ref` (explicit mean, variance, matmul), the CPU
implementation (torch's ``layer_norm`` and ``addmm``) as the custom op
``dsstream::layernorm_linear``, the Triton kernel ``_layernorm_linear_kernel``,
and the launcher :func:`layernorm_linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import choose, dot_in_float32, dot_precision, warn_once
from kernels._triton import tl, triton

__all__ = ["layernorm_linear", "layernorm_linear_ref"]


def layernorm_linear_ref(x, ln_weight, ln_bias, weight, bias, eps: float) -> torch.Tensor:
    """Plain torch, the formulas written out: ``x [..., K]`` (the residual already added)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    h = (x - mean) / torch.sqrt(var + eps)
    if ln_weight is not None:
        h = h * ln_weight
    if ln_bias is not None:
        h = h + ln_bias
    y = h @ weight.T
    return y if bias is None else y + bias


@torch.library.custom_op("dsstream::layernorm_linear", mutates_args=())
def _layernorm_linear_op(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    # x [..., K] -> [..., N]; the LayerNorm affine may be None (folded into W by
    # engine.passes.fold_layernorm_into_linear).
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return F.linear(h, weight, bias)


@_layernorm_linear_op.register_fake
def _(x, ln_weight, ln_bias, weight, bias, eps):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_layernorm_linear_op.register_kernel("cuda")
def _(x, ln_weight, ln_bias, weight, bias, eps):
    if triton is None:
        warn_once("layernorm_linear:triton", "layernorm_linear: no Triton; using the reference")
        return layernorm_linear_ref(x, ln_weight, ln_bias, weight, bias, eps)
    return _layernorm_linear_triton(x, ln_weight, ln_bias, weight, bias, eps)


if triton is not None:

    @triton.jit
    def _layernorm_linear_kernel(
        x_ptr, g_ptr, beta_ptr, w_ptr, b_ptr, y_ptr, M, N, K, eps,
        sx_m, sw_n, sy_m,
        HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        rmask = rows < M
        # Row statistics in float32, two passes (mean, then centred variance) for accuracy.
        total = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            m = rmask[:, None] & ((k0 + ks) < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * sx_m + (k0 + ks)[None, :], mask=m, other=0.0)
            total += tl.sum(x.to(tl.float32), 1)
        mean = total / K
        sq = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            m = rmask[:, None] & ((k0 + ks) < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * sx_m + (k0 + ks)[None, :], mask=m, other=0.0)
            c = tl.where(m, x.to(tl.float32) - mean[:, None], 0.0)
            sq += tl.sum(c * c, 1)
        rstd = 1.0 / tl.sqrt(sq / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + ks) < K
            m = rmask[:, None] & kmask[None, :]
            x = tl.load(x_ptr + rows[:, None] * sx_m + (k0 + ks)[None, :], mask=m, other=0.0)
            g = tl.load(g_ptr + k0 + ks, mask=kmask, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + k0 + ks, mask=kmask, other=0.0).to(tl.float32)
            h = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]
            h = tl.where(m, h, 0.0).to(w_ptr.dtype.element_ty)  # the dtype of the matmul
            w = tl.load(w_ptr + cols[None, :] * sw_n + (k0 + ks)[:, None],
                        mask=kmask[:, None] & (cols < N)[None, :], other=0.0)  # fmt: skip
            if DOT_F32:
                h, w = h.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(h, w, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * sy_m + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols < N)[None, :])  # fmt: skip


def _layernorm_linear_triton(x, ln_weight, ln_bias, weight, bias, eps: float) -> torch.Tensor:
    lead = x.shape[:-1]
    x, weight = x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    if ln_weight is None:
        ln_weight = x.new_ones(k)
    if ln_bias is None:
        ln_bias = x.new_zeros(k)
    y = x.new_empty(m, n)
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 64))
    _layernorm_linear_kernel[grid](
        x, ln_weight, ln_bias, weight, bias if bias is not None else weight, y, m, n, k, eps,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, DOT_F32=dot_in_float32(weight.dtype),
        PRECISION=dot_precision(weight.dtype),
        BLOCK_M=32, BLOCK_N=64, BLOCK_K=block_k,
    )  # fmt: skip
    return y.reshape(*lead, n)


def layernorm_linear(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    impl: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``LN(x [+ residual]) @ weight.T + bias``: x ``[..., K]`` -> ``[..., N]``.

    With ``residual``, returns ``(y, x + residual)``.  ``impl``: "ref", "cpu",
    "triton" (default: by device).
    """
    k = x.shape[-1]
    if any(p is not None and p.shape != (k,) for p in (ln_weight, ln_bias)):
        raise ValueError(f"LayerNorm weight and bias must be [{k}] (or None)")
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}], got {list(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}]")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {list(residual.shape)} != x {list(x.shape)}")
    h = x if residual is None else x + residual
    which = choose("layernorm_linear", impl, x.device, gpu="triton")
    if which == "ref":
        y = layernorm_linear_ref(h, ln_weight, ln_bias, weight, bias, eps)
    elif which == "triton":
        y = _layernorm_linear_triton(h, ln_weight, ln_bias, weight, bias, eps)
    else:
        y = _layernorm_linear_op(h, ln_weight, ln_bias, weight, bias, eps)
    return y if residual is None else (y, h)
