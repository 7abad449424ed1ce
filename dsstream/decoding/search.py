"""CTC prefix beam search with word-level LM fusion and hotwords (pure Python).

This is the reference implementation; a compiled core must give identical
results.  Every operation here is deterministic: candidates are visited in
token order, hypotheses merge in a fixed order, ties break by first
appearance.

Prefixes live in a tree: a node is (parent, token), created once, so equal
prefixes are the same integer and merge exactly.  Everything that depends only
on the prefix text (LM state and score, the partial word, hotword state) is
computed once per node, in a :class:`Context`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any, Callable, Union

import numpy as np

from dsstream.decoding.hotwords import HotwordState, HotwordTrie
from dsstream.decoding.lexicon import Lexicon
from dsstream.decoding.lm import KenLM
from dsstream.decoding.vocab import Vocabulary

__all__ = [
    "DECODER_PRESETS",
    "DecoderConfig",
    "Context",
    "BeamSearch",
    "NativeBeamSearch",
    "FinalBeam",
    "word_spans",
    "word_times",
    "path_text",
    "native_available",
]

NEG = float("-inf")
MODES = ("free", "lexicon")
OOV_SCALE_CHARS = 6  # partial words longer than this pay a proportionally larger OOV penalty


@dataclass(frozen=True)
class DecoderConfig:
    """Search and fusion settings; log-probabilities are natural logs."""

    beam_width: int = 10  # hypotheses kept per frame
    alpha: float = 0.5  # LM weight
    beta: float = 1.0  # word insertion bonus, per word
    unk_offset: float = -10.0  # per word (and partial word) outside the LM vocabulary
    beam_prune_logp: float = -10.0  # drop hypotheses this far below the best
    token_min_logp: float = -5.0  # per frame, skip tokens below this log-probability
    top_k: int = 40  # per frame, at most this many non-blank tokens
    # Frames whose blank log-probability is at least this only extend with blank
    # (log 0.999); None disables the shortcut.
    blank_skip_logp: float | None = math.log(0.999)
    # "free": any spelling, words outside the LM pay unk_offset; "lexicon": only
    # words of the lexicon (and hotwords) are emitted (dsstream.decoding.lexicon).
    mode: str = "free"
    # Lexicon mode: the score of a word outside the lexicon (in place of
    # unk_offset); None: such words are not allowed at all.
    lexicon_unk: float | None = None
    # Lexicon mode with an LM: a partial word is charged alpha times the best
    # unigram ln p of the words it starts, until it completes (Lexicon.lookahead).
    lexicon_lookahead: bool = True
    # Lexicon mode's beam_prune_logp: a completed word trades its lookahead for
    # its real LM score, so hypotheses spread wider than in the free search
    # (measured, docs/benchmarks.md: -10 cut the right words at alpha 1.4 and up).
    lexicon_prune_logp: float = -20.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.lexicon_unk is not None and not math.isfinite(self.lexicon_unk):
            raise ValueError("lexicon_unk must be finite or None")
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        for name in ("alpha", "beta", "unk_offset", "beam_prune_logp", "token_min_logp",
                     "lexicon_prune_logp"):  # fmt: skip
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")

    @classmethod
    def preset(cls, name: str, **changes: Any) -> DecoderConfig:
        """A named speed/accuracy point (:data:`DECODER_PRESETS`), with ``changes``
        (e.g. the model's tuned ``alpha`` and ``beta``) on top."""
        if name not in DECODER_PRESETS:
            raise ValueError(
                f"unknown decoder preset {name!r}; expected one of {', '.join(DECODER_PRESETS)}"
            )
        return replace(DECODER_PRESETS[name], **changes)


# Beams measured with the sample model on the real-speech dev speakers (docs/asr.md,
# "Real speech"): WER 41.9 / 40.9 / 40.5% at 0.72 / 0.96 / 1.98 ms of decoder
# CPU per second of audio; "balanced" is what apps.asr.tune chose.
DECODER_PRESETS = {
    "fast": DecoderConfig(beam_width=32),
    "balanced": DecoderConfig(beam_width=64),
    "accurate": DecoderConfig(beam_width=128),
}


def logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == NEG:
        return a
    return a + math.log1p(math.exp(b - a))


@dataclass(frozen=True, slots=True)
class Context:
    """What a prefix means for the LM and hotwords (one per prefix node)."""

    lm_score: float  # alpha * ln p(words) + beta * words (+ unk offsets)
    lm_state: int  # KenLM state after the completed words
    partial: str  # characters of the unfinished word
    hw: HotwordState
    words: int  # completed words
    score: float  # lm_score + partial-word penalty + hotword bonus


@dataclass(frozen=True)
class FinalBeam:
    node: int
    score: float  # acoustic + LM (with </s>) + bonuses
    acoustic: float  # log P(prefix | frames)


Key = Union[int, tuple[int, int]]


class BeamSearch:
    """One stream's search state: feed frames with :meth:`advance`, then :meth:`finish`."""

    def __init__(
        self,
        vocab: Vocabulary,
        config: DecoderConfig,
        lm: KenLM | None = None,
        hotwords: HotwordTrie | None = None,
        lexicon: Lexicon | None = None,
    ) -> None:
        self.vocab = vocab
        self.cfg = config
        self.lm = lm
        self.trie = hotwords if hotwords is not None and len(hotwords) else None
        self.lexicon = _lexicon_for(config, lexicon)
        self.look = (
            self.lexicon.lookahead(lm)
            if self.lexicon is not None and lm is not None and config.lexicon_lookahead
            else None
        )
        # An out-of-lexicon partial word's lookahead (with lexicon_unk): the
        # LM's <unk>, as its completed word will score.
        self.look_unk = lm.unigram("<unk>") if self.look is not None and lm is not None else 0.0
        self.blank = vocab.blank_id
        self.parts = vocab.token_parts()
        # Tokens that end a word and add no characters (the char delimiter).
        self.silent = [starts and not chars for starts, chars in self.parts]
        # Prefix tree; node 0 is the empty prefix.
        self.parent: list[int] = [-1]
        self.token: list[int] = [-1]
        self.frame: list[int] = [-1]
        self.logp: list[float] = [0.0]
        self.ctx: list[Context] = [self._root_context()]
        self.children: dict[tuple[int, int], int] = {}
        self.beams: list[tuple[int, float, float]] = [(0, 0.0, NEG)]  # (node, p_blank, p_nonblank)
        self.frames = 0

    # -- contexts ---------------------------------------------------------------

    def _root_context(self) -> Context:
        state = self.lm.begin_state if self.lm is not None else 0
        return self._context(0.0, state, "", HotwordState(), 0)

    def _context(self, lm_score: float, state: int, partial: str, hw: HotwordState,
                 words: int) -> Context:  # fmt: skip
        score = lm_score
        trie = self.trie
        if trie is not None:
            score += hw.bonus(trie)
        if not partial or (trie is not None and trie.in_match(hw)):
            return Context(lm_score, state, partial, hw, words, score)
        lexicon, look = self.lexicon, self.look
        if lexicon is not None:
            inside = partial in look if look is not None else lexicon.is_prefix(partial)
            if inside:
                if look is not None:
                    score += self.cfg.alpha * look[partial]
            elif self.cfg.lexicon_unk is None:
                return Context(lm_score, state, partial, hw, words, NEG)  # forbidden
            else:
                score += self.cfg.lexicon_unk * _oov_scale(len(partial))
                if look is not None:
                    score += self.cfg.alpha * self.look_unk
        elif self.lm is not None and not self.lm.is_prefix(partial):
            # Scaled by length past a typical word, as pyctcdecode does: a flat
            # penalty let beams glue words into one long OOV string (measured:
            # "took impressions from" -> "dookosimpresseiunsrfrom...").
            score += self.cfg.unk_offset * _oov_scale(len(partial))
        return Context(lm_score, state, partial, hw, words, score)

    def _word(self, lm_score: float, state: int, word: str) -> tuple[float, int]:
        """The LM score after ``word``; NEG where lexicon mode forbids it."""
        cfg, lm, lexicon = self.cfg, self.lm, self.lexicon
        hot = self.trie is not None and word in self.trie.words
        if lexicon is not None and not hot and word not in lexicon:
            if cfg.lexicon_unk is None:
                return NEG, state
            lm_score += cfg.lexicon_unk
        if lm is None:
            return lm_score, state
        known = word in lm.vocab
        # KenLM scores every unknown word as <unk> (same score, same state), so
        # asking for "<unk>" keeps one cache entry per context instead of one
        # per misspelling: most completed words in a wide beam are junk.
        logp, state = lm.score(state, word if known else "<unk>")
        lm_score += cfg.alpha * logp + cfg.beta
        if lexicon is None and not known and not hot:
            lm_score += cfg.unk_offset
        return lm_score, state

    def extend(self, ctx: Context, tok: int) -> Context:
        """The context of ``prefix + tok`` from the context of ``prefix``."""
        starts, chars = self.parts[tok]
        lm_score, state, partial, hw, words = (
            ctx.lm_score, ctx.lm_state, ctx.partial, ctx.hw, ctx.words
        )  # fmt: skip
        trie = self.trie
        if starts and partial:
            lm_score, state = self._word(lm_score, state, partial)
            if lm_score == NEG:
                return Context(NEG, state, "", hw, words, NEG)  # a word lexicon mode forbids
            words += 1
            partial = ""
            if trie is not None:
                hw = trie.word_end(hw)
        for ch in chars:
            if trie is not None:
                hw = trie.char(hw, ch, not partial)
            partial += ch
        return self._context(lm_score, state, partial, hw, words)

    def final_context(
        self, ctx: Context, lenient: bool = False
    ) -> tuple[float, HotwordState, bool]:
        """LM score with the last word and </s>, the settled hotword state, and
        whether the last word was left out (``lenient``: a word lexicon mode
        forbids is dropped, not scored NEG)."""
        lm_score, state, hw = ctx.lm_score, ctx.lm_state, ctx.hw
        dropped = False
        if ctx.partial:
            score, after = self._word(lm_score, state, ctx.partial)
            if score == NEG and lenient:
                dropped = True
            else:
                lm_score, state = score, after
                if self.trie is not None:
                    hw = self.trie.word_end(hw)
        if self.lm is not None:
            lm_score += self.cfg.alpha * self.lm.score(state, "</s>")[0]
        if self.trie is not None:
            hw = self.trie.finish(hw)
        return lm_score, hw, dropped

    # -- frames -------------------------------------------------------------------

    def candidates(self, row: np.ndarray) -> list[tuple[int, float]]:
        """Non-blank tokens worth extending with in this frame, in token order."""
        cfg = self.cfg
        idx = np.flatnonzero(row >= cfg.token_min_logp)
        idx = idx[idx != self.blank]
        if len(idx) > cfg.top_k:
            # Ties at the cut keep the lower token ids (stable sort).
            order = np.argsort(-row[idx], kind="stable")[: cfg.top_k]
            idx = np.sort(idx[order])
        return [(int(i), float(row[i])) for i in idx]

    def advance(self, log_probs: np.ndarray) -> None:
        """Consume frames ``[T, V]`` of float64 log-probabilities."""
        for row in log_probs:
            self._frame(row)
            self.frames += 1

    def _frame(self, row: np.ndarray) -> None:
        blank_lp = float(row[self.blank])
        skip = self.cfg.blank_skip_logp
        if skip is not None and blank_lp >= skip:
            self.beams = [(n, logaddexp(pb, pnb) + blank_lp, NEG) for n, pb, pnb in self.beams]
            return
        cands = self.candidates(row)
        nxt: dict[Key, list[float]] = {}
        children, token, peak, t = self.children, self.token, self.logp, self.frames
        silent = self.silent
        for node, pb, pnb in self.beams:
            total = logaddexp(pb, pnb)
            _acc(nxt, node, total + blank_lp, NEG)
            last = token[node]
            boundary = not self.ctx[node].partial
            for tok, lp in cands:
                if boundary and silent[tok]:
                    # A delimiter where no word is open ("the| |", or one
                    # before the first word) spells what the prefix spells:
                    # the same hypothesis, not a new one crowding the beam.
                    _acc(nxt, node, NEG, total + lp)
                    continue
                key: Key = children.get((node, tok), (node, tok))
                if tok == last:
                    _acc(nxt, node, NEG, pnb + lp)
                    if lp > peak[node]:
                        self._move_peak(node, lp, t)
                    if pb > NEG:
                        _acc(nxt, key, NEG, pb + lp)
                else:
                    _acc(nxt, key, NEG, total + lp)
                if isinstance(key, int) and lp > peak[key]:
                    self._move_peak(key, lp, t)
        self._select(nxt, row)

    def _move_peak(self, node: int, lp: float, frame: int) -> None:
        # A token's time is the frame where it was emitted most confidently
        # (CTC spikes), not the frame where some weak beam first proposed it.
        self.logp[node] = lp
        self.frame[node] = frame

    def _select(self, nxt: dict[Key, list[float]], row: np.ndarray) -> None:
        pending: dict[tuple[int, int], Context] = {}
        scored: list[tuple[float, int, Key]] = []
        for order, (key, (pb, pnb)) in enumerate(nxt.items()):
            if isinstance(key, int):
                ctx = self.ctx[key]
            else:
                ctx = pending[key] = self.extend(self.ctx[key[0]], key[1])
                if ctx.score == NEG:  # lexicon mode: not a word, nor the start of one
                    continue
            scored.append((logaddexp(pb, pnb) + ctx.score, order, key))
        scored.sort(key=lambda s: (-s[0], s[1]))
        best = scored[0][0]
        cfg = self.cfg
        floor = best + (cfg.lexicon_prune_logp if self.lexicon is not None else cfg.beam_prune_logp)
        beams = []
        for score, _, key in scored[: self.cfg.beam_width]:
            if score < floor:
                break
            pb, pnb = nxt[key]
            node = key if isinstance(key, int) else self._new_node(key, pending[key], row)
            beams.append((node, pb, pnb))
        self.beams = beams

    def _new_node(self, key: tuple[int, int], ctx: Context, row: np.ndarray) -> int:
        node = len(self.parent)
        self.children[key] = node
        self.parent.append(key[0])
        self.token.append(key[1])
        self.frame.append(self.frames)
        self.logp.append(float(row[key[1]]))
        self.ctx.append(ctx)
        return node

    # -- results ---------------------------------------------------------------------

    def finish(self) -> list[FinalBeam]:
        """Rescore the beams with the final word and </s>; best first.

        In lexicon mode, beams that end inside a word that is not a lexicon
        word are dropped; if every beam does (the audio stopped mid-word),
        their unfinished words are left out of the texts instead."""
        return _finish(self._finals, self.lexicon is not None)

    def _finals(self, lenient: bool) -> list[FinalBeam]:
        finals = []
        for order, (node, pb, pnb) in enumerate(self.beams):
            lm_score, hw, dropped = self.final_context(self.ctx[node], lenient)
            bonus = hw.banked if self.trie is not None else 0.0
            acoustic = logaddexp(pb, pnb)
            shown = self._word_start(node) if dropped else node
            finals.append((acoustic + lm_score + bonus, order, FinalBeam(shown, 0.0, acoustic)))
        finals.sort(key=lambda f: (-f[0], f[1]))
        return [FinalBeam(f.node, score, f.acoustic) for score, _, f in finals]

    def _word_start(self, node: int) -> int:
        """The prefix before ``node``'s unfinished word."""
        while self.ctx[node].partial:
            node = self.parent[node]
        return node

    def path_info(self, node: int) -> tuple[list[int], list[int], list[float]]:
        """Tokens, frames and emission log-probs from the first token to ``node``."""
        nodes = []
        while node > 0:
            nodes.append(node)
            node = self.parent[node]
        nodes.reverse()
        return (
            [self.token[n] for n in nodes],
            [self.frame[n] for n in nodes],
            [self.logp[n] for n in nodes],
        )

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    def text(self, node: int) -> str:
        """The words the path to ``node`` spells."""
        return path_text(self.parts, self.path_info(node)[0])

    def word_times(self, node: int) -> list[tuple[str, int, int, float]]:
        """Each word on the path to ``node``: (word, first frame, last frame,
        mean log-prob of its tokens)."""
        return word_times(self.parts, self.path_info(node))


def word_spans(
    parts: list[tuple[bool, str]], info: tuple[list[int], list[int], list[float]]
) -> list[tuple[str, list[int], list[float]]]:
    """Words of a path, each with the frames and log-probs of its tokens.

    A token's frame is its emission peak, which can move past the frame at which
    a later token was emitted (the prefix kept being extended by repeats after
    its child appeared); a backward running minimum keeps the path in time order,
    so every word starts before it ends and after the word before it."""
    tokens, peaks, logps_in = info
    ordered = list(accumulate(reversed(peaks), min))[::-1]
    words: list[tuple[str, list[int], list[float]]] = []
    current, frames, logps = "", list[int](), list[float]()
    for tok, frame, logp in zip(tokens, ordered, logps_in):
        starts, chars = parts[tok]
        if starts and current:
            words.append((current, frames, logps))
            current, frames, logps = "", [], []
        if chars:
            current += chars
            frames.append(frame)
            logps.append(logp)
    if current:
        words.append((current, frames, logps))
    return words


def word_times(
    parts: list[tuple[bool, str]], info: tuple[list[int], list[int], list[float]]
) -> list[tuple[str, int, int, float]]:
    """``word_spans`` summed up: (word, first frame, last frame, mean log-prob)."""
    return [(w, frames[0], frames[-1], sum(logps) / len(logps))
            for w, frames, logps in word_spans(parts, info)]  # fmt: skip


def path_text(parts: list[tuple[bool, str]], tokens: list[int]) -> str:
    """The words a path spells, joined by spaces (``word_spans`` without times)."""
    words: list[str] = []
    current = ""
    for tok in tokens:
        starts, chars = parts[tok]
        if starts and current:
            words.append(current)
            current = ""
        current += chars
    if current:
        words.append(current)
    return " ".join(words)


class NativeBeamSearch:
    """The compiled core behind the same interface as :class:`BeamSearch`."""

    def __init__(
        self,
        vocab: Vocabulary,
        config: DecoderConfig,
        lm: KenLM | None = None,
        hotwords: HotwordTrie | None = None,
        lexicon: Lexicon | None = None,
    ) -> None:
        from dsstream.decoding import _native  # type: ignore[attr-defined]

        self.vocab = vocab
        self.cfg = config
        self.parts = vocab.token_parts()
        trie = hotwords if hotwords is not None and len(hotwords) else None
        lexicon = _lexicon_for(config, lexicon)
        self.lexicon = lexicon is not None
        look_lm = lm if config.lexicon_lookahead else None
        self.core = _native.Core(
            vocab.blank_id,
            [starts for starts, _ in self.parts],
            [list(chars) for _, chars in self.parts],
            dict(vars(config)),  # asdict's deep copy costs more than the search of a short clip
            lm.native_info() if lm is not None else None,
            trie,
            lexicon.native_info(look_lm) if lexicon is not None else None,
        )

    @property
    def frames(self) -> int:
        return int(self.core.frames)

    @property
    def beams(self) -> list[tuple[int, float, float]]:
        return list(self.core.beams())

    @property
    def num_nodes(self) -> int:
        return int(self.core.num_nodes())

    def advance(self, log_probs: np.ndarray) -> None:
        self.core.advance(np.ascontiguousarray(log_probs, dtype=np.float64))

    def finish(self) -> list[FinalBeam]:
        def finals(lenient: bool) -> list[FinalBeam]:
            return [FinalBeam(n, score, ac) for n, score, ac in self.core.finish(lenient)]

        return _finish(finals, self.lexicon)

    def path_info(self, node: int) -> tuple[list[int], list[int], list[float]]:
        tokens, frames, logps = self.core.path_info(node)
        return list(tokens), list(frames), list(logps)

    def text(self, node: int) -> str:
        return str(self.core.text(node))

    def word_times(self, node: int) -> list[tuple[str, int, int, float]]:
        return list(self.core.word_times(node))


def native_available() -> bool:
    try:
        from dsstream.decoding import _native  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        return False
    return True


def _finish(finals: Callable[[bool], list[FinalBeam]], lexicon: bool) -> list[FinalBeam]:
    """Both searches' end rule: ``finals(lenient)`` ranks the beams; lexicon
    mode drops those its last word forbids, unless that is all of them."""
    ranked = finals(False)
    if lexicon and all(f.score == NEG for f in ranked):
        ranked = finals(True)
    return [f for f in ranked if f.score > NEG] or ranked


def _oov_scale(n: int) -> float:
    """Partial words longer than OOV_SCALE_CHARS pay proportionally more."""
    return n / OOV_SCALE_CHARS if n > OOV_SCALE_CHARS else 1.0


def _lexicon_for(config: DecoderConfig, lexicon: Lexicon | None) -> Lexicon | None:
    """The lexicon a search walks: only in lexicon mode, where one is required."""
    if config.mode != "lexicon":
        return None
    if lexicon is None:
        raise ValueError("lexicon mode needs a lexicon: a language model or a word list")
    return lexicon


def _acc(table: dict[Key, list[float]], key: Key, pb: float, pnb: float) -> None:
    entry = table.get(key)
    if entry is None:
        table[key] = [pb, pnb]
    else:
        entry[0] = logaddexp(entry[0], pb)
        entry[1] = logaddexp(entry[1], pnb)
