"""Authentication at the HTTP edge (ARCHITECTURE section 13): ``Authorization: Bearer <secret>``
on every ``/graphql`` request when ``settings.auth`` is ``required``.

A missing, malformed, unknown, expired or revoked key answers HTTP 401 with
``WWW-Authenticate: Bearer`` (RFC 6750, section 3) and
``{"errors": [{"message": ..., "extensions": {"code": "UNAUTHENTICATED"}}]}``; nothing of
GraphQL runs, introspection included. A good key is left in the request's ASGI state
(``api_key``) for the GraphQL context, whose scopes it sets, and bound to the log lines written
while the request runs (``observability.logs.caller``). A browser's GET of the GraphiQL
page (no ``query``) needs no key: the page's own requests do. While the database (which holds
the keys) is away, a key not in the cache gets HTTP 503 ``UNAVAILABLE`` with ``Retry-After``.

The key's org is the org the request acts for (tenancy: the GraphQL context's service and
reads are that org's).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from stockledger.db.engine import is_connection_lost
from stockledger.observability.logs import caller

GRAPHQL_PATH = "/graphql"


class AuthMiddleware:
    """ASGI middleware for :data:`GRAPHQL_PATH`, installed only when ``settings.auth`` is
    ``required``; other paths (``/healthz``, ``/readyz``, ``/metrics``, GraphiQL's files)
    stay open. Reads the key store at ``app.state.api_keys``
    (:class:`~stockledger.services.api_keys.ApiKeys`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != GRAPHQL_PATH or _is_ide_page(scope):
            await self.app(scope, receive, send)
            return
        secret = _bearer(scope)
        if secret is None:
            await _refuse(
                send, 401, "UNAUTHENTICATED", "an API key is needed: Authorization: Bearer <key>"
            )
            return
        try:
            key = await scope["app"].state.api_keys.authenticate(secret)
        except Exception as exc:
            if not (is_connection_lost(exc) or isinstance(exc, TimeoutError)):
                raise
            # The key store is the database: while it is away, say so as the writes do.
            await _refuse(
                send, 503, "UNAVAILABLE", "the API keys cannot be read now: the database is away"
            )
            return
        if key is None:
            await _refuse(
                send, 401, "UNAUTHENTICATED", "the API key is unknown, expired or revoked"
            )
            return
        scope.setdefault("state", {})["api_key"] = key
        token = caller.set((key.id, key.name, key.org))
        try:
            await self.app(scope, receive, send)
        finally:
            caller.reset(token)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if kind.lower() == "bearer" and token.strip() else None
    return None


def _is_ide_page(scope: Scope) -> bool:
    if scope["method"] != "GET" or b"query=" in scope.get("query_string", b""):
        return False
    accept = dict(scope.get("headers") or ()).get(b"accept", b"")
    return b"text/html" in accept


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    extensions: dict[str, Any] = {"code": code}
    if status == 503:
        extensions["retryAfterMs"] = 1000  # as the writes' UNAVAILABLE carries it
    body: dict[str, Any] = {"errors": [{"message": message, "extensions": extensions}]}
    payload = orjson.dumps(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="stockledger"'))
    if status == 503:
        headers.append((b"retry-after", b"1"))  # RFC 9110 section 10.2.3, in seconds
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
