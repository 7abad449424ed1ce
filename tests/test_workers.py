"""Several server processes on one port (dsstream serve --workers N)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from dsstream.metrics import ServerMetrics
from dsstream.workers import merge_expositions, newest_sockets, restart_allowed

# -- pure parts --------------------------------------------------------------------


def _samples(text: bytes | str) -> dict[tuple[str, tuple], float]:
    text = text.decode() if isinstance(text, bytes) else text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_merged_metrics_label_each_workers_series_and_describe_each_family_once():
    a, b = ServerMetrics(), ServerMetrics()
    a.sessions.labels("asr").inc(3)
    b.sessions.labels("asr").inc(2)
    b.sessions.labels("vqa").inc()
    b.step_latency.labels("asr").observe(0.02)
    merged = merge_expositions({"0": a.exposition().decode(), "1": b.exposition().decode()})
    text = merged.decode()
    assert text.count("# TYPE dsstream_sessions_total counter") == 1
    values = _samples(merged)
    key = "dsstream_sessions_total"
    assert values[(key, (("task", "asr"), ("worker", "0")))] == 3
    assert values[(key, (("task", "asr"), ("worker", "1")))] == 2
    assert values[(key, (("task", "vqa"), ("worker", "1")))] == 1
    bucket = ("dsstream_step_seconds_bucket", (("le", "0.025"), ("task", "asr"), ("worker", "1")))
    assert values[bucket] == 1
    # Every sample of the inputs is there once, with its worker.
    for worker, metrics in (("0", a), ("1", b)):
        for (name, labels), value in _samples(metrics.exposition()).items():
            assert values[(name, tuple(sorted((*labels, ("worker", worker)))))] == value


def test_metrics_are_read_from_each_workers_newest_generation():
    names = ["worker-0-0.sock", "worker-1-0.sock", "worker-0-2.sock", "worker-0-1.sock",
             "worker-x.sock", "worker-3-0.sock"]  # fmt: skip
    paths = [Path("/run") / n for n in names]
    newest = newest_sockets(paths)
    assert {i: p.name for i, p in newest.items()} == {
        0: "worker-0-2.sock",
        1: "worker-1-0.sock",
        3: "worker-3-0.sock",
    }
    assert list(newest_sockets(paths, exclude=0)) == [1, 3]


def test_a_crashing_worker_is_restarted_until_it_crashes_too_often():
    assert restart_allowed([], now=100.0)
    assert restart_allowed([10.0] * 9 + [95.0] * 4, now=100.0, limit=5, window_s=60)
    assert not restart_allowed([95.0] * 5, now=100.0, limit=5, window_s=60)
    assert restart_allowed([30.0] * 5, now=100.0, limit=5, window_s=60)  # long ago


# -- the supervisor and its workers, as a user runs them -------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> set[int]:
    out = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] != "Z":  # a zombie not yet reaped is gone
                out.add(int(proc.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie that a container's init never reaps counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _get(port: int, path: str) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read().decode()


def _workers_in_metrics(port: int) -> set[str]:
    values = _samples(_get(port, "/metrics"))
    return {
        dict(labels)["worker"] for name, labels in values if name == "dsstream_connections_total"
    }


def _wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int, Path]:
    """``dsstream serve --port P *args``, its output in a log file, once it says it
    serves: the process, its port and the log."""
    port, log = _free_port(), tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "dsstream.cli", "serve", "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    _wait(lambda: "serving" in log.read_text() or server.poll() is not None)
    return server, port, log


def _two_workers_without_models(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """Two workers with no models to load (they start fast)."""
    no_models = str(tmp_path / "no-models")
    return _serve(tmp_path, "--workers", "2", "--samples", no_models, "--log-level", "WARNING")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_workers_share_the_port_merge_metrics_restart_and_stop_together(tmp_path):
    supervisor, port, log = _two_workers_without_models(tmp_path)
    try:
        assert f"serving ws://127.0.0.1:{port}/v1/stream (2 worker processes)" in log.read_text()
        workers = _children(supervisor.pid)
        assert len(workers) == 2
        # Whichever worker takes the scrape, /metrics has both.
        assert _workers_in_metrics(port) == {"0", "1"}
        health = json.loads(_get(port, "/healthz"))
        assert health["status"] == "ok" and health["worker"] in (0, 1)
        # A worker serves WebSocket sessions on the shared socket.
        with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
            ws.send(json.dumps({"type": "start", "task": "asr", "sample_rate": 16000}))
            error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["code"] == "model_unavailable"
        # And the Vosk-compatible endpoint (no audio sent: an empty result, then the close).
        assert f"Vosk-compatible endpoint: ws://127.0.0.1:{port}/vosk" in log.read_text()
        with connect(f"ws://127.0.0.1:{port}/vosk") as ws:
            ws.send('{"eof" : 1}')
            assert json.loads(ws.recv(timeout=10)) == {"result": [], "text": ""}
        # A worker that dies is started again.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: len(_children(supervisor.pid) - {victim}) == 2)
        _wait(lambda: _workers_in_metrics(port) == {"0", "1"})
        # SIGTERM: every worker shuts down gracefully, then the supervisor exits.
        workers = _children(supervisor.pid)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        assert not any(_alive(pid) for pid in workers)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    rest = log.read_text()
    assert "worker 0 exited" in rest or "worker 1 exited" in rest


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    supervisor, _, log = _two_workers_without_models(tmp_path)
    assert "serving" in log.read_text()
    workers = _children(supervisor.pid)
    assert len(workers) == 2
    supervisor.kill()  # no chance to stop them: they notice it is gone
    supervisor.wait()
    _wait(lambda: not any(_alive(pid) for pid in workers), timeout=30)


SAMPLES = Path(__file__).resolve().parents[1] / "samples"
needs_sample_models = pytest.mark.skipif(
    not (SAMPLES / "asr" / "model-int8.ds").exists(), reason="the sample models are not in samples/"
)


@pytest.mark.skipif(
    not (SAMPLES / "asr" / "model.ds").exists(), reason="the sample ASR model is not in samples/"
)
def test_forked_workers_transcribe_as_one_process_does(tmp_path):
    """Models loaded after the fork (ONNX Runtime sessions, the LM) work in every
    worker: concurrent sessions get the in-process transcript."""
    import asyncio

    import dsstream
    from dsstream.client import Client
    from dsstream.protocol import Final

    clip = SAMPLES / "asr" / "clips" / "heldout-espeak-david.flac"
    expected = dsstream.transcribe(clip).text
    supervisor, port, _ = _serve(tmp_path, "--workers", "2", "--log-level", "WARNING")
    try:

        async def one() -> str:
            async with Client(f"ws://127.0.0.1:{port}/v1/stream") as client:
                events = [e async for e in client.transcribe(str(clip))]
            return " ".join(e.text for e in events if isinstance(e, Final) and e.text)

        async def many() -> list[str]:
            return await asyncio.gather(*(one() for _ in range(6)))

        assert asyncio.run(many()) == [expected] * 6
        values = _samples(_get(port, "/metrics"))
        started = {
            dict(labels)["worker"]: value
            for (name, labels), value in values.items()
            if name == "dsstream_sessions_total"
        }
        assert sum(started.values()) == 6
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=60)


@needs_sample_models
def test_reload_replaces_workers_while_open_sessions_go_on(tmp_path):
    """SIGHUP: new workers load the models again; a session open on an old worker
    goes on to its own end there; a replacement that cannot load leaves the
    serving workers alone."""
    import asyncio
    import shutil

    from dsstream.client import Client
    from dsstream.protocol import Final

    samples = tmp_path / "samples"
    for name in ("asr/model-int8.ds", "asr/lm.arpa", "vqa/image.ds", "vqa/fuser.ds"):
        (samples / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / name, samples / name)
    audio, _ = sf.read(SAMPLES / "asr" / "clips" / "LJ001-0011.flac", dtype="float32")
    supervisor, port, log = _serve(
        tmp_path, "--workers", "2", "--samples", str(samples), "--log-level", "WARNING"
    )
    try:
        first = _children(supervisor.pid)

        async def across_a_reload() -> list:
            async with Client(f"ws://127.0.0.1:{port}/v1/stream") as client:
                await client.start("asr", sample_rate=16000)
                half = len(audio) // 2
                await client.stream_audio(audio[:half], 16000)
                supervisor.send_signal(signal.SIGHUP)
                while len(_children(supervisor.pid) - first) < 2:
                    await asyncio.sleep(0.1)
                assert any(_alive(pid) for pid in first)  # the one serving us drains
                await client.stream_audio(audio[half:], 16000)
                await client.end()
                return [event async for event in client.events()]

        events = asyncio.run(across_a_reload())
        assert events[-1].reason == "client"  # not "shutdown": the session ended itself
        assert any(isinstance(e, Final) and e.text for e in events)
        _wait(lambda: not any(_alive(pid) for pid in first))  # drained, gone
        second = _children(supervisor.pid)
        assert len(second) == 2 and _workers_in_metrics(port) == {"0", "1"}
        # A replacement that cannot load its model: the workers serving go on.
        (samples / "asr" / "model-int8.ds").write_bytes(b"not an artifact")
        supervisor.send_signal(signal.SIGHUP)
        _wait(lambda: "replacement failed" in log.read_text())
        assert _children(supervisor.pid) == second
        assert json.loads(_get(port, "/healthz"))["status"] == "ok"
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=60)


@needs_sample_models
def test_a_single_process_server_reloads_its_models_on_sighup(tmp_path):
    """SIGHUP to the one-process server: StreamServer.reload (tested with a
    model replaced under open sessions in test_asr_pipeline.py); a model that
    fails to load is reported and the server goes on."""
    import shutil

    samples = tmp_path / "samples"
    (samples / "asr").mkdir(parents=True)
    server, port, log = _serve(tmp_path, "--samples", str(samples))
    try:
        server.send_signal(signal.SIGHUP)
        _wait(lambda: "reload: done" in log.read_text())
        health = json.loads(_get(port, "/healthz"))
        assert (health["status"], health["reloads"]) == ("ok", 1)
        assert "not installed" in health["models"]["asr"]["sample-asr"]
        # Installed since: the reload loads it. Then one that does not load.
        shutil.copy(SAMPLES / "asr" / "model-int8.ds", samples / "asr" / "model-int8.ds")
        shutil.copy(SAMPLES / "asr" / "lm.arpa", samples / "asr" / "lm.arpa")
        server.send_signal(signal.SIGHUP)
        _wait(lambda: log.read_text().count("reload: done") == 2)
        health = json.loads(_get(port, "/healthz"))
        assert (health["reloads"], health["models"]["asr"]["sample-asr"]) == (2, "ok")
        (samples / "asr" / "model-int8.ds").write_bytes(b"not an artifact")
        server.send_signal(signal.SIGHUP)
        _wait(lambda: "reload: failed" in log.read_text())
        assert server.poll() is None
        assert json.loads(_get(port, "/healthz"))["reloads"] == 2
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
