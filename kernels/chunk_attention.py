"""Chunked streaming attention with a left-context cache, as the ASR encoder
runs it (apps/asr/model.py, ``ChunkedAttention.step``): each session's chunk of
``C`` frames attends to every frame of its own chunk and to the last ``filled``
frames of its left-context cache; sessions in a batch have different fill levels.

Shapes: q, k, v ``[B, H, C, D]`` (this chunk); cache_k, cache_v ``[B, H, L, D]``
right-aligned (slot ``L - 1`` is the newest frame; slots ``< L - filled`` are
empty); filled ``[B]`` int, 0..L.  Output ``[B, H, C, D]``.

Layers: :func:`chunk_attention_ref` (plain torch, explicit softmax), the CPU
implementation (one masked ``scaled_dot_product_attention``) as the custom op
``dsstream::chunk_attention``, the Triton kernel ``_chunk_attention_kernel``
(flash-attention style: online softmax over key tiles, the empty cache slots
skipped by mask) for CUDA and for the CPU under ``TRITON_INTERPRET=1``, and the
launcher :func:`chunk_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import choose, dot_in_float32, dot_precision, warn_once
from kernels._triton import tl, triton

__all__ = ["chunk_attention", "chunk_attention_ref"]


def _visible(filled: torch.Tensor, left: int, chunk: int) -> torch.Tensor:
    """``[B, L + C]`` bool: which keys each session's chunk may attend to."""
    slot = torch.arange(left + chunk, device=filled.device)
    return slot[None, :] >= (left - filled.long())[:, None]


def chunk_attention_ref(q, k, v, cache_k, cache_v, filled, scale: float) -> torch.Tensor:
    """Plain torch: concatenate cache and chunk, mask the empty slots, softmax."""
    keys, values = torch.cat([cache_k, k], 2), torch.cat([cache_v, v], 2)
    scores = (q @ keys.transpose(-1, -2)) * scale  # [B, H, C, L + C]
    visible = _visible(filled, cache_k.shape[2], q.shape[2])
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ values


@torch.library.custom_op("dsstream::chunk_attention", mutates_args=())
def _chunk_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    filled: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    keys, values = torch.cat([cache_k, k], 2), torch.cat([cache_v, v], 2)
    visible = _visible(filled, cache_k.shape[2], q.shape[2])[:, None, None, :]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale)


@_chunk_attention_op.register_fake
def _(q, k, v, cache_k, cache_v, filled, scale):
    return torch.empty_like(q)


@_chunk_attention_op.register_kernel("cuda")
def _(q, k, v, cache_k, cache_v, filled, scale):
    if triton is None:
        warn_once("chunk_attention:triton", "chunk_attention: no Triton; using the reference")
        return chunk_attention_ref(q, k, v, cache_k, cache_v, filled, scale)
    return _chunk_attention_triton(q, k, v, cache_k, cache_v, filled, scale)


