"""Batch transcription: many audio files, one JSON line each, resumable.

``dsstream transcribe-batch INPUTS... -o OUT`` (and :func:`run_local`) writes
``OUT/transcripts.jsonl``: one record per file, in the order files finish::

    {"path": "/abs/file.flac", "duration": 12.48, "model": "sample-asr",
     "text": "...", "segments": [{"start": 0.31, "end": 5.2, "text": "...",
     "words": [{"word": "...", "start": 0.31, "end": 0.6, "confidence": 0.93}]}],
     "error": null}

A file that cannot be transcribed gets a record with ``"error": {"code",
"message"}`` (codes in :data:`ERROR_CODES`) and the run goes on.  A rerun
skips every file the output already has, so an interrupted run resumes where
it stopped (``retry_errors`` also redoes the failed ones; the last record of a
path is the one that counts).  Optional SRT/VTT files go under ``OUT/captions``.

Every file is one fresh streaming session through the same pipeline as the
server's (:func:`dsstream.local.transcribe_pieces`), fed in
:data:`~dsstream.local.PIECE_SECONDS` pieces, so a record depends only on the
file and the options: one process, the process pool here and Ray Data
(:mod:`dsstream.batch_ray`) write the same records.

The pieces are pure (inputs, ledger, records); :class:`Recognizer` runs the
model; :class:`Output` owns the files; :func:`run_local` schedules.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np

from dsstream.local import PIECE_SECONDS, Transcript, file_pieces, transcribe_pieces

__all__ = [
    "AUDIO_SUFFIXES",
    "MANIFEST_SUFFIXES",
    "ERROR_CODES",
    "BatchConfig",
    "BatchSummary",
    "FileError",
    "FileResult",
    "Output",
    "Recognizer",
    "collect_inputs",
    "common_root",
    "duration_text",
    "read_ledger",
    "pending",
    "probe",
    "run_local",
]

# What a folder is searched for (a file named on the command line is tried
# whatever its name): the containers soundfile (libsndfile 1.2) reads.
AUDIO_SUFFIXES = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif",
    ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64", ".sph", ".nist",
})  # fmt: skip
# An input with one of these suffixes lists files: one path per line (relative
# to the manifest's folder), or a TSV whose first column is the path; blank
# lines and lines starting with '#' are skipped.
MANIFEST_SUFFIXES = frozenset({".txt", ".lst", ".list", ".tsv"})

ERROR_CODES = {
    "not_found": "the file does not exist",
    "unreadable": "not audio that soundfile can decode",
    "empty": "no samples",
    "too_long": "longer than the run's limit (max_seconds)",
    "bad_audio": "the pipeline refused the audio (e.g. a sample rate it cannot resample)",
    "crashed": "the worker process died on this file twice",
    "failed": "recognition raised an error",
}

LEDGER = "transcripts.jsonl"


@dataclass(frozen=True)
class BatchConfig:
    """What every file of a run is recognized with.

    ``options``: an ASR start message's options (hotwords, decoder_mode,
    split_channels, nbest...); ``captions``: any of "srt", "vtt";
    ``max_seconds``: longer files are recorded as ``too_long`` (a limit on one
    file's work and memory); ``samples_dir``: the models (default: the
    package's samples)."""

    options: Mapping[str, Any] = field(default_factory=dict)
    captions: tuple[str, ...] = ()
    max_seconds: float = 4 * 3600.0
    samples_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.captions) - {"srt", "vtt"}
        if unknown:
            raise ValueError(f"captions are 'srt' or 'vtt', not {sorted(unknown)}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")


