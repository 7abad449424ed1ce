"""The public CTC decoder: batch and streaming calls over the beam search."""

from __future__ import annotations

import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from dsstream.decoding.grammar import UNK, Grammar, GrammarSearch, search_for
from dsstream.decoding.hotwords import HotwordTrie
from dsstream.decoding.lexicon import Lexicon
from dsstream.decoding.lm import KenLM
from dsstream.decoding.search import (
    BeamSearch,
    DecoderConfig,
    NativeBeamSearch,
    native_available,
    path_text,
    word_times,
)
from dsstream.decoding.vocab import Vocabulary

__all__ = [
    "CTCDecoder",
    "DecoderStream",
    "GrammarStream",
    "DecodeResult",
    "WordInfo",
    "ENGLISH_CHARS",
    "greedy_decode",
]

# The sample ASR model's output tokens: blank, word delimiter, apostrophe, a-z.
ENGLISH_CHARS = Vocabulary(("<blank>", "|", "'", *"abcdefghijklmnopqrstuvwxyz"), 0)

HotwordsArg = HotwordTrie | Iterable[str | tuple[str, float]] | None
GrammarArg = Grammar | Iterable[str] | None


@dataclass(frozen=True)
class WordInfo:
    word: str
    start: float  # seconds (from the stream start, with time_offset)
    end: float  # seconds
    confidence: float  # exp(mean token log-prob at the frames that emitted it), in [0, 1]


