"""The CTC output step: log-softmax over the vocabulary fused with top-k per
frame, so only ``k`` (log-prob, token) pairs per frame cross to the host for
the prefix beam search instead of the whole ``[T, V]`` matrix.

Shapes: logits ``[..., T, V]`` (any float dtype) -> ``(logp [..., T, k]``
float32 sorted high to low, ``ids [..., T, k]`` int64).  Ties go to the lower
token id (``torch.topk`` leaves their order unspecified).

Layers: :func:`ctc_topk_ref` (float64 log-softmax, then ``topk``), the CPU
implementation (float32 ``log_softmax`` and ``topk``) as the custom op
``dsstream::ctc_topk``, the Triton kernel ``_ctc_topk_kernel`` (one program per
frame: max, log-sum-exp, then ``k`` rounds of arg-max), and the launcher
:func:`ctc_topk`.
"""

from __future__ import annotations

import torch

from kernels._dispatch import choose, warn_once
from kernels._triton import tl, triton

__all__ = ["ctc_topk", "ctc_topk_ref"]

MAX_K = 32
MAX_VOCAB = 1 << 15  # one frame's row is held in registers by the Triton kernel


def ctc_topk_ref(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference on ``[T, V]``."""
    values, ids = logits.double().log_softmax(-1).topk(k, -1)
    return values.float(), ids


@torch.library.custom_op("dsstream::ctc_topk", mutates_args=())
def _ctc_topk_op(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = logits.float().log_softmax(-1).topk(k, -1)
    return values, ids


@_ctc_topk_op.register_fake
def _(logits, k):
    shape = (logits.shape[0], k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.long)


@_ctc_topk_op.register_kernel("cuda")
def _(logits, k):
    if triton is None:
        warn_once("ctc_topk:triton", "ctc_topk: no Triton; using the reference")
        return ctc_topk_ref(logits, k)
    return _ctc_topk_triton(logits, k)


if triton is not None:

    @triton.jit
    def _ctc_topk_kernel(x_ptr, v_ptr, i_ptr, V, sx, K: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + row * sx + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m = tl.max(x, 0)
        lse = m + tl.log(tl.sum(tl.exp(x - m), 0))
        for j in tl.static_range(K):
            best = tl.max(x, 0)
            # The lowest id holding the maximum (what topk returns for ties).
            idx = tl.min(tl.where(x == best, cols, BLOCK_V), 0)
            tl.store(v_ptr + row * K + j, best - lse)
            tl.store(i_ptr + row * K + j, idx.to(tl.int64))
            x = tl.where(cols == idx, -float("inf"), x)


def _ctc_topk_triton(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.contiguous()
    t, v = logits.shape
    values = torch.empty(t, k, device=logits.device, dtype=torch.float32)
    ids = torch.empty(t, k, device=logits.device, dtype=torch.long)
    if t:
        _ctc_topk_kernel[(t,)](logits, values, ids, v, logits.stride(0), K=k,
                               BLOCK_V=triton.next_power_of_2(v))  # fmt: skip
    return values, ids


def ctc_topk(
    logits: torch.Tensor, k: int, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax and the top ``k`` per frame: ``[..., T, V]`` -> two ``[..., T, k]``.

    ``impl``: "ref", "cpu", "triton" (default: by device).
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., T, V], got {list(logits.shape)}")
    v = logits.shape[-1]
    if not 1 <= k <= min(v, MAX_K):
        raise ValueError(f"k must lie in 1..{min(v, MAX_K)} (vocabulary {v}), got {k}")
    if v > MAX_VOCAB:
        raise ValueError(f"vocabulary {v} exceeds {MAX_VOCAB}")
    flat = logits.reshape(-1, v)
    which = choose("ctc_topk", impl, logits.device, gpu="triton")
    if which == "ref":
        values, ids = ctc_topk_ref(flat, k)
    elif which == "triton":
        values, ids = _ctc_topk_triton(flat, k)
    else:
        values, ids = _ctc_topk_op(flat, k)
    shape = (*logits.shape[:-1], k)
    return values.reshape(shape), ids.reshape(shape)
