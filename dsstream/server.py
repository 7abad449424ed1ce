"""The WebSocket streaming server: a thin asyncio adapter around the protocol core.

One port serves the WebSocket endpoint (``/v1/stream`` by default), the demo
page (``GET /``), ``GET /healthz`` and ``GET /metrics``.  Sessions are driven
by :class:`dsstream.session.SessionRunner`; this module handles the HTTP side,
authentication, admission and graceful shutdown.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import logging
import signal
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from dsstream import __version__
from dsstream.access import origin_allowed, token_ok
from dsstream.host import SessionHost, SessionSettings
from dsstream.metrics import CONTENT_TYPE, ServerMetrics
from dsstream.openai_api import ApiError, models_document
from dsstream.pipelines.base import PipelineRegistry
from dsstream.protocol import CloseCode, ErrorCode, Limits, ServerProtocol, encode_event
from dsstream.rest import RestConnection, UploadSettings
from dsstream.session import SessionRunner
from dsstream.vosk import serve_vosk
from dsstream.workers import (
    WorkerInfo,
    gather_metrics,
    listening_socket,
    serve_own_metrics,
    watch_parent,
)

__all__ = [
    "ServerConfig", "StreamServer", "health_document", "run_server", "server_urls", "STATIC",
    "asr_model_names", "default_scenes_dir", "list_scenes", "scenes_route",
]  # fmt: skip

log = logging.getLogger("dsstream.server")

STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/worklet.js": ("worklet.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765  # 0 picks a free port (see StreamServer.port)
    path: str = "/v1/stream"  # the WebSocket endpoint
    vosk_path: str | None = "/vosk"  # Vosk-server-compatible endpoint (dsstream.vosk); None: off
    limits: Limits = field(default_factory=Limits)
    max_sessions: int = 128  # concurrent sessions; beyond it, ``busy``
    session_queue_frames: int = 64  # per-session queue; full means the reader pauses
    token: str | None = None  # bearer token required when set (WebSocket and /metrics)
    # Browser origins allowed beside the server's own and loopback ones
    # (dsstream.access); ("*",) allows any.
    allowed_origins: tuple[str, ...] = ()
    metrics_public: bool = False  # with a token: /metrics without it too
    # Threads running pipeline calls. A call blocks its thread while its encoder step
    # waits to be batched with other sessions' steps, so the thread count caps the
    # batch: with 8, 64 real-time streams fell behind on 2 cores; 16 to 128 kept up
    # (docs/benchmarks.md). Waiting threads cost no CPU.
    worker_threads: int = 64
    shutdown_grace_s: float = 30.0  # time open sessions get to finish on shutdown
    # A worker replaced by a reload (dsstream.workers) takes no new connections
    # and lets its open sessions go on this long before it shuts down.
    drain_timeout_s: float = 600.0
    busy_retry_after_ms: int = 2000  # the retry hint sent with ``busy``
    # POST /v1/audio/transcriptions: the largest upload taken (OpenAI's own
    # service takes 25 MB; long recordings are read in pieces, not held twice).
    max_upload_bytes: int = 200 << 20
    # Images the demo page offers to click (GET /scenes lists them with their
    # sample questions, GET /scenes/NAME serves one); None: the VQA samples'.
    scenes_dir: str | None = None
    # After the server's close frame, how long a client has to answer it before
    # the connection is dropped (websockets' default, 10 s, let a client that
    # keeps sending and never answers hold the socket that long).
    close_timeout_s: float = 2.0
    # Frames already queued when the worker wakes go to the pool in one call:
    # one thread hop per burst instead of per frame.
    max_frames_per_call: int = 16
    # Frames above the limit get a non-fatal ``too_large``; far above it the
    # WebSocket layer closes the connection (1009) without reading them.
    hard_frame_factor: int = 4
    # One of several worker processes (dsstream.workers): accept on the listening
    # socket inherited as this file descriptor instead of binding host and port,
    # and merge the other workers' series into /metrics.
    listen_fd: int | None = None
    worker: WorkerInfo | None = None

    def session_settings(self) -> SessionSettings:
        """What the per-connection runners read of this config (the fields of
        the same names)."""
        return SessionSettings(**{f.name: getattr(self, f.name) for f in fields(SessionSettings)})


# ~270 lines, past our ~250 bound: sockets, HTTP routes, reload and graceful
# shutdown/drain of one server; what sessions use of it is host.py.
class StreamServer:
    """The dsstream WebSocket server.

    Use as ``async with StreamServer(registry, config) as server:`` (then
    ``server.url``), or ``await server.serve_forever()`` in a program.
    """

    def __init__(
        self,
        registry: PipelineRegistry,
        config: ServerConfig | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        # What sessions may use of the server: admission, the pool, limits, metrics.
        self.host = SessionHost(
            registry, self.config.session_settings(), metrics, self.config.worker_threads
        )
        self.reloads = 0  # model reloads done (:meth:`reload`)
        self._reloading = False
        self.runners: set[SessionRunner] = set()
        self._server: Server | None = None
        self._closing = False
        self._closed: asyncio.Event | None = None
        # Open connections of either protocol; drain waits for the last to end.
        self._connections = 0
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        self._metrics_server: asyncio.Server | None = None  # worker mode: for the others

    @property
    def registry(self) -> PipelineRegistry:
        """The models new sessions get."""
        return self.host.registry

    @property
    def metrics(self) -> ServerMetrics:
        return self.host.metrics

    @property
    def active_sessions(self) -> int:
        return self.host.active_sessions

    @property
    def stopping(self) -> asyncio.Event:
        """Set when a graceful shutdown begins."""
        return self.host.stopping

    # -- reload ------------------------------------------------------------------

    async def reload(self, registry: PipelineRegistry | None = None) -> bool:
        """Serve new sessions from freshly loaded models, without dropping one.

        Loads ``registry`` (default: the current models read again from their
        files, :meth:`PipelineRegistry.reloaded`) on a pipeline thread, then
        swaps it in at once: sessions that start afterwards use it, open ones
        go on with the models they started with, which are released when the
        last of them ends.  /metrics then shows the new models' series (their
        counters start again from zero).  Returns False, with the reason
        logged, when a model fails to load or a reload is already running;
        the models in use keep serving."""
        if self._reloading or self._closing:
            log.warning("reload ignored: %s", "one is loading" if self._reloading else "closing")
            return False
        self._reloading = True
        new = registry
        try:
            new = registry if registry is not None else self.registry.reloaded()
            await self.host.run(new.load)
        except Exception as exc:
            log.error("reload failed, the loaded models keep serving: %s", exc)
            if new is not None:
                await self.host.run(new.close, self.registry)
            return False
        finally:
            self._reloading = False
        self.host.swap(new)
        self.reloads += 1
        log.info("models reloaded (reload %d)", self.reloads)
        return True

    async def start(self) -> None:
        limits = self.config.limits
        hard = self.config.hard_frame_factor * max(limits.max_frame_bytes, limits.max_text_bytes)
        self._closed = asyncio.Event()
        fd = self.config.listen_fd
        where: dict[str, Any] = (
            {"sock": listening_socket(fd)}
            if fd is not None
            else {"host": self.config.host, "port": self.config.port}
        )
        uploads = UploadSettings(
            self.host, self.config.token, self.config.max_upload_bytes, self._asr_models,
            max(1, round(self.config.busy_retry_after_ms / 1000)),
        )  # fmt: skip
        self._uploads = uploads
        self._server = await serve(
            self._handle,
            **where,
            create_connection=RestConnection.serving(uploads),
            process_request=self._process_request,
            max_size=hard,
            compression=None,  # PCM audio does not deflate well; save the CPU
            close_timeout=self.config.close_timeout_s,
            server_header=f"dsstream/{__version__}",
            logger=logging.getLogger("dsstream.websockets"),
        )
        if self.config.worker is not None:
            self._metrics_server = await serve_own_metrics(
                self.config.worker, self.metrics.exposition
            )
        log.info("serving on %s (demo page %s)", self.url, self.http_url)

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return server_urls(self.config.host, self.port, self.config.path)[0]

    @property
    def http_url(self) -> str:
        return server_urls(self.config.host, self.port, self.config.path)[1]

    async def shutdown(self) -> None:
        """Graceful: stop accepting, let open sessions send their finals, then close."""
        if self._closing or self._server is None:
            return
        self._closing = True
        log.info("shutting down: finishing %d open session(s)", len(self.runners))
        for runner in list(self.runners):
            runner.request_stop("shutdown")
        self.stopping.set()  # Vosk-protocol sessions finish on it
        self._server.close(close_connections=False)
        try:
            await asyncio.wait_for(self._server.wait_closed(), self.config.shutdown_grace_s + 5)
        except TimeoutError:
            log.warning("forcing connections closed after the grace period")
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        self.host.close()
        if self._metrics_server is not None and self.config.worker is not None:
            self._metrics_server.close()
            self.config.worker.socket_path.unlink(missing_ok=True)
        assert self._closed is not None
        self._closed.set()
        log.info("server closed")

    async def drain(self, timeout_s: float) -> None:
        """Stop taking connections (the other workers on the socket take them),
        let the open sessions go on to their own end, then shut down; sessions
        still open after ``timeout_s`` are finalized as :meth:`shutdown` does."""
        if self._closing or self._server is None:
            return
        log.info("draining %d open session(s), for up to %g s", len(self.runners), timeout_s)
        self._server.close(close_connections=False)
        try:
            await asyncio.wait_for(self._no_connections.wait(), timeout_s)
        except TimeoutError:
            log.warning("drain: sessions still open after %g s are finalized now", timeout_s)
        await self.shutdown()

    def shutdown_soon(self) -> None:
        """Start a graceful shutdown from the event loop's thread (signal handlers)."""
        asyncio.ensure_future(self.shutdown())

    async def serve_forever(self, handle_signals: bool = True) -> None:
        """Serve until SIGINT/SIGTERM (when ``handle_signals``) or :meth:`shutdown`."""
        if self._server is None:
            await self.start()
        assert self._closed is not None
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.shutdown_soon)
        await self._closed.wait()

    async def __aenter__(self) -> StreamServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- HTTP --------------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = urlsplit(request.path).path
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        authorized = token_ok(self.config.token, request.headers.get("Authorization"), request.path)
        if path in (self.config.path, self.config.vosk_path) and upgrade:
            # Refused before the upgrade, as HTTP: a client sees why without a session.
            origin = request.headers.get("Origin")
            host = request.headers.get("Host")
            if not origin_allowed(origin, host, self.config.allowed_origins):
                self.metrics.errors.labels(ErrorCode.UNAUTHORIZED.value).inc()
                log.info("refused connection: origin %r is not allowed", origin)
                return _http_refusal(connection, http.HTTPStatus.FORBIDDEN,
                                f"origin {origin!r} is not allowed (see --origin)")  # fmt: skip
            if not authorized:
                self.metrics.errors.labels(ErrorCode.UNAUTHORIZED.value).inc()
                log.info("refused connection: missing or wrong bearer token")
                return _http_refusal(connection, http.HTTPStatus.UNAUTHORIZED,
                                "missing or wrong bearer token")  # fmt: skip
            return None  # go on with the WebSocket handshake
        if path == self.config.path:
            return connection.respond(http.HTTPStatus.UPGRADE_REQUIRED, "WebSocket endpoint\n")
        if path == "/v1/models":
            if not authorized:
                error = ApiError(401, "missing or wrong bearer token", code="invalid_api_key")
                return _response(connection, http.HTTPStatus.UNAUTHORIZED, error.body(),
                                 "application/json")  # fmt: skip
            body = json.dumps(models_document(self._asr_models())).encode()
            return _response(connection, http.HTTPStatus.OK, body, "application/json")
        if path == "/scenes" or path.startswith("/scenes/"):
            return self._scenes(connection, path)
        if path == "/healthz":
            body = self._health(details=authorized)
            return _response(connection, http.HTTPStatus.OK, body, "application/json")
        if path == "/metrics" and not (authorized or self.config.metrics_public):
            message = "missing or wrong bearer token (or serve with --metrics-public)"
            return _http_refusal(connection, http.HTTPStatus.UNAUTHORIZED, message)
        if path == "/metrics":
            body = self.metrics.exposition()
            if self.config.worker is not None:
                body = await gather_metrics(self.config.worker, body)
            return _response(connection, http.HTTPStatus.OK, body, CONTENT_TYPE)
        if path in STATIC:
            name, ctype = STATIC[path]
            body = resources.files("dsstream.web").joinpath(name).read_bytes()
            return _response(connection, http.HTTPStatus.OK, body, ctype)
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")

    def _scenes(self, connection: ServerConnection, path: str) -> Response:
        status, body, ctype = scenes_route(self.config.scenes_dir, path)
        return _response(connection, http.HTTPStatus(status), body, ctype)

    def _asr_models(self) -> list[str]:
        return asr_model_names(self.registry)

    def _health(self, details: bool = True) -> bytes:
        """The server's state; without the token (on a server that has one),
        only whether it is up."""
        worker = {"worker": self.config.worker.index} if self.config.worker is not None else {}
        state = health_document(self.config, self.host, self._closing, details, self.reloads)
        return json.dumps({**state, **worker} if details else state).encode()

    # -- WebSocket -----------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        self._connections += 1
        self._no_connections.clear()
        try:
            await self._serve_connection(ws)
        finally:
            self._connections -= 1
            if not self._connections:
                self._no_connections.set()

    async def _serve_connection(self, ws: ServerConnection) -> None:
        self.metrics.connections.inc()
        refusal = self._refusal(ws)
        if refusal:
            await self._refuse(ws, *refusal)
            return
        assert ws.request is not None
        if urlsplit(ws.request.path).path == self.config.vosk_path:
            await serve_vosk(self.host, ws)
            return
        runner = SessionRunner(self.host, ws)
        self.runners.add(runner)
        try:
            await runner.run()
        finally:
            self.runners.discard(runner)

    def _refusal(self, ws: ServerConnection) -> tuple[ErrorCode, str] | None:
        # Origin and token were checked before the upgrade (_process_request).
        if self._closing:
            return ErrorCode.BUSY, "server is shutting down"
        return None

    async def _refuse(self, ws: ServerConnection, code: ErrorCode, message: str) -> None:
        error = ServerProtocol(self.config.limits).fail(
            code, message, self.config.busy_retry_after_ms if code is ErrorCode.BUSY else None
        )
        self.metrics.errors.labels(code.value).inc()
        log.info("refused connection: %s", message)
        await ws.send(encode_event(error))
        close = CloseCode.TRY_AGAIN_LATER if code is ErrorCode.BUSY else CloseCode.POLICY_VIOLATION
        await ws.close(close, message[:120])


