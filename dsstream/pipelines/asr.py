"""The streaming ASR pipeline: audio in, partial and final transcripts out.

Per session: resample to the model's rate, the streaming log-mel frontend,
one engine session of the streaming acoustic model (steps of all live
sessions are batched by the engine), the CTC prefix beam search with the
n-gram LM, and a voice activity detector driving the endpoint rules.

Timeline.  The model consumes chunks of ``chunk_frames`` feature frames (10
ms each) and emits one output frame per ``subsampling`` feature frames.
Endpoints are decided at chunk boundaries, from VAD windows that end by that
time, so the segmentation depends only on the audio, never on how a client
chunked it.  At an endpoint the decoder is finalized and restarted; the
acoustic model's state carries on, so no audio is dropped between segments.

``flush`` and ``end`` finalize the audio of an incomplete chunk by running it
zero-padded on a copy of the model state (:meth:`StreamSession.peek`); the
output frames decoded that way are skipped when the real chunk completes, so
every output frame is decoded exactly once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dsstream.audio import ResampleError, StreamingResampler
from dsstream.decoding import CTCDecoder, DecoderConfig, Vocabulary
from dsstream.decoding.grammar import UNK, Grammar, GrammarError
from dsstream.endpoint import Endpointer
from dsstream.frontend import FbankConfig, LogMel, StreamingFbank
from dsstream.metrics import StageTimes
from dsstream.options import MAX_GRAMMAR_PHRASES, AsrOptions, parse_task_options
from dsstream.pipelines.base import PipelineError
from dsstream.pipelines.channels import SplitChannels
from dsstream.pipelines.config import AsrConfig
from dsstream.protocol import (
    AudioChunk,
    Endpoint,
    ErrorCode,
    Final,
    Flush,
    Hypothesis,
    Partial,
    ServerEvent,
    Word,
)
from dsstream.punctuation import PunctStream, Punctuator
from dsstream.vad import SileroVad, VadConfig

__all__ = ["AsrModelSpec", "AsrConfig", "AsrRuntime", "AsrPipeline", "StageTimes", "load"]

STAGES = ("resample", "vad", "frontend", "encoder", "decoder", "punctuation")


@dataclass(frozen=True)
class AsrModelSpec:
    """What a streaming ASR artifact's manifest says about it."""

    sample_rate: int  # Hz the frontend expects
    fbank: FbankConfig
    vocabulary: Vocabulary
    chunk_frames: int  # feature frames per model step
    subsampling: int  # feature frames per output frame
    frame_shift_s: float  # seconds per output frame
    alpha: float | None  # the decoder's LM weight tuned for this model, if recorded
    beta: float | None
    beam_width: int | None = None  # the beam the model's decoder settings were tuned at
    mode: str | None = None  # the search mode chosen by measurement ("free" or "lexicon")
    # Each search mode's tuned (alpha, beta), where the settings record them.
    modes: dict[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, extra: dict[str, Any], inputs: list[str]) -> AsrModelSpec:
        if extra.get("task") != "asr":
            raise ValueError("the artifact is not an ASR model (its manifest has no task 'asr')")
        if extra.get("streaming") is False or "state" not in extra:
            raise ValueError(
                "the artifact is a whole-utterance model; the streaming pipeline needs a "
                "streaming artifact (apps.asr.export.export_streaming)"
            )
        missing = [k for k in ("vocabulary", "frontend", "chunk_feature_frames",
                               "frame_shift_s") if k not in extra]  # fmt: skip
        if missing or "feats" not in inputs:
            raise ValueError(f"the ASR artifact's manifest lacks {missing or ['a feats input']}")
        fb = dict(extra["frontend"])
        fbank = FbankConfig(**{**fb, "mean": tuple(fb["mean"]), "std": tuple(fb["std"])})
        shift = float(extra["frame_shift_s"])
        sub = round(shift / (fbank.hop_length / fbank.sample_rate))
        decoder = extra.get("decoder", {})
        return cls(
            sample_rate=fbank.sample_rate,
            fbank=fbank,
            vocabulary=Vocabulary(tuple(extra["vocabulary"]), int(extra.get("blank_id", 0))),
            chunk_frames=int(extra["chunk_feature_frames"]),
            subsampling=sub,
            frame_shift_s=shift,
            alpha=decoder.get("alpha"),
            beta=decoder.get("beta"),
            beam_width=decoder.get("beam_width"),
            mode=decoder.get("mode"),
            modes={
                m: (float(v["alpha"]), float(v["beta"]))
                for m, v in decoder.get("modes", {}).items()
            },  # fmt: skip
        )

    @property
    def chunk_s(self) -> float:
        return self.chunk_frames * self.fbank.hop_length / self.sample_rate