class FileError(Exception):
    """A file that cannot be transcribed; ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, message: str, duration: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.duration = code, message, duration


@dataclass(frozen=True)
class FileResult:
    """One file's outcome: its JSONL record, its captions by format, and the
    seconds of audio it held (0 when unknown), for the progress figures."""

    record: dict[str, Any]
    captions: dict[str, str]
    seconds: float

    @property
    def failed(self) -> bool:
        return self.record.get("error") is not None

    def to_json(self) -> str:
        return json.dumps(
            {"record": self.record, "captions": self.captions, "seconds": self.seconds}
        )

    @staticmethod
    def from_json(text: str) -> FileResult:
        data = json.loads(text)
        return FileResult(data["record"], data["captions"], data["seconds"])


# -- inputs and ledger (pure) -------------------------------------------------------


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files to transcribe from files, folders (searched recursively for
    :data:`AUDIO_SUFFIXES`), glob patterns and manifests; absolute, each once,
    in the order given (a folder's and a glob's files sorted).

    Raises ``ValueError`` for an input that names nothing (a missing path, a
    glob that matches nothing, an empty folder), so a typo is not a silent
    empty run."""
    found: dict[Path, None] = {}
    for item in inputs:
        for path in _expand(str(item)):
            found.setdefault(path.resolve(), None)
    return list(found)


def _expand(item: str) -> list[Path]:
    path = Path(item)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_audio(p))
        if not files:
            raise ValueError(f"{item}: no audio files in this folder")
        return files
    if path.is_file():
        return _manifest(path) if path.suffix.lower() in MANIFEST_SUFFIXES else [path]
    if any(ch in item for ch in "*?["):
        files = sorted(Path(p) for p in glob(item, recursive=True) if Path(p).is_file())
        if not files:
            raise ValueError(f"{item}: the pattern matches no file")
        return files
    raise ValueError(f"{item}: no such file or folder")


def _is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_SUFFIXES


def _manifest(path: Path) -> list[Path]:
    files = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = line.split("\t", 1)[0].strip()
        if entry and not entry.startswith("#"):
            p = Path(entry)
            files.append(p if p.is_absolute() else path.parent / p)
    if not files:
        raise ValueError(f"{path}: the manifest lists no file")
    return files


def read_ledger(path: Path) -> dict[str, dict[str, Any]]:
    """The records already written, by path (the last one of a path wins).  A
    line cut short by a crash is ignored."""
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("path"), str):
                records[record["path"]] = record
    return records


def pending(
    paths: Iterable[Path], ledger: Mapping[str, Mapping[str, Any]], retry_errors: bool = False
) -> list[Path]:
    """The files still to do: those without a record (or, with ``retry_errors``,
    whose record is an error)."""
    todo = []
    for path in paths:
        record = ledger.get(str(path))
        if record is None or (retry_errors and record.get("error") is not None):
            todo.append(path)
    return todo


# -- one file ----------------------------------------------------------------------


def probe(path: Path, max_seconds: float) -> tuple[float, int, int]:
    """``(duration s, sample rate, channels)`` of a file, or :class:`FileError`."""
    import soundfile as sf

    if not path.is_file():
        raise FileError("not_found", f"{path}: no such file")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise FileError("unreadable", f"{path}: {exc}") from None
    if info.frames <= 0:
        raise FileError("empty", f"{path}: no samples", 0.0)
    duration = info.frames / info.samplerate
    if duration > max_seconds:
        raise FileError(
            "too_long", f"{path}: {duration:.0f} s is over the limit of {max_seconds:.0f} s",
            round(duration, 3),
        )  # fmt: skip
    return duration, int(info.samplerate), int(info.channels)


def read_pieces(path: Path, mono: bool) -> Iterator[np.ndarray]:
    """The file in :data:`PIECE_SECONDS` pieces, float32 ``[n]`` (channels
    averaged) or ``[n, channels]``: what :func:`dsstream.local.transcribe` cuts
    from the whole array, without holding it."""
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        yield from file_pieces(f, mono)


def split_pieces(samples: np.ndarray, rate: int) -> Iterator[np.ndarray]:
    """An array decoded whole (Ray's read step) cut as :func:`read_pieces` cuts."""
    size = rate * PIECE_SECONDS
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


