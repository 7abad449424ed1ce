"""Paged attention for decoding: one query token per sequence attends to that
sequence's keys and values scattered over cache blocks (engine.kv_cache).

Three layers (see ../shared/docs/style.md, point 4): ``paged_attention_ref``
in plain torch, the CPU implementation ``_paged_attention_cpu`` registered as
the custom op ``dsstream::paged_attention`` (with a fake implementation, so
models using it export), and the launcher ``paged_attention``.  The GPU kernel
comes with the kernels work; until then CUDA tensors fall back to the
reference with a one-time warning.

Shapes: q ``[seqs, heads, head_dim]``; k_cache, v_cache ``[blocks, block_size,
heads, head_dim]``; block_tables ``[seqs, max_blocks]`` int32 (unused entries
may hold any valid block id); context_lens ``[seqs]`` int32 (>= 1).
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["paged_attention", "paged_attention_ref"]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain-torch reference: gather each sequence's tokens, then attend."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    for s in range(q.shape[0]):
        n = int(context_lens[s])
        blocks = block_tables[s, : (n + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:n]  # [n, heads, dim]
        v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:n]
        scores = torch.einsum("hd,nhd->hn", q[s], k) * scale
        out[s] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


@torch.library.custom_op("dsstream::paged_attention", mutates_args=(), device_types="cpu")
def _paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    # All sequences at once: gather every table's blocks, mask slots past each length.
    seqs, max_blocks = block_tables.shape
    block_size = k_cache.shape[1]
    tables = block_tables.long()
    k = k_cache[tables].reshape(seqs, max_blocks * block_size, *k_cache.shape[2:])
    v = v_cache[tables].reshape(seqs, max_blocks * block_size, *v_cache.shape[2:])
    scores = torch.einsum("shd,snhd->shn", q, k) * scale
    slots = torch.arange(max_blocks * block_size, device=q.device)
    invalid = slots[None, :] >= context_lens[:, None].long()
    scores = scores.masked_fill(invalid[:, None, :], float("-inf"))
    return torch.einsum("shn,snhd->shd", scores.softmax(-1), v).contiguous()


@_paged_attention_cpu.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale):
    return torch.empty_like(q)


_warned = False


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each sequence's query over its paged keys and values."""
    global _warned
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [seqs, heads, dim] and caches [blocks, block_size, heads, dim], got "
            f"{list(q.shape)}, {list(k_cache.shape)}, {list(v_cache.shape)}"
        )
    if q.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"q heads/dim {list(q.shape[1:])} != cache {list(k_cache.shape[2:])}")
    if block_tables.shape[0] != q.shape[0] or context_lens.shape != (q.shape[0],):
        raise ValueError("block_tables and context_lens need one row per sequence")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.device.type == "cpu":
        return _paged_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, scale)
    if not _warned:
        _warned = True
        warnings.warn(
            f"no paged attention kernel for {q.device.type} yet; using the reference",
            RuntimeWarning,
            stacklevel=2,
        )
    return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
