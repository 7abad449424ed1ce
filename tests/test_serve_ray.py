"""The streaming endpoint on Ray Serve (dsstream.serve_ray): sessions through
Serve's proxy equal in-process transcription, a session stays on its replica,
a replica that dies ends only its own sessions (with a coded error), and the
autoscaler follows open sessions and drains the replica it removes.

On a two-node loopback cluster (tests/local_ray.py): the replicas run on the
worker node, the controller and the proxy on the head."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import local_ray
import numpy as np
import pytest
from conftest import async_test
from test_asr_e2e import CARD_WER, CLIPS, REFS

from dsstream.audio import load_audio
from dsstream.client import Client
from dsstream.evaluation import wer
from dsstream.local import transcribe
from dsstream.protocol import Ended, Error, ErrorCode, Final
from dsstream.server import ServerConfig
from engine.extras import available

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not available("ray"), reason="needs the ray extra"),
    pytest.mark.timeout(600),
]

LJ = CLIPS / "LJ001-0011.flac"
# Serve's autoscaler reads metrics the replicas and handles push every 10 s by
# default; faster here so a test sees it act within seconds.
FAST_METRICS = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    os.environ.update(FAST_METRICS)  # inherited by the nodes' processes
    with local_ray.two_nodes(worker_cpus=3) as nodes:
        from dsstream.ray_cluster import connect

        connect(nodes.address)
        import ray
        from ray import serve

        try:
            yield nodes
        finally:
            serve.shutdown()
            ray.shutdown()
            for key in FAST_METRICS:
                os.environ.pop(key, None)


PORT = _free_port()  # Serve's proxy keeps the port it started on across deploys


def _deploy(**settings):
    from dsstream.serve_ray import ServeSettings, deploy

    port = PORT
    config = ServerConfig()
    url = deploy(config, ServeSettings(port=port, proxy_location="HeadOnly", **settings))
    return url, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def two_replicas(cluster):
    """Deployed as a Serve config file (and KubeRay's RayService) deploys it:
    through the application builder, with its flat args."""
    from ray import serve
    from ray.serve.config import HTTPOptions

    from dsstream.serve_ray import build

    serve.start(proxy_location="HeadOnly", http_options=HTTPOptions(host="127.0.0.1", port=PORT))
    serve.run(build({"replicas": 2, "max_sessions": 64}), name="dsstream", route_prefix="/")
    assert _replica_states() == {"RUNNING": 2}
    # Ray's servers, Serve's controller, proxy and replicas: loopback only.
    assert local_ray.non_loopback_listeners() == []
    return f"ws://127.0.0.1:{PORT}/v1/stream", f"http://127.0.0.1:{PORT}"


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


def _replica(client: Client) -> str:
    from dsstream.serve_replica import REPLICA_HEADER

    response = client.ws.response
    assert response is not None
    return response.headers[REPLICA_HEADER]


async def _keep_alive(client: Client) -> None:
    """Silence every half second: an open, idle-but-live stream."""
    while True:
        await client.send_audio(np.zeros(1600, dtype=np.float32))
        await asyncio.sleep(0.5)


async def _finish(client: Client, samples: np.ndarray, rate: int) -> list:
    return [e async for e in client.transcribe_started(samples, rate, chunk_ms=100)]


def _replica_states() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications["dsstream"]
    return dict(app.deployments["stream"].replica_states)


async def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {_replica_states()}")
        await asyncio.sleep(0.25)


# -- through the proxy ---------------------------------------------------------------


def test_cli_serves_on_a_private_cluster_until_sigterm(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "dsstream.cli", "serve", "--ray", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=local_ray.ray_env())  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 180
        while not any("serving ws://" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(proc.stdout.readline())
        url = f"ws://127.0.0.1:{port}/v1/stream"
        assert any(url in line and "Ray Serve" in line for line in lines)

        async def session():
            async with Client(url) as client:
                return [e async for e in client.transcribe(LJ)]

        events = asyncio.run(session())
        finals = [e for e in events if isinstance(e, Final)]
        assert " ".join(f.text for f in finals) == transcribe(LJ).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        local_ray.stop()


@async_test
async def test_a_session_through_the_proxy_equals_in_process(two_replicas):
    url, http = two_replicas
    reference = transcribe(LJ)
    async with Client(url) as client:
        events = [e async for e in client.transcribe(LJ)]
        assert len(_replica(client)) > 0
    finals = [e for e in events if isinstance(e, Final)]
    assert " ".join(f.text for f in finals) == reference.text
    assert [w.word for f in finals for w in f.words] == [w.word for w in reference.words]
    assert isinstance(events[-1], Ended) and events[-1].reason == "client"

    status, body = _get(f"{http}/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["replica"]
    assert health["max_sessions"] == 64  # the builder's args reached the replicas
    assert health["models"]["asr"]["sample-asr"] == "ok"
    status, body = _get(f"{http}/metrics")
    assert status == 200 and b"dsstream_sessions_total" in body
    status, body = _get(f"{http}/")
    assert status == 200 and b"<html" in body.lower()
    status, body = _get(f"{http}/scenes")
    assert status == 200 and len(json.loads(body)) == 4


def test_the_openai_api_through_the_proxy(two_replicas):
    openai = pytest.importorskip("openai")
    _, http = two_replicas
    client = openai.OpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0, timeout=120)
    with open(LJ, "rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json",
            timestamp_granularities=["word"],
        )  # fmt: skip
    reference = transcribe(LJ, punctuate=True)  # uploads are punctuated
    assert result.text == reference.text
    assert [w.word for w in result.words] == [w.word for w in reference.words]
    assert [m.id for m in client.models.list().data] == ["sample-asr"]
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="nope", file=("a.flac", LJ.read_bytes()))


@async_test
async def test_the_vosk_endpoint_through_the_proxy(two_replicas):
    import websockets

    url, _ = two_replicas
    samples, rate = load_audio(LJ)
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    async with websockets.connect(url.replace("/v1/stream", "/vosk")) as ws:
        await ws.send(json.dumps({"config": {"sample_rate": rate}}))
        for i in range(0, len(pcm), 8000):
            await ws.send(pcm[i : i + 8000])
            await ws.recv()
        await ws.send('{"eof" : 1}')
        final = json.loads(await ws.recv())
    # The reference hears the same 16-bit samples the Vosk client sent.
    heard = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
    assert final["text"] == transcribe(heard, rate).text


# -- failures ------------------------------------------------------------------------


@async_test
async def test_a_dead_replica_ends_only_its_sessions(two_replicas):
    import ray

    url, _ = two_replicas
    samples, rate = load_audio(LJ)
    clients: dict[str, Client] = {}
    spare: list[Client] = []
    for _ in range(8):  # Serve's router spreads new sessions over both replicas
        client = await Client(url).connect()
        await client.start("asr", sample_rate=rate)
        replica = _replica(client)
        if replica in clients:
            spare.append(client)
        else:
            clients[replica] = client
        if len(clients) == 2:
            break
    for client in spare:
        await client.close()
    assert len(clients) == 2, "both replicas should take sessions"
    (doomed, doomed_client), (survivor, survivor_client) = sorted(clients.items())

    ray.kill(ray.get_actor(f"SERVE_REPLICA::dsstream#stream#{doomed}", namespace="serve"),
             no_restart=True)  # fmt: skip
    lost = await asyncio.wait_for(_until_error(doomed_client), 60)
    assert lost.code is ErrorCode.UNAVAILABLE and lost.fatal
    await doomed_client.close()

    events = await asyncio.wait_for(_finish(survivor_client, samples, rate), 120)
    await survivor_client.close()
    finals = [e for e in events if isinstance(e, Final)]
    assert " ".join(f.text for f in finals) == transcribe(LJ).text
    assert isinstance(events[-1], Ended) and events[-1].reason == "client"

    # A client starting again gets a session (on the survivor, or the
    # replacement Serve starts).
    async with Client(url) as client:
        events = [e async for e in client.transcribe(LJ)]
    assert isinstance(events[-1], Ended)


async def _until_error(client: Client) -> Error:
    while True:
        event = await client.recv()
        assert event is not None, "the connection closed without an error event"
        if isinstance(event, Error):
            return event


# -- autoscaling -----------------------------------------------------------------------


@async_test
async def test_autoscaling_follows_sessions_and_drains_the_replica_it_removes(cluster):
    url, _ = _deploy(autoscale=(1, 2), target_sessions=1, upscale_delay_s=0.5,
                     downscale_delay_s=1.0, look_back_period_s=2.0,
                     drain_timeout_s=120.0)  # fmt: skip
    await _wait_for(lambda: _replica_states().get("RUNNING") == 1, 60, "one replica")
    samples, rate = load_audio(LJ)

    first = await Client(url).connect()
    await first.start("asr", sample_rate=rate)
    first_alive = asyncio.create_task(_keep_alive(first))
    second = await Client(url).connect()  # two sessions for a target of one each
    await second.start("asr", sample_rate=rate)
    second_alive = asyncio.create_task(_keep_alive(second))
    await _wait_for(lambda: _replica_states().get("RUNNING") == 2, 90, "a second replica")

    # A session opened now goes to the new, idle replica: the one a downscale
    # stops first (Serve stops the newest).
    third = await Client(url).connect()
    await third.start("asr", sample_rate=rate)
    newest = _replica(third)
    assert newest not in (_replica(first), _replica(second))
    for client, alive in ((first, first_alive), (second, second_alive)):
        alive.cancel()
        await client.end()
        assert isinstance([e async for e in client.events()][-1], Ended)
        await client.close()

    # One session left, for a target of one: the newest replica is drained,
    # and its session goes on.
    third_alive = asyncio.create_task(_keep_alive(third))
    await _wait_for(lambda: _replica_states().get("STOPPING") == 1, 90, "a draining replica")
    await asyncio.sleep(2.0)  # past the downscale: the drained replica still serves it
    assert _replica_states().get("STOPPING") == 1
    third_alive.cancel()
    events = await asyncio.wait_for(_finish(third, samples, rate), 120)
    await third.close()
    assert not any(isinstance(e, Error) for e in events)
    finals = [e for e in events if isinstance(e, Final)]
    text = " ".join(f.text for f in finals if f.text)  # after the keep-alive's silence
    assert wer([REFS[LJ.name]], [text]) <= CARD_WER[LJ.name] + 1 / 15 + 1e-9, text
    await _wait_for(lambda: _replica_states() == {"RUNNING": 1}, 90, "the drain to finish")


def test_the_kuberay_manifest_deploys_this_application():
    """deploy/rayservice.yaml's Serve config is valid for this Ray, and its
    import path and args build the application."""
    import importlib

    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).parents[1] / "deploy" / "rayservice.yaml"
    manifest = yaml.safe_load(path.read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = config.applications
    module, _, name = app.import_path.partition(":")
    built = getattr(importlib.import_module(module), name)(app.args)
    assert isinstance(built, Application)
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    grace = workers["terminationGracePeriodSeconds"]
    assert grace > app.args["drain_timeout_s"]  # the Pod outlives its drain


# Last: it drains the worker node for good.
@async_test
async def test_draining_a_node_moves_its_replica_and_lets_its_sessions_finish(cluster):
    """What deploy/prestop-drain.sh does before a Pod goes: ``ray drain-node``
    on the replica's node.  Serve starts a replacement elsewhere, routes new
    sessions there, and stops the old replica only once its session ended."""
    url, _ = _deploy(replicas=1, drain_timeout_s=120.0)
    await _wait_for(lambda: _replica_states() == {"RUNNING": 1}, 60, "one replica")
    (worker,) = [n for n in cluster.worker_nodes]
    cluster.add_node(num_cpus=1, object_store_memory=100_000_000)  # where it can move
    samples, rate = load_audio(LJ)
    client = await Client(url).connect()
    await client.start("asr", sample_rate=rate)
    old = _replica(client)
    alive = asyncio.create_task(_keep_alive(client))
    ray_cli = Path(sys.executable).parent / "ray"
    drain = subprocess.run(
        [str(ray_cli), "drain-node", "--address", cluster.address, "--node-id", worker.node_id,
         "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=test: pod terminating",
         "--deadline-remaining-seconds=120"],
        capture_output=True, text=True, env=local_ray.ray_env(), timeout=60,
    )  # fmt: skip
    assert drain.returncode == 0, drain.stderr
    await _wait_for(lambda: _replica_states() == {"RUNNING": 1, "STOPPING": 1}, 90,
                    "a replacement replica beside the draining one")  # fmt: skip
    async with Client(url) as other:  # new sessions go to the replacement
        await other.start("asr", sample_rate=rate)
        assert _replica(other) != old
    alive.cancel()
    events = await asyncio.wait_for(_finish(client, samples, rate), 120)
    await client.close()
    assert not any(isinstance(e, Error) for e in events)
    assert isinstance(events[-1], Ended) and events[-1].reason == "client"
    await _wait_for(lambda: _replica_states() == {"RUNNING": 1}, 90, "the old replica to stop")
