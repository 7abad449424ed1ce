"""Host-to-device copies overlapped with compute (``InferenceEngine.enable_overlap``).

A batch's inputs are copied into a ring of pinned host buffers and sent to
the GPU on a copy stream, while the previous batch still computes on the
compute stream; the compute stream waits for the copy's event, never the
host.  Pinned memory is what lets ``non_blocking=True`` copies run
asynchronously (a copy from pageable memory blocks the host).

:class:`DeviceStager` is the CUDA implementation.  :class:`HostStager` is
the same interface without streams (inputs become CPU tensors); the engine
uses it to run its two-thread copy/compute pipeline where there is no GPU,
which keeps that pipeline tested everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["Staged", "Stager", "HostStager", "DeviceStager"]


@dataclass
class Staged:
    """One batch's inputs on their way to the device: ``tensors`` are usable on
    the compute stream once :meth:`Stager.ready` returned them."""

    tensors: list[Any]
    event: Any = None  # the copy stream's event (CUDA), None on the host
    slot: int = -1


class Stager(Protocol):
    def stage(self, arrays: list[np.ndarray]) -> Staged:
        """Start moving ``arrays`` to the device; returns at once."""

    def ready(self, staged: Staged) -> list[Any]:
        """The staged tensors, ordered after their copy on the compute stream."""


class HostStager:
    """No device: tensors share the arrays' memory; nothing to wait for."""

    def stage(self, arrays: list[np.ndarray]) -> Staged:
        import torch

        return Staged([torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])

    def ready(self, staged: Staged) -> list[Any]:
        return staged.tensors


@dataclass
class _Slot:
    buffers: list[Any] = field(default_factory=list)  # pinned uint8, one per input
    event: Any = None  # the last copy out of this slot


class DeviceStager:
    """Pinned ring of ``buffer_size`` slots, a copy stream and a compute stream.

    A slot is reused only after the copy out of it finished (its event), so a
    host write never races a DMA read; device tensors are recorded on the
    compute stream so the caching allocator does not hand their memory to the
    next copy while the compute still reads it.
    """

    def __init__(
        self, device: Any, copy_stream: Any = None, compute_stream: Any = None, buffer_size: int = 2
    ) -> None:
        import torch

        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        self.torch = torch
        self.device = torch.device(device)
        self.copy_stream = copy_stream or torch.cuda.Stream(self.device)
        self.compute_stream = compute_stream or torch.cuda.Stream(self.device)
        self.slots = [_Slot() for _ in range(buffer_size)]
        self.next = 0

    def _pinned(self, slot: _Slot, i: int, nbytes: int) -> Any:
        torch = self.torch
        while len(slot.buffers) <= i:
            slot.buffers.append(torch.empty(0, dtype=torch.uint8).pin_memory())
        if slot.buffers[i].numel() < nbytes:  # grow to the next power of two
            size = 1 << max(12, (nbytes - 1).bit_length())
            slot.buffers[i] = torch.empty(size, dtype=torch.uint8).pin_memory()
        return slot.buffers[i]

    def stage(self, arrays: list[np.ndarray]) -> Staged:
        torch = self.torch
        index = self.next
        self.next = (self.next + 1) % len(self.slots)
        slot = self.slots[index]
        if slot.event is not None:
            slot.event.synchronize()  # the slot's previous copy has left the host
        tensors = []
        with torch.cuda.stream(self.copy_stream):
            for i, array in enumerate(arrays):
                src = torch.from_numpy(np.ascontiguousarray(array))
                nbytes = src.numel() * src.element_size()
                host = self._pinned(slot, i, nbytes)[:nbytes].view(src.dtype).view(src.shape)
                host.copy_(src)
                tensors.append(host.to(self.device, non_blocking=True))
            slot.event = torch.cuda.Event()
            slot.event.record(self.copy_stream)
        return Staged(tensors, slot.event, index)

    def ready(self, staged: Staged) -> list[Any]:
        self.compute_stream.wait_event(staged.event)
        for t in staged.tensors:
            t.record_stream(self.compute_stream)
        return staged.tensors
