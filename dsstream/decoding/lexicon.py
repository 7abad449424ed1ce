"""The words a lexicon-constrained search may emit.

In ``mode="lexicon"`` (:class:`~dsstream.decoding.search.DecoderConfig`) a
prefix may only spell the start of a lexicon word, and a completed word must be
one: every word the search emits is a lexicon word (or a hotword, which is
always allowed).  By default the lexicon is the language model's vocabulary;
a caller may give its own word list.
"""

from __future__ import annotations

import threading
import weakref
from typing import Iterable

from dsstream.decoding.lm import KenLM

__all__ = ["Lexicon", "LexiconError"]


NEG = float("-inf")
# Lexicon.of's lexicons, one per LM while the LM lives.
_OF_LM: weakref.WeakKeyDictionary[KenLM, Lexicon] = weakref.WeakKeyDictionary()
_OF_LOCK = threading.Lock()


class LexiconError(ValueError):
    """A word list the decoder cannot use (empty, or a word it cannot spell)."""


class Lexicon:
    """A set of words with the set of their prefixes.

    ``words``: whitespace-free, as the decoder spells them (lowercase for the
    sample model).  Repeats are ignored.
    """

    def __init__(self, words: Iterable[str]) -> None:
        cleaned: set[str] = set()
        for word in words:
            if not isinstance(word, str):
                raise LexiconError(f"lexicon words must be strings, got {type(word).__name__}")
            if not word or any(ch.isspace() for ch in word):
                raise LexiconError(f"lexicon word {word!r} is empty or contains whitespace")
            cleaned.add(word)
        if not cleaned:
            raise LexiconError("the lexicon has no words")
        self.words = frozenset(cleaned)
        self.prefixes = frozenset(w[:i] for w in self.words for i in range(1, len(w) + 1))
        self._lookahead: dict[KenLM, dict[str, float]] = {}
        self._native: dict[KenLM | None, object] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, lm: KenLM) -> Lexicon:
        """The LM's vocabulary as a lexicon (built once per model, shared by
        all its decoders): lexicon mode's default word list."""
        with _OF_LOCK:
            lexicon = _OF_LM.get(lm)
            if lexicon is None:
                lexicon = _OF_LM[lm] = cls(lm.vocab)
            return lexicon

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self.words

    def is_prefix(self, partial: str) -> bool:
        """Whether some lexicon word starts with ``partial``."""
        return partial in self.prefixes

    def check_spelling(self, alphabet: set[str]) -> None:
        """Refuse a lexicon with a word the model's tokens cannot spell."""
        bad = sorted(w for w in self.words if not set(w) <= alphabet)
        if bad:
            shown = ", ".join(repr(w) for w in bad[:5])
            raise LexiconError(
                f"{len(bad)} lexicon word(s) use characters the vocabulary cannot spell "
                f"({shown}); normalize them to its characters first"
            )

    def lookahead(self, lm: KenLM) -> dict[str, float]:
        """Per prefix, the best unigram ln p of the lexicon words it starts.

        A search that charges a partial word this much (times the LM weight)
        until the word is complete sees early that a prefix leads only to rare
        words, as flashlight's "smearing" does; without it, a long prefix of a
        rare word pays nothing until its last letter and crowds out prefixes
        that already paid for a common word.  Built once per LM."""
        with self._lock:
            table = self._lookahead.get(lm)
            if table is None:
                table = self._lookahead[lm] = _smear(self.words, lm)
            return table

    def native_info(self, lm: KenLM | None = None) -> object:
        """The compiled core's trie of these words, with ``lm``'s lookahead
        scores when given (built once per LM, shared by all streams)."""
        with self._lock:
            trie = self._native.get(lm)
            if trie is None:
                from dsstream.decoding import _native  # type: ignore[attr-defined]

                words = sorted(self.words)
                # The trie takes each node's maximum itself, as _smear does.
                unigrams = [lm.unigram(w) for w in words] if lm is not None else []
                unk = lm.unigram("<unk>") if lm is not None else 0.0
                trie = self._native[lm] = _native.WordTrie(words, unigrams, unk)
            return trie


def _smear(words: Iterable[str], lm: KenLM) -> dict[str, float]:
    best: dict[str, float] = {}
    for word in words:
        score = lm.unigram(word)
        for i in range(1, len(word) + 1):
            prefix = word[:i]
            if score > best.get(prefix, NEG):
                best[prefix] = score
    return best
