"""The streaming endpoint on Ray Serve: ``dsstream serve --ray``.

Each replica (:class:`dsstream.serve_replica.StreamReplica`) hosts the pipelines and serves what one
``dsstream serve`` process serves: ``/v1/stream`` (the same protocol, through
the same :class:`dsstream.session.SessionRunner`), ``/vosk``, ``/healthz``,
``/metrics`` (the replica's own series) and the demo page.  Clients connect to
Ray Serve's proxy, whose FastAPI ingress carries the WebSocket; a session is
one request, so it stays on the replica that accepted it for its whole life
(the replica names itself in the handshake's ``x-dsstream-replica`` header).

Scaling: a fixed number of replicas, or Serve's autoscaler following open
sessions per replica (each open WebSocket is an ongoing request).  Scaling
down drains a replica: Serve routes no new session to it and waits up to the
drain timeout for its open sessions to end before stopping it.

Failures: when a replica dies, or a drained one is stopped with sessions still
open, Serve's proxy drops each of its WebSockets (close 1006, no ``ended``);
dsstream's clients report that as a fatal ``unavailable`` error, and
:func:`dsstream.client.transcribe_resumable` starts again on another replica.
Sessions on other replicas go on.

The settings are pure data (:class:`ServeSettings`, :func:`deployment_options`);
:func:`deploy` talks to Ray (``pip install 'dsstream[ray]'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dsstream.protocol import Limits
from dsstream.server import ServerConfig

__all__ = [
    "ServeSettings",
    "deployment_options",
    "application",
    "settings_from_args",
    "build",
    "deploy",
]

APP_NAME = "dsstream"


@dataclass(frozen=True)
class ServeSettings:
    """How the endpoint is deployed on Ray Serve.

    ``replicas`` fixed, or ``autoscale=(min, max)`` with ``target_sessions``
    open sessions per replica (the autoscaler's aim; the upscale and
    downscale delays keep it from flapping).  ``drain_timeout_s``: how long a
    replica being removed lets its open sessions go on.  ``cpus_per_replica``:
    what Ray reserves per replica (one process runs about 1.4 cores of
    pipeline work: docs/benchmarks.md).  ``proxy_location``: "EveryNode"
    (Serve's default: a proxy on each node, behind your load balancer) or
    "HeadOnly"."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    target_sessions: float = 32.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    look_back_period_s: float = 10.0
    drain_timeout_s: float = 600.0
    cpus_per_replica: float = 1.0
    host: str = "127.0.0.1"
    port: int = 8000
    proxy_location: str = "EveryNode"

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise ValueError(f"autoscale is MIN..MAX with 0 <= MIN <= MAX, MAX >= 1: "
                                 f"got {low}..{high}")  # fmt: skip
        if not self.target_sessions > 0:
            raise ValueError(f"target_sessions must be > 0, got {self.target_sessions}")
        if self.proxy_location not in ("EveryNode", "HeadOnly"):
            raise ValueError(f"proxy_location is EveryNode or HeadOnly, not {self.proxy_location}")
        for name in ("upscale_delay_s", "downscale_delay_s", "drain_timeout_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")


def deployment_options(settings: ServeSettings, config: ServerConfig) -> dict[str, Any]:
    """The ``@serve.deployment`` options for ``settings`` (pure data).

    A replica takes a few requests past ``max_sessions`` (health checks,
    /metrics, and sessions it refuses as ``busy`` itself, with the coded
    error, rather than Serve queueing them unseen)."""
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_sessions + 16,
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 5.0,
        "ray_actor_options": {"num_cpus": settings.cpus_per_replica},
    }
    if settings.autoscale is None:
        options["num_replicas"] = settings.replicas
    else:
        low, high = settings.autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(low, 1),
            "target_ongoing_requests": settings.target_sessions,
            "upscale_delay_s": settings.upscale_delay_s,
            "downscale_delay_s": settings.downscale_delay_s,
            "look_back_period_s": settings.look_back_period_s,
        }
    return options


