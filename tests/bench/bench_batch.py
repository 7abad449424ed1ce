"""Batch transcription throughput: one process, the local process pool, and
Ray Data on a private local cluster, on the same files (``dsstream
transcribe-batch``, each run a fresh CLI process: start-up and model loading
included, as a user runs it).

The set: LibriSpeech speaker 5652 from ../shared/data/speech (130 utterances,
0.42 h; a held-out test speaker, never trained on).  Printed per mode: wall
time, x real time (audio seconds per wall second) and the ratio to one
process; every mode must write the same records.

    pytest tests/bench/bench_batch.py -s -o python_files='bench_*.py'
    DSSTREAM_BENCH_BATCH_FILES=40 for a shorter run
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.extras import available

ROOT = Path(__file__).resolve().parents[2]
SPEAKER = ROOT.parent / "shared" / "data" / "speech" / "librispeech-100-sample"
LIMIT = int(os.environ.get("DSSTREAM_BENCH_BATCH_FILES", "0")) or None
MODES = {
    "one process": [],
    "local pool, --jobs 2": ["--jobs", "2"],
    "Ray Data, 1 actor": ["--ray", "--actors", "1"],
    "Ray Data, 2 actors of 0.75 CPU": ["--ray", "--actors", "2", "--cpus-per-actor", "0.75"],
}

pytestmark = pytest.mark.skipif(
    not SPEAKER.is_dir(), reason="needs ../shared/data/speech/librispeech-100-sample"
)


def _run(manifest: Path, out: Path, flags: list[str]) -> float:
    cmd = [sys.executable, "-m", "dsstream.cli", "transcribe-batch", "--no-progress",
           str(manifest), "-o", str(out), *flags]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-2000:]
    return wall


def test_batch_throughput(tmp_path):
    files = sorted(SPEAKER.glob("5652-*.opus"))[:LIMIT]
    manifest = tmp_path / "files.txt"
    manifest.write_text("".join(f"{f}\n" for f in files))
    import soundfile as sf

    audio = sum(sf.info(str(f)).duration for f in files)
    rows, ledgers = [], {}
    for name, flags in MODES.items():
        if "--ray" in flags and not available("ray"):
            continue
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        wall = _run(manifest, out, flags)
        rows.append((name, wall))
        ledgers[name] = sorted((out / "transcripts.jsonl").read_text().splitlines())
    one = rows[0][1]
    print(f"\nBatch transcription: {len(files)} files, {audio / 3600:.2f} h "
          f"(LibriSpeech speaker 5652, Opus), fresh CLI process per run, machine: "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("| mode | wall s | x real time | vs one process |")
    print("|---|---:|---:|---:|")
    for name, wall in rows:
        print(f"| {name} | {wall:.1f} | {audio / wall:.1f} | {one / wall:.2f}x |")
    first = next(iter(ledgers.values()))
    assert all(lines == first for lines in ledgers.values()), "modes wrote different records"
    print("every mode wrote the same records")
