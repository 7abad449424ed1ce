"""The streaming endpoint direct and on Ray Serve, under the same load.

The load is bench_asr_load's (N concurrent real-time streams of the shipped
clips, 100 ms frames; partial latency from the frame that completes a
partial's audio to the partial).  Against, in the same run:

- ``dsstream serve`` (one process), the peer;
- ``dsstream serve --ray --replicas 1``: the same pipelines in one Serve
  replica, every frame through Serve's proxy (the hop this measures);
- ``dsstream serve --ray --replicas 2``: streams held by two replicas.

Both Ray runs use a private local cluster on this machine.  Machine CPU is
all cores busy (/proc/stat) over the load, the generator included.

    pytest tests/bench/bench_ray_serve.py -s -o python_files='bench_*.py'
    DSSTREAM_BENCH_STREAMS=8,32 DSSTREAM_BENCH_SECONDS=10 to shorten
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import bench_asr_load as load
import numpy as np
import pytest

from engine.extras import available

STREAMS = [int(n) for n in os.environ.get("DSSTREAM_BENCH_STREAMS", "8,32,64").split(",")]

pytestmark = [
    pytest.mark.skipif(not available("ray"), reason="needs the ray extra"),
    pytest.mark.skipif(
        not (load.SAMPLES / "model.ds").exists(), reason="the sample ASR model is not in samples"
    ),
]


def _busy_s() -> float:
    """Seconds of CPU all cores spent busy so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _serve_ray(port: int, replicas: int) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsstream.cli", "serve", "--ray", "--port", str(port),
         "--replicas", str(replicas), "--max-sessions", "512", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=load.ROOT, env=env,
    )  # fmt: skip
    for line in proc.stdout:  # type: ignore[union-attr]
        if "serving ws://" in line:
            return proc
    raise RuntimeError(f"serve --ray exited with {proc.wait()}")


def _measure(url: str, pcm: bytes) -> list[dict]:
    rows = []
    for n in STREAMS:
        b0, w0 = _busy_s(), time.time()
        streams = asyncio.run(load._load(url, n, pcm))
        wall = time.time() - w0
        rows.append(load._row(n, streams, (_busy_s() - b0) / wall, 0.0))
    return rows


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_proxy_hop_and_replicas():
    audio = load._audio()
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    results: dict[str, list[dict]] = {}
    port = load._free_port()
    server = load.start_server(port)
    try:
        results["direct (dsstream serve)"] = _measure(f"ws://127.0.0.1:{port}/v1/stream", pcm)
    finally:
        _stop(server)
    for replicas in (1, 2):
        port = load._free_port()
        proc = _serve_ray(port, replicas)
        try:
            url = f"ws://127.0.0.1:{port}/v1/stream"
            results[f"Ray Serve, {replicas} replica{'s' * (replicas > 1)}"] = _measure(url, pcm)
        finally:
            _stop(proc)
    print(f"\nStreaming ASR direct vs Ray Serve: {load.SECONDS:g} s of audio per stream, "
          f"real time, {os.cpu_count()} CPUs (generator on the same machine)")  # fmt: skip
    print("| server | streams | partial p50 ms | partial p95 ms | kept up | machine CPU (cores) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows in results.items():
        for r in rows:
            print(f"| {name} | {r['n']} | {r['p50']:.0f} | {r['p95']:.0f} | "
                  f"{r['kept']}/{r['n']} | {r['server_cores']:.2f} |")  # fmt: skip
    direct = {r["n"]: r for r in results["direct (dsstream serve)"]}
    for r in results["Ray Serve, 1 replica"]:
        d = direct[r["n"]]
        print(f"proxy hop at {r['n']} streams: p50 +{r['p50'] - d['p50']:.0f} ms, "
              f"p95 +{r['p95'] - d['p95']:.0f} ms")  # fmt: skip
    for name, rows in results.items():
        ok = [r["n"] for r in rows if r["kept"] == r["n"] and r["p95"] < 500]
        print(f"{name}: largest N kept up with p95 < 500 ms: {max(ok) if ok else 0}")
    assert results["Ray Serve, 1 replica"][0]["kept"] == STREAMS[0]