class AsrRuntime:
    """What all sessions share: the engine, the decoder with its LM, the frontend, the VAD.

    ``AsrRuntime("model.ds", "lm.arpa")``; ``runtime.stream(**options)`` opens
    a streaming recognizer (options as in a ``start`` message).
    """

    def __init__(
        self,
        model: str | Path,
        lm: str | Path | None = None,
        config: AsrConfig = AsrConfig(),
        name: str = "asr",
        punct: str | Path | None = None,
    ) -> None:
        """``punct``: a punctuation model (``samples/punct/punct.ds``) that
        sessions asking ``punctuate`` use; None: finals stay raw."""
        from engine import BatchPolicy, EngineConfig, InferenceEngine

        self.config = config
        self.name = name
        self.punctuator: Punctuator | None = None
        if punct is not None:
            self.punctuator = Punctuator(punct, threads=config.engine_threads)
        policy = BatchPolicy(
            max_batch_size=config.max_batch, max_queue_delay_ms=config.batch_delay_ms
        )
        self.engine = InferenceEngine(model, config=EngineConfig(
            device=config.device, policy=policy, session_pool_bytes=config.session_pool_bytes,
            session_idle_timeout_s=float("inf"),  # the server's idle timeout governs
            cpu_threads=config.engine_threads,
        ))  # fmt: skip
        manifest = self.engine.manifest
        try:
            self.spec = AsrModelSpec.from_manifest(manifest.extra, self.engine.input_names)
        except ValueError as exc:
            raise ValueError(f"{model}: {exc}") from None
        self.fbank = LogMel(self.spec.fbank)
        spec = self.spec
        # The artifact's choice was measured with its LM; without one, lexicon
        # mode has no words to allow, so only an explicit setting insists on it.
        mode = config.decoder_mode or (spec.mode if lm is not None else None) or "free"
        search = DecoderConfig(beam_width=int(_first(config.beam_width, spec.beam_width, 32)),
                               **self.search_settings(mode))  # fmt: skip
        try:
            self.decoder = CTCDecoder(
                vocabulary=spec.vocabulary, language_model=lm, frame_shift_s=spec.frame_shift_s,
                hotword_beam_width=config.hotword_beam_width, config=search,
            )  # fmt: skip
        except ValueError as exc:  # lexicon mode without an LM
            raise ValueError(f"{model}: decoder_mode {mode!r}: {exc}") from None
        self.vad = SileroVad(config=VadConfig(threshold=config.vad_threshold))
        self.times = StageTimes(STAGES, task="asr")
        self._collectors = [
            self.engine.prometheus("asr"), self.times.collector(), self.vad.collector()
        ]  # fmt: skip

    def search_settings(self, mode: str) -> dict[str, Any]:
        """The decoder settings of search ``mode``: its LM weight and word
        bonus as tuned for this model (``AsrConfig``'s where it sets them)."""
        spec, config = self.spec, self.config
        alpha, beta = spec.modes.get(mode) or (
            (spec.alpha, spec.beta) if spec.mode in (None, mode) else (None, None)
        )
        return {"mode": mode, "alpha": _first(config.alpha, alpha, 0.5),
                "beta": _first(config.beta, beta, 1.0)}  # fmt: skip

    def pipeline(self) -> AsrPipeline:
        """A new session pipeline (call ``begin`` with options before use)."""
        return AsrPipeline(self)

    __call__ = pipeline  # the registry's per-session factory

    def collectors(self) -> list[Any]:
        """Prometheus collectors: the engine's stats and the stage times."""
        return list(self._collectors)

    def stream(self, **options: Any) -> AsrPipeline:
        """A begun pipeline for in-process streaming; ``options`` as in ``start``."""
        opts = parse_task_options("asr", options)  # OptionsError is a ValueError
        pipe = AsrPipeline(self)
        pipe.begin(opts)
        return pipe

    def close(self) -> None:
        self.engine.close()
        if self.punctuator is not None:
            self.punctuator.close()


def _first(*values: float | None) -> float:
    return float(next(v for v in values if v is not None))