class Recognizer:
    """The models, loaded once (per process or per Ray actor), and one file at a time."""

    def __init__(self, config: BatchConfig) -> None:
        from dsstream.pipelines.defaults import default_registry

        self.config = config
        self.registry = default_registry(Path(config.samples_dir) if config.samples_dir else None)
        self.model = self.registry.resolve("asr", config.options.get("model")).name

    @property
    def split(self) -> bool:
        return bool(self.config.options.get("split_channels"))

    def file(self, path: Path) -> FileResult:
        """Read ``path`` piece by piece and transcribe it; never raises."""
        try:
            duration, rate, channels = probe(path, self.config.max_seconds)
            pieces = read_pieces(path, mono=not self.split)
            return self._recognize(path, pieces, rate, channels, duration)
        except FileError as exc:
            return self.error(path, exc)

    def samples(self, path: Path, samples: np.ndarray, rate: int, duration: float) -> FileResult:
        """Transcribe a file already decoded (``[n]`` or ``[n, channels]``)."""
        channels = samples.shape[1] if samples.ndim == 2 else 1
        try:
            return self._recognize(path, split_pieces(samples, rate), rate, channels, duration)
        except FileError as exc:
            return self.error(path, exc)

    def _recognize(
        self, path: Path, pieces: Iterable[np.ndarray], rate: int, channels: int, duration: float
    ) -> FileResult:
        from dsstream.pipelines.base import PipelineError

        options = dict(self.config.options)
        if self.split:
            if channels < 2:
                raise FileError("bad_audio", f"{path}: split_channels needs several channels")
            options["channels"] = channels
        try:
            transcript = transcribe_pieces(pieces, rate, self.registry, **options)
        except PipelineError as exc:
            raise FileError("bad_audio", f"{path}: {exc}", round(duration, 3)) from None
        except Exception as exc:  # one file's failure must not end the run
            raise FileError("failed", f"{path}: {type(exc).__name__}: {exc}", round(duration, 3))
        return FileResult(
            _record(path, self.model, duration, transcript),
            _captions(transcript, self.config.captions),
            duration,
        )

    def error(self, path: Path, exc: FileError) -> FileResult:
        record: dict[str, Any] = {
            "path": str(path), "duration": exc.duration, "model": self.model, "text": None,
            "segments": [], "error": {"code": exc.code, "message": exc.message},
        }  # fmt: skip
        return FileResult(record, {}, exc.duration or 0.0)


def _record(path: Path, model: str, duration: float, transcript: Transcript) -> dict[str, Any]:
    segments = []
    for seg in transcript.segments:
        item: dict[str, Any] = {
            "start": round(seg.start, 3), "end": round(seg.end, 3), "text": seg.text,
            "words": [
                {"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
                 "confidence": round(w.confidence, 3)}
                for w in seg.words
            ],
        }  # fmt: skip
        if seg.channel is not None:
            item["channel"] = seg.channel
        if len(seg.nbest) > 1:
            item["nbest"] = [{"text": h.text, "score": round(h.score, 3)} for h in seg.nbest]
        segments.append(item)
    return {
        "path": str(path), "duration": round(duration, 3), "model": model,
        "text": transcript.text, "segments": segments, "error": None,
    }  # fmt: skip


def _captions(transcript: Transcript, formats: Sequence[str]) -> dict[str, str]:
    from dsstream.captions import to_srt, to_vtt

    make = {"srt": to_srt, "vtt": to_vtt}
    return {fmt: make[fmt](transcript.segments) for fmt in formats}


# -- output -------------------------------------------------------------------------


