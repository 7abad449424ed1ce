"""Paged attention over the engine's block KV cache (engine.kv_cache): each
sequence's keys and values lie scattered over fixed-size blocks named by its
row of ``block_tables``.

Decode (one query token per sequence) and chunked prefill (``chunk`` new query
tokens per sequence, causal among themselves, after the sequence's earlier
tokens) are one op: query ``c`` of a sequence sees its tokens
``t < context_len - chunk + c + 1``.

Layers (../shared/docs/style.md, point 4): :func:`paged_attention_ref` in plain
torch; the CPU implementation (all sequences in one gather plus a mask) as the
custom op ``dsstream::paged_attention`` with a fake implementation, so models
using it export; the CUDA C++ kernel (kernels/csrc/paged_attention.cu, built on
first use) registered for CUDA tensors; and the launcher :func:`paged_attention`.

Shapes: q ``[seqs, heads, dim]`` (decode) or ``[seqs, chunk, heads, dim]``;
k_cache, v_cache ``[blocks, block_size, heads, dim]``; block_tables ``[seqs,
max_blocks]`` int32 (unused entries may hold any valid block id); context_lens
``[seqs]`` int32, each >= chunk (the chunk's own keys are already in the cache).
"""

from __future__ import annotations

import torch

from kernels._build import extension_or_none
from kernels._dispatch import choose

__all__ = ["paged_attention", "paged_attention_ref"]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain-torch reference, one sequence at a time: gather its tokens, then attend.

    q ``[seqs, chunk, heads, dim]`` -> ``[seqs, chunk, heads, dim]``.
    """
    block_size = k_cache.shape[1]
    chunk = q.shape[1]
    out = torch.empty_like(q)
    for s in range(q.shape[0]):
        n = int(context_lens[s])
        blocks = block_tables[s, : (n + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:n]  # [n, heads, dim]
        v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:n]
        scores = torch.einsum("chd,nhd->chn", q[s], k) * scale
        visible = torch.arange(n)[None, :] < (n - chunk + torch.arange(chunk) + 1)[:, None]
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        out[s] = torch.einsum("chn,nhd->chd", scores.softmax(-1), v)
    return out


@torch.library.custom_op("dsstream::paged_attention", mutates_args=())
def _paged_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    # CPU: all sequences at once; gather every table's blocks, mask what each query may not see.
    seqs, chunk = q.shape[:2]
    max_blocks = block_tables.shape[1]
    block_size = k_cache.shape[1]
    tables = block_tables.long()
    k = k_cache[tables].reshape(seqs, max_blocks * block_size, *k_cache.shape[2:])
    v = v_cache[tables].reshape(seqs, max_blocks * block_size, *v_cache.shape[2:])
    scores = torch.einsum("schd,snhd->shcn", q, k) * scale
    slots = torch.arange(max_blocks * block_size, device=q.device)
    limit = context_lens.long()[:, None] - chunk + torch.arange(chunk, device=q.device) + 1
    invalid = slots[None, None, :] >= limit[:, :, None]  # [seqs, chunk, slots]
    scores = scores.masked_fill(invalid[:, None], float("-inf"))
    return torch.einsum("shcn,snhd->schd", scores.softmax(-1), v).contiguous()


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale):
    return torch.empty_like(q)


@_paged_attention_op.register_kernel("cuda")
def _(q, k_cache, v_cache, block_tables, context_lens, scale):
    ext = extension_or_none("paged_attention")
    if ext is None:
        return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
    return ext.paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def _check(q: torch.Tensor, k_cache, v_cache, block_tables, context_lens) -> None:
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "expected q [seqs, heads, dim] or [seqs, chunk, heads, dim] and caches [blocks, "
            f"block_size, heads, dim], got {list(q.shape)}, {list(k_cache.shape)}, "
            f"{list(v_cache.shape)}"
        )
    if q.shape[2:] != k_cache.shape[2:]:
        raise ValueError(f"q heads/dim {list(q.shape[2:])} != cache {list(k_cache.shape[2:])}")
    if block_tables.shape[0] != q.shape[0] or context_lens.shape != (q.shape[0],):
        raise ValueError("block_tables and context_lens need one row per sequence")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if q.shape[0] and int(context_lens.min()) < q.shape[1]:
        raise ValueError(f"every context length must cover the chunk of {q.shape[1]} queries")


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Attention of each sequence's queries over its paged keys and values.

    q ``[seqs, heads, dim]`` (decode) or ``[seqs, chunk, heads, dim]`` (chunked
    prefill) -> the same shape.  ``scale`` defaults to ``dim ** -0.5``; ``impl``
    forces "ref", "cpu" or "cuda" (default: by device).
    """
    decode = q.dim() == 3
    q4 = q.unsqueeze(1) if decode else q
    _check(q4, k_cache, v_cache, block_tables, context_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    which = choose("paged_attention", impl, q.device, gpu="cuda")
    if which == "ref":
        out = paged_attention_ref(q4, k_cache, v_cache, block_tables, context_lens, scale)
    else:  # the op dispatches to the CPU implementation or the CUDA kernel by device
        out = _paged_attention_op(q4, k_cache, v_cache, block_tables, context_lens, scale)
    return out.squeeze(1) if decode else out