@dataclass(frozen=True)
class DecodeResult:
    text: str
    score: float  # total log-score of the best hypothesis (acoustic + LM + bonuses)
    words: tuple[WordInfo, ...]
    nbest: tuple[tuple[str, float], ...]  # (text, score), best first, distinct texts
    frames: int  # frames decoded


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (C-contiguous); idempotent on log-probabilities."""
    # Rows are short (the vocabulary) and many: reducing over the contiguous
    # axis of the transpose vectorizes across frames (half the time of axis=1).
    t = np.array(np.asarray(x).T, dtype=np.float64, order="C")
    m = t.max(axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    np.subtract(t, m, out=t)
    np.subtract(t, np.log(np.exp(t).sum(axis=0)), out=t)
    return np.ascontiguousarray(t.T)


def _as_matrix(logits: Any, vocab_size: int) -> np.ndarray:
    if hasattr(logits, "detach"):  # a torch tensor, without importing torch here
        logits = logits.detach().cpu().numpy()
    if not isinstance(logits, np.ndarray):
        raise TypeError(
            f"logits must be a numpy array or torch tensor, got {type(logits).__name__}"
        )
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [frames, vocab], got shape {logits.shape}")
    if logits.dtype not in (np.float32, np.float64):
        raise TypeError(f"logits must be float32 or float64, got {logits.dtype}")
    if logits.shape[1] != vocab_size:
        raise ValueError(
            f"logits have {logits.shape[1]} classes but the vocabulary has {vocab_size} tokens"
        )
    if not np.isfinite(logits).all():  # the checks below cost more than this one
        if np.isnan(logits).any():
            raise ValueError("logits contain NaN")
        if np.isposinf(logits).any():
            raise ValueError("logits contain +inf")
        if len(logits) and np.isneginf(logits).all(axis=1).any():
            raise ValueError("a frame of logits is -inf for every token")
    return log_softmax(logits)


def _hotwords(hotwords: HotwordsArg, default_boost: float) -> HotwordTrie | None:
    if isinstance(hotwords, HotwordTrie):  # built once (CTCDecoder.hotwords), used per stream
        return hotwords if len(hotwords) else None
    if not hotwords:
        return None
    pairs = []
    for item in hotwords:
        if isinstance(item, str):
            pairs.append((item, default_boost))
        else:
            phrase, boost = item
            if not math.isfinite(boost):
                raise ValueError(f"hotword boost must be finite, got {boost}")
            pairs.append((phrase, float(boost)))
    return HotwordTrie(pairs)


_warned_fallback = False


def _pick_backend(backend: str) -> str:
    """``"native"`` (compiled core), ``"python"``, or ``"auto"``: native when built."""
    global _warned_fallback
    if backend not in ("auto", "native", "python"):
        raise ValueError(f"backend must be 'auto', 'native' or 'python', got {backend!r}")
    if backend == "python":
        return backend
    if native_available():
        return "native"
    if backend == "native":
        raise RuntimeError(
            "the compiled decoder core is not built; reinstall dsstream with a C++ compiler"
        )
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            "dsstream's compiled CTC decoder core is not available; using the pure-Python "
            "search (identical results, about 10x slower)",
            RuntimeWarning,
            stacklevel=3,
        )
    return "python"


def greedy_decode(logits: Any, vocab: Vocabulary = ENGLISH_CHARS) -> str:
    """Best-path decoding: argmax per frame, collapse repeats, drop blanks."""
    best = np.argmax(_as_matrix(logits, len(vocab)), axis=1).tolist()
    tokens = [t for i, t in enumerate(best) if t != vocab.blank_id and (i == 0 or t != best[i - 1])]
    return path_text(vocab.token_parts(), tokens)


class CTCDecoder:
    """CTC prefix beam search with optional KenLM shallow fusion and hotwords.

    ``CTCDecoder(blank_id=0, beam_width=10, language_model="lm.arpa")`` decodes
    the sample model's character vocabulary; pass ``vocabulary`` (a
    :class:`Vocabulary` or token list) for another model.  ``decode(logits)``
    takes ``[frames, vocab]`` logits or log-probabilities (normalized with a
    log-softmax either way).  ``frame_shift_s`` converts frames to seconds.
    ``mode="lexicon"`` (or ``begin(mode="lexicon")`` for one stream) emits
    only words of ``lexicon`` (a word list; by default the LM's vocabulary)
    and hotwords; ``lexicon_unk`` lets other words through at that score.
    Streams with hotwords search a beam of at least ``hotword_beam_width``
    (None: the configured beam): a partial match's credit lifts its
    hypotheses, and in a narrow beam they crowd out the ones that win once
    the credit is taken back (measured with the sample model: boosting
    "sprung" turned "seized" into "seased" at beam 8, not at 12 or more).
    """

    def __init__(
        self,
        vocabulary: Vocabulary | Sequence[str] | None = None,
        blank_id: int = 0,
        beam_width: int | None = None,
        language_model: str | Path | KenLM | None = None,
        unigrams: Iterable[str] | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        frame_shift_s: float = 0.04,
        hotword_boost: float = 5.0,
        hotword_beam_width: int | None = 16,
        backend: str = "auto",
        config: DecoderConfig | None = None,
        lexicon: Lexicon | Iterable[str] | None = None,
        **overrides: Any,
    ) -> None:
        if vocabulary is None:
            vocab = ENGLISH_CHARS if blank_id == 0 else replace(ENGLISH_CHARS, blank_id=blank_id)
        elif isinstance(vocabulary, Vocabulary):
            vocab = vocabulary
        else:  # labels as other decoders take them: " " or "|" between words
            vocab = Vocabulary.from_labels(vocabulary, blank_id)
        self.vocab = vocab
        cfg = config or DecoderConfig()
        # Keywords given override ``config`` (default: DecoderConfig(), beam 10).
        changes: dict[str, Any] = dict(overrides)
        if beam_width is not None:
            changes["beam_width"] = beam_width
        if alpha is not None:
            changes["alpha"] = alpha
        if beta is not None:
            changes["beta"] = beta
        self.config = replace(cfg, **changes)
        if isinstance(language_model, KenLM) or language_model is None:
            self.lm = language_model
        elif unigrams is None:
            self.lm = KenLM.shared(language_model)  # one per file and process
        else:
            self.lm = KenLM(language_model, unigrams)
        self.frame_shift_s = frame_shift_s
        self.hotword_boost = hotword_boost
        if hotword_beam_width is not None and hotword_beam_width < 1:
            raise ValueError(f"hotword_beam_width must be at least 1, got {hotword_beam_width}")
        self.hotword_beam_width = hotword_beam_width
        self.backend = _pick_backend(backend)
        if lexicon is not None and not isinstance(lexicon, Lexicon):
            lexicon = Lexicon(lexicon)
        if lexicon is not None:
            lexicon.check_spelling(self.alphabet)
        self._lexicon = lexicon
        if self.config.mode == "lexicon":
            self.lexicon  # noqa: B018 - refuse lexicon mode without words now, not per stream
        self._executor: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def begin(
        self,
        hotwords: HotwordsArg = None,
        time_offset: float = 0.0,
        grammar: GrammarArg = None,
        **overrides: Any,
    ) -> DecoderStream | GrammarStream:
        """Start a stream; ``overrides`` change config fields for this stream only.

        ``grammar``: phrases (or a :class:`Grammar`) the result must be one of,
        for command-and-control (:mod:`dsstream.decoding.grammar`): each is
        scored exactly, every phrase equally likely before the audio, so the
        LM, the beam and hotwords do not apply.  A stream that matches no
        phrase (it stopped inside one) ends with an empty text; with
        ``"[unk]"`` among the phrases, speech far from all of them ends as
        ``"[unk]"``."""
        if grammar is not None:
            if hotwords:
                raise ValueError("hotwords and a grammar do not combine: list the phrases")
            if not isinstance(grammar, Grammar):
                grammar = Grammar.parse(grammar, self.alphabet)
            return GrammarStream(self, search_for(grammar, self.vocab), time_offset)
        config = replace(self.config, **overrides) if overrides else self.config
        trie = _hotwords(hotwords, self.hotword_boost)
        if trie is not None and len(trie) and self.hotword_beam_width is not None:
            width = max(config.beam_width, self.hotword_beam_width)
            config = replace(config, beam_width=width)
        lexicon = self.lexicon if config.mode == "lexicon" else None
        search_cls = NativeBeamSearch if self.backend == "native" else BeamSearch
        search = search_cls(self.vocab, config, self.lm, trie, lexicon)
        return DecoderStream(self, search, time_offset)

    @property
    def lexicon(self) -> Lexicon:
        """The words lexicon mode may emit: the word list given, else the LM's
        vocabulary."""
        if self._lexicon is not None:
            return self._lexicon
        if self.lm is not None:
            return Lexicon.of(self.lm)
        raise ValueError(
            "lexicon mode needs words to allow: pass lexicon=[...] or a language model"
        )

    def hotwords(self, hotwords: HotwordsArg) -> HotwordTrie | None:
        """``hotwords`` (phrases, or ``(phrase, boost)`` pairs; a bare phrase gets
        this decoder's ``hotword_boost``) as a trie that ``begin`` takes as it is:
        a session that starts a stream per segment builds it once."""
        return _hotwords(hotwords, self.hotword_boost)

    @property
    def alphabet(self) -> set[str]:
        """The characters the vocabulary can spell."""
        return {ch for _, chars in self.vocab.token_parts() for ch in chars}

    def decode(
        self,
        logits: Any,
        hotwords: HotwordsArg = None,
        nbest: int = 1,
        grammar: GrammarArg = None,
        **overrides: Any,
    ) -> DecodeResult:
        """Decode one utterance ``[frames, vocab]``."""
        stream = self.begin(hotwords, grammar=grammar, **overrides)
        stream.feed(logits)  # no partial text: nobody reads it
        return stream.end(nbest)

    def decode_batch(
        self,
        batch: Sequence[Any],
        hotwords: HotwordsArg = None,
        nbest: int = 1,
        max_workers: int | None = None,
        hotwords_per_item: Sequence[HotwordsArg] | None = None,
    ) -> list[DecodeResult]:
        """Decode several utterances on a thread pool.

        ``hotwords`` apply to every item; ``hotwords_per_item`` gives each its own.
        """
        if hotwords_per_item is not None and len(hotwords_per_item) != len(batch):
            raise ValueError("hotwords_per_item needs one entry per batch item")
        per_item = list(hotwords_per_item or [hotwords] * len(batch))
        with ThreadPoolExecutor(max_workers) as pool:
            futures = [pool.submit(self.decode, x, hw, nbest) for x, hw in zip(batch, per_item)]
            return [f.result() for f in futures]

    def step_batch(
        self, streams: Sequence[DecoderStream], chunks: Sequence[Any], max_workers: int = 4
    ) -> list[str]:
        """Advance many streams by one chunk each, in parallel; their partial texts.

        The compiled core releases the GIL while it searches, so the streams of
        a server's sessions decode on several cores at once.  Each stream keeps
        its own order: a stream may appear at most once per call.
        """
        if len(streams) != len(chunks):
            raise ValueError("step_batch needs one chunk per stream")
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("a stream appears twice in one step_batch call")
        pool = self._pool(max_workers)
        return list(pool.map(lambda sc: sc[0].step(sc[1]), zip(streams, chunks)))

    def _pool(self, max_workers: int) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers, "dsstream-decoder")
            return self._executor


class _Stream:
    """What both kinds of stream share: ``step`` feeds the search its frames."""

    search: Any  # has advance([T, V] log-probs) and frames

    def __init__(self, decoder: CTCDecoder, search: Any, time_offset: float) -> None:
        self.decoder = decoder
        self.search = search
        self.time_offset = time_offset
        self.ended = False

    @property
    def frames(self) -> int:
        return int(self.search.frames)

    def step(self, log_probs: Any) -> str:
        """Consume ``[frames, vocab]``; return the current best partial text."""
        self.feed(log_probs)
        return self.partial()

    def feed(self, log_probs: Any) -> None:
        """Consume ``[frames, vocab]`` (``step`` without the partial text)."""
        if self.ended:
            raise RuntimeError("decoder stream has ended")
        self.search.advance(_as_matrix(log_probs, len(self.decoder.vocab)))

    def partial(self) -> str:
        raise NotImplementedError


class DecoderStream(_Stream):
    """One stream's decoding: ``step`` chunks of frames, then ``end``.

    Beams persist across chunks, so any chunking gives exactly the result of
    decoding the whole matrix at once.
    """

    search: BeamSearch | NativeBeamSearch

    def partial(self) -> str:
        return self._text(self.search.beams[0][0])

    def _text(self, node: int) -> str:
        return self.search.text(node)

    def end(self, nbest: int = 1) -> DecodeResult:
        """Finish: score the last word and the sentence end; return the result."""
        if self.ended:
            raise RuntimeError("decoder stream has ended")
        self.ended = True
        finals = self.search.finish()
        best = finals[0]
        texts: list[tuple[str, float]] = []
        seen: set[str] = set()
        for beam in finals:
            text = self._text(beam.node)
            if text not in seen:
                seen.add(text)
                texts.append((text, beam.score))
            if len(texts) >= nbest:
                break
        return DecodeResult(
            text=texts[0][0],
            score=best.score,
            words=tuple(self._words(best.node)),
            nbest=tuple(texts),
            frames=self.search.frames,
        )

    def _words(self, node: int) -> list[WordInfo]:
        times = self.search.word_times(node)
        return _word_infos(times, self.decoder.frame_shift_s, self.time_offset)


class GrammarStream(_Stream):
    """A stream whose result is one of a grammar's phrases (``CTCDecoder.begin(
    grammar=...)``), with :class:`DecoderStream`'s calls; partials are the
    start of the most probable phrase."""

    search: GrammarSearch

    def partial(self) -> str:
        return self.search.partial()

    def end(self, nbest: int = 1) -> DecodeResult:
        """The most probable phrase (or none, or ``"[unk]"``) and the next ones."""
        if self.ended:
            raise RuntimeError("decoder stream has ended")
        self.ended = True
        search, frames = self.search, self.search.frames
        ranked = search.ranked()
        if not ranked or search.silence >= ranked[0][1]:  # nothing was said
            return DecodeResult("", search.silence, (), (), frames)
        text, best = ranked[0]
        if search.rejects(text, best):
            return DecodeResult(UNK, best, (), ((UNK, best),), frames)
        parts = self.decoder.vocab.token_parts()
        words = _word_infos(word_times(parts, search.align(text)), self.decoder.frame_shift_s,
                            self.time_offset)  # fmt: skip
        return DecodeResult(text, best, tuple(words), tuple(ranked[:nbest]), frames)


def _word_infos(
    times: list[tuple[str, int, int, float]], frame_shift_s: float, time_offset: float
) -> list[WordInfo]:
    """``word_times`` in seconds, with each word's confidence (the mean token
    probability, geometric)."""
    return [
        WordInfo(
            word,
            round(time_offset + first * frame_shift_s, 4),
            round(time_offset + (last + 1) * frame_shift_s, 4),
            round(math.exp(mean_logp), 4),
        )
        for word, first, last, mean_logp in times
    ]