async def _reload(server: StreamServer, rebuild: Callable[[], PipelineRegistry] | None) -> None:
    """SIGHUP to a single-process server: load the models again, say how it went."""
    print("reload: loading the models again", flush=True)
    try:
        ok = await server.reload(rebuild() if rebuild is not None else None)
    except Exception as exc:  # building the registry failed
        log.error("reload failed: %s", exc)
        ok = False
    if ok:
        print(f"reload: done; {len(server.runners)} open session(s) finish on the "
              "models they started with", flush=True)  # fmt: skip
    else:
        print("reload: failed, see the log; the models loaded before keep serving", flush=True)


def _http_refusal(connection: ServerConnection, status: http.HTTPStatus, message: str) -> Response:
    """An HTTP refusal of a request, with the reason in a JSON body (the same
    ``error`` shape a session gets) and, for 401, how to authenticate."""
    code = ErrorCode.UNAUTHORIZED.value
    body = json.dumps({"type": "error", "code": code, "message": message, "fatal": True})
    response = _response(connection, status, body.encode(), "application/json")
    if status is http.HTTPStatus.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = 'Bearer realm="dsstream"'
    return response


def health_document(
    config: ServerConfig, host: SessionHost, closing: bool, details: bool, reloads: int = 0
) -> dict[str, Any]:
    """/healthz's body for a server (or a Ray Serve replica) with ``config``
    whose sessions run on ``host``: with ``details``, its sessions, models and
    limits; without (no token given to a server that has one), only whether it
    is up."""
    state: dict[str, Any] = {"status": "shutting_down" if closing else "ok"}
    if not details:
        return state
    return {
        **state,
        "version": __version__,
        "sessions": host.active_sessions,
        "max_sessions": config.max_sessions,
        "models": host.registry.describe(),
        "reloads": reloads,
        "limits": asdict(config.limits),
    }


