"""Winograd F(2x2, 3x3) convolution (Lavin and Gray, 2016) for 3x3, stride-1
convolutions on the CPU: each 4x4 input tile and each 3x3 filter are
transformed so that a 2x2 output tile costs 16 multiplications instead of 36;
the channel sums become 16 batched matrix multiplies.

Shapes as ``torch.nn.functional.conv2d``: x ``[N, C, H, W]``, weight ``[O, C,
3, 3]``, bias ``[O]`` or None, symmetric zero ``padding`` (0 or 1), stride 1.

Layers: :func:`winograd_conv2d_ref` (torch's direct convolution in float64,
the reference), the implementation :func:`_winograd_conv2d` (plain tensor
algebra: unfold, transforms, ``bmm``) registered as ``dsstream::winograd_conv2d``,
and the launcher :func:`conv3x3`, which uses Winograd only where it measured
faster than torch's own convolution on this machine (tests/bench/bench_kernels_cpu.py,
docs/benchmarks.md); the stride-2 convolutions of the ASR subsampling are not
Winograd-shaped (F(2x2, 3x3) is a stride-1 algorithm) and stay with torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["conv3x3", "winograd_conv2d", "winograd_conv2d_ref", "WINOGRAD_MIN_CHANNELS"]

# F(2x2, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A; B^T and A^T are _rows_bt, _rows_at.
_G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)

# Smallest channel count (in and out) at which Winograd beat torch's convolution here;
# None: it never did, so conv3x3 always uses torch (see docs/benchmarks.md).
WINOGRAD_MIN_CHANNELS: int | None = None


def winograd_conv2d_ref(x, weight, bias=None, padding: int = 0) -> torch.Tensor:
    """Direct convolution in float64 (the numerical reference)."""
    b = None if bias is None else bias.double()
    return F.conv2d(x.double(), weight.double(), b, padding=padding)


def _transform_filters(weight: torch.Tensor) -> torch.Tensor:
    """``[O, C, 3, 3]`` -> ``U [16, O, C]``."""
    g = _G.to(weight.dtype)
    u = torch.einsum("ik,ockl,jl->ijoc", g, weight, g)
    return u.reshape(16, *weight.shape[:2])


def _rows_bt(d: torch.Tensor) -> torch.Tensor:
    """``B^T d`` along dim 0 (size 4)."""
    return torch.stack([d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]])


def _rows_at(m: torch.Tensor) -> torch.Tensor:
    """``A^T m`` along dim 0 (size 4 -> 2)."""
    return torch.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])


@torch.library.custom_op("dsstream::winograd_conv2d", mutates_args=())
def winograd_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int
) -> torch.Tensor:
    """F(2x2, 3x3) convolution, stride 1: ``[N, C, H, W]`` -> ``[N, O, H', W']``."""
    n, c, _, _ = x.shape
    o = weight.shape[0]
    xp = F.pad(x, (padding,) * 4)
    h_out, w_out = xp.shape[2] - 2, xp.shape[3] - 2
    th, tw = (h_out + 1) // 2, (w_out + 1) // 2
    # Pad to whole tiles: 2 outputs per tile need 4 inputs, tiles overlap by 2.
    xp = F.pad(xp, (0, 2 * tw + 2 - xp.shape[3], 0, 2 * th + 2 - xp.shape[2]))
    # Tiles with the 4x4 position first, so that each transform below is a few
    # additions of contiguous slices (B^T and A^T hold only 0 and +-1).
    d = xp.unfold(2, 4, 2).unfold(3, 4, 2).permute(4, 5, 1, 0, 2, 3)  # [4, 4, C, N, th, tw]
    d = _rows_bt(_rows_bt(d.contiguous()).transpose(0, 1)).transpose(0, 1)
    v = d.reshape(16, c, n * th * tw)
    m = torch.bmm(_transform_filters(weight), v).reshape(4, 4, o, n, th, tw)
    y = _rows_at(_rows_at(m).transpose(0, 1)).transpose(0, 1)  # [2, 2, O, N, th, tw]
    y = y.permute(3, 2, 4, 0, 5, 1).reshape(n, o, 2 * th, 2 * tw)
    y = y[:, :, :h_out, :w_out]
    return y if bias is None else y + bias[None, :, None, None]


@winograd_conv2d.register_fake
def _(x, weight, bias, padding):
    h, w = x.shape[2] + 2 * padding - 2, x.shape[3] + 2 * padding - 2
    return x.new_empty(x.shape[0], weight.shape[0], h, w)


def conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int = 0,
    stride: int = 1,
    impl: str | None = None,
) -> torch.Tensor:
    """A 3x3 convolution by the faster algorithm for its shape on this CPU.

    ``impl``: "winograd", "torch" or "ref"; default: Winograd for stride 1 when
    both channel counts reach :data:`WINOGRAD_MIN_CHANNELS`, torch otherwise.
    """
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"expected x [N, C, H, W] and weight [O, C, 3, 3], got "
                         f"{list(x.shape)}, {list(weight.shape)}")  # fmt: skip
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels, x has {x.shape[1]}")
    if impl is None:
        wins = WINOGRAD_MIN_CHANNELS is not None and min(weight.shape[:2]) >= WINOGRAD_MIN_CHANNELS
        impl = "winograd" if stride == 1 and wins and x.device.type == "cpu" else "torch"
    if impl == "ref":
        return winograd_conv2d_ref(x, weight, bias, padding)[:, :, ::stride, ::stride].to(x.dtype)
    if impl == "winograd":
        if stride != 1:
            raise ValueError("Winograd F(2x2, 3x3) is a stride-1 algorithm")
        return winograd_conv2d(x, weight, bias, padding)
    if impl == "torch":
        return F.conv2d(x, weight, bias, stride=stride, padding=padding)
    raise ValueError(f"unknown implementation {impl!r}; choose winograd, torch or ref")
