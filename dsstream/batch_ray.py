"""Batch transcription on Ray Data: the same records as :func:`dsstream.batch.run_local`,
from a Ray cluster (``pip install 'dsstream[ray]'``).

Files are read and decoded in parallel Ray tasks (:func:`_decode`), and
recognized in an actor pool, one :class:`dsstream.batch.Recognizer` (the models,
loaded once) per actor; records reach the output as files finish, so a run
that stops resumes like a local one.

Connect first with :func:`dsstream.ray_cluster.connect` (a private loopback
cluster, or a running one).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsstream.batch import (
    BatchConfig,
    BatchSummary,
    FileError,
    FileResult,
    Output,
    Recognizer,
    Report,
    probe,
)

__all__ = ["run_ray"]


def _decode(row: dict[str, Any], config: BatchConfig) -> dict[str, Any]:
    """One file read and decoded (a Ray task): float32 PCM bytes, or its error."""
    from dsstream.audio import load_audio

    path = Path(row["path"])
    mono = not config.options.get("split_channels")
    out: dict[str, Any] = {"path": str(path), "pcm": b"", "rate": 0, "channels": 0,
                           "duration": 0.0, "error": ""}  # fmt: skip
    try:
        duration, _, _ = probe(path, config.max_seconds)
        samples, rate = load_audio(path, mono=mono)
    except FileError as exc:
        out["error"] = json.dumps([exc.code, exc.message, exc.duration])
        return out
    except ValueError as exc:  # probed fine, then failed to decode
        out["error"] = json.dumps(["unreadable", str(exc), None])
        return out
    channels = samples.shape[1] if samples.ndim == 2 else 1
    out.update(pcm=samples.tobytes(), rate=rate, channels=channels, duration=duration)
    return out


class _Transcriber:
    """A Ray Data actor: loads the models once, then recognizes decoded files."""

    def __init__(self, config: BatchConfig) -> None:
        self.recognizer = Recognizer(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for i, path in enumerate(batch["path"]):
            results.append(self._one(Path(str(path)), {k: v[i] for k, v in batch.items()}))
        return {"result": np.array(results, dtype=object)}

    def _one(self, path: Path, row: dict[str, Any]) -> str:
        if row["error"]:
            code, message, duration = json.loads(row["error"])
            return self.recognizer.error(path, FileError(code, message, duration)).to_json()
        samples = np.frombuffer(row["pcm"], dtype=np.float32)
        if int(row["channels"]) > 1:
            samples = samples.reshape(-1, int(row["channels"]))
        result = self.recognizer.samples(path, samples, int(row["rate"]), float(row["duration"]))
        return result.to_json()


# CPUs each read task asks for.  Reading is light next to recognition: a
# quarter CPU per task lets reads run ahead on the cores the actors leave.
READ_CPUS = 0.25


def _check_cpus(actor_cpus: float, cluster_cpus: float) -> None:
    """Actors hold their CPUs for the whole run; reads need some left, or the
    run would wait for ever."""
    if actor_cpus + READ_CPUS > cluster_cpus:
        raise ValueError(
            f"the actors take {actor_cpus:g} of the cluster's {cluster_cpus:g} CPUs: leave at "
            f"least {READ_CPUS:g} for reading files (fewer --actors or --cpus-per-actor)"
        )


def run_ray(
    paths: Sequence[Path],
    output: Output,
    config: BatchConfig,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    report: Report | None = None,
) -> BatchSummary:
    """Transcribe ``paths`` into ``output`` on the connected Ray cluster
    (:func:`dsstream.ray_cluster.connect` first): decoding in tasks, recognition in ``actors``
    actors of ``cpus_per_actor`` CPUs each.  Records are written here, in the
    driver, as they arrive."""
    if actors < 1:
        raise ValueError(f"actors must be at least 1, got {actors}")
    if not cpus_per_actor > 0:
        raise ValueError(f"cpus_per_actor must be > 0, got {cpus_per_actor}")
    import ray.data

    summary = BatchSummary()
    if not paths:
        return summary
    _check_cpus(actors * cpus_per_actor, float(ray.cluster_resources().get("CPU", 0)))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller shows one for the whole run
    context.execution_options.preserve_order = False  # records as files finish
    items = [{"path": str(p)} for p in paths]
    ds: Any = ray.data.from_items(items, override_num_blocks=min(len(items), 1000))
    ds = ds.map(_decode, fn_kwargs={"config": config}, num_cpus=READ_CPUS)
    ds = ds.map_batches(
        _Transcriber, fn_constructor_kwargs={"config": config}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
    )  # fmt: skip
    for row in ds.iter_rows():
        result = FileResult.from_json(row["result"])
        output.write(result)
        summary.add(result)
        if report is not None:
            report(result, summary)
    return summary
