"""Punctuation and capitals for recognized text, one final at a time.

The model (trained by ``apps/punct``, an engine artifact) reads a final's
words after up to ``context`` words of the finals before it and labels each
of the final's words with the mark that follows it (none . , ? !) and its
case (lower, Title, UPPER).  A final is punctuated once, when it is produced:
the finals before it are never changed, and partials stay raw.

Pure parts (``encode``, ``render``, ``labels_of``) have no I/O; the
:class:`Punctuator` runs the artifact with ONNX Runtime (no torch) and
:class:`PunctStream` keeps one stream's context.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "MARKS",
    "CASES",
    "SENTENCE_END",
    "LOOKAHEAD",
    "PunctVocab",
    "Labelled",
    "labels_of",
    "encode",
    "written",
    "render",
    "label_windows",
    "Punctuator",
    "PunctStream",
]

MARKS = ("", ".", ",", "?", "!")  # the mark after a word; index 0: none
CASES = ("lower", "title", "upper")
SENTENCE_END = frozenset({1, 3, 4})  # . ? !
PAD, UNK = 0, 1
LOOKAHEAD = 16  # words after a word that a long final's windows keep in view
_CLOSERS = "\"')]}\u201d\u2019"
# Marks a reader writes that the model folds into its four: a clause break is a comma.
_FOLDED = {".": 1, ",": 2, "?": 3, "!": 4, ";": 2, ":": 2}
# Written abbreviations whose period is not a sentence's end (normalize expands them).
_ABBREVIATIONS = frozenset({"mr.", "mrs.", "dr.", "st.", "jr.", "sr.", "no.", "vs.", "mt."})


@dataclass(frozen=True)
class PunctVocab:
    """Word ids of the model's input: 0 padding, 1 unknown, then ``words``."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {w: i + 2 for i, w in enumerate(self.words)})

    def ids(self, words: Sequence[str]) -> list[int]:
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        return [index.get(w, UNK) for w in words]

    def __len__(self) -> int:
        return len(self.words) + 2


@dataclass(frozen=True)
class Labelled:
    """Written text as the recognizer's words with each word's mark and case ids."""

    words: tuple[str, ...]
    marks: tuple[int, ...]
    cases: tuple[int, ...]


def _mark_of(token: str) -> int:
    core = token.rstrip(_CLOSERS)
    if core.lower().lstrip("\"'([{\u201c\u2018") in _ABBREVIATIONS:
        return 0
    if core.endswith(("--", "\u2014")):
        return 2  # a dash at a word's end is a clause break
    return _FOLDED.get(core[-1:], 0) if core else 0


def _case_of(token: str) -> int:
    letters = [c for c in token if c.isalpha()]
    if not letters:
        return 0
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return 2
    return 1 if letters[0].isupper() else 0


def labels_of(text: str) -> Labelled:
    """Written text (marks and capitals) to the recognizer's words and their labels.

    Words come from :func:`dsstream.lm.normalize_sentence` of each written
    token, so numbers are spelled out as the recognizer hears them; a token
    that becomes several words gives its case to the first (all of them when
    it is UPPER) and its mark to the last; a token with no words (a lone dash
    or quote) gives its mark to the word before it."""
    from dsstream.lm.normalize import normalize_sentence

    words: list[str] = []
    marks: list[int] = []
    cases: list[int] = []
    for token in text.replace("--", "-- ").replace("\u2014", "\u2014 ").split():
        mark, case = _mark_of(token), _case_of(token)
        spoken = normalize_sentence(token).split()
        if not spoken:
            if words and mark and not marks[-1]:
                marks[-1] = mark
            continue
        words += spoken
        cases += [case] + [case if case == 2 else 0] * (len(spoken) - 1)
        marks += [0] * (len(spoken) - 1) + [mark]
    return Labelled(tuple(words), tuple(marks), tuple(cases))


