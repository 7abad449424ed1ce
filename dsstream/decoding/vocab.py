"""Token vocabularies for CTC decoding: characters with a word delimiter, or
BPE-style pieces with a word-start marker."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

__all__ = ["Vocabulary", "VocabularyError"]


class VocabularyError(ValueError):
    """A vocabulary the decoder cannot use (no blank, duplicate tokens...)."""


@dataclass(frozen=True)
class Vocabulary:
    """The acoustic model's output tokens, in output order.

    ``kind="char"``: one token per character and ``delimiter`` between words
    (``"|"`` as in wav2vec2, or ``" "``).  ``kind="bpe"``: pieces, a piece that
    starts with ``marker`` (``"▁"`` as in SentencePiece) begins a new word.
    """

    tokens: tuple[str, ...]
    blank_id: int = 0
    kind: str = "char"  # "char" or "bpe"
    delimiter: str = "|"  # char vocabularies: the word delimiter token
    marker: str = "\u2581"  # bpe vocabularies: the word-start marker

    def __post_init__(self) -> None:
        if self.kind not in ("char", "bpe"):
            raise VocabularyError(f"vocabulary kind must be 'char' or 'bpe', got {self.kind!r}")
        if not 0 <= self.blank_id < len(self.tokens):
            raise VocabularyError(
                f"blank_id {self.blank_id} is outside the vocabulary of {len(self.tokens)} tokens"
            )
        if len(set(self.tokens)) != len(self.tokens):
            raise VocabularyError("vocabulary has duplicate tokens")
        if self.kind == "char" and self.delimiter not in self.tokens:
            raise VocabularyError(f"char vocabulary lacks the word delimiter {self.delimiter!r}")

    @classmethod
    def from_tokens(cls, tokens: Sequence[str], blank: str | int = 0, **kw: str) -> Vocabulary:
        """Build from a token list; ``blank`` is the blank's index or its token text."""
        tokens = tuple(tokens)
        if isinstance(blank, str):
            if blank not in tokens:
                raise VocabularyError(f"vocabulary has no blank token {blank!r}")
            blank = tokens.index(blank)
        return cls(tokens, blank, **kw)

    @classmethod
    def from_labels(cls, labels: Sequence[str], blank_id: int = 0) -> Vocabulary:
        """A vocabulary from labels as other CTC decoders take them: characters
        with ``" "`` (pyctcdecode's convention, whose blank is ``""`` wherever it
        stands) or ``"|"`` (wav2vec2's) between words, or word pieces marked
        ``"▁"`` (SentencePiece).  ``blank_id``: the blank's index where no
        label is ``""``."""
        tokens = tuple(labels)
        if "" in tokens:
            blank_id = tokens.index("")
        if "|" in tokens:
            return cls(tokens, blank_id, delimiter="|")
        if " " in tokens:
            return cls(tokens, blank_id, delimiter=" ")
        if any(t.startswith(cls.marker) for t in tokens):
            return cls(tokens, blank_id, kind="bpe")
        raise VocabularyError(
            "the labels have no word delimiter: include ' ' (pyctcdecode's convention) or '|' "
            "(wav2vec2's) between words, or pass Vocabulary(tokens, kind='bpe') for word "
            "pieces that start with '\u2581'"
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def token_parts(self) -> list[tuple[bool, str]]:
        """Per token: (begins a new word, the characters it adds to the word).

        The blank and the char delimiter add nothing; the delimiter ends a word
        (``True, ""``).  Computed once per vocabulary (every stream asks).
        """
        return list(self._parts)

    @cached_property
    def _parts(self) -> tuple[tuple[bool, str], ...]:
        parts: list[tuple[bool, str]] = []
        for i, tok in enumerate(self.tokens):
            if i == self.blank_id:
                parts.append((False, ""))
            elif self.kind == "char":
                parts.append((True, "") if tok == self.delimiter else (False, tok))
            elif tok.startswith(self.marker):
                parts.append((True, tok[len(self.marker) :]))
            else:
                parts.append((False, tok))
        return tuple(parts)
