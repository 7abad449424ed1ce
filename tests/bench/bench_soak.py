"""Soak: N real-time streams for a set time, every final checked, memory watched.

The server (``dsstream serve`` with the shipped model and LM) runs in its own
process.  Each of N streams loops: start a session, send the clip at
real-time pace in 100 ms frames, end, compare its finals with the same clip
streamed alone (the reference, taken first), start again.  The server's RSS
is sampled every 10 s.  Reported: sessions, finals that differ from the
reference (must be none), and RSS at the start, after warm-up and at the
end, with its growth per hour fitted over the second half of the run (a
leak grows there; warm-up, arenas and caches, does not).

    DSSTREAM_SOAK_STREAMS=24 DSSTREAM_SOAK_MINUTES=30 \\
        pytest tests/bench/bench_soak.py -s -o python_files='bench_*.py'
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from bench_asr_load import _free_port, start_server
from websockets.asyncio.client import connect

from dsstream.protocol import Final, parse_server_event

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "asr"
STREAMS = int(os.environ.get("DSSTREAM_SOAK_STREAMS", "24"))
MINUTES = float(os.environ.get("DSSTREAM_SOAK_MINUTES", "5"))
REPORT = os.environ.get("DSSTREAM_SOAK_JSON")  # write the results here too
FRAME_S, RATE = 0.1, 16000

pytestmark = pytest.mark.skipif(
    not (SAMPLES / "model.ds").exists(), reason="the sample ASR model is not in samples/asr"
)


def _pcm() -> bytes:
    x, rate = sf.read(SAMPLES / "clips" / "LJ001-0011.flac", dtype="float32")
    assert rate == RATE
    x = np.concatenate([x, np.zeros(RATE, np.float32)])  # a second of silence: an endpoint
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _session(url: str, pcm: bytes, realtime: bool) -> tuple[str, ...]:
    """One session's final texts."""
    step = int(FRAME_S * RATE) * 2
    async with connect(url, compression=None, max_queue=None) as ws:
        await ws.send(json.dumps({"type": "start", "task": "asr", "sample_rate": RATE}))
        await ws.recv()
        finals: list[str] = []

        async def reader() -> None:
            async for message in ws:
                event = parse_server_event(message)  # type: ignore[arg-type]
                if isinstance(event, Final):
                    finals.append(event.text)
                elif event.type == "ended":
                    return

        task = asyncio.create_task(reader())
        t0 = time.monotonic()
        for k in range(0, len(pcm), step):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + (k // step) * FRAME_S - time.monotonic()))
            await ws.send(pcm[k : k + step])
        await ws.send('{"type": "end"}')
        await task
        return tuple(finals)


async def _soak(url: str, pcm: bytes, pid: int) -> dict:
    reference = await _session(url, pcm, realtime=False)
    deadline = time.monotonic() + MINUTES * 60
    counts = {"sessions": 0, "differ": 0, "failed": 0}
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()

    async def stream(i: int) -> None:
        await asyncio.sleep(i * FRAME_S * 10 / max(STREAMS, 1))  # spread the starts
        while time.monotonic() < deadline:
            try:
                finals = await _session(url, pcm, realtime=True)
            except Exception:
                counts["failed"] += 1
                continue
            counts["sessions"] += 1
            counts["differ"] += finals != reference

    async def sample() -> None:
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - t0, _rss_mb(pid)))
            await asyncio.sleep(10)

    await asyncio.gather(sample(), *(stream(i) for i in range(STREAMS)))
    times, mb = np.array([t for t, _ in rss]), np.array([m for _, m in rss])
    half = times >= times[-1] / 2
    slope = float(np.polyfit(times[half], mb[half], 1)[0]) * 3600 if half.sum() > 2 else 0.0
    at = lambda s: float(mb[np.searchsorted(times, min(s, times[-1]))])  # noqa: E731
    return {
        "streams": STREAMS, "minutes": MINUTES, **counts, "reference": list(reference),
        "rss_start_mb": float(mb[0]), "rss_1min_mb": at(60), "rss_5min_mb": at(300),
        "rss_end_mb": float(mb[-1]), "rss_growth_mb_per_hour_second_half": slope,
        "rss_samples": rss,
    }  # fmt: skip


def test_soak_realtime_streams():
    port = _free_port()
    server = start_server(port)
    try:
        result = asyncio.run(_soak(f"ws://127.0.0.1:{port}/v1/stream", _pcm(), server.pid))
    finally:
        server.terminate()
        server.wait(30)
    print(f"\nsoak: {STREAMS} real-time streams for {MINUTES:g} min: {result['sessions']} "
          f"sessions, {result['differ']} with finals unlike the clip alone, "
          f"{result['failed']} failed")  # fmt: skip
    print(f"server RSS: start {result['rss_start_mb']:.0f} MB, 1 min {result['rss_1min_mb']:.0f},"
          f" 5 min {result['rss_5min_mb']:.0f}, end {result['rss_end_mb']:.0f}; growth over the"
          f" second half {result['rss_growth_mb_per_hour_second_half']:+.1f} MB/hour")  # fmt: skip
    if REPORT:
        Path(REPORT).write_text(json.dumps(result, indent=1))
    assert result["differ"] == 0 and result["failed"] == 0 and result["sessions"] > 0
