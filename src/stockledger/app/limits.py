"""Request body limit: refuse bodies above ``max_body_bytes`` with HTTP 413, before parsing.

Checked twice: the declared ``Content-Length``, then the bytes actually received (a chunked or
lying client is stopped as soon as it passes the limit). The accepted body is buffered (at most
the limit) and replayed to the app.

A refused body is read and thrown away before the 413 is sent (up to :data:`DRAIN_BYTES` and
:data:`DRAIN_SECONDS`): a server that closes a connection with unread bytes in it makes the
kernel reset it (RFC 7230 section 6.6, "lingering close"), and the client then sees a reset
instead of the 413, also on a reused keep-alive connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_METHODS_WITH_BODY = {"POST", "PUT", "PATCH"}
# How much of a refused body is read and dropped so that the client receives the 413: beyond
# it (or past the time) the 413 goes out anyway and the connection closes.
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 5.0


class BodyLimitMiddleware:
    """ASGI middleware: HTTP requests whose body exceeds ``max_body_bytes`` get a 413 whose
    JSON body reads ``{"errors": [{"message": "request body too large: ..."}]}``; a body not
    received within ``read_timeout_seconds`` (a client trickling it) gets a 408."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, read_timeout_seconds: float = 30.0
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_seconds = read_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _METHODS_WITH_BODY:
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _drain(receive, 0)
            await _too_large(send, f"{declared} bytes declared", limit)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_seconds
        while more:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                await _answer(
                    send, 408, f"request body not received within {self.read_timeout_seconds:g} s"
                )
                return
            if message["type"] == "http.disconnect":
                return  # the client went away; nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive, size)
                await _too_large(send, f"more than {limit} bytes sent", limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for disconnect as usual

        await self.app(scope, replay, send)


async def _drain(receive: Receive, size: int) -> None:
    """Read and drop the rest of a request body (``size`` bytes already read), up to
    :data:`DRAIN_BYTES` in all and :data:`DRAIN_SECONDS`."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while size <= DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                size += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, what: str, limit: int) -> None:
    await _answer(send, 413, f"request body too large: {what}, the limit is {limit} bytes")


async def _answer(send: Send, status: int, message: str) -> None:
    """A JSON error answer (``{"errors": [{"message": ...}]}``) that closes the connection."""
    body: dict[str, Any] = {"errors": [{"message": message}]}
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
