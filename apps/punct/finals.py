"""Text cut the way a recognizer cuts speech into finals, and labelling by final.

A streaming recognizer ends a final at a pause; a reader pauses most at a
sentence's end, often at a comma, seldom elsewhere.  :func:`finals` cuts a
labelled document so (probabilities in :class:`FinalsConfig`, chosen on the
dev documents), for training and for scoring on text; LJ001's clips are
finals as they were spoken.  :func:`label_document` labels a document final by
final as the server does: each final after the words before it, and a
sentence's first word capitalized where the final before ended one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from dsstream.punctuation import SENTENCE_END

__all__ = ["FinalsConfig", "finals", "Labeller", "label_document", "baseline"]

# [(context words, final words)] -> [(marks, cases)] of each final's words
Labeller = Callable[[list[tuple[Sequence[str], Sequence[str]]]], list[tuple[list[int], list[int]]]]


@dataclass(frozen=True)
class FinalsConfig:
    at_sentence: float = 0.75  # a final ends after a sentence's last word
    at_comma: float = 0.3
    elsewhere: float = 0.02  # a pause within a clause
    min_words: int = 12  # each final's word limit is drawn from [min_words, max_words]
    max_words: int = 60


def finals(
    marks: Sequence[int], rng: random.Random, cfg: FinalsConfig = FinalsConfig()
) -> list[tuple[int, int]]:
    """[start, end) word spans of a document's finals, in order, covering it."""
    spans: list[tuple[int, int]] = []
    start, limit = 0, rng.randint(cfg.min_words, cfg.max_words)
    for i, mark in enumerate(marks):
        p = (
            cfg.at_sentence
            if mark in SENTENCE_END
            else cfg.at_comma
            if mark == 2
            else cfg.elsewhere
        )
        if i + 1 - start >= limit or rng.random() < p:
            spans.append((start, i + 1))
            start, limit = i + 1, rng.randint(cfg.min_words, cfg.max_words)
    if start < len(marks):
        spans.append((start, len(marks)))
    return spans


def label_document(
    words: Sequence[str], spans: Sequence[tuple[int, int]], labeller: Labeller, context: int
) -> tuple[list[int], list[int]]:
    """Marks and cases of every word, labelled final by final (cases as shown:
    a sentence's first word capitalized)."""
    pieces = [(words[max(0, s - context) : s] if context else [], words[s:e]) for s, e in spans]
    marks: list[int] = []
    cases: list[int] = []
    start = True
    for m, c in labeller(pieces):
        for mark, case in zip(m, c):
            cases.append(1 if start and case == 0 else case)
            marks.append(mark)
            start = mark in SENTENCE_END
    return marks, cases


def baseline(words: Sequence[str], spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The simple rule to beat: a period at each final's end, a capital after it."""
    marks = [0] * len(words)
    cases = [0] * len(words)
    for s, e in spans:
        marks[e - 1] = 1
        cases[s] = 1
    return marks, cases