if triton is not None:

    @triton.jit
    def _attend_tile(q, k_ptrs, v_ptrs, keep, dmask, m_i, l_i, acc, scale,
                     DOT_F32: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        """One key tile of the online softmax (Milakov and Gimelshein, 2018).

        The dots take the inputs' dtype (fp16/bf16 on tensor cores; float32 in
        IEEE precision, not TF32, so fp32 matches torch), accumulating in fp32."""
        load = keep[:, None] & dmask[None, :]
        k = tl.load(k_ptrs, mask=load, other=0.0)
        v = tl.load(v_ptrs, mask=load, other=0.0)
        if DOT_F32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [M, N]
        s = tl.where(keep[None, :], s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.where(keep[None, :], tl.exp(s - m_new[:, None]), 0.0)
        corr = tl.exp(m_i - m_new)
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _chunk_attention_kernel(
        q_ptr, k_ptr, v_ptr, ck_ptr, cv_ptr, filled_ptr, out_ptr,
        heads, chunk, left, dim, scale,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sc_b, sc_h, sc_t, so_b, so_h, so_t,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        b = bh // heads
        h = bh % heads
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        cols = tl.arange(0, BLOCK_N)
        dmask = dims < dim
        q = tl.load(
            q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :],
            mask=(rows[:, None] < chunk) & dmask[None, :], other=0.0,
        )  # fmt: skip
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        first = left - tl.load(filled_ptr + b)  # the oldest filled cache slot
        cache = b * sc_b + h * sc_h
        for start in range(0, left, BLOCK_N):
            slot = start + cols
            keep = (slot >= first) & (slot < left)
            offs = cache + slot[:, None] * sc_t + dims[None, :]
            m_i, l_i, acc = _attend_tile(q, ck_ptr + offs, cv_ptr + offs, keep, dmask,
                                         m_i, l_i, acc, scale, DOT_F32, PRECISION)  # fmt: skip
        new = b * sk_b + h * sk_h
        for start in range(0, chunk, BLOCK_N):
            slot = start + cols
            keep = slot < chunk
            offs = new + slot[:, None] * sk_t + dims[None, :]
            m_i, l_i, acc = _attend_tile(q, k_ptr + offs, v_ptr + offs, keep, dmask,
                                         m_i, l_i, acc, scale, DOT_F32, PRECISION)  # fmt: skip
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + b * so_b + h * so_h + rows[:, None] * so_t + dims[None, :],
            out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < chunk) & dmask[None, :],
        )  # fmt: skip


def _chunk_attention_triton(q, k, v, cache_k, cache_v, filled, scale: float) -> torch.Tensor:
    """Launch the Triton kernel (last dims contiguous; cache and chunk strides may differ)."""
    q, k, v, cache_k, cache_v = (t.contiguous() for t in (q, k, v, cache_k, cache_v))
    b, h, c, d = q.shape
    left = cache_k.shape[2]
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(d))
    block_m = min(64, max(16, triton.next_power_of_2(c)))
    grid = (b * h, triton.cdiv(c, block_m))
    _chunk_attention_kernel[grid](
        q, k, v, cache_k, cache_v, filled.to(torch.int32).contiguous(), out,
        h, c, left, d, scale,
        *q.stride()[:3], *k.stride()[:3], *cache_k.stride()[:3], *out.stride()[:3],
        BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=block_d,
        DOT_F32=dot_in_float32(q.dtype), PRECISION=dot_precision(q.dtype),
    )  # fmt: skip
    return out


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    filled: torch.Tensor,
    scale: float | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Each session's chunk queries over its filled left context plus its own chunk.

    q, k, v ``[B, H, C, D]``; cache_k, cache_v ``[B, H, L, D]`` right-aligned;
    filled ``[B]`` (0..L) -> ``[B, H, C, D]``.  ``impl``: "ref", "cpu", "triton"
    (default: by device).
    """
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"q, k, v must be [B, H, C, D] alike, got {[list(t.shape) for t in (q, k, v)]}"
        )
    if cache_k.shape != cache_v.shape or cache_k.dim() != 4:
        raise ValueError("cache_k and cache_v must be [B, H, L, D] alike")
    if cache_k.shape[:2] != q.shape[:2] or cache_k.shape[3] != q.shape[3]:
        raise ValueError(f"cache {list(cache_k.shape)} does not match q {list(q.shape)}")
    if filled.shape != (q.shape[0],):
        raise ValueError(f"filled must be [B] = [{q.shape[0]}], got {list(filled.shape)}")
    left = cache_k.shape[2]
    if q.shape[0] and (int(filled.min()) < 0 or int(filled.max()) > left):
        raise ValueError(f"filled must lie in 0..{left}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    which = choose("chunk_attention", impl, q.device, gpu="triton")
    if which == "ref":
        return chunk_attention_ref(q, k, v, cache_k, cache_v, filled, scale)
    if which == "triton":
        return _chunk_attention_triton(q, k, v, cache_k, cache_v, filled, scale)
    return _chunk_attention_op(q, k, v, cache_k, cache_v, filled, scale)
