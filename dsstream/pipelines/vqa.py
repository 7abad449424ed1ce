"""The VQA pipeline: an image, then questions about it, answered with a score.

Two engine stages (see apps/vqa/export.py): ``image.ds`` turns an image into
every fuser layer's cross-attention keys/values, ``fuser.ds`` answers a
question from them.  The keys/values live in a paged cache (the engine's
:class:`~engine.kv_cache.BlockPool`), keyed by the image's content hash, so an
image is encoded once however many questions (or sessions) ask about it; a
session holds its current image's blocks, and released images stay cached
(LRU) for the next session that sends the same picture
(:class:`engine.kv_cache.PagedKVStore`).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dsstream.media import ImageError, decode_image
from dsstream.options import VqaOptions
from dsstream.pipelines.base import PipelineError
from dsstream.pipelines.config import VqaConfig
from dsstream.protocol import (
    Answer,
    AudioChunk,
    Error,
    ErrorCode,
    Final,
    Flush,
    ImageData,
    Question,
    ServerEvent,
)
from dsstream.tokenizer import WordTokenizer

__all__ = ["VqaConfig", "ImageKVCache", "VqaRuntime", "VqaPipeline", "load"]


class ImageKVCache:
    """Images' keys/values in the engine's paged store
    (:class:`engine.kv_cache.PagedKVStore`: ``acquire``, ``read``, ``release``,
    ``stats``); a full store is the client's ``busy``."""

    def __init__(self, kv_shape: tuple[int, int, int, int], cap_bytes: int) -> None:
        from engine.kv_cache import PagedKVStore  # the engine (and torch) load lazily

        self.store = PagedKVStore(kv_shape, cap_bytes)
        self.read, self.release, self.stats = self.store.read, self.store.release, self.store.stats

    def acquire(self, digest: bytes, compute: Any) -> int:
        """A handle on the image ``digest``'s keys/values; ``compute() -> [L, 2, T, d]``."""
        from engine.kv_cache import OutOfBlocks

        try:
            return self.store.acquire(digest, compute)
        except OutOfBlocks as exc:
            raise PipelineError(ErrorCode.BUSY, f"image cache is full: {exc}") from None


