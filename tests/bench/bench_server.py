"""Streaming-layer overhead: dsstream's server vs a bare websockets server.

Both serve N concurrent clients that each send 100 ms pcm_s16le frames as fast
as allowed and get one JSON event back per frame.  The bare server does only
that (recv, json reply); dsstream adds the protocol core, validation, PCM
decoding, the per-session queue, the thread-pool hop and metrics, with a
pipeline that does no model work.  The ratio is the layer's cost.
"""

import asyncio
import json
import os
import sys
import time

import numpy as np
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import running_server  # noqa: E402
from pipelines import StaticFactory  # noqa: E402

from dsstream.pipelines import PipelineRegistry  # noqa: E402
from dsstream.protocol import AudioChunk, Partial  # noqa: E402

FRAMES = 200
FRAME = np.zeros(1600, "<i2").tobytes()  # 100 ms at 16 kHz


class NullAsr:
    def begin(self, options):
        self.n = 0
        return {"model": "null"}

    def step(self, frame):
        if isinstance(frame, AudioChunk):
            self.n += len(frame.samples)
        return [Partial(str(self.n), 0)]

    def end(self):
        return []


async def _bare_handler(ws):
    json.loads(await ws.recv())
    await ws.send('{"type":"started"}')
    n = 0
    async for message in ws:
        if isinstance(message, bytes):
            n += len(message) // 2
            await ws.send(json.dumps({"type": "partial", "text": str(n), "segment": 0}))
        else:
            break


async def _client(url: str) -> None:
    async with connect(url, compression=None) as ws:
        await ws.send('{"type":"start","task":"asr"}')
        await ws.recv()

        async def reader():
            for _ in range(FRAMES):
                await ws.recv()

        task = asyncio.create_task(reader())
        for _ in range(FRAMES):
            await ws.send(FRAME)
        await task
        await ws.send('{"type":"end"}')


async def _measure(url: str, clients: int) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(url) for _ in range(clients)))
    return clients * FRAMES / (time.perf_counter() - t0)


async def _run(clients: int) -> tuple[float, float]:
    registry = PipelineRegistry([StaticFactory("asr", "null", NullAsr)])
    async with running_server(registry, max_sessions=1000) as server:
        ours = await _measure(server.url, clients)
    async with serve(_bare_handler, "127.0.0.1", 0, compression=None) as bare:
        port = bare.sockets[0].getsockname()[1]
        theirs = await _measure(f"ws://127.0.0.1:{port}", clients)
    return ours, theirs


def test_bench_streaming_layer_overhead():
    print("\nclients  dsstream frames/s  bare websockets frames/s  ratio  realtime streams")
    for clients in (1, 8, 32, 128):
        ours, theirs = asyncio.run(_run(clients))
        # Each frame is 100 ms of audio: frames/s / 10 = streams kept in real time.
        print(
            f"{clients:7d}  {ours:17.0f}  {theirs:24.0f}  {ours / theirs:5.2f}  {ours / 10:16.0f}"
        )
