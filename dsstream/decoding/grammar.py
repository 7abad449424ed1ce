"""A closed grammar for command-and-control: each segment's result is one of
the given phrases, scored exactly.

For every phrase the CTC forward algorithm runs over its whole label
sequence, all phrases at once in NumPy (``[phrases, states]`` per frame), so
``log P(phrase | audio)`` sums over every alignment and no phrase is lost to
beam pruning: a beam search constrained to the phrases lost the right one
where the model prefers other letters (the sample model hears LJ001-0011's
"first importance" as "forest ports"), since hypotheses that had not yet
spelled the unlikely letters outranked the ones that had.  A phrase is its
words' characters with the word delimiter between words, and optionally one
before the first word and one after the last.  The cost per frame is
linear in the total length of the phrases.

Nothing said (blanks alone explain the audio better than any phrase) gives
an empty result.  Speech outside the grammar is still forced onto the
closest phrase; with ``"[unk]"`` among the phrases (Vosk's convention), a
segment whose best phrase explains the audio much worse than the
unconstrained best path (by more than ``REJECT_BELOW`` nats per letter)
comes out as ``"[unk]"``.

With ``Grammar.sequence`` a result may be several phrases in a row
(:class:`SequenceSearch`: the Viterbi path through a loop from each phrase's
end to every phrase's start).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from dsstream.decoding.vocab import Vocabulary

__all__ = [
    "Grammar",
    "GrammarError",
    "GrammarSearch",
    "SequenceSearch",
    "search_for",
    "UNK",
    "MAX_PHRASE_CHARS",
    "REJECT_BELOW",
]

UNK = "[unk]"
MAX_PHRASE_CHARS = 200
# Nats per letter by which the best phrase may fall short of the free best path
# before "[unk]" wins; measured with the sample model (docs/asr.md, "Grammars").
REJECT_BELOW = -2.5
NEG = -np.inf


class GrammarError(ValueError):
    """Phrases the decoder cannot constrain to (empty, unspellable, too many)."""


@dataclass(frozen=True)
class Grammar:
    """The allowed phrases (words separated by single spaces), and whether
    out-of-grammar speech is reported as ``"[unk]"`` instead of forced onto a
    phrase.  ``Grammar.parse(phrases)`` validates and builds one."""

    phrases: tuple[str, ...]
    unk: bool = False
    sequence: bool = False  # a result may be several phrases in a row (digits, codes)

    @classmethod
    def parse(
        cls,
        phrases: Iterable[str],
        alphabet: Iterable[str] | None = None,
        sequence: bool = False,
        max_phrases: int | None = None,
    ) -> Grammar:
        """``alphabet``: the characters the model can spell; a phrase with
        another character could never be recognized, so it is refused.
        ``max_phrases``: the most phrases allowed (a server's limit; none by
        default, the cost grows with the phrases' total length)."""
        letters = set(alphabet) if alphabet is not None else None
        seen: list[str] = []
        unk = False
        for raw in phrases:
            phrase = " ".join(str(raw).split())
            if phrase == UNK:
                unk = True
                continue
            if not phrase:
                raise GrammarError("a grammar phrase is empty")
            if len(phrase) > MAX_PHRASE_CHARS:
                raise GrammarError(f"grammar phrase {phrase[:40]!r}... is longer than "
                                   f"{MAX_PHRASE_CHARS} characters")  # fmt: skip
            bad = sorted(
                {c for c in phrase if c != " " and letters is not None and c not in letters}
            )
            if bad:
                raise GrammarError(
                    f"grammar phrase {phrase!r} has characters the model cannot spell: "
                    f"{''.join(bad)!r}"
                )
            if phrase not in seen:
                seen.append(phrase)
        if not seen:
            raise GrammarError("the grammar has no phrases")
        if max_phrases is not None and len(seen) > max_phrases:
            raise GrammarError(f"the grammar has {len(seen)} phrases; at most {max_phrases}")
        return cls(tuple(seen), unk, sequence)

    def __len__(self) -> int:
        return len(self.phrases)


@dataclass(frozen=True)
class _Tables:
    """A grammar's state layout for a vocabulary, ``[phrases, states]`` each."""

    states: np.ndarray  # the token of each state
    valid: np.ndarray
    skip: np.ndarray  # s-2 -> s allowed (a label after a blank, not the same label)
    final: np.ndarray  # a phrase may end here: last letter, blank, "|", blank
    loop_from: np.ndarray  # the next phrase may start after: the trailing "|" and blank
    chars: np.ndarray  # the phrase characters spelled at each state


@functools.lru_cache(maxsize=32)
def _tables(grammar: Grammar, vocab: Vocabulary) -> _Tables:
    """Built once per grammar (every segment of every session that uses it
    starts a search), read-only."""
    if vocab.kind != "char":
        raise GrammarError("grammars need a character vocabulary (one token per letter)")
    index = {tok: i for i, tok in enumerate(vocab.tokens)}
    delim = index[vocab.delimiter]
    labels = [
        [delim, *(delim if c == " " else index[c] for c in phrase), delim]
        for phrase in grammar.phrases
    ]
    shape = (len(labels), 2 * max(len(seq) for seq in labels) + 1)
    states = np.full(shape, vocab.blank_id, np.int64)
    valid, skip, final, loop_from = (np.zeros(shape, bool) for _ in range(4))
    chars = np.zeros(shape, np.int64)
    for p, seq in enumerate(labels):
        size = 2 * len(seq) + 1
        states[p, 1:size:2] = seq
        valid[p, :size] = True
        skip[p, 3:size:2] = states[p, 3:size:2] != states[p, 1 : size - 2 : 2]
        final[p, size - 4 : size] = True
        loop_from[p, size - 2 : size] = True
        # State 2k+1 is label k: the leading "|" spells nothing, label k>=1
        # ends the phrase's first k characters (the trailing "|" none more).
        chars[p, :size] = np.minimum(np.maximum((np.arange(size) - 1) // 2, 0),
                                     len(grammar.phrases[p]))  # fmt: skip
    for table in (states, valid, skip, final, loop_from, chars):
        table.flags.writeable = False
    return _Tables(states, valid, skip, final, loop_from, chars)


class GrammarSearch:
    """The CTC forward algorithm over every phrase of ``grammar`` at once.

    States per phrase: the labels ``[b, |, b, c1, b, c2, ..., cN, b, |, b]``
    (``b`` blank, ``|`` the word delimiter; the outer delimiters optional),
    padded to the longest phrase.  ``advance`` takes ``[T, V]`` log-probs."""

    def __init__(self, grammar: Grammar, vocab: Vocabulary) -> None:
        self.grammar, self.vocab = grammar, vocab
        tables = _tables(grammar, vocab)
        self.states, self.valid, self.skip = tables.states, tables.valid, tables.skip
        self.final, self.loop_from, self.chars = tables.final, tables.loop_from, tables.chars
        self.alpha = np.full(self.states.shape, NEG)
        self.rows: list[np.ndarray] = []  # kept for the final alignment
        self.free = 0.0  # the unconstrained best path's log-prob
        self.silence = 0.0  # log-prob of blanks only: nothing was said
        self.blank = vocab.blank_id
        self.frames = 0

    def advance(self, log_probs: np.ndarray) -> None:
        for row in log_probs:
            emit = np.where(self.valid, row[self.states], NEG)
            if self.frames == 0:  # a blank, the optional "|" or the first letter
                self.alpha = np.full_like(self.alpha, NEG)
                self.alpha[:, [0, 1, 3]] = emit[:, [0, 1, 3]]
            else:
                self._step(emit)
            self.rows.append(row)
            self.free += float(row.max())
            self.silence += float(row[self.blank])
            self.frames += 1

    def _step(self, emit: np.ndarray) -> None:
        """One frame of the forward algorithm: every alignment summed.  The
        predecessors of :func:`_predecessors`, without stacking them: the
        first letter's extra one is one column (stacked, the step took 1.6
        times as long)."""
        a = self.alpha
        skip = np.where(self.skip, _shift2d(a, 2, NEG), NEG)
        skip[:, 3] = np.logaddexp(skip[:, 3], a[:, 0])  # past the optional "|"
        self.alpha = np.logaddexp(np.logaddexp(a, _shift2d(a, 1, NEG)), skip) + emit

    def partial(self) -> str:
        """The phrase prefix of the most probable state now."""
        if self.frames == 0:
            return ""
        p, s = np.unravel_index(int(np.argmax(self.alpha)), self.alpha.shape)
        return self.grammar.phrases[p][: self.chars[p, s]].strip()

    def scores(self) -> np.ndarray:
        """``log P(phrase | frames so far)`` per phrase (-inf where it cannot end yet)."""
        if self.frames == 0:
            return np.full(len(self.grammar), NEG)
        return np.logaddexp.reduce(np.where(self.final, self.alpha, NEG), axis=1)

    def ranked(self) -> list[tuple[str, float]]:
        """The phrases that can end here with their ``log P``, best first."""
        scores = self.scores()
        order = [int(p) for p in np.argsort(-scores, kind="stable") if np.isfinite(scores[p])]
        return [(self.grammar.phrases[p], float(scores[p])) for p in order]

    def align(self, text: str) -> tuple[list[int], list[int], list[float]]:
        """The alignment of a result (one of the phrases), for its word times."""
        return self.alignment(self.grammar.phrases.index(text))

    def rejects(self, text: str, score: float) -> bool:
        """Whether ``"[unk]"`` wins over the result ``text``, scored ``score``: it
        explains the audio worse than the free best path by more than
        ``REJECT_BELOW`` per letter (per letter, not per frame: a short command
        forced onto a long stretch of other speech or noise still costs its
        every letter)."""
        if not self.grammar.unk:
            return False
        return bool((score - self.free) / len(text) < REJECT_BELOW)

    def alignment(self, p: int) -> tuple[list[int], list[int], list[float]]:
        """The most probable alignment of phrase ``p``: its tokens, the frame
        each is emitted at most confidently, and that frame's log-prob (as
        :meth:`BeamSearch.path_info` gives them, for ``word_spans``)."""
        size = int(self.valid[p].sum())
        tokens = self.states[p, :size]
        emit = np.stack(self.rows)[:, tokens]  # [T, size]
        skip = self.skip[p : p + 1, :size]
        score = np.full((1, size), NEG)
        score[0, [0, 1, 3]] = emit[0, [0, 1, 3]]
        back = np.zeros((len(emit), size), np.int64)
        for t in range(1, len(emit)):
            cands = _predecessors(score, skip)[:, 0]
            choice = np.argmax(cands, axis=0)  # ties: the nearer predecessor
            back[t] = np.arange(size) - _OFFSETS[choice]
            score = np.take_along_axis(cands, choice[None], 0) + emit[t]
        score = score[0]
        finals = np.flatnonzero(self.final[p, :size])
        state = int(finals[np.argmax(score[finals])])
        path = [state]
        for t in range(len(emit) - 1, 0, -1):
            state = int(back[t, state])
            path.append(state)
        path.reverse()
        out: tuple[list[int], list[int], list[float]] = ([], [], [])
        last = -1
        for t, s in enumerate(path):
            if s % 2 == 1:  # a label, not a blank
                if s != last:
                    out[0].append(int(tokens[s]))
                    out[1].append(t)
                    out[2].append(float(emit[t, s]))
                elif emit[t, s] > out[2][-1]:  # its most confident frame
                    out[1][-1], out[2][-1] = t, float(emit[t, s])
            last = s
        return out


class SequenceSearch(GrammarSearch):
    """One or more phrases in a row (``Grammar.sequence``): the Viterbi
    algorithm over the same states, where the trailing ``|`` of any phrase may
    go on to the first letter of any phrase.  Each state keeps the phrases its
    best path has completed, as a node in a shared history (one per frame), so
    the best sequence is read back at the end; its score is that path's."""

    def __init__(self, grammar: Grammar, vocab: Vocabulary) -> None:
        super().__init__(grammar, vocab)
        self.history = np.full(self.alpha.shape, -1, np.int64)  # -1: no phrase completed
        self.nodes: list[tuple[int, int]] = []  # (previous node, completed phrase)

    def _step(self, emit: np.ndarray) -> None:
        """One frame of the Viterbi algorithm, with the loop from any phrase's
        end into every phrase's first letter."""
        a, h = self.alpha, self.history
        ends = np.where(self.loop_from, a, NEG)
        p_end, s_end = np.unravel_index(int(np.argmax(ends)), ends.shape)
        node = len(self.nodes)
        loop = np.full_like(a, NEG)
        loop[:, 3] = ends[p_end, s_end]  # after another phrase (or this one again)
        cands = np.concatenate([_predecessors(a, self.skip), loop[None]])
        choice = np.argmax(cands, axis=0)  # ties: the nearer predecessor
        self.alpha = np.take_along_axis(cands, choice[None], 0)[0] + emit
        first_h = np.full_like(h, -1)
        first_h[:, 3] = h[:, 0]
        hists = np.stack([h, _shift2d(h, 1, -1), _shift2d(h, 2, -1), first_h,
                          np.full_like(h, node)])  # fmt: skip
        self.history = np.take_along_axis(hists, choice[None], 0)[0]
        self.nodes.append((int(h[p_end, s_end]), int(p_end)))

    def _phrases(self, node: int) -> list[str]:
        out = []
        while node >= 0:
            node, phrase = self.nodes[node]
            out.append(self.grammar.phrases[phrase])
        return out[::-1]

    def partial(self) -> str:
        if self.frames == 0:
            return ""
        p, s = np.unravel_index(int(np.argmax(self.alpha)), self.alpha.shape)
        done = self._phrases(int(self.history[p, s]))
        return " ".join([*done, self.grammar.phrases[p][: self.chars[p, s]]]).strip()

    def ranked(self) -> list[tuple[str, float]]:
        """The best sequence and its path's ``log P`` (none before one can end)."""
        if self.frames == 0:
            return []
        ends = np.where(self.final, self.alpha, NEG)
        p, s = np.unravel_index(int(np.argmax(ends)), ends.shape)
        if not np.isfinite(ends[p, s]):
            return []
        words = [*self._phrases(int(self.history[p, s])), self.grammar.phrases[p]]
        return [(" ".join(words), float(ends[p, s]))]

    def align(self, text: str) -> tuple[list[int], list[int], list[float]]:
        one = GrammarSearch(Grammar((text,)), self.vocab)
        one.advance(np.stack(self.rows))
        return one.alignment(0)


def search_for(grammar: Grammar, vocab: Vocabulary) -> GrammarSearch:
    """The search a grammar needs: one phrase scored exactly, or sequences."""
    return (SequenceSearch if grammar.sequence else GrammarSearch)(grammar, vocab)


_OFFSETS = np.array([0, 1, 2, 3])  # how far back each of _predecessors' rows reaches


def _predecessors(a: np.ndarray, skip: np.ndarray) -> np.ndarray:
    """The scores each state can be reached from, ``[4, phrases, states]``: itself,
    s-1, s-2 over a blank (where ``skip`` allows), and for the first letter
    (s=3) the blank before the optional "|" (s-3)."""
    first = np.full_like(a, NEG)
    first[:, 3] = a[:, 0]
    return np.stack([a, _shift2d(a, 1, NEG), np.where(skip, _shift2d(a, 2, NEG), NEG), first])


def _shift2d(x: np.ndarray, k: int, fill: float) -> np.ndarray:
    """``x`` moved ``k`` states right along each phrase, ``fill`` coming in."""
    return np.concatenate([np.full((len(x), k), fill, x.dtype), x[:, :-k]], axis=1)