class VqaRuntime:
    """Shared by all VQA sessions: both engines, the tokenizer, the image KV cache."""

    def __init__(
        self, image: str | Path, fuser: str | Path, config: VqaConfig = VqaConfig(),
        name: str = "vqa", asr: Any = None,
    ) -> None:  # fmt: skip
        """``asr``: a pipeline factory (``create()``) for spoken questions, or None."""
        from engine import BatchPolicy, EngineConfig, InferenceEngine

        self.config, self.name, self.asr = config, name, asr
        engine_config = EngineConfig(
            device=config.device,
            policy=BatchPolicy(max_batch_size=config.max_batch),
            cpu_threads=config.engine_threads,
        )
        self.image_engine = InferenceEngine(image, config=engine_config)
        self.fuser_engine = InferenceEngine(fuser, config=engine_config)
        img, fus = self.image_engine.manifest.extra, self.fuser_engine.manifest.extra
        if img.get("stage") != "image" or fus.get("stage") != "fuser":
            raise ValueError(f"{image} and {fuser} are not a VQA image stage and fuser stage")
        self.image_size = int(img["image_size"])
        kv_shape = tuple(int(x) for x in img["kv_shape"])
        self.tokenizer = WordTokenizer(tuple(fus["tokenizer"]["vocab"]),
                                       int(fus["tokenizer"]["max_len"]))  # fmt: skip
        self.answers = tuple(fus["answers"])
        # The question forms the model was trained on, where its artifact lists them:
        # spoken questions are matched to them (VqaOptions.question_forms).
        self.questions = tuple(fus.get("questions", ()))
        self.cache = ImageKVCache(kv_shape, config.cache_bytes)  # type: ignore[arg-type]

    def pipeline(self) -> VqaPipeline:
        return VqaPipeline(self)

    __call__ = pipeline

    def encode_image(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> model input ``[1, 3, S, S]`` (RGB in [0, 1])."""
        from PIL import Image

        try:
            image = decode_image(data, self.config.max_image_pixels)
        except ImageError as exc:
            raise PipelineError(ErrorCode.BAD_IMAGE, str(exc)) from None
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return (np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0)[None]

    def image_kv(self, pixels: np.ndarray) -> np.ndarray:
        return self.image_engine.infer({"image": pixels})["kv"][0]

    def answer(self, kv: np.ndarray, text: str) -> tuple[str, float]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise PipelineError(ErrorCode.BAD_MESSAGE, "the question has no words")
        probs = self.fuser_engine.infer({"tokens": np.array([ids], np.int64), "kv": kv[None]})[
            "probs"
        ][0]
        best = int(np.argmax(probs))
        return self.answers[best], float(probs[best])

    def collectors(self) -> list[Any]:
        return [
            self.image_engine.prometheus("vqa-image"),
            self.fuser_engine.prometheus("vqa-fuser"),
        ]

    def close(self) -> None:
        self.image_engine.close()
        self.fuser_engine.close()


class VqaPipeline:
    """One VQA session: ``ImageData`` sets the current image, ``Question`` asks about it.

    With spoken questions on, audio frames go to an ASR pipeline whose events
    pass through, and each final transcript is answered about the current image
    (an ``answer`` with ``transcript`` after the ``final``)."""

    def __init__(self, runtime: VqaRuntime) -> None:
        self.runtime = runtime
        self.asr: Any = None  # the spoken-question recognizer, with speech on
        self.handle: int | None = None
        self.image_ms = math.nan  # encode time of the current image (0 when it was cached)
        self._ended = False

    def begin(self, options: Any) -> dict[str, Any]:
        if not isinstance(options, VqaOptions):
            raise PipelineError(ErrorCode.BAD_MESSAGE, "the VQA pipeline needs vqa options", True)
        rt = self.runtime
        effective: dict[str, Any] = {
            "model": rt.name, "image_size": rt.image_size, "answers": list(rt.answers),
        }  # fmt: skip
        if options.speech is not None:
            if rt.asr is None or rt.asr.unavailable_reason():
                why = rt.asr.unavailable_reason() if rt.asr is not None else "no ASR model"
                raise PipelineError(
                    ErrorCode.MODEL_UNAVAILABLE, f"spoken questions need ASR: {why}", True
                )
            speech = options.speech
            if options.question_forms and rt.questions and not (speech.grammar or speech.hotwords):
                speech = replace(speech, grammar=rt.questions)
            self.asr = rt.asr.create()
            effective["speech"] = self.asr.begin(speech)
            effective["question_forms"] = len(rt.questions) if speech is not options.speech else 0
        return effective

    def step(self, frame: Any) -> list[ServerEvent]:
        if self._ended:
            raise PipelineError(ErrorCode.BAD_MESSAGE, "the session has ended")
        if isinstance(frame, ImageData):
            self.set_image(frame.data)
            return []
        if isinstance(frame, Question):
            return [self.ask(frame.text, frame.id)]
        if isinstance(frame, (AudioChunk, Flush)) and self.asr is not None:
            return self._spoken(self.asr.step(frame))
        if isinstance(frame, Flush):
            return []
        raise PipelineError(
            ErrorCode.BAD_MESSAGE, f"a vqa session does not take {type(frame).__name__} frames"
        )

    def set_image(self, data: bytes) -> None:
        """Make ``data`` (JPEG/PNG/WebP bytes) the image questions are about."""
        rt = self.runtime
        t0 = time.perf_counter()
        pixels = rt.encode_image(data)  # bad images raise before the old one is dropped
        digest = hashlib.blake2b(pixels.tobytes(), digest_size=16).digest()
        handle = rt.cache.acquire(digest, lambda: rt.image_kv(pixels))
        if self.handle is not None:
            rt.cache.release(self.handle)
        self.handle = handle
        self.image_ms = (time.perf_counter() - t0) * 1000.0

    def ask(self, text: str, qid: str = "q", transcript: str | None = None) -> Answer:
        if self.handle is None:
            raise PipelineError(ErrorCode.NO_IMAGE, "send an image before asking about it")
        t0 = time.perf_counter()
        answer, score = self.runtime.answer(self.runtime.cache.read(self.handle), text)
        ms = (time.perf_counter() - t0) * 1000.0
        return Answer(qid, answer, round(score, 4), round(ms, 2), transcript)

    def _spoken(self, events: list[ServerEvent]) -> list[ServerEvent]:
        """ASR events pass through; each non-empty final is asked as a question."""
        out: list[ServerEvent] = []
        for event in events:
            out.append(event)
            if isinstance(event, Final) and event.text:
                qid = f"spoken-{event.segment}"
                try:
                    out.append(self.ask(event.text, qid, transcript=event.text))
                except PipelineError as exc:  # e.g. no image yet: say so, keep listening
                    out.append(Error(exc.code, f"{qid} ({event.text!r}): {exc.message}"))
        return out

    def end(self) -> list[ServerEvent]:
        events: list[ServerEvent] = []
        if self._ended:
            return events
        try:
            if self.asr is not None:
                events = self._spoken(self.asr.end())
        finally:
            if self.handle is not None:
                self.runtime.cache.release(self.handle)
                self.handle = None
            self._ended = True
        return events


def load(image: Path, fuser: Path, name: str = "vqa", asr: Any = None, **config: Any) -> VqaRuntime:
    """The registry's entry point: load once; the runtime, called, makes a session pipeline.

    ``asr`` is the ASR pipeline factory used for spoken questions."""
    return VqaRuntime(image, fuser, replace(VqaConfig(), **config), name=name, asr=asr)
