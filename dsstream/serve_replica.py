"""One Ray Serve replica of the streaming endpoint (:mod:`dsstream.serve_ray`).

Imported only where Ray Serve runs (the ray extra brings FastAPI).  No
``from __future__ import annotations`` here: FastAPI reads the handlers'
parameter types at run time to inject the WebSocket and the request.
"""

import asyncio
import json
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket
from ray import serve

from dsstream.access import origin_allowed, token_ok
from dsstream.asgi import AsgiConnection
from dsstream.errors import CloseCode, ErrorCode
from dsstream.host import SessionHost
from dsstream.metrics import CONTENT_TYPE
from dsstream.openai_api import ApiError, models_document
from dsstream.pipelines.defaults import default_registry
from dsstream.rest import answer_upload
from dsstream.server import (
    STATIC,
    ServerConfig,
    asr_model_names,
    health_document,
    scenes_route,
)
from dsstream.session import SessionRunner
from dsstream.vosk import serve_vosk

__all__ = ["REPLICA_HEADER", "StreamReplica"]

REPLICA_HEADER = "x-dsstream-replica"  # the handshake response names the replica

api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(api)
class StreamReplica:
    """The pipelines, their pool and metrics, and the server's routes; the
    paths are the replica's ``ServerConfig``'s.

    Everything the methods call is imported from other modules or lives on
    the class: Serve ships the class to the replica by value, without this
    file's module-level helpers."""

    def __init__(self, config: ServerConfig, registry_args: dict[str, Any]) -> None:
        # Imported here: Serve ships this class to the replica by value, and a
        # module-level helper of this file would not come with it.
        from dsstream.ray_cluster import keep_internal_server_on_loopback

        keep_internal_server_on_loopback()
        self.config = config
        registry = default_registry(**registry_args)
        self.host = SessionHost(registry, config.session_settings(), None, config.worker_threads)
        for task, models in registry.describe().items():  # ready before the first client
            for name, status in models.items():
                if status == "ok":
                    factory = registry.resolve(task, name)
                    factory.create()
                    self.host.adopt_metrics(factory)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.runners: set[SessionRunner] = set()
        self.closing = False

    def check_health(self) -> None:
        if self.closing:
            raise RuntimeError("replica shutting down")

    @api.websocket("/{path:path}")
    async def websocket(self, websocket: WebSocket, path: str) -> None:
        config, route = self.config, "/" + path
        query = websocket.url.query
        full = route + (f"?{query}" if query else "")
        origin = websocket.headers.get("origin")
        allowed = origin_allowed(origin, websocket.headers.get("host"), config.allowed_origins)
        authorized = token_ok(config.token, websocket.headers.get("authorization"), full)
        if route not in (config.path, config.vosk_path) or not (allowed and authorized):
            # Refused before the handshake completes: the client gets HTTP 403.
            self.host.metrics.errors.labels(ErrorCode.UNAUTHORIZED.value).inc()
            await websocket.close(CloseCode.POLICY_VIOLATION)
            return
        conn = AsgiConnection(websocket)
        await conn.accept([(REPLICA_HEADER.encode(), self.replica.encode())])
        self.host.metrics.connections.inc()
        try:
            if route == config.vosk_path:
                await serve_vosk(self.host, conn)
                return
            runner = SessionRunner(self.host, conn)
            self.runners.add(runner)
            try:
                await runner.run()
            finally:
                self.runners.discard(runner)
        finally:
            await conn.close()

    @api.get("/{path:path}")
    async def http(self, request: Request, path: str) -> Response:
        config, route = self.config, "/" + path
        full = route + (f"?{request.url.query}" if request.url.query else "")
        authorized = token_ok(config.token, request.headers.get("authorization"), full)
        if route == "/healthz":
            doc = health_document(config, self.host, self.closing, authorized)
            if authorized:
                doc["replica"] = self.replica
            return Response(json.dumps(doc), media_type="application/json")
        if route == "/metrics":
            if not (authorized or config.metrics_public):
                return self._unauthorized("missing or wrong bearer token")
            return Response(self.host.metrics.exposition(), media_type=CONTENT_TYPE)
        if route in (config.path, config.vosk_path):
            return Response("WebSocket endpoint\n", status_code=426)
        if route == "/v1/models":
            if not authorized:
                return self._api_error(ApiError(401, "missing or wrong bearer token",
                                           code="invalid_api_key"))  # fmt: skip
            doc = models_document(asr_model_names(self.host.registry))
            return Response(json.dumps(doc), media_type="application/json")
        if route == "/scenes" or route.startswith("/scenes/"):
            status, body, ctype = scenes_route(config.scenes_dir, route)
            return Response(body, status_code=status, media_type=ctype)
        if route in STATIC:
            name, ctype = STATIC[route]
            body = resources.files("dsstream.web").joinpath(name).read_bytes()
            return Response(body, media_type=ctype.split(";")[0])
        return Response("not found\n", status_code=404)

    @api.post("/v1/audio/transcriptions")
    async def transcriptions(self, request: Request) -> Response:
        """The OpenAI-compatible upload (docs/protocol.md), as the server's own
        port answers it: same checks, admission, pool and responses."""
        config = self.config
        full = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if not token_ok(config.token, request.headers.get("authorization"), full):
            return self._api_error(ApiError(401, "missing or wrong bearer token",
                                       code="invalid_api_key"))  # fmt: skip
        if int(request.headers.get("content-length") or 0) > config.max_upload_bytes:
            return self._api_error(ApiError(413, "the upload is larger than this server's limit",
                                       "file", "file_too_large"))  # fmt: skip
        lease = self.host.admit("asr")
        if lease is None:
            retry = str(max(1, round(config.busy_retry_after_ms / 1000)))
            return self._api_error(ApiError(429, "the server is at its session limit; retry later",
                                       code="server_busy", type="server_busy"),
                              {"Retry-After": retry})  # fmt: skip
        try:
            form = await request.form()
            fields = {k: [v for v in form.getlist(k) if isinstance(v, str)] for k in form}
            upload = form.get("file")
            file = None if upload is None or isinstance(upload, str) else upload.file
            models = asr_model_names(self.host.registry)
            body, ctype = await answer_upload(self.host, lease, fields, file, models)
            return Response(body, media_type=ctype.split(";")[0])
        except ApiError as error:
            return self._api_error(error)
        finally:
            lease.release()

    @staticmethod
    def _api_error(error: ApiError, headers: dict[str, str] | None = None) -> Response:
        return Response(error.body(), status_code=error.status, media_type="application/json",
                        headers=headers)  # fmt: skip

    @staticmethod
    def _unauthorized(message: str) -> Response:
        body = json.dumps({"type": "error", "code": ErrorCode.UNAUTHORIZED.value,
                           "message": message, "fatal": True})  # fmt: skip
        return Response(body, status_code=401, media_type="application/json",
                        headers={"WWW-Authenticate": 'Bearer realm="dsstream"'})  # fmt: skip

    async def __del__(self) -> None:
        # Serve calls this once the drain is over (every session ended) or when
        # the deployment is deleted: finish what is left, then free the pool.
        self.closing = True
        for runner in list(self.runners):
            runner.request_stop("shutdown")
        for _ in range(50):
            if not self.runners:
                break
            await asyncio.sleep(0.1)
        self.host.close()
