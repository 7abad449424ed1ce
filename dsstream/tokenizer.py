"""A word tokenizer for questions: lower-cased words, unknown words mapped to ``<unk>``.

Words are runs of letters, digits and apostrophes; everything else (punctuation,
spacing, case) is ignored, so "What's the SHAPE of the red object??" and
"what's the shape of the red object" encode alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["WordTokenizer", "PAD", "UNK"]

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class WordTokenizer:
    vocab: tuple[str, ...]  # id -> word; ids 0 and 1 are <pad> and <unk>
    max_len: int = 24  # tokens per question; longer questions are cut

    def __post_init__(self) -> None:
        if self.vocab[:2] != (PAD, UNK):
            raise ValueError("the vocabulary must start with <pad>, <unk>")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.vocab)})

    @classmethod
    def build(cls, texts: Iterable[str], max_len: int = 24) -> WordTokenizer:
        words = sorted({w for t in texts for w in cls.words(t)})
        return cls((PAD, UNK, *words), max_len)

    @staticmethod
    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        return [index.get(w, 1) for w in self.words(text)][: self.max_len]

    def unknown(self, text: str) -> list[str]:
        """The words of ``text`` the vocabulary lacks."""
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        return [w for w in self.words(text) if w not in index]

    def batch(self, texts: Sequence[str]) -> np.ndarray:
        """``[B, max_len]`` int64 ids, padded with 0."""
        out = np.zeros((len(texts), self.max_len), dtype=np.int64)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            out[i, : len(ids)] = ids
        return out