def encode(
    vocab: PunctVocab, context: Sequence[str], words: Sequence[str], max_len: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Model inputs for one final: ``tokens [1, T]`` and ``segment [1, T]``
    (int64; 0 context, 1 the final's words, 2 its last word: where the
    speaker paused) and where the final starts.  The context is cut from the
    left so that context and words fit ``max_len``."""
    keep = max(0, min(len(context), max_len - len(words)))
    ctx = list(context[len(context) - keep :]) if keep else []
    ids = vocab.ids([*ctx, *words])
    segment = [0] * len(ctx) + [1] * max(0, len(words) - 1) + [2] * bool(words)
    return np.array([ids], np.int64), np.array([segment], np.int64), len(ctx)


def written(word: str, mark: int, case: int, capital: bool = False) -> str:
    """One word as written: its case (``capital`` forces a capital first letter) and mark."""
    if case == 2:
        word = word.upper()
    elif case == 1 or capital:
        word = word[:1].upper() + word[1:]
    return word + MARKS[mark]


def render(
    words: Sequence[str], marks: Sequence[int], cases: Sequence[int], sentence_start: bool
) -> list[str]:
    """Words as written.  A sentence's first word is always capitalized,
    whatever the model said about its case: the final before decided where the
    sentence starts (``sentence_start``), and its text is not changed later."""
    out = []
    start = sentence_start
    for word, mark, case in zip(words, marks, cases):
        out.append(written(word, mark, case, capital=start))
        start = mark in SENTENCE_END
    return out


Run = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def label_windows(
    run: Run, vocab: PunctVocab, context: Sequence[str], words: Sequence[str],
    max_len: int, context_len: int,
) -> tuple[list[int], list[int]]:  # fmt: skip
    """Marks and cases of a final's ``words`` after ``context``, ``run``
    (tokens, segment ``[1, T]`` -> mark and case scores ``[T, 5]``, ``[T, 3]``)
    called on windows of at most ``max_len`` words: a final longer than one
    window is labelled in windows that overlap by :data:`LOOKAHEAD` words,
    each word keeping its labels from a window where words follow it."""
    marks_out: list[int] = []
    cases_out: list[int] = []
    done = 0
    while done < len(words):
        ctx = [*context, *words[:done]][-context_len:] if context_len else []
        piece = words[done : done + max_len - len(ctx)]
        tokens, segment, start = encode(vocab, ctx, piece, max_len)
        last = done + len(piece) >= len(words)
        if not last:
            segment[0, -1] = 1  # the window ends mid-final, not at a pause
        marks, cases = run(tokens, segment)
        # A window's last words lack the words after them: the next window,
        # which starts there, labels them again with those words in view.
        take = len(piece) if last else len(piece) - LOOKAHEAD
        marks_out += marks[start : start + take].argmax(-1).tolist()
        cases_out += cases[start : start + take].argmax(-1).tolist()
        done += take
    return marks_out, cases_out


class Punctuator:
    """The punctuation model, shared by all streams: ``Punctuator("punct.ds")``.

    ``label(context, words)`` -> (marks, cases) of ``words``, one forward pass
    of at most ``max_len`` words; a longer final is labelled in overlapping
    windows, the last ``LOOKAHEAD`` words of each labelled again by the next."""

    def __init__(self, path: str | Path, threads: int | None = 1) -> None:
        from engine import EngineConfig, InferenceEngine

        self.engine = InferenceEngine(path, config=EngineConfig(cpu_threads=threads))
        extra = self.engine.manifest.extra
        if extra.get("task") != "punctuation":
            raise ValueError(f"{path} is not a punctuation model (its manifest has no task)")
        self.vocab = PunctVocab(tuple(extra["vocab"]))
        self.max_len = int(extra["max_len"])
        self.context = int(extra["context"])
        # The no-mark probability is scaled by this before the argmax: chosen on
        # dev text by the recipe (below 1 writes more marks: recall for precision).
        self.none_scale = float(extra.get("none_scale", 1.0))
        self._scale = np.array([self.none_scale] + [1.0] * (len(MARKS) - 1), np.float32)
        if self.context + LOOKAHEAD >= self.max_len:
            raise ValueError(f"{path}: context {self.context} leaves no room in {self.max_len}")
        self.path = Path(path)

    def _run(self, tokens: np.ndarray, segment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.engine.infer({"tokens": tokens, "segment": segment})
        return out["marks"][0] * self._scale, out["cases"][0]

    def label(self, context: Sequence[str], words: Sequence[str]) -> tuple[list[int], list[int]]:
        return label_windows(self._run, self.vocab, context, words, self.max_len, self.context)

    def close(self) -> None:
        self.engine.close()


class PunctStream:
    """One stream's punctuation: ``apply(words)`` -> the words as written.

    Remembers the last words (the next final's context) and whether the last
    final ended a sentence, so finals are punctuated as they come and never
    revised."""

    def __init__(self, punctuator: Any) -> None:
        self.punctuator = punctuator
        self.context: deque[str] = deque(maxlen=punctuator.context)
        self.sentence_start = True

    def apply(self, words: Sequence[str]) -> list[str]:
        words = [w for w in words if w]
        if not words:
            return []
        marks, cases = self.punctuator.label(list(self.context), words)
        out = render(words, marks, cases, self.sentence_start)
        self.sentence_start = marks[-1] in SENTENCE_END
        self.context.extend(words)
        return out
