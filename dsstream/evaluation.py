"""Error rates for recognition results: WER and CER by Levenshtein alignment."""

from __future__ import annotations

from typing import Sequence

__all__ = ["edit_distance", "wer", "cer"]


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Minimum substitutions + deletions + insertions turning ``ref`` into ``hyp``."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate: total word edits over total reference words."""
    edits = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps, strict=True))
    return edits / max(1, sum(len(r.split()) for r in refs))


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus character error rate (spaces count as characters)."""
    edits = sum(edit_distance(list(r), list(h)) for r, h in zip(refs, hyps, strict=True))
    return edits / max(1, sum(len(r) for r in refs))
