"""Authentication at the HTTP edge (ARCHITECTURE section 13): ``Authorization: Bearer <secret>``
on every ``/graphql`` request when ``settings.auth`` is ``required``.

A missing, malformed, unknown, expired or revoked key answers HTTP 401 with
``WWW-Authenticate: Bearer`` (RFC 6750, section 3) and
``{"errors": [{"message": ..., "extensions": {"code": "UNAUTHENTICATED"}}]}``; nothing of
GraphQL runs, introspection included. A good key is left in the request's ASGI state
(``api_key``) for the GraphQL context, whose scopes it sets. A browser's GET of the GraphiQL
page (no ``query``) needs no key: the page's own requests do.

Tenancy comes later (issue 10): until then a process serves one org, ``STOCKLEDGER_ORG_ID``,
and a key of another org is refused here (HTTP 403, ``FORBIDDEN``).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from stockledger.config import Settings

GRAPHQL_PATH = "/graphql"


class AuthMiddleware:
    """ASGI middleware for :data:`GRAPHQL_PATH`, installed only when ``settings.auth`` is
    ``required``; other paths (``/healthz``, ``/readyz``, ``/metrics``, GraphiQL's files)
    stay open. Reads the key store at ``app.state.api_keys``
    (:class:`~stockledger.services.api_keys.ApiKeys`)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.org_id = settings.org_id

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
        key = await scope["app"].state.api_keys.authenticate(secret)
        if key is None:
            await _refuse(
                send, 401, "UNAUTHENTICATED", "the API key is unknown, expired or revoked"
            )
            return
        if key.org != self.org_id:
            await _refuse(
                send,
                403,
                "FORBIDDEN",
                f"this key is for org {key.org!r}; this server serves another",
            )
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


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
    body: dict[str, Any] = {"errors": [{"message": message, "extensions": {"code": code}}]}
    payload = orjson.dumps(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="stockledger"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
