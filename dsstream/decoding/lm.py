"""Word-level n-gram LM for shallow fusion, through the ``kenlm`` package.

States are interned to small integers so beams carry an int, and every
(state, word) pair is scored once: later beams reaching the same context and
word hit the cache.
"""

from __future__ import annotations

import gzip
import math
import threading
from pathlib import Path
from typing import Iterable

__all__ = ["KenLM", "LMError", "read_arpa_unigrams", "vocab_sidecar"]

LN10 = math.log(10.0)
_SPECIAL = {"<s>", "</s>", "<unk>"}
# A beam search scores a few thousand distinct (context, word) pairs per
# second of audio; past this many cached pairs the cache starts over.
MAX_CACHE = 2_000_000


_SHARED: dict[tuple[str, int, int], KenLM] = {}  # KenLM.shared's models
_SHARED_LOCK = threading.Lock()


class LMError(ValueError):
    """A missing, unreadable or unusable language model."""


def read_arpa_unigrams(path: str | Path) -> list[str]:
    """The words of an ARPA file's ``\\1-grams:`` section, without <s>, </s>, <unk>."""
    opener = gzip.open if str(path).endswith(".gz") else open
    words: list[str] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("\\1-grams:"):
                break
        else:
            raise LMError(f"{path} is not an ARPA file: no \\1-grams: section")
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("\\"):
                break
            fields = line.split("\t")
            if len(fields) < 2:
                raise LMError(f"{path}: malformed unigram line {line[:60]!r}")
            if fields[1] not in _SPECIAL:
                words.append(fields[1])
    return words


def _is_arpa(path: Path) -> bool:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b"\\data\\" in head


def vocab_sidecar(binary: str | Path) -> Path:
    """Where a binary LM's unigrams live: ``<path>.vocab`` (a binary model does
    not list its words)."""
    binary = Path(binary)
    return binary.with_name(binary.name + ".vocab")


class KenLM:
    """A KenLM model (ARPA or KenLM binary) with interned states and a score cache.

    ``unigrams``: the LM's words, needed for partial-word checks; read from the
    ARPA file when omitted, and required (or a ``<path>.vocab`` file beside it)
    for binary models.  Scores are natural-log probabilities.
    """

    def __init__(self, path: str | Path, unigrams: Iterable[str] | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise LMError(f"language model file not found: {path}")
        try:
            import kenlm
        except ImportError as exc:  # pragma: no cover - kenlm is a dependency
            raise LMError("the 'kenlm' package is required for LM fusion") from exc
        try:
            self.model = kenlm.Model(str(path))
        except (OSError, RuntimeError, IOError) as exc:
            raise LMError(f"cannot load language model {path}: {exc}") from None
        if unigrams is None:
            sidecar = vocab_sidecar(path)
            if _is_arpa(path):
                unigrams = read_arpa_unigrams(path)
            elif sidecar.is_file():
                unigrams = sidecar.read_text(encoding="utf-8").split()
            else:
                raise LMError(
                    f"{path} is a binary LM: pass its unigrams or put them in {sidecar.name}"
                )
        self.path = path
        self.order: int = self.model.order
        self.vocab = frozenset(unigrams)
        self.prefixes = frozenset(w[:i] for w in self.vocab for i in range(1, len(w) + 1))
        self._kenlm = kenlm
        self._states: list[object] = []
        self._state_ids: dict[object, int] = {}
        self._cache: dict[tuple[int, str], tuple[float, int]] = {}
        self._lock = threading.RLock()  # native_info: LMInfo checks its scores against ours
        self._native: object | None = None
        self._unigrams: dict[str, float] = {}
        begin = kenlm.State()
        self.model.BeginSentenceWrite(begin)
        self.begin_state = self._intern(begin)

    @classmethod
    def shared(cls, path: str | Path) -> KenLM:
        """One model per file and process (the file's size and time decide
        whether it is the same file): decoders of one LM share its memory, and
        worker processes forked after loading it share its pages."""
        path = Path(path).resolve()
        try:
            stat = path.stat()
        except OSError:
            raise LMError(f"language model file not found: {path}") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with _SHARED_LOCK:
            model = _SHARED.get(key)
            if model is None:
                model = _SHARED[key] = cls(path)
                # A changed file (a server reloading its models) replaces the old
                # version here; decoders still using it keep it until they go.
                for old in [k for k in _SHARED if k[0] == key[0] and k != key]:
                    del _SHARED[old]
        return model

    def _intern(self, state: object) -> int:
        sid = self._state_ids.get(state)
        if sid is None:
            sid = self._state_ids[state] = len(self._states)
            self._states.append(state)
        return sid

    def score(self, state: int, word: str) -> tuple[float, int]:
        """``(ln p(word | state), next state)``; ``word="</s>"`` ends the sentence."""
        key = (state, word)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        result = self._score_uncached(state, word)
        with self._lock:
            if len(self._cache) >= MAX_CACHE:
                self._cache.clear()
            self._cache[key] = result
        return result

    def _score_uncached(self, state: int, word: str) -> tuple[float, int]:
        """:meth:`score` without this object's cache: the compiled core's miss
        path where it cannot query KenLM itself (it keeps its own cache of
        every pair it asks for)."""
        with self._lock:
            out = self._kenlm.State()
            logp = self.model.BaseScore(self._states[state], word, out) * LN10
            return logp, self._intern(out)

    def unigram(self, word: str) -> float:
        """``ln p(word)`` with no context (an unknown word as ``<unk>``)."""
        with self._lock:
            score = self._unigrams.get(word)
            if score is None:
                state, out = self._kenlm.State(), self._kenlm.State()
                self.model.NullContextWrite(state)
                score = self._unigrams[word] = float(self.model.BaseScore(state, word, out)) * LN10
            return score

    def native_info(self) -> object:
        """The compiled core's view of this LM (built once, shared by all streams)."""
        with self._lock:
            if self._native is None:
                from dsstream.decoding import _native  # type: ignore[attr-defined]

                self._native = _native.LMInfo(self, sorted(self.vocab), self.begin_state)
            return self._native

    def is_prefix(self, partial: str) -> bool:
        """Whether some LM word starts with ``partial``."""
        return partial in self.prefixes
