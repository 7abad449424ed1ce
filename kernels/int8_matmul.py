"""Int8 matrix multiply for the quantization path: ``y = (x @ w_q.T) * w_scale (+ bias)``.

Weights are int8 with one float32 scale per output channel (symmetric, the
seed document's advice).  Activations are either floating point (float32,
fp16, bf16: the int8 weights are widened tile by tile, exact, and the products
accumulate in float32) or int8 with one float32 scale per row (dynamic
quantization: int8 x int8 products accumulate exactly in int32).

Shapes: x ``[..., K]``; w_q ``[N, K]`` int8; w_scale ``[N]`` float32; x_scale
``[...]`` (one per row) when x is int8; bias ``[N]`` or None.  Output
``[..., N]`` float32.

Layers: :func:`int8_matmul_ref` (float64 dequantize-then-multiply), the CPU
implementation as the custom op ``dsstream::int8_matmul`` (``torch._int_mm`` for
int8 activations; a dequantized float32 matmul otherwise), the Triton kernel
``_int8_matmul_kernel``, and the launcher :func:`int8_matmul`.
"""

from __future__ import annotations

import torch

from kernels._dispatch import choose, dot_in_float32, dot_precision, warn_once
from kernels._triton import tl, triton

__all__ = ["int8_matmul", "int8_matmul_ref", "quantize_rows", "int8_linear"]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (the last dim): ``x ≈ q * scale[..., None]``."""
    scale = x.detach().abs().amax(-1).float().clamp_min(1e-12) / 127.0
    q = torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul_ref(x, w_q, w_scale, bias=None, x_scale=None) -> torch.Tensor:
    """Float64 reference: dequantize both operands, multiply, then float32."""
    xf = x.double() if x_scale is None else x.double() * x_scale.double()[..., None]
    y = xf @ (w_q.double() * w_scale.double()[:, None]).T
    if bias is not None:
        y = y + bias.double()
    return y.float()


@torch.library.custom_op("dsstream::int8_matmul", mutates_args=())
def _int8_matmul_op(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None,
) -> torch.Tensor:
    if x_scale is not None:
        # torch._int_mm wants more than 16 rows on some backends: pad, then drop.
        rows = x.shape[0]
        xp = x if rows > 16 else torch.cat([x, x.new_zeros(17 - rows, x.shape[1])])
        acc = torch._int_mm(xp, w_q.T.contiguous())[:rows]
        y = acc.float() * x_scale[:, None] * w_scale[None, :]
    else:
        y = x.float() @ (w_q.float() * w_scale[:, None]).T
    return y if bias is None else y + bias.float()


@_int8_matmul_op.register_fake
def _(x, w_q, w_scale, bias, x_scale):
    return x.new_empty(x.shape[0], w_q.shape[0], dtype=torch.float32)


@_int8_matmul_op.register_kernel("cuda")
def _(x, w_q, w_scale, bias, x_scale):
    if triton is None:
        warn_once("int8_matmul:triton", "int8_matmul: no Triton; using the reference")
        return int8_matmul_ref(x, w_q, w_scale, bias, x_scale)
    return _int8_matmul_triton(x, w_q, w_scale, bias, x_scale)


if triton is not None:

    @triton.jit
    def _int8_matmul_kernel(
        x_ptr, w_ptr, ws_ptr, xs_ptr, b_ptr, y_ptr, M, N, K, sx_m, sw_n, sw_k, sy_m,
        INT8_X: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        if INT8_X:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + ks) < K
            x = tl.load(x_ptr + rows[:, None] * sx_m + (k0 + ks)[None, :],
                        mask=(rows < M)[:, None] & kmask[None, :], other=0)  # fmt: skip
            w = tl.load(w_ptr + cols[None, :] * sw_n + (k0 + ks)[:, None] * sw_k,
                        mask=kmask[:, None] & (cols < N)[None, :], other=0)  # fmt: skip
            if INT8_X:
                acc += tl.dot(x, w)  # int8 x int8 -> int32, exact
            elif DOT_F32:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
            else:
                # |w| <= 127 is exact in fp16 and bf16; fp32 x in IEEE precision, not TF32.
                acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
        y = acc.to(tl.float32) * tl.load(ws_ptr + cols, mask=cols < N, other=0.0)[None, :]
        if INT8_X:
            y = y * tl.load(xs_ptr + rows, mask=rows < M, other=0.0)[:, None]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * sy_m + cols[None, :], y,
                 mask=(rows < M)[:, None] & (cols < N)[None, :])  # fmt: skip


def _int8_matmul_triton(x, w_q, w_scale, bias, x_scale) -> torch.Tensor:
    x = x.contiguous()  # w_q may be a transposed view: its strides are passed
    m, k = x.shape
    n = w_q.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=torch.float32)
    block_k = min(64, max(32, triton.next_power_of_2(k)))
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 64))
    _int8_matmul_kernel[grid](
        x, w_q, w_scale.float().contiguous(), x_scale if x_scale is not None else w_scale,
        bias if bias is not None else w_scale, y, m, n, k,
        x.stride(0), w_q.stride(0), w_q.stride(1), y.stride(0),
        INT8_X=x_scale is not None, HAS_BIAS=bias is not None, DOT_F32=dot_in_float32(x.dtype),
        PRECISION=dot_precision(x.dtype),
        BLOCK_M=32, BLOCK_N=64, BLOCK_K=block_k,
    )  # fmt: skip
    return y


def int8_matmul(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """``x [..., K]`` times int8 weights ``[N, K]`` -> float32 ``[..., N]``.

    Float ``x``: no ``x_scale``.  Int8 ``x``: ``x_scale [...]``, one per row (see
    :func:`quantize_rows`).  ``impl``: "ref", "cpu", "triton" (default: by device).
    """
    k = x.shape[-1]
    if w_q.dtype != torch.int8 or w_q.dim() != 2 or w_q.shape[1] != k:
        raise ValueError(f"w_q must be int8 [N, {k}], got {w_q.dtype} {list(w_q.shape)}")
    if w_scale.shape != (w_q.shape[0],):
        raise ValueError(f"w_scale must be [{w_q.shape[0]}] (one per output channel)")
    if bias is not None and bias.shape != (w_q.shape[0],):
        raise ValueError(f"bias must be [{w_q.shape[0]}]")
    if (x.dtype == torch.int8) != (x_scale is not None):
        raise ValueError("int8 activations need x_scale (one per row); float ones take none")
    if x_scale is not None and x_scale.shape != x.shape[:-1]:
        raise ValueError(f"x_scale must be {list(x.shape[:-1])}, got {list(x_scale.shape)}")
    if x.dtype not in (torch.int8, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported activation dtype {x.dtype}")
    flat = x.reshape(-1, k)
    xs = None if x_scale is None else x_scale.reshape(-1).float()
    which = choose("int8_matmul", impl, x.device, gpu="triton")
    if which == "ref":
        y = int8_matmul_ref(flat, w_q, w_scale, bias, xs)
    elif which == "triton":
        y = _int8_matmul_triton(flat, w_q, w_scale, bias, xs)
    else:
        y = _int8_matmul_op(flat, w_q, w_scale.float(), bias, xs)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


@torch.library.custom_op("dsstream::int8_linear", mutates_args=())
def int8_linear(
    x_q: torch.Tensor, x_scale: float, x_zero: int, w_q: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """What a quantize -> dequantize -> matmul(dequantized int8 weights) chain computes,
    in integers: ``x_q [..., K]`` int8 with one scale and zero point, ``w_q [K, N]``
    int8 with ``w_scale [N]`` -> float32 ``[..., N]``.

    ``sum_k (x_q - z) w_q = x_q @ w_q - z * colsum(w_q)``: the int8 product runs
    on integer kernels (``torch._int_mm`` here, the Triton kernel on a GPU) and the
    zero point costs one vector.  engine.passes.fuse_int8_linear swaps it in.
    """
    lead, k = x_q.shape[:-1], x_q.shape[-1]
    flat = x_q.reshape(-1, k)
    rows = flat.shape[0]
    if x_q.device.type == "cuda" and triton is not None:
        ones = torch.full((rows,), float(x_scale), device=x_q.device)
        y = _int8_matmul_triton(flat, w_q.T, w_scale, None, ones)
    else:
        padded = flat if rows > 16 else torch.cat([flat, flat.new_zeros(17 - rows, k)])
        y = torch._int_mm(padded, w_q.contiguous())[:rows].float() * (x_scale * w_scale)
    if x_zero:
        colsum = w_q.to(torch.int32).sum(0).float()
        y = y - (x_zero * x_scale) * colsum * w_scale
    return y.reshape(*lead, w_q.shape[1])


@int8_linear.register_fake
def _(x_q, x_scale, x_zero, w_q, w_scale):
    return x_q.new_empty(*x_q.shape[:-1], w_q.shape[1], dtype=torch.float32)
