"""Dynamic batching decisions: queue state in, batch plan out.

``plan`` is a pure function in the style of NVIDIA Triton's dynamic batcher
and vLLM's scheduler: it never sleeps, locks or touches a tensor, so it is
tested with plain data.  The engine's worker thread runs the plans.

Rules, in order:
1. Requests past their deadline are expired (the caller rejects them).
2. Requests are grouped by batch key (shapes that can share a forward pass:
   equal non-batch dims, or the same length bucket when padding is allowed).
3. A group with at least ``max_batch_size`` requests sends full batches now.
4. A group that reaches a preferred batch size sends the largest one now.
5. A group whose oldest request has waited ``max_queue_delay_ms`` sends what
   it has (up to ``max_batch_size``).
6. Otherwise the plan says how long to wait before planning again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

__all__ = ["BatchPolicy", "QueuedRequest", "BatchPlan", "plan", "length_bucket"]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 16  # requests per forward pass
    # Longest a request waits for company.  0 (as Triton's default): run as soon as
    # the worker is free, so batches grow with load; measured best on this CPU.
    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()  # sizes worth sending at once
    max_queue_size: int = 1024  # a full queue rejects new requests
    pad: bool = True  # pad dynamic non-batch dims within a length bucket
    bucket_ratio: float = 1.25  # lengths within this ratio share a bucket

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_queue_delay_ms < 0:
            raise ValueError("max_queue_delay_ms must be >= 0")
        if any(p < 1 or p > self.max_batch_size for p in self.preferred_batch_sizes):
            raise ValueError("preferred batch sizes must be in [1, max_batch_size]")
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        if self.bucket_ratio < 1:
            raise ValueError("bucket_ratio must be >= 1")


@dataclass(frozen=True)
class QueuedRequest:
    id: int
    arrival_s: float  # monotonic seconds
    key: Hashable  # requests with equal keys may share a batch
    deadline_s: float | None = None  # monotonic seconds; None: no deadline


@dataclass(frozen=True)
class BatchPlan:
    batches: tuple[tuple[int, ...], ...]  # request ids per batch to run now, oldest first
    expired: tuple[int, ...]  # ids past their deadline
    wait_s: float | None  # re-plan after this long (None: only when a request arrives)


def length_bucket(length: int, ratio: float) -> int:
    """The bucket of a length: lengths within ``ratio`` of each other mostly share one.

    Bucket bounds grow by ``ratio`` (at least by one): 1, 2, 3, 4, 5, 6.25, 7.8,
    ... for 1.25, so lengths sharing a bucket differ by at most that ratio and
    padding wastes at most ``ratio - 1`` of the batch's length.
    """
    if ratio <= 1.0 or length <= 1:
        return length
    bound = 1.0
    while bound < length:
        bound = max(bound * ratio, bound + 1)
    return math.ceil(bound)


def plan(queue: Sequence[QueuedRequest], now_s: float, policy: BatchPolicy) -> BatchPlan:
    """Decide what to run now from the queue (oldest first) and the clock."""
    expired = tuple(r.id for r in queue if r.deadline_s is not None and r.deadline_s < now_s)
    dead = set(expired)
    groups: dict[Hashable, list[QueuedRequest]] = {}
    for r in queue:
        if r.id not in dead:
            groups.setdefault(r.key, []).append(r)
    delay = policy.max_queue_delay_ms / 1000.0
    batches: list[tuple[int, ...]] = []
    waits: list[float] = []
    for group in groups.values():  # dicts keep first-arrival order
        while len(group) >= policy.max_batch_size:
            batches.append(tuple(r.id for r in group[: policy.max_batch_size]))
            group = group[policy.max_batch_size :]
        if not group:
            continue
        preferred = [p for p in policy.preferred_batch_sizes if p <= len(group)]
        waited = now_s - group[0].arrival_s
        if preferred:
            size = max(preferred)
            batches.append(tuple(r.id for r in group[:size]))
            group = group[size:]
            if not group:
                continue
            waited = now_s - group[0].arrival_s
        if waited >= delay:
            batches.append(tuple(r.id for r in group))
        else:
            waits.append(delay - waited)
    sent = {i for b in batches for i in b}
    for r in queue:  # wake up to expire a waiting request on time
        if r.deadline_s is not None and r.id not in dead and r.id not in sent:
            waits.append(max(0.0, r.deadline_s - now_s))
    return BatchPlan(tuple(batches), expired, min(waits) if waits else None)
