"""Custom ops: plain-torch references, CPU implementations and (with the
kernels work) GPU kernels, registered with torch.library."""

from kernels.paged_attention import paged_attention, paged_attention_ref

__all__ = ["paged_attention", "paged_attention_ref"]
