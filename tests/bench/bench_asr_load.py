"""Streaming ASR under load: N concurrent real-time WebSocket streams.

The server (``dsstream serve`` with the shipped model and LM) runs in its own
process; this process is the load generator.  Each stream sends 100 ms
``pcm_s16le`` frames at real-time pace, looping the shipped clips with a
second of silence after each (so endpoints fire), for ``SECONDS`` of audio,
then ``end``.  Measured per N:

- partial latency: from sending the frame that completes the audio a partial
  covers (its ``time``) to receiving that partial (p50/p95);
- final latency: from sending ``end`` to receiving the last ``final``;
- whether every stream kept up: its sender never fell behind the audio clock
  by more than 0.5 s (backpressure) and its final came within 1.5 s of ``end``;
- the server's CPU use (cores, from /proc) and the generator's own.

At the largest N, the server's /metrics split its CPU time by stage (resample,
VAD, frontend, encoder forward passes, decoder), the rest being the protocol,
websockets, the event loop and thread hand-offs.

    make bench   (or: pytest tests/bench/bench_asr_load.py -s -o python_files='bench_*.py')
    DSSTREAM_BENCH_STREAMS=1,8,32 DSSTREAM_BENCH_SECONDS=10 to shorten;
    DSSTREAM_BENCH_SERVE_ARGS="--threads 16 --beam 8" to try server settings;
    DSSTREAM_BENCH_RATE=8000 for telephone-rate callers (resampled by the server).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect

from dsstream.protocol import Final, Partial, parse_server_event

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "asr"
STREAMS = [
    int(n) for n in os.environ.get("DSSTREAM_BENCH_STREAMS", "1,8,32,64,96,112,128").split(",")
]
SECONDS = float(os.environ.get("DSSTREAM_BENCH_SECONDS", "20"))
SERVE_ARGS = os.environ.get("DSSTREAM_BENCH_SERVE_ARGS", "").split()  # default: as `make run`
FRAME_S = 0.1
RATE = int(os.environ.get("DSSTREAM_BENCH_RATE", "16000"))  # 8000: telephone callers

pytestmark = pytest.mark.skipif(
    not (SAMPLES / "model.ds").exists(), reason="the sample ASR model is not in samples/asr"
)


def _audio() -> np.ndarray:
    parts = []
    for name in ("LJ001-0011.flac", "heldout-espeak-david.flac"):
        x, rate = sf.read(SAMPLES / "clips" / name, dtype="float32")
        if rate != RATE:
            import torch
            import torchaudio

            x = torchaudio.functional.resample(torch.from_numpy(x), rate, RATE).numpy()
        parts += [x, np.zeros(RATE, np.float32)]
    loop = np.concatenate(parts)
    reps = math.ceil(SECONDS * RATE / len(loop))
    return np.tile(loop, reps)[: int(SECONDS * RATE)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, *args: str) -> subprocess.Popen:
    """``dsstream serve`` (the default models) in its own process, once it serves."""
    server = subprocess.Popen(
        [sys.executable, "-m", "dsstream.cli", "serve", "--port", str(port),
         "--max-sessions", "512", "--log-level", "WARNING", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    for line in server.stdout:  # type: ignore[union-attr]
        if "serving" in line:
            break
    return server


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_s(pid: int) -> float:
    """CPU seconds of the server and its live worker processes (serve --workers)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = _stat(int(proc.name))
            except OSError:  # gone meanwhile
                continue
            if int(proc.name) == pid or int(fields[1]) == pid:
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(
            r"^(dsstream_(?:asr|vad)_\w+|engine_compute_(?:cpu_)?seconds_total)(\{[^}]*\})? (\S+)$",
            line,
        )
        if m:
            labels = re.sub(r',?worker="\d+"', "", m.group(2) or "").replace("{,", "{")
            key = m.group(1) + ("" if labels == "{}" else labels)
            out[key] = out.get(key, 0.0) + float(m.group(3))  # summed over workers
    return out


class Stream:
    def __init__(self) -> None:
        self.partial_ms: list[float] = []
        self.final_ms = math.nan
        self.max_lag_s = 0.0
        self.finals = 0


async def _stream(url: str, pcm: bytes, delay: float, out: Stream) -> None:
    await asyncio.sleep(delay)
    frame_bytes = int(FRAME_S * RATE) * 2
    frames = [pcm[i : i + frame_bytes] for i in range(0, len(pcm), frame_bytes)]
    sent_at = [math.nan] * len(frames)
    loop = asyncio.get_running_loop()
    async with connect(url, compression=None, max_queue=None) as ws:
        await ws.send(f'{{"type":"start","task":"asr","sample_rate":{RATE}}}')
        await ws.recv()
        end_sent = [math.nan]

        async def reader() -> None:
            async for message in ws:
                now = loop.time()
                event = parse_server_event(message)  # type: ignore[arg-type]
                if isinstance(event, Partial) and event.time is not None:
                    k = min(len(frames) - 1, max(0, math.ceil(event.time / FRAME_S - 1e-6) - 1))
                    out.partial_ms.append((now - sent_at[k]) * 1000.0)
                elif isinstance(event, Final):
                    out.finals += 1
                    if not math.isnan(end_sent[0]):
                        out.final_ms = (now - end_sent[0]) * 1000.0
                elif event.type == "ended":
                    return

        task = asyncio.create_task(reader())
        t0 = loop.time()
        for k, frame in enumerate(frames):
            await asyncio.sleep(max(0.0, t0 + k * FRAME_S - loop.time()))
            await ws.send(frame)
            sent_at[k] = loop.time()
            out.max_lag_s = max(out.max_lag_s, sent_at[k] - (t0 + (k + 1) * FRAME_S))
        await asyncio.sleep(max(0.0, t0 + len(frames) * FRAME_S - loop.time()))
        end_sent[0] = loop.time()
        await ws.send('{"type":"end"}')
        await task