def asr_model_names(registry: PipelineRegistry) -> list[str]:
    """The installed ASR models' names, the default first (GET /v1/models)."""
    models = registry.describe().get("asr", {})
    ready = [name for name, state in models.items() if state == "ok"]
    try:
        default = registry.resolve("asr").name
    except Exception:
        return ready
    return [default] + [name for name in ready if name != default]


def default_scenes_dir() -> Path:
    from dsstream.pipelines.defaults import SAMPLES_DIR

    return SAMPLES_DIR / "vqa" / "images"


def list_scenes(root: Path) -> list[dict[str, Any]]:
    """The PNG scenes in ``root`` with their sample questions (``questions.tsv``:
    image, question, type, answer), sorted; [] where there are none."""
    if not root.is_dir():
        return []
    questions: dict[str, list[str]] = {}
    table = root / "questions.tsv"
    if table.is_file():
        for line in table.read_text(encoding="utf-8").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 2:
                questions.setdefault(parts[0], []).append(parts[1])
    return [{"name": p.name, "questions": questions.get(p.name, [])}
            for p in sorted(root.glob("*.png"))]  # fmt: skip


def scenes_route(scenes_dir: str | None, path: str) -> tuple[int, bytes, str]:
    """``GET /scenes`` (the demo page's sample scenes with their questions) or
    ``/scenes/NAME`` (one PNG; only a listed name is served, so no path
    reaches another file): status, body and content type."""
    root = Path(scenes_dir) if scenes_dir else default_scenes_dir()
    scenes = list_scenes(root)
    if path == "/scenes":
        return 200, json.dumps(scenes).encode(), "application/json"
    name = path.removeprefix("/scenes/")
    if name not in {scene["name"] for scene in scenes}:
        return 404, b"not found\n", "text/plain; charset=utf-8"
    return 200, (root / name).read_bytes(), "image/png"


