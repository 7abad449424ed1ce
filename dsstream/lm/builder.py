"""N-gram LM estimation: interpolated modified Kneser-Ney, as KenLM's lmplz does.

Steps (Chen & Goodman 1998; Heafield et al. 2013):

1. Count n-grams of sentences padded with ``<s>`` and ``</s>``.
2. Adjusted counts: the highest order and n-grams starting with ``<s>`` keep
   raw counts; other lower-order n-grams count their distinct left extensions.
3. Discounts per order from the counts-of-adjusted-counts n1..n4:
   ``Y = n1/(n1+2 n2)``, ``D_k = k - (k+1) Y n_{k+1}/n_k`` for k = 1, 2, 3+
   (fallback 0.5, 1.0, 1.5 when the counts cannot support the estimate, as
   lmplz's ``--discount_fallback``).
4. ``p(w|c) = (a(cw) - D(a(cw))) / a(c.) + gamma(c) p(w|c')`` with
   ``gamma(c) = sum_k D_k N_k(c.) / a(c.)``; unigrams interpolate with the
   uniform distribution over the vocabulary (``<unk>`` included, ``<s>`` not).
5. Optional pruning of rare n-grams keeps every kept n-gram's prefix and
   suffix, and recomputes back-off weights so each context still sums to 1.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["NGramModel", "Discounts", "build_lm", "write_arpa", "FALLBACK_DISCOUNTS"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)
Gram = tuple[str, ...]


@dataclass(frozen=True)
class Discounts:
    d1: float
    d2: float
    d3: float  # for adjusted counts >= 3
    fallback: bool = False

    def __call__(self, count: int) -> float:
        return self.d1 if count == 1 else self.d2 if count == 2 else self.d3


@dataclass
class NGramModel:
    """An estimated back-off model: per order, n-gram -> (log10 p, log10 back-off)."""

    order: int
    probs: list[dict[Gram, float]]  # probs[n-1][gram] = p(gram[-1] | gram[:-1]) (linear)
    backoffs: list[dict[Gram, float]]  # backoffs[n-1][gram] = weight of gram as a context
    discounts: list[Discounts]
    vocab: list[str] = field(default_factory=list)

    def prob(self, word: str, context: Gram) -> float:
        """p(word | context) with ARPA back-off semantics (linear probability)."""
        context = context[-(self.order - 1) :] if self.order > 1 else ()
        weight = 1.0
        while True:
            gram = context + (word,)
            p = self.probs[len(gram) - 1].get(gram)
            if p is not None:
                return weight * p
            if not context:
                return weight * self.probs[0][(UNK,)]
            weight *= self.backoffs[len(context) - 1].get(context, 1.0)
            context = context[1:]


def _count(sentences: Iterable[Sequence[str]], order: int) -> list[dict[Gram, int]]:
    counts: list[dict[Gram, int]] = [defaultdict(int) for _ in range(order)]
    for words in sentences:
        tokens = (BOS, *words, EOS)
        for n in range(1, order + 1):
            table = counts[n - 1]
            for i in range(len(tokens) - n + 1):
                gram = tokens[i : i + n]
                if gram != (BOS,):
                    table[gram] += 1
    return [dict(c) for c in counts]


def _adjust(counts: list[dict[Gram, int]]) -> list[dict[Gram, int]]:
    order = len(counts)
    adjusted = [dict(counts[-1])]
    for n in range(order - 1, 0, -1):
        left: dict[Gram, int] = defaultdict(int)
        for gram in counts[n]:  # order n+1: its suffix gains one left extension
            left[gram[1:]] += 1
        table = {}
        for gram, raw in counts[n - 1].items():
            table[gram] = raw if gram[0] == BOS else left.get(gram, 0)
        adjusted.insert(0, table)
    return adjusted


def _discounts(table: dict[Gram, int]) -> Discounts:
    n = [0] * 5
    for count in table.values():
        if 1 <= count <= 4:
            n[count] += 1
    try:
        y = n[1] / (n[1] + 2 * n[2])
        d1, d2, d3 = (k - (k + 1) * y * n[k + 1] / n[k] for k in (1, 2, 3))
    except ZeroDivisionError:
        return Discounts(*FALLBACK_DISCOUNTS, fallback=True)
    if not (0 < d1 < 1 and 0 < d2 < 2 and 0 < d3 < 3):
        return Discounts(*FALLBACK_DISCOUNTS, fallback=True)
    return Discounts(d1, d2, d3)


def _discounted(count: int, disc: Discounts) -> float:
    return count - disc(count) if count > 0 else 0.0


def _context_stats(table: dict[Gram, int], disc: Discounts) -> dict[Gram, tuple[int, float]]:
    """Per context: (sum of adjusted counts, total discounted mass)."""
    stats: dict[Gram, list[float]] = {}
    for gram, count in table.items():
        entry = stats.setdefault(gram[:-1], [0, 0.0])
        entry[0] += count
        entry[1] += disc(count)
    return {c: (int(s), m) for c, (s, m) in stats.items()}


def estimate(counts: list[dict[Gram, int]], vocab: Sequence[str]) -> NGramModel:
    """Interpolated modified Kneser-Ney from raw n-gram counts."""
    order = len(counts)
    adjusted = _adjust(counts)
    discounts = [_discounts(t) for t in adjusted]
    probs: list[dict[Gram, float]] = []
    backoffs: list[dict[Gram, float]] = []
    # Unigrams: interpolate with uniform over everything but <s>.
    uni, disc = adjusted[0], discounts[0]
    (total, mass), = _context_stats(uni, disc).values()  # fmt: skip
    predicted = [w for w in vocab if w != BOS]
    uniform = (mass / total) / len(predicted)
    p1: dict[Gram, float] = {
        (w,): _discounted(uni.get((w,), 0), disc) / total + uniform for w in predicted
    }
    p1[(BOS,)] = 0.0
    probs.append(p1)
    for n in range(2, order + 1):
        table, disc = adjusted[n - 1], discounts[n - 1]
        stats = _context_stats(table, disc)
        pn = {}
        for gram, count in table.items():
            ctx_total, ctx_mass = stats[gram[:-1]]
            pn[gram] = (count - disc(count)) / ctx_total + ctx_mass / ctx_total * _lookup(
                probs, backoffs, gram[1:]
            )
        backoffs.append({ctx: mass / total for ctx, (total, mass) in stats.items()})
        probs.append(pn)
    backoffs.append({})
    return NGramModel(order, probs, backoffs, discounts, list(vocab))


def _lookup(probs: list[dict[Gram, float]], backoffs: list[dict[Gram, float]], gram: Gram) -> float:
    """p(gram[-1] | gram[:-1]) from the orders estimated so far (ARPA semantics)."""
    weight = 1.0
    while True:
        p = probs[len(gram) - 1].get(gram) if len(gram) <= len(probs) else None
        if p is not None:
            return weight * p
        if len(gram) == 1:
            return weight * probs[0][(UNK,)]
        ctx = gram[:-1]
        if len(ctx) <= len(backoffs):
            weight *= backoffs[len(ctx) - 1].get(ctx, 1.0)
        gram = gram[1:]


def prune(model: NGramModel, adjusted: list[dict[Gram, int]], thresholds: Sequence[int]) -> None:
    """Drop n-grams (order >= 2) with adjusted count <= threshold, then renormalize.

    ``thresholds[n-1]`` applies to order n (0 keeps all).  An n-gram that is
    the prefix or suffix of a kept longer n-gram is always kept.
    """
    order = model.order
    for n in range(order, 1, -1):
        limit = thresholds[n - 1] if n - 1 < len(thresholds) else thresholds[-1]
        if limit <= 0:
            continue
        needed: set[Gram] = set()
        if n < order:
            for gram in model.probs[n]:
                needed.add(gram[:-1])
                needed.add(gram[1:])
        table = model.probs[n - 1]
        for gram in [g for g in table if adjusted[n - 1].get(g, 0) <= limit]:
            if gram not in needed:
                del table[gram]
    _renormalize(model)


def _renormalize(model: NGramModel) -> None:
    """Back-off weights that make every context sum to one over the kept n-grams."""
    for n in range(2, model.order + 1):
        kept: dict[Gram, list[Gram]] = defaultdict(list)
        for gram in model.probs[n - 1]:
            kept[gram[:-1]].append(gram)
        weights = model.backoffs[n - 2]
        for ctx in list(weights):
            grams = kept.get(ctx, [])
            num = 1.0 - sum(model.probs[n - 1][g] for g in grams)
            den = 1.0 - sum(model.prob(g[-1], ctx[1:]) for g in grams)
            weights[ctx] = num / den if den > 1e-12 else 1.0
            if ctx not in model.probs[n - 2] and not grams:
                del weights[ctx]


def build_lm(
    sentences: Iterable[Sequence[str]], order: int = 3, prune_thresholds: Sequence[int] = ()
) -> NGramModel:
    """Estimate a model from tokenized sentences (lists of words)."""
    if not 1 <= order <= 9:
        raise ValueError(f"order must be between 1 and 9, got {order}")
    counts = _count(sentences, order)
    if not counts[0]:
        raise ValueError("the corpus is empty: no words to estimate a language model from")
    words = sorted({g[0] for g in counts[0]} - {BOS, EOS})
    vocab = [UNK, BOS, EOS, *words]
    model = estimate(counts, vocab)
    if order > 1 and any(prune_thresholds):
        prune(model, _adjust(counts), prune_thresholds)
    return model


def _log10(p: float) -> float:
    return -99.0 if p <= 0 else math.log10(p)


def write_arpa(model: NGramModel, path: str | Path) -> None:
    """Write the model in ARPA format (log10 probabilities and back-offs)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\\data\\\n")
        for n, table in enumerate(model.probs, 1):
            f.write(f"ngram {n}={len(table)}\n")
        for n, table in enumerate(model.probs, 1):
            f.write(f"\n\\{n}-grams:\n")
            backoffs = model.backoffs[n - 1]
            last = n == model.order
            for gram in sorted(table):
                line = f"{_log10(table[gram]):.7g}\t{' '.join(gram)}"
                if not last:
                    line += f"\t{_log10(backoffs.get(gram, 1.0)) if gram in backoffs else 0:.7g}"
                f.write(line + "\n")
        f.write("\n\\end\\\n")