# ~265 lines, past our ~250 bound: one stream's resample -> VAD -> features ->
# model step -> decoder -> endpoint loop, whose frame bookkeeping (peeked,
# pending, segment frames) every stage shares; split channels are channels.py.
class AsrPipeline:
    """One stream's recognition: the :class:`~dsstream.pipelines.base.Pipeline` calls,
    plus ``accept``/``flush`` for in-process use."""

    def __init__(self, runtime: AsrRuntime) -> None:
        self.runtime = runtime
        self.spec = runtime.spec
        self.options: AsrOptions | None = None
        self._ended = False
        self.split: SplitChannels | None = None  # split_channels: a stream per channel

    # -- Pipeline protocol -----------------------------------------------------------

    def begin(self, options: Any) -> dict[str, Any]:
        if not isinstance(options, AsrOptions):
            raise PipelineError(ErrorCode.BAD_MESSAGE, "the ASR pipeline needs asr options", True)
        if options.split_channels:
            self.split = SplitChannels(lambda: AsrPipeline(self.runtime))
            effective = self.split.begin(options)
            self.options = options
            return effective
        rt, spec = self.runtime, self.spec
        self.punct = self._punctuation(options)  # refused before any state is taken
        try:
            self.resampler = StreamingResampler(options.sample_rate, spec.sample_rate)
        except ResampleError as exc:
            raise PipelineError(ErrorCode.UNSUPPORTED, str(exc), True) from None
        from engine.sessions import SessionPoolFull

        try:
            self.session = rt.engine.open_session()
        except SessionPoolFull as exc:
            raise PipelineError(ErrorCode.BUSY, str(exc), True) from None
        self.options = options
        self._times = dict.fromkeys(STAGES, 0.0)
        self.frontend = StreamingFbank(rt.fbank)
        self.vad = rt.vad.stream()
        self.endpointer = Endpointer(options.endpointing)
        # Built once: every segment's decoder stream searches the same trie.
        self.hotwords = rt.decoder.hotwords([(h.phrase, h.boost) for h in options.hotwords])
        self.grammar = self._grammar(options.grammar, options.grammar_sequence)
        self.overrides = self._search(options)
        self.held: list[np.ndarray] = []  # audio not yet through the VAD and frontend
        self.held_samples = 0
        self.pending = np.zeros((0, spec.fbank.n_mels), np.float32)  # features not yet run
        self.peeked = 0  # output frames of the pending chunk already decoded (flush)
        self.frames = 0  # output frames decoded in the stream
        self.samples = 0  # samples received, at the model rate
        self.segment = 0
        self.segment_frame = 0  # first output frame of the current segment
        self.segment_start = 0.0  # seconds: where the previous segment ended
        self._new_decoder()
        return {
            "model": rt.name,
            "model_sample_rate": spec.sample_rate,
            "chunk_ms": round(spec.chunk_s * 1000),
            "language_model": rt.decoder.lm is not None,
            "decoder_mode": self.overrides.get("mode", rt.decoder.config.mode),
            "punctuate": self.punct is not None,
        }

    def _punctuation(self, options: AsrOptions) -> PunctStream | None:
        if not options.punctuate:
            return None
        if self.runtime.punctuator is None:
            raise PipelineError(
                ErrorCode.UNSUPPORTED,
                f"model {self.runtime.name!r} has no punctuation model; start without 'punctuate'",
                True,
            )
        return PunctStream(self.runtime.punctuator)

    def step(self, frame: Any) -> list[ServerEvent]:
        self._check()
        if isinstance(frame, AudioChunk):
            return self.accept(frame.samples, frame.sample_rate)
        if isinstance(frame, Flush):
            return self.flush()
        raise PipelineError(
            ErrorCode.BAD_MESSAGE, f"an asr session does not take {type(frame).__name__} frames"
        )

    def end(self) -> list[ServerEvent]:
        """Finalize everything received and release the stream's model state."""
        if self._ended or self.options is None:
            self._ended = True
            return []
        if self.split is not None:
            self._ended = True
            return self.split.end()
        try:
            events = self._feed(self.resampler.finish())
            self._pad_frontend()
            return events + self._finalize("end")
        finally:
            self._ended = True
            self.session.close()

    # -- in-process calls ---------------------------------------------------------------

    def accept(self, samples: np.ndarray, sample_rate: int | None = None) -> list[ServerEvent]:
        """Feed float32 mono samples ``[n]`` (``[n, channels]`` with
        ``split_channels``) at the session's rate; the events they produced."""
        self._check()
        assert self.options is not None
        if sample_rate is not None and sample_rate != self.options.sample_rate:
            raise PipelineError(
                ErrorCode.BAD_AUDIO,
                f"audio at {sample_rate} Hz in a session started at {self.options.sample_rate} Hz",
            )
        if self.split is not None:
            return self.split.accept(samples)
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise PipelineError(ErrorCode.BAD_AUDIO, "audio contains NaN or infinity")
        t0 = time.thread_time()
        y = self.resampler.process(x)
        self._times["resample"] += time.thread_time() - t0
        return self._feed(y)

    def flush(self) -> list[ServerEvent]:
        """Finalize what was received so far as a segment; the stream goes on."""
        self._check()
        if self.split is not None:
            return self.split.flush()
        return self._finalize("flush")

    # -- internals ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self.options is None:
            raise PipelineError(ErrorCode.BAD_MESSAGE, "the ASR pipeline was not begun")
        if self._ended:
            raise PipelineError(ErrorCode.BAD_MESSAGE, "the stream has ended")

    def _search(self, options: AsrOptions) -> dict[str, Any]:
        """Per-session decoder settings: a search mode other than the runtime's
        brings that mode's tuned weights; ``lm_weight`` overrides the weight."""
        decoder = self.runtime.decoder
        out: dict[str, Any] = {}
        mode = options.decoder_mode
        if mode is not None and mode != decoder.config.mode:
            if mode == "lexicon" and decoder.lm is None:
                raise PipelineError(ErrorCode.UNSUPPORTED,
                                    "decoder_mode 'lexicon' needs the model's language "
                                    "model, and this server has none", True)  # fmt: skip
            out = self.runtime.search_settings(mode)
        if options.lm_weight is not None:
            out["alpha"] = options.lm_weight
        return out

    def _grammar(self, phrases: tuple[str, ...], sequence: bool) -> Grammar | None:
        """The session's phrases spelled as transcripts are (lowercase, numbers
        in words, no punctuation); refused at ``start`` if the model cannot."""
        if not phrases:
            return None
        from dsstream.lm import normalize_sentence

        spelled = [p if p == UNK else normalize_sentence(p) for p in phrases]
        try:
            return Grammar.parse(spelled, self.runtime.decoder.alphabet, sequence,
                                 max_phrases=MAX_GRAMMAR_PHRASES)  # fmt: skip
        except GrammarError as exc:
            raise PipelineError(ErrorCode.BAD_MESSAGE, str(exc), True) from None

    def _new_decoder(self) -> None:
        offset = self.segment_frame * self.spec.frame_shift_s
        self.decoder = self.runtime.decoder.begin(
            self.hotwords, offset, grammar=self.grammar, **self.overrides
        )
        self.partial_text = ""
        self.partial_time = -math.inf

    @property
    def audio_s(self) -> float:
        return self.samples / self.spec.sample_rate

    def _now(self) -> float:
        """The decoded position in seconds (to the ms), never past the audio received."""
        cap = math.floor(self.audio_s * 1000.0 + 1e-6) / 1000.0
        return min(round(self.frames * self.spec.frame_shift_s, 3), cap)

    def _absorb(self) -> None:
        """Run the VAD and the frontend on the audio held since the last chunk.

        Audio is held until it completes a model chunk: one VAD pass and one
        frontend call per chunk instead of per client frame (with 100 ms frames,
        a third of the calls; the results are the same for any grouping)."""
        if not self.held:
            return
        x = np.concatenate(self.held) if len(self.held) > 1 else self.held[0]
        self.held, self.held_samples = [], 0
        times = self._times
        t0 = time.thread_time()
        self.endpointer.add(self.vad.process(x))
        t1 = time.thread_time()
        feats = self.frontend.process(x)
        times["vad"] += t1 - t0
        times["frontend"] += time.thread_time() - t1
        if len(feats):
            self.pending = np.concatenate([self.pending, feats])

    def _feed(self, x: np.ndarray) -> list[ServerEvent]:
        if not len(x):
            return []
        times = self._times
        self.samples += len(x)
        self.held.append(x)
        self.held_samples += len(x)
        size = self.spec.chunk_frames
        possible = self.runtime.fbank.frames(len(self.frontend.buffer) + self.held_samples)
        if len(self.pending) + possible < size:
            self.runtime.times.add({}, len(x) / self.spec.sample_rate)
            return []  # nothing can change before the chunk completes
        self._absorb()
        events: list[ServerEvent] = []
        while len(self.pending) >= size:
            chunk, self.pending = self.pending[:size], self.pending[size:]
            t0 = time.perf_counter()
            logp = self.session.step({"feats": chunk[None]})["logp"][0]
            times["encoder"] += time.perf_counter() - t0
            self._decode(logp[self.peeked :])
            self.peeked = 0
            reason = self.endpointer.check(self.frames * self.spec.frame_shift_s)
            if reason:
                events += self._close_segment(reason)
        events += self._partial()
        self.runtime.times.add(times, len(x) / self.spec.sample_rate)
        self._times = dict.fromkeys(STAGES, 0.0)
        return events

    def _decode(self, logp: np.ndarray) -> None:
        if len(logp):
            t0 = time.thread_time()
            self.decoder.step(logp)
            self._times["decoder"] += time.thread_time() - t0
            self.frames += len(logp)

    def _partial(self) -> list[ServerEvent]:
        assert self.options is not None
        now = self._now()
        if not self.options.partials:
            return []
        if (now - self.partial_time) * 1000.0 < self.options.partial_interval_ms:
            return []
        text = self.decoder.partial()
        if not text or text == self.partial_text:
            return []
        self.partial_text, self.partial_time = text, now
        return [Partial(text, self.segment, round(now, 3))]

    def _pad_frontend(self) -> None:
        """At the end, complete the last frontend window with zeros (the audio's tail)."""
        self._absorb()
        cfg = self.spec.fbank
        held = len(self.frontend.buffer)
        if held > cfg.win_length - cfg.hop_length:  # samples no frame has covered yet
            feats = self.frontend.process(np.zeros(cfg.win_length - held, np.float32))
            self.pending = np.concatenate([self.pending, feats])

    def _finalize(self, reason: str) -> list[ServerEvent]:
        """Decode the incomplete chunk (zero-padded, state untouched), then close the segment."""
        self._absorb()
        spec = self.spec
        k = len(self.pending)
        ready = min(math.ceil(k / spec.subsampling), spec.chunk_frames // spec.subsampling)
        if ready > self.peeked:
            padded = np.zeros((spec.chunk_frames, spec.fbank.n_mels), np.float32)
            padded[:k] = self.pending
            logp = self.session.peek({"feats": padded[None]})["logp"][0]
            self._decode(logp[self.peeked : ready])
            self.peeked = ready
        return self._close_segment(reason)

    def _close_segment(self, reason: str) -> list[ServerEvent]:
        assert self.options is not None
        opts, shift = self.options, self.spec.frame_shift_s
        result = self.decoder.end(opts.nbest)
        end = self._now()
        start = min(self.segment_start, end)
        words: tuple[Word, ...] = ()
        if opts.word_timestamps:
            words = tuple(
                Word(w.word, min(w.start, end), min(w.end, end), w.confidence) for w in result.words
            )
        nbest = tuple(Hypothesis(t, round(s, 4)) for t, s in result.nbest) if opts.nbest > 1 else ()
        text = result.text
        if self.punct is not None and text:
            text, words = self._punctuate(text, words)
        events: list[ServerEvent] = [
            Final(text, self.segment, round(start, 3), round(end, 3), words, nbest),
            Endpoint(self.segment, round(end, 3), reason),
        ]
        self.segment += 1
        self.segment_frame, self.segment_start = self.frames, end
        self.endpointer.reset(self.frames * shift)
        self._new_decoder()
        return events

    def _punctuate(self, text: str, words: tuple[Word, ...]) -> tuple[str, tuple[Word, ...]]:
        """The final's text as written; its words take their written forms
        (captions are cut from them), their times and confidences unchanged."""
        assert self.punct is not None
        t0 = time.perf_counter()
        shown = self.punct.apply(text.split())
        self.runtime.times.add({"punctuation": time.perf_counter() - t0}, 0.0)
        if len(words) == len(shown):
            words = tuple(replace(w, word=s) for w, s in zip(words, shown))
        return " ".join(shown), words


def load(
    model: Path, lm: Path | None = None, name: str = "asr", punct: Path | None = None,
    **config: Any,
) -> AsrRuntime:  # fmt: skip
    """The registry's entry point: load once; the runtime, called, makes a session pipeline."""
    return AsrRuntime(model, lm, replace(AsrConfig(), **config), name=name, punct=punct)
