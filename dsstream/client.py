"""Python clients for a dsstream server: :class:`Client` (asyncio) and
:class:`BlockingClient` (a blocking wrapper for scripts and notebooks).

Both are thin adapters over :class:`dsstream.protocol.ClientProtocol`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Coroutine, TypeVar

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from dsstream.audio import channel_options, iter_chunks, load_audio
from dsstream.protocol import (
    Answer,
    ClientProtocol,
    Ended,
    Endpoint,
    Error,
    ErrorCode,
    Final,
    Partial,
    ServerEvent,
    Started,
    parse_server_event,
)

__all__ = [
    "Client",
    "BlockingClient",
    "ServerError",
    "AudioSource",
    "Reconnect",
    "transcribe_resumable",
]

T = TypeVar("T")

# A file path, or (samples [n] float32 in [-1, 1], sample_rate in Hz).
AudioSource = str | Path | tuple[np.ndarray, int]


class ServerError(Exception):
    """The server answered with an ``error`` event where a result was expected."""

    def __init__(self, event: Error) -> None:
        super().__init__(f"{event.code.value}: {event.message}")
        self.event = event
        self.code: ErrorCode = event.code


def _refusal_event(exc: Any) -> Error:
    """The ``error`` a server's HTTP refusal of the handshake carries (401:
    token, 403: origin), or one made from its status."""
    response = exc.response
    try:
        event = parse_server_event(response.body.decode())
        if isinstance(event, Error):
            return event
    except Exception:
        pass
    code = ErrorCode.UNAUTHORIZED if response.status_code in (401, 403) else ErrorCode.INTERNAL
    return Error(code, f"the server refused the connection: HTTP {response.status_code}", True)


def _read_source(source: AudioSource, channels: bool = False) -> tuple[np.ndarray, int]:
    """Samples ``[n]``, or ``[n, channels]`` when ``channels`` (split_channels)."""
    if isinstance(source, tuple):
        samples, rate = source
        arr = np.asarray(samples, dtype=np.float32)
        return (arr if channels else arr.reshape(-1)), int(rate)
    return load_audio(source, mono=not channels)


def _read_image(image: bytes | str | Path) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return Path(image).read_bytes()


class Client:
    """An asyncio client for one session.

    ``url`` is the WebSocket endpoint, e.g. ``ws://127.0.0.1:8765/v1/stream``;
    ``token`` is sent as a bearer token.  Use as an async context manager.
    """

    def __init__(self, url: str, token: str | None = None, open_timeout: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.open_timeout = open_timeout
        self.protocol = ClientProtocol()
        self._ws: ClientConnection | None = None
        self._pending: collections.deque[ServerEvent] = collections.deque()
        self._encoding = "pcm_s16le"
        self._tagged = False
        self._in_session = False  # between start and ended: a lost connection is an error

    # -- connection ------------------------------------------------------------

    async def connect(self) -> Client:
        from websockets.exceptions import InvalidStatus

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            self._ws = await connect(
                self.url,
                additional_headers=headers,
                open_timeout=self.open_timeout,
                compression=None,
                max_size=None,
            )
        except InvalidStatus as exc:  # refused before the upgrade: token or origin
            raise ServerError(_refusal_event(exc)) from None
        return self

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def ws(self) -> ClientConnection:
        if self._ws is None:
            raise RuntimeError("client is not connected; use 'async with Client(url)'")
        return self._ws

    # -- requests ----------------------------------------------------------------

    async def start(self, task: str = "asr", **options: Any) -> Started:
        """Start a session; return ``started`` or raise :class:`ServerError`."""
        await self.ws.send(self.protocol.start(task, **options))
        speech = options.get("speech")
        # A vqa session with spoken questions tags each binary frame with its kind.
        self._tagged = task == "vqa" and bool(speech)
        encoding = speech.get("encoding") if isinstance(speech, dict) else None
        self._encoding = encoding or options.get("encoding", "pcm_s16le")
        while True:
            event = await self._recv_raw()
            if event is None:
                raise ConnectionError("server closed the connection before 'started'")
            if isinstance(event, Started):
                self._in_session = True
                return event
            if isinstance(event, Error):
                raise ServerError(event)
            self._pending.append(event)

    async def send_audio(self, samples: np.ndarray | bytes) -> None:
        """Send float samples in [-1, 1] (encoded as declared in start) or raw bytes."""
        await self.ws.send(self.protocol.audio(samples, self._encoding, self._tagged))

    async def send_image(self, image: bytes | str | Path) -> None:
        await self.ws.send(self.protocol.image(_read_image(image), self._tagged))

    async def flush(self) -> None:
        await self.ws.send(self.protocol.flush())

    async def end(self) -> None:
        await self.ws.send(self.protocol.end())

    async def ask(self, text: str, qid: str | None = None, timeout: float | None = 60) -> Answer:
        """Ask about the latest image; return the answer or raise :class:`ServerError`.

        Other events that arrive meanwhile stay queued for :meth:`recv`.
        """
        qid, message = self.protocol.question(text, qid)
        await self.ws.send(message)
        async with asyncio.timeout(timeout):
            while True:
                event = await self._recv_raw()
                if event is None:
                    raise ConnectionError("server closed the connection before answering")
                if isinstance(event, Answer) and event.id == qid:
                    return event
                if isinstance(event, Error):
                    raise ServerError(event)
                self._pending.append(event)

    # -- events ------------------------------------------------------------------

    async def _recv_raw(self) -> ServerEvent | None:
        try:
            message = await self.ws.recv()
        except ConnectionClosed as closed:
            return self._lost(closed)
        if isinstance(message, bytes):
            raise ValueError("unexpected binary frame from the server")
        event = self.protocol.receive(message)
        if isinstance(event, Ended) or (isinstance(event, Error) and event.fatal):
            self._in_session = False
        return event

    def _lost(self, closed: ConnectionClosed) -> Error | None:
        """A session whose connection closed before ``ended`` (its server
        process died: a killed worker, a lost Ray Serve replica) gets one fatal
        ``unavailable`` error, then None."""
        if not self._in_session:
            return None
        self._in_session = False
        code = closed.rcvd.code if closed.rcvd is not None else 1006
        return Error(
            ErrorCode.UNAVAILABLE,
            f"the connection was lost before the session ended (close code {code}); "
            "start a new session",
            fatal=True,
        )

    async def recv(self, timeout: float | None = None) -> ServerEvent | None:
        """The next event, or None once the server closed the connection."""
        if self._pending:
            return self._pending.popleft()
        async with asyncio.timeout(timeout):
            return await self._recv_raw()

    async def events(self) -> AsyncIterator[ServerEvent]:
        """Events until ``ended`` (included) or the connection closes."""
        while True:
            event = await self.recv()
            if event is None:
                return
            yield event
            if isinstance(event, Ended):
                return

    async def stream_audio(
        self,
        samples: np.ndarray | Iterable[np.ndarray],
        sample_rate: int,
        chunk_ms: float = 100.0,
        realtime: bool = False,
    ) -> None:
        """Send audio: an array (cut into ``chunk_ms`` chunks) or an iterable of chunks.

        With ``realtime`` the chunks go out at the pace of the audio, as a live
        source would send them; otherwise as fast as the server reads them.
        """
        chunks = (
            iter_chunks(samples, sample_rate, chunk_ms)
            if isinstance(samples, np.ndarray)
            else samples
        )
        t0 = time.monotonic()
        sent = 0.0
        for chunk in chunks:
            await self.send_audio(chunk)
            sent += len(chunk) / sample_rate
            if realtime:
                await asyncio.sleep(max(0.0, t0 + sent - time.monotonic()))

    async def transcribe(
        self,
        source: AudioSource,
        chunk_ms: float = 100.0,
        realtime: bool = False,
        **options: Any,
    ) -> AsyncIterator[ServerEvent]:
        """Start an ASR session, stream ``source``, end, and yield every event.

        Audio is sent concurrently with reading events, so partials arrive while
        the audio is still being sent.
        """
        samples, rate = _read_source(source, bool(options.get("split_channels")))
        options = channel_options(samples, options)
        await self.start("asr", sample_rate=rate, **options)
        async for event in self.transcribe_started(samples, rate, chunk_ms, realtime):
            yield event

    async def transcribe_started(
        self, samples: np.ndarray, rate: int, chunk_ms: float = 100.0, realtime: bool = False
    ) -> AsyncIterator[ServerEvent]:
        """In a started ASR session: send ``samples`` and ``end`` while yielding
        every event, until ``ended`` or the connection closes."""

        async def feed() -> None:
            await self.stream_audio(samples, rate, chunk_ms, realtime)
            await self.end()

        sender = asyncio.create_task(feed())
        try:
            async for event in self.events():
                yield event
            await sender
        finally:
            sender.cancel()


@dataclass(frozen=True)
class Reconnect:
    """When a transcription's connection is lost (a worker killed: the socket
    drops without a close frame) or the server shuts down before the audio
    is all sent, connect again up to ``attempts`` times, ``delay_s`` apart
    (doubling), and resume (see :func:`transcribe_resumable`)."""

    attempts: int = 3
    delay_s: float = 0.5


async def transcribe_resumable(
    url: str,
    source: AudioSource,
    token: str | None = None,
    reconnect: Reconnect = Reconnect(),
    chunk_ms: float = 100.0,
    realtime: bool = False,
    **options: Any,
) -> AsyncIterator[ServerEvent]:
    """:meth:`Client.transcribe` that survives a lost connection.

    Audio up to the end of the last final is done; after a loss, a new session
    starts with the same options and the audio from there is sent again (the
    unfinished segment's audio, whose partials are repeated), so no final is
    lost or doubled.  Events of a resumed session are shifted to read as one
    stream: times by the audio already done, segments by those already
    finalized.  One ``ended`` comes at the end.  ``split_channels`` sessions
    are not resumable (their channels finalize at different points)."""
    if options.get("split_channels"):
        raise ValueError("split_channels sessions are not resumable: use Client.transcribe")
    samples, rate = _read_source(source)
    options = channel_options(samples, options)
    done_s, segments, failures = 0.0, 0, 0
    while True:
        offset_s, first_segment = done_s, segments
        client = Client(url, token)
        try:
            await client.connect()
            await client.start("asr", sample_rate=rate, **options)
        except (OSError, ConnectionError) as exc:
            failures += 1
            if failures > reconnect.attempts:
                raise ConnectionError(f"gave up after {failures} tries: {exc}") from exc
            await asyncio.sleep(reconnect.delay_s * 2 ** (failures - 1))
            continue
        ended: Ended | None = None
        remaining = samples[int(round(offset_s * rate)) :]
        try:
            async for event in client.transcribe_started(remaining, rate, chunk_ms, realtime):
                if isinstance(event, Ended):
                    ended = event
                    break
                if isinstance(event, Error) and event.code is ErrorCode.UNAVAILABLE:
                    break  # the connection was lost: resumed below
                event = _shifted(event, offset_s, first_segment)
                if isinstance(event, Final):
                    done_s, segments = event.end, event.segment + 1
                yield event
        except (ConnectionClosed, OSError):
            pass  # lost while sending: resumed below
        finally:
            await client.close()
        if ended is not None and ended.reason != "shutdown":
            yield ended
            return
        if ended is not None and done_s * rate >= len(samples) - 1:
            yield ended  # a shutdown after the last final: nothing left to send
            return
        failures += 1
        if failures > reconnect.attempts:
            raise ConnectionError(f"the connection was lost {failures} times; gave up")
        await asyncio.sleep(reconnect.delay_s * 2 ** (failures - 1))


def _shifted(event: ServerEvent, offset_s: float, segments: int) -> ServerEvent:
    """``event`` of a resumed session as part of the whole stream."""
    if not (offset_s or segments):
        return event
    if isinstance(event, Final):
        words = tuple(replace(w, start=w.start + offset_s, end=w.end + offset_s)
                      for w in event.words)  # fmt: skip
        return replace(event, segment=event.segment + segments, start=event.start + offset_s,
                       end=event.end + offset_s, words=words)  # fmt: skip
    if isinstance(event, Partial):
        time = None if event.time is None else event.time + offset_s
        return replace(event, segment=event.segment + segments, time=time)
    if isinstance(event, Endpoint):
        return replace(event, segment=event.segment + segments, time=event.time + offset_s)
    return event


class BlockingClient:
    """A blocking wrapper around :class:`Client` (its own event loop thread).

    Every method of :class:`Client` exists here without ``await``; ``events``
    and ``transcribe`` are plain iterators.
    """

    def __init__(self, url: str, token: str | None = None, open_timeout: float = 10.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client = Client(url, token, open_timeout)
        try:
            self._run(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        while True:
            try:
                yield self._run(agen.__anext__())  # type: ignore[arg-type]
            except StopAsyncIteration:
                return

    def start(self, task: str = "asr", **options: Any) -> Started:
        return self._run(self._client.start(task, **options))

    def send_audio(self, samples: np.ndarray | bytes) -> None:
        self._run(self._client.send_audio(samples))

    def send_image(self, image: bytes | str | Path) -> None:
        self._run(self._client.send_image(image))

    def ask(self, text: str, qid: str | None = None, timeout: float | None = 60) -> Answer:
        return self._run(self._client.ask(text, qid, timeout))

    def flush(self) -> None:
        self._run(self._client.flush())

    def end(self) -> None:
        self._run(self._client.end())

    def recv(self, timeout: float | None = None) -> ServerEvent | None:
        return self._run(self._client.recv(timeout))

    def events(self) -> Iterator[ServerEvent]:
        return self._iterate(self._client.events())

    def stream_audio(self, samples: np.ndarray, sample_rate: int, **kw: Any) -> None:
        self._run(self._client.stream_audio(samples, sample_rate, **kw))

    def transcribe(self, source: AudioSource, **kw: Any) -> Iterable[ServerEvent]:
        return self._iterate(self._client.transcribe(source, **kw))

    def close(self) -> None:
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