def application(
    config: ServerConfig, settings: ServeSettings, registry_args: dict[str, Any] | None = None
) -> Any:
    """The Serve application (one deployment, ``stream``) for ``config`` and
    ``settings``; what :func:`deploy` runs and :func:`build` gives Serve's
    config files."""
    from ray import serve

    from dsstream.serve_replica import StreamReplica

    options = deployment_options(settings, config)
    deployment = serve.deployment(name="stream", **options)(StreamReplica)
    return deployment.bind(config, dict(registry_args or {}))


def settings_from_args(args: dict[str, Any]) -> tuple[ServerConfig, ServeSettings, dict[str, Any]]:
    """A Serve config file's ``args`` (flat, YAML-friendly) as the server's
    config, the deployment settings and the models' arguments.

    Keys: replicas, autoscale ("MIN..MAX"), target_sessions, upscale_delay_s,
    downscale_delay_s, drain_timeout_s, cpus_per_replica, max_sessions, token,
    metrics_public, origins (a list), idle_timeout_s, max_session_s,
    max_frame_bytes, samples_dir, beam_width, decoder_mode.  Unknown keys are
    refused (a typo would otherwise be a silent default)."""
    known = {
        "replicas", "autoscale", "target_sessions", "upscale_delay_s", "downscale_delay_s",
        "drain_timeout_s", "cpus_per_replica", "max_sessions", "token", "metrics_public",
        "origins", "idle_timeout_s", "max_session_s", "max_frame_bytes", "samples_dir",
        "beam_width", "decoder_mode",
    }  # fmt: skip
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"unknown dsstream args: {sorted(unknown)}; known: {sorted(known)}")
    limits = Limits(
        max_frame_bytes=int(args.get("max_frame_bytes", Limits.max_frame_bytes)),
        idle_timeout_s=float(args.get("idle_timeout_s", Limits.idle_timeout_s)),
        max_session_s=float(args.get("max_session_s", Limits.max_session_s)),
    )
    config = ServerConfig(
        limits=limits, max_sessions=int(args.get("max_sessions", ServerConfig.max_sessions)),
        token=args.get("token"), metrics_public=bool(args.get("metrics_public", False)),
        allowed_origins=tuple(args.get("origins", ())),
    )  # fmt: skip
    autoscale = None
    if "autoscale" in args:
        low, sep, high = str(args["autoscale"]).partition("..")
        if not sep or not (low.isdigit() and high.isdigit()):
            raise ValueError(f"autoscale is MIN..MAX, e.g. 1..8: got {args['autoscale']!r}")
        autoscale = (int(low), int(high))
    scale: dict[str, Any] = {k: float(args[k]) for k in ("target_sessions", "upscale_delay_s",
                                         "downscale_delay_s", "drain_timeout_s",
                                         "cpus_per_replica") if k in args}  # fmt: skip
    settings = ServeSettings(replicas=int(args.get("replicas", 1)), autoscale=autoscale, **scale)
    models: dict[str, Any] = {
        k: args[k] for k in ("samples_dir", "beam_width", "decoder_mode") if k in args
    }
    return config, settings, models


def build(args: dict[str, Any]) -> Any:
    """Serve's application builder, for config files and KubeRay's RayService
    (``import_path: dsstream.serve_ray:build``; ``args``: see
    :func:`settings_from_args`).  Host, port and proxies are the config
    file's ``http_options`` and ``proxy_location``."""
    return application(*settings_from_args(args))


def deploy(
    config: ServerConfig,
    settings: ServeSettings,
    registry_args: dict[str, Any] | None = None,
    blocking: bool = False,
) -> str:
    """Start Serve's proxy on ``settings.host:port`` and deploy the endpoint on
    the connected cluster (:func:`dsstream.ray_cluster.connect` first); return
    the WebSocket URL.  ``registry_args``: :func:`default_registry`'s
    arguments in each replica (samples_dir, beam_width...)."""
    from ray import serve
    from ray.serve.config import HTTPOptions

    http = HTTPOptions(host=settings.host, port=settings.port)
    serve.start(proxy_location=settings.proxy_location, http_options=http)
    app = application(config, settings, registry_args)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
    shown = "127.0.0.1" if settings.host in ("", "0.0.0.0") else settings.host
    return f"ws://{shown}:{settings.port}{config.path}"
