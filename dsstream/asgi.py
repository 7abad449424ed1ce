"""A WebSocket of an ASGI server (Starlette's, under FastAPI or Ray Serve) as
the connection the session runners drive (:class:`dsstream.host.Connection`),
so a session is served the same whichever server carries it."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

from dsstream.errors import CloseCode

__all__ = ["AsgiConnection"]

_CLOSED = object()


class AsgiConnection:
    """A Starlette WebSocket with the surface :class:`dsstream.host.Connection`
    asks for (websockets' own), so the same runners serve it.

    A reader task moves incoming messages to a queue, which makes ``recv``
    safe to cancel (the runners cancel it on a timeout or a stop) without
    losing a message."""

    def __init__(self, websocket: Any) -> None:
        self.websocket = websocket
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._close_code: int | None = None  # the client's, once it closed
        self._closed = False

    async def accept(self, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self.websocket.accept(headers=headers)
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                self._close_code = int(message.get("code", 1000))
                self._inbox.put_nowait(_CLOSED)
                return
            data = message.get("bytes")
            self._inbox.put_nowait(data if data is not None else message.get("text", ""))

    def _closed_error(self) -> Exception:
        code = self._close_code or CloseCode.NORMAL
        frame = Close(code, "")
        kind = ConnectionClosedOK if code in (1000, 1001) else ConnectionClosedError
        return kind(frame, None)

    async def recv(self) -> str | bytes:
        item = await self._inbox.get()
        if item is _CLOSED:
            self._inbox.put_nowait(_CLOSED)  # every later recv sees the close too
            raise self._closed_error()
        return item

    async def send(self, message: str | bytes) -> None:
        if self._closed or self._close_code is not None:
            raise self._closed_error()
        try:
            if isinstance(message, bytes):
                await self.websocket.send_bytes(message)
            else:
                await self.websocket.send_text(message)
        except Exception:  # the client went away under us
            self._close_code = self._close_code or 1006
            raise self._closed_error() from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        if self._close_code is None:  # the client has not closed it already
            try:
                await self.websocket.close(code, reason)
            except Exception:
                pass  # already gone
        if self._reader is not None:
            self._reader.cancel()