def _origins_line(allowed: tuple[str, ...]) -> str:
    if "*" in allowed:
        return "any (--origin '*': every web page may open sessions)"
    extra = f", {', '.join(allowed)}" if allowed else ""
    return f"this server's own and loopback{extra} (--origin to add)"


def server_urls(host: str, port: int, path: str) -> tuple[str, str]:
    """The WebSocket endpoint's URL and the demo page's for a server bound there."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host
    return f"ws://{shown}:{port}{path}", f"http://{shown}:{port}/"


def _response(
    connection: ServerConnection, status: http.HTTPStatus, body: bytes, content_type: str
) -> Response:
    headers = Headers()
    headers["Date"] = email.utils.formatdate(usegmt=True)
    headers["Connection"] = "close"
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    return Response(status.value, status.phrase, headers, body)


async def run_server(
    registry: PipelineRegistry,
    config: ServerConfig,
    rebuild: Callable[[], PipelineRegistry] | None = None,
) -> None:
    """Start a server and serve until SIGINT/SIGTERM, then shut down gracefully.

    SIGHUP reloads the models (:meth:`StreamServer.reload`) from ``rebuild()``,
    by default the same registry's models read again from their files.

    As a worker (``config.worker``) it reports ready through its ready file
    instead of printing where it serves (the supervisor does, once for all),
    and stops when the supervisor is gone."""
    server = StreamServer(registry, config)
    await server.start()
    worker = config.worker
    prefix = f"worker {worker.index}: " if worker is not None else ""
    # Load the installed models now, so the first client does not wait for them.
    loop = asyncio.get_running_loop()
    for task, models in registry.describe().items():
        for name, status in models.items():
            if status == "ok":
                factory = registry.resolve(task, name)
                await server.host.run(factory.create)
                server.host.adopt_metrics(factory)
                print(f"{prefix}{task}: {name}: loaded", flush=True)
            else:
                print(f"{prefix}{task}: {name}: {status}", flush=True)
    watcher: asyncio.Future[None] | None = None
    if worker is not None:
        worker.ready_path.touch()
        watcher = asyncio.ensure_future(watch_parent(worker.supervisor, server.shutdown_soon))
        loop.add_signal_handler(  # the supervisor's reload replaced this worker
            signal.SIGUSR1, lambda: asyncio.ensure_future(server.drain(config.drain_timeout_s))
        )
    else:
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(_reload(server, rebuild))
        )
        print(f"dsstream {__version__} serving {server.url}", flush=True)
        print(f"browser origins allowed: {_origins_line(config.allowed_origins)}", flush=True)
        print(f"demo page: {server.http_url}", flush=True)
        if config.vosk_path:
            vosk = server_urls(config.host, server.port, config.vosk_path)[0]
            print(f"Vosk-compatible endpoint: {vosk}", flush=True)
    try:
        await server.serve_forever()
    finally:
        if watcher is not None:
            watcher.cancel()
