"""Custom ops, each with a plain-torch reference, a CPU implementation and a GPU
implementation (Triton, or CUDA C++ from kernels/csrc), registered as
``torch.ops.dsstream.*`` with fake implementations so models using them export.

Every launcher takes ``impl=None`` (by device) or a forced implementation; a
GPU implementation that cannot run falls back to the reference with one warning.
"""

from kernels._build import load_extension
from kernels.chunk_attention import chunk_attention, chunk_attention_ref
from kernels.ctc_topk import ctc_topk, ctc_topk_ref
from kernels.int8_matmul import int8_linear, int8_matmul, int8_matmul_ref, quantize_rows
from kernels.layernorm_linear import layernorm_linear, layernorm_linear_ref
from kernels.paged_attention import paged_attention, paged_attention_ref
from kernels.winograd import conv3x3, winograd_conv2d, winograd_conv2d_ref

__all__ = [
    "paged_attention",
    "paged_attention_ref",
    "chunk_attention",
    "chunk_attention_ref",
    "layernorm_linear",
    "layernorm_linear_ref",
    "int8_matmul",
    "int8_matmul_ref",
    "quantize_rows",
    "int8_linear",
    "ctc_topk",
    "ctc_topk_ref",
    "conv3x3",
    "winograd_conv2d",
    "winograd_conv2d_ref",
    "load_extension",
]
