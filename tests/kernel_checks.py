"""Shared checks for the kernel tests (../shared/docs/style.md, point 5): an
implementation's error against a float64 reference is at most about twice
plain torch's error at the same precision."""

from __future__ import annotations

import pytest
import torch

from kernels._dispatch import triton_usable

__all__ = ["assert_close_to_reference", "device_for", "DTYPES"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_close_to_reference(got, plain, ref64, dtype: torch.dtype) -> None:
    """``|got - ref64| <= 2 |plain - ref64| + eps(dtype) * |ref64|`` (max norms).

    The eps term keeps the bound meaningful where plain torch happens to be exact.
    """
    ref64 = ref64.double().cpu()
    err = (got.double().cpu() - ref64).abs().max().item()
    torch_err = (plain.double().cpu() - ref64).abs().max().item()
    floor = torch.finfo(dtype).eps * max(1.0, ref64.abs().max().item())
    assert err <= 2 * torch_err + floor, f"error {err:.3g} vs plain torch {torch_err:.3g}"


def device_for(impl: str | None) -> torch.device:
    """The device an implementation's tests run on; skips what cannot run here."""
    if impl in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return torch.device("cuda")
    if impl == "triton" and not triton_usable(torch.device("cpu")):
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 on the CPU")
    return torch.device("cpu")
