"""``POST /v1/audio/transcriptions`` on the streaming server's own port.

websockets' HTTP layer reads a request's headers only and refuses any body,
so a POST is taken from it at its first bytes: :class:`RestConnection`
(websockets' documented ``create_connection`` hook, a ``ServerConnection``
subclass) hands a connection whose request starts with ``POST`` to
:class:`UploadHandler` before websockets parses it; every other request
(WebSocket upgrades, GET) goes on to websockets as before.

:class:`UploadHandler` speaks HTTP/1.1 through ``h11`` and parses the
multipart form with ``python-multipart`` as it arrives (the file goes to a
temporary file, spilled to disk past 1 MiB), then transcribes it on the
server's pipeline pool under the same admission as WebSocket sessions (a busy
server answers 429 with Retry-After), reading it in 10 s pieces.  The form and
the responses are :mod:`dsstream.openai_api`'s; one request per connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

import h11
from websockets.asyncio.server import ServerConnection

from dsstream.access import token_ok
from dsstream.host import Lease, SessionHost
from dsstream.local import file_pieces, transcribe_pieces
from dsstream.openai_api import ApiError, TranscriptionRequest, parse_request, render

__all__ = [
    "TRANSCRIPTIONS_PATH", "RestConnection", "UploadHandler", "UploadSettings",
    "transcribe_upload", "answer_upload",
]  # fmt: skip

log = logging.getLogger("dsstream.rest")

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
_MEMORY_FILE_BYTES = 1 << 20  # an upload past this spills to a temporary file
_MAX_FIELD_BYTES = 64 << 10  # a text field (the prompt is the longest)


class UploadSettings:
    """What an upload handler needs of the server: the pipeline host, the
    token, the size limit, the ASR model names (the first is the default)
    and the busy retry hint."""

    def __init__(
        self,
        host: SessionHost,
        token: str | None,
        max_upload_bytes: int,
        asr_models: Callable[[], list[str]],
        retry_after_s: int,
    ) -> None:
        self.host, self.token, self.max_upload_bytes = host, token, max_upload_bytes
        self.asr_models, self.retry_after_s = asr_models, retry_after_s
        self.open: set[UploadHandler] = set()  # for a graceful shutdown


class _Detached:
    """The transport a diverted websockets connection is left with: websockets
    tidies up a connection whose handshake failed, which must not touch the
    socket the upload handler now owns."""

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True


class _Diverted(Exception):
    pass


class RestConnection(ServerConnection):
    """websockets' server connection, except that a request starting with
    ``POST`` goes to an :class:`UploadHandler` (``uploads``)."""

    def __init__(self, *args: Any, uploads: UploadSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._uploads = uploads
        self._first = b""  # bytes before the method is known
        self._decided = False
        self._diverted = asyncio.Event()

    @classmethod
    def serving(cls, uploads: UploadSettings) -> type[RestConnection]:
        """The class to give websockets' ``serve(create_connection=...)``."""

        class Bound(cls):  # type: ignore[valid-type,misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, uploads=uploads, **kwargs)

        return Bound

    def data_received(self, data: bytes) -> None:
        if self._decided:
            super().data_received(data)
            return
        self._first += data
        if len(self._first) < 5 and b"POST ".startswith(self._first):
            return  # too short to tell
        self._decided = True
        data, self._first = self._first, b""
        if not data.startswith(b"POST "):
            super().data_received(data)
            return
        transport = self.transport
        handler = UploadHandler(self._uploads)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        self.transport = _Detached()  # type: ignore[assignment]
        self._diverted.set()
        handler.data_received(data)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        # websockets awaits this for every connection; a diverted one fails it
        # at once, so websockets lets go of it (and of nothing else).
        shake = asyncio.ensure_future(super().handshake(*args, **kwargs))
        diverted = asyncio.ensure_future(self._diverted.wait())
        done, _ = await asyncio.wait({shake, diverted}, return_when=asyncio.FIRST_COMPLETED)
        diverted.cancel()
        if shake in done:
            return shake.result()
        shake.cancel()
        raise _Diverted()


