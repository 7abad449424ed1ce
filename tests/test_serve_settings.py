"""Ray Serve deployment settings as pure data (dsstream.serve_ray), the CLI's
scale flags, and the client's coded error when a connection drops mid-session
(how a session lost with its Ray Serve replica or worker process is reported)."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import async_test
from websockets.asyncio.server import serve

from dsstream.cli import build_parser
from dsstream.client import Client
from dsstream.protocol import ErrorCode, Started, encode_event
from dsstream.serve_ray import ServeSettings, deployment_options
from dsstream.server import ServerConfig


def test_fixed_replicas():
    options = deployment_options(ServeSettings(replicas=3, drain_timeout_s=45.0),
                                 ServerConfig(max_sessions=100))  # fmt: skip
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    # Sessions past max_sessions reach the replica, which refuses them as busy.
    assert options["max_ongoing_requests"] > 100
    assert options["graceful_shutdown_timeout_s"] == 45.0  # the drain
    assert options["ray_actor_options"] == {"num_cpus": 1.0}


def test_autoscaling_follows_open_sessions():
    settings = ServeSettings(autoscale=(0, 4), target_sessions=24, upscale_delay_s=5)
    options = deployment_options(settings, ServerConfig())
    assert "num_replicas" not in options
    auto = options["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["initial_replicas"]) == (0, 4, 1)
    assert auto["target_ongoing_requests"] == 24 and auto["upscale_delay_s"] == 5


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"replicas": 0}, "replicas must be at least 1"),
        ({"autoscale": (3, 2)}, "MIN..MAX"),
        ({"autoscale": (0, 0)}, "MIN..MAX"),
        ({"target_sessions": 0}, "target_sessions"),
        ({"proxy_location": "Everywhere"}, "EveryNode or HeadOnly"),
        ({"drain_timeout_s": float("inf")}, "drain_timeout_s"),
    ],
)
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ServeSettings(**bad)


def test_cli_scale_flags():
    parse = build_parser().parse_args
    args = parse(["serve", "--ray", "--autoscale", "1..4", "--target-sessions", "8"])
    assert args.autoscale == (1, 4) and args.target_sessions == 8.0
    for bad in (["--autoscale", "4..1"], ["--autoscale", "x"], ["--replicas", "2", "--autoscale",
                                                                 "1..2"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse(["serve", "--ray", *bad])


@async_test
async def test_a_connection_dropped_mid_session_is_a_coded_error():
    async def handler(ws):  # a server process that dies after starting the session
        await ws.recv()
        started = Started("s1", "asr", {"sample_rate": 16000}, {})
        await ws.send(encode_event(started))
        ws.transport.abort()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Client(f"ws://127.0.0.1:{port}") as client:
            await client.start("asr", sample_rate=16000)
            events = [e async for e in client.events()]
    assert len(events) == 1 and events[0].code is ErrorCode.UNAVAILABLE and events[0].fatal
    assert "before the session ended (close code 1006)" in events[0].message


@async_test
async def test_a_connection_closed_outside_a_session_is_not_an_error():
    async def handler(ws):
        await ws.send(json.dumps({"type": "ended", "session_id": "s", "reason": "client",
                                  "stats": {}}))  # fmt: skip
        await asyncio.sleep(0.1)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Client(f"ws://127.0.0.1:{port}") as client:
            events = [e async for e in client.events()]
    assert [e.type for e in events] == ["ended"]


def test_serve_config_args():
    from dsstream.serve_ray import settings_from_args

    config, settings, models = settings_from_args({
        "autoscale": "1..8", "target_sessions": 48, "drain_timeout_s": 900, "max_sessions": 96,
        "token": "s3cret", "origins": ["https://app.example"], "idle_timeout_s": 20,
        "beam_width": 32,
    })  # fmt: skip
    assert settings.autoscale == (1, 8) and settings.target_sessions == 48.0
    assert settings.drain_timeout_s == 900.0
    assert config.max_sessions == 96 and config.token == "s3cret"
    assert config.allowed_origins == ("https://app.example",)
    assert config.limits.idle_timeout_s == 20.0 and models == {"beam_width": 32}
    with pytest.raises(ValueError, match="unknown dsstream args: \\['replica'\\]"):
        settings_from_args({"replica": 2})
    with pytest.raises(ValueError, match="MIN..MAX"):
        settings_from_args({"autoscale": "8"})