class Output:
    """``OUT/transcripts.jsonl`` (appended, one flushed line per file) and
    ``OUT/captions/<path relative to root>.<fmt>``.

    A line cut short by a crash is dropped when the ledger is opened again, so
    appends always start on a fresh line."""

    def __init__(self, out_dir: Path, root: Path | None = None) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ledger = self.dir / LEDGER
        self.root = root
        _drop_partial_line(self.ledger)
        self._file = self.ledger.open("a", encoding="utf-8")

    def done(self) -> dict[str, dict[str, Any]]:
        return read_ledger(self.ledger)

    def write(self, result: FileResult) -> None:
        # Captions first: a record in the ledger means the file is complete.
        for fmt, text in result.captions.items():
            target = self.caption_path(Path(result.record["path"]), fmt)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        self._file.write(json.dumps(result.record, ensure_ascii=False) + "\n")
        self._file.flush()

    def caption_path(self, path: Path, fmt: str) -> Path:
        try:
            rel = path.relative_to(self.root) if self.root else Path(path.name)
        except ValueError:
            rel = Path(path.name)
        return self.dir / "captions" / rel.with_suffix(f".{fmt}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_partial_line(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def common_root(paths: Sequence[Path]) -> Path | None:
    """The deepest folder holding every path (captions mirror the tree below it)."""
    if not paths:
        return None
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


# -- scheduling ---------------------------------------------------------------------


@dataclass
class BatchSummary:
    """A run's totals; ``x_realtime`` is seconds of audio per second of wall time."""

    files: int = 0
    failed: int = 0
    skipped: int = 0
    audio_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    wall_seconds: float = 0.0

    def add(self, result: FileResult) -> None:
        self.files += 1
        self.failed += int(result.failed)
        self.audio_seconds += result.seconds
        self.wall_seconds = time.monotonic() - self.started

    @property
    def x_realtime(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.files} files done ({self.failed} failed), {self.skipped} done before; "
            f"{duration_text(self.audio_seconds)} of audio in {self.wall_seconds:.1f} s: "
            f"{self.x_realtime:.1f}x real time"
        )


def duration_text(seconds: float) -> str:
    """Hours of audio for people: "2.31 h", or minutes under an hour."""
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


Report = Callable[[FileResult, BatchSummary], None]

_worker: Recognizer | None = None


def _init_worker(config: BatchConfig) -> None:
    global _worker
    _worker = Recognizer(config)


def _work(path: str) -> str:
    assert _worker is not None, "the pool's initializer loads the recognizer"
    return _worker.file(Path(path)).to_json()


def run_local(
    paths: Sequence[Path],
    output: Output,
    config: BatchConfig,
    jobs: int = 1,
    report: Report | None = None,
) -> BatchSummary:
    """Transcribe ``paths`` into ``output`` in this process (``jobs=1``) or in a
    pool of ``jobs`` processes, each loading the models once; records are
    written as files finish.  A worker that dies (e.g. killed for memory) is
    replaced and its files tried again; a file present at two deaths is
    recorded as ``crashed``."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    summary = BatchSummary()

    def finish(result: FileResult) -> None:
        output.write(result)
        summary.add(result)
        if report is not None:
            report(result, summary)

    # Models load at a file's first session, so this one costs nothing more
    # where the pool's workers do the work: it writes their crash records.
    recognizer = Recognizer(config)
    if jobs == 1:
        for path in paths:
            finish(recognizer.file(path))
    else:
        _run_pool(list(paths), recognizer, jobs, finish)
    return summary


def _run_pool(
    paths: list[Path],
    recognizer: Recognizer,
    jobs: int,
    finish: Callable[[FileResult], None],
    work: Callable[[str], str] = _work,  # a module-level function (pickled by name)
) -> None:
    config = recognizer.config
    todo = list(reversed(paths))  # popped from the end: the given order
    deaths: dict[Path, int] = {}
    while todo:
        # spawn: a fresh interpreter per worker (no forked ONNX Runtime threads).
        pool = ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(config,),
        )  # fmt: skip
        running: dict[Future[str], Path] = {}
        try:
            while todo or running:
                while todo and len(running) < 2 * jobs:  # a few queued per worker
                    path = todo.pop()
                    running[pool.submit(work, str(path))] = path
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    result = FileResult.from_json(future.result())  # raises if the pool broke
                    del running[future]
                    finish(result)
        except BrokenProcessPool:
            for path in running.values():
                deaths[path] = deaths.get(path, 0) + 1
                if deaths[path] >= 2:
                    error = FileError("crashed", f"{path}: the worker process died on it twice")
                    finish(recognizer.error(path, error))
                else:
                    todo.append(path)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