class UploadHandler(asyncio.Protocol):
    """One HTTP request: ``POST /v1/audio/transcriptions`` with a multipart
    form, answered as OpenAI's API answers; anything else gets an error."""

    def __init__(self, settings: UploadSettings) -> None:
        self.settings = settings
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=64 << 10)
        self.transport: asyncio.Transport | None = None
        self.lease: Lease | None = None
        self.form: Any = None
        self.fields: dict[str, list[str]] = {}
        self.file: BinaryIO | None = None
        self.received = 0
        self.done = False
        self.task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.settings.open.add(self)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.http.receive_data(data)
        try:
            self._events()
        except ApiError as error:
            self._respond_error(error)
        except h11.RemoteProtocolError as exc:
            self._respond_error(ApiError(400, f"malformed HTTP request: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True  # nothing more is sent
        if self.task is None or self.task.done():
            self._release()
        # else: the transcription runs on to its end on a pool thread (it
        # cannot be interrupted), holding its session slot; the task releases it.
        self.settings.open.discard(self)

    # -- the request -----------------------------------------------------------------

    def _events(self) -> None:
        while not self.done:
            event = self.http.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._begin(event)
            elif isinstance(event, h11.Data):
                self._body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._end()
                return

    def _begin(self, request: h11.Request) -> None:
        target = request.target.decode("latin-1")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        if target.split("?", 1)[0] != TRANSCRIPTIONS_PATH:
            raise ApiError(404, f"no POST route {target.split('?', 1)[0]!r}; POST "
                           f"{TRANSCRIPTIONS_PATH}", code="not_found")  # fmt: skip
        if not token_ok(self.settings.token, headers.get("authorization"), target):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer ...)",
                           code="invalid_api_key")  # fmt: skip
        length = headers.get("content-length")
        if length is not None and int(length) > self.settings.max_upload_bytes:
            raise self._too_large()
        from python_multipart import FormParser
        from python_multipart.multipart import parse_options_header

        ctype, params = parse_options_header(headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or b"boundary" not in params:
            raise ApiError(400, "the request must be multipart/form-data with a file and a "
                           "model", "file")  # fmt: skip
        self.lease = self.settings.host.admit("asr")
        if self.lease is None:
            raise ApiError(429, "the server is at its session limit; retry later",
                           code="server_busy", type="server_busy")  # fmt: skip
        self.form = FormParser(
            "multipart/form-data", self._field, self._file, boundary=params[b"boundary"],
            config={"MAX_MEMORY_FILE_SIZE": _MEMORY_FILE_BYTES,
                    "MAX_BODY_SIZE": self.settings.max_upload_bytes},
        )  # fmt: skip

    def _too_large(self) -> ApiError:
        limit = self.settings.max_upload_bytes
        return ApiError(413, f"the upload is larger than this server's limit of "
                        f"{limit / (1 << 20):.0f} MiB", "file", "file_too_large")  # fmt: skip

    def _field(self, field: Any) -> None:
        name = (field.field_name or b"").decode("utf-8", "replace")
        value = (field.value or b"")[:_MAX_FIELD_BYTES].decode("utf-8", "replace")
        self.fields.setdefault(name, []).append(value)

    def _file(self, upload: Any) -> None:
        if upload.field_name == b"file" and self.file is None:
            self.file = upload.file_object  # in memory, or on disk past the threshold

    def _body(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.settings.max_upload_bytes:
            raise self._too_large()
        assert self.form is not None
        self.form.write(data)

    def _end(self) -> None:
        assert self.form is not None
        self.form.finalize()
        self.task = asyncio.ensure_future(self._answer())

    async def _answer(self) -> None:
        try:
            assert self.lease is not None
            body, ctype = await answer_upload(
                self.settings.host, self.lease, self.fields, self.file, self.settings.asr_models()
            )
            self._respond(200, body, ctype)
        except ApiError as error:
            self._respond_error(error)
        except Exception:
            log.exception("transcription request failed")
            self._respond_error(ApiError(500, "the server failed while transcribing",
                                         type="server_error"))  # fmt: skip
        finally:
            self._release()

    # -- the response ------------------------------------------------------------------

    def _respond_error(self, error: ApiError) -> None:
        extra = []
        if error.status == 429:
            extra.append(("Retry-After", str(self.settings.retry_after_s)))
        if error.status == 401:
            extra.append(("WWW-Authenticate", 'Bearer realm="dsstream"'))
        self.settings.host.metrics.errors.labels(f"http_{error.status}").inc()
        self._respond(error.status, error.body(), "application/json", extra)
        self._release()

    def _respond(
        self, status: int, body: bytes, ctype: str, extra: list[tuple[str, str]] | None = None
    ) -> None:
        if self.done or self.transport is None:
            return
        self.done = True
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                   ("Connection", "close"), *(extra or [])]  # fmt: skip
        out = b""
        try:
            out += self.http.send(h11.Response(status_code=status, headers=headers)) or b""
            out += self.http.send(h11.Data(data=body)) or b""
            out += self.http.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:  # the request itself was beyond answering
            out = (f"HTTP/1.1 {status} \r\nContent-Type: {ctype}\r\nContent-Length: "
                   f"{len(body)}\r\nConnection: close\r\n\r\n").encode() + body  # fmt: skip
        self.transport.write(out)
        self.transport.close()

    def _release(self) -> None:
        if self.lease is not None and not self.lease.released:
            self.lease.release()
        if self.file is not None and self.done:
            self.file.close()


def transcribe_upload(
    lease: Lease, file: BinaryIO, request: TranscriptionRequest
) -> tuple[Any, float]:
    """On a pool thread: decode the upload piece by piece and transcribe it
    with the session's pinned models."""
    import soundfile as sf

    file.seek(0)
    try:
        audio = sf.SoundFile(file)
    except (sf.LibsndfileError, RuntimeError) as exc:
        message = (
            f"the file is not audio this server can decode (WAV, FLAC, Ogg/Opus, MP3...): {exc}"
        )
        raise ApiError(400, message, "file", "invalid_file_format") from None
    with audio:
        if audio.frames == 0:
            raise ApiError(400, "the audio file holds no samples", "file", "empty_file")
        rate, duration = audio.samplerate, audio.frames / audio.samplerate
        pieces = file_pieces(audio)
        options = request.asr_options()
        if "punctuate" not in options:  # uploads are read: punctuated where the model can
            factory = lease.registry.resolve("asr", request.model)
            options["punctuate"] = getattr(factory, "punct", None) is not None
        transcript = transcribe_pieces(pieces, rate, lease.registry, **options)
    return transcript, duration


async def answer_upload(
    host: SessionHost,
    lease: Lease,
    fields: Mapping[str, Sequence[str]],
    file: BinaryIO | None,
    models: list[str],
) -> tuple[bytes, str]:
    """A received form's answer (body, content type): the fields checked,
    the file transcribed on ``host``'s pool with ``lease``'s models.  Raises
    :class:`ApiError`.  The server's own port and Ray Serve replicas both
    answer through it."""
    request = parse_request(fields, models)
    if file is None:
        raise ApiError(400, "the form has no 'file' part with the audio", "file")
    transcript, duration = await host.run(transcribe_upload, lease, file, request)
    return render(request, transcript, duration)
