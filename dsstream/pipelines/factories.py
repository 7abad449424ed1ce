"""Typed factories of the built-in pipelines: model files and a config in,
a loaded runtime (once per process) and a pipeline per session out.

``AsrFactory(name, model, lm, AsrConfig(beam_width=64))`` and
``VqaFactory(name, image, fuser, VqaConfig(), asr=...)``: every setting is a
typed field, so it reaches the runtime in one hop a reader can follow, and
"VQA needs ASR" (for spoken questions) is a field, not an entry in a dict.
The runtimes' modules (torch, ONNX Runtime) load with the first session.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from dsstream.pipelines.base import LoadOnce, Pipeline
from dsstream.pipelines.config import AsrConfig, VqaConfig

__all__ = ["AsrFactory", "VqaFactory"]


@dataclass
class AsrFactory(LoadOnce):
    """Streaming ASR (dsstream.pipelines.asr) from an acoustic model artifact,
    an optional n-gram LM and an optional punctuation model."""

    name: str
    model: Path
    lm: Path | None = None
    config: AsrConfig = field(default_factory=AsrConfig)
    hint: str = ""  # how to obtain the missing files
    punct: Path | None = None  # sessions' ``punctuate`` needs it
    task: str = field(default="asr", init=False)
    _make: Callable[[], Pipeline] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def files(self) -> Mapping[str, Path | None]:  # type: ignore[override]
        return {"model": self.model, "lm": self.lm, "punct": self.punct}

    def _module(self) -> str:
        return "dsstream.pipelines.asr"

    def _load(self) -> Callable[[], Pipeline]:
        from dsstream.pipelines.asr import AsrRuntime

        return AsrRuntime(self.model, self.lm, self.config, name=self.name, punct=self.punct)

    def reloaded(self, copies: Mapping[int, Any]) -> AsrFactory:
        """An unloaded copy that reads its files again on its first ``create``."""
        return replace(self)


@dataclass
class VqaFactory(LoadOnce):
    """VQA (dsstream.pipelines.vqa) from its image and fuser stages; with
    ``asr``, questions may also be spoken."""

    name: str
    image: Path
    fuser: Path
    config: VqaConfig = field(default_factory=VqaConfig)
    asr: AsrFactory | None = None  # recognizes spoken questions
    hint: str = ""
    task: str = field(default="vqa", init=False)
    _make: Callable[[], Pipeline] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def files(self) -> Mapping[str, Path | None]:  # type: ignore[override]
        return {"image": self.image, "fuser": self.fuser}

    def _module(self) -> str:
        return "dsstream.pipelines.vqa"

    def _load(self) -> Callable[[], Pipeline]:
        from dsstream.pipelines.vqa import VqaRuntime

        return VqaRuntime(self.image, self.fuser, self.config, name=self.name, asr=self.asr)

    def reloaded(self, copies: Mapping[int, Any]) -> VqaFactory:
        """An unloaded copy; its ASR is the reloaded registry's copy (by ``id``
        in ``copies``), so both answer from the same new models."""
        return replace(self, asr=copies.get(id(self.asr), self.asr))