async def _load(url: str, n: int, pcm: bytes) -> list[Stream]:
    rng = np.random.default_rng(n)
    streams = [Stream() for _ in range(n)]
    delays = rng.uniform(0, 1.0, size=n)
    await asyncio.gather(*(_stream(url, pcm, float(d), s) for d, s in zip(delays, streams)))
    return streams


def _row(n: int, streams: list[Stream], server_cores: float, client_cores: float) -> dict:
    partial = np.concatenate([s.partial_ms for s in streams if s.partial_ms] or [[math.nan]])
    finals = np.array([s.final_ms for s in streams])
    kept = sum(1 for s in streams if s.max_lag_s <= 0.5 and s.final_ms <= 1500.0)
    return {
        "n": n,
        "p50": float(np.percentile(partial, 50)),
        "p95": float(np.percentile(partial, 95)),
        "final_p50": float(np.nanpercentile(finals, 50)),
        "final_p95": float(np.nanpercentile(finals, 95)),
        "kept": kept,
        "server_cores": server_cores,
        "client_cores": client_cores,
    }


def test_concurrent_realtime_streams():
    audio = _audio()
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    port = _free_port()
    server = start_server(port, *SERVE_ARGS)
    try:
        url = f"ws://127.0.0.1:{port}/v1/stream"
        rows, profile = [], None
        for n in STREAMS:
            m0, s0, c0, w0 = _metrics(port), _cpu_s(server.pid), time.process_time(), time.time()
            streams = asyncio.run(_load(url, n, pcm))
            wall = time.time() - w0
            m1, s1, c1 = _metrics(port), _cpu_s(server.pid), time.process_time()
            rows.append(_row(n, streams, (s1 - s0) / wall, (c1 - c0) / wall))
            profile = (n, {k: m1[k] - m0.get(k, 0.0) for k in m1}, s1 - s0)
    finally:
        server.terminate()
        server.wait(30)
    _report(rows, profile)
    assert rows[0]["kept"] == rows[0]["n"]  # the smallest load (1 stream by default) keeps up


def _report(rows: list[dict], profile) -> None:
    print(
        f"\nStreaming ASR load: {SECONDS:g} s of audio per stream at {RATE} Hz, 100 ms frames, "
        "real time"
    )
    print("| streams | partial p50 ms | partial p95 ms | final after end p50/p95 ms "
          "| kept up | server CPU (cores) | generator CPU (cores) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['p50']:.0f} | {r['p95']:.0f} | {r['final_p50']:.0f} / "
              f"{r['final_p95']:.0f} | {r['kept']}/{r['n']} | {r['server_cores']:.2f} | "
              f"{r['client_cores']:.2f} |")  # fmt: skip
    ok = [r["n"] for r in rows if r["kept"] == r["n"] and r["p95"] < 500]
    print(f"largest N keeping up with p95 partial latency < 500 ms: {max(ok) if ok else 0}")
    if profile is None:
        return
    n, delta, server_cpu = profile
    audio = delta.get("dsstream_asr_audio_seconds_total", 0.0) or 1.0
    print(f"\nWhere the time goes at N={n} ({audio:.0f} s of audio, server CPU {server_cpu:.1f} s)")
    print("| stage | seconds | ms per s of audio | share of server CPU |")
    print("|---|---:|---:|---:|")
    stages = {k.split('"')[1]: v for k, v in delta.items() if "stage=" in k}
    # CPU time, like the other stages: the forward passes' wall time also holds
    # their waits for the cores and the GIL (one ONNX Runtime thread: all its CPU).
    passes = delta.get('engine_compute_seconds_total{model="asr"}', 0.0)
    stages["encoder (forward passes, CPU)"] = delta.get(
        'engine_compute_cpu_seconds_total{model="asr"}', 0.0
    )
    wait = stages.pop("encoder", 0.0) - passes
    for stage, t in stages.items():
        print(f"| {stage} | {t:.1f} | {1000 * t / audio:.2f} | {t / server_cpu:.0%} |")
    rest = server_cpu - sum(stages.values())
    print(f"| protocol, websockets, event loop, threads (rest of server CPU) | {rest:.1f} | "
          f"{1000 * rest / audio:.2f} | {rest / server_cpu:.0%} |")  # fmt: skip
    runs = delta.get("dsstream_vad_runs_total", 0.0) or 1.0
    print(f"(each VAD run classified {delta.get('dsstream_vad_windows_total', 0.0) / runs:.1f} "
          "streams' windows on average)")  # fmt: skip
    print(f"(the forward passes took {passes:.1f} s of wall time; streams also waited "
          f"{wait:.1f} s in total for their batched encoder steps)")  # fmt: skip
