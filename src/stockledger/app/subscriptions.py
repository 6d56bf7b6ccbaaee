"""GraphQL subscriptions over graphql-transport-ws on ``/graphql`` (ARCHITECTURE section 15):
who may connect, and how much each may hold.

HTTP requests authenticate in :class:`~stockledger.app.auth.AuthMiddleware`; a websocket
passes it untouched (browsers cannot set headers on one) and authenticates here, with the key
in connection_init's payload: ``{"authorization": "Bearer <key>"}`` (the name in any case).
With ``settings.auth`` ``required``:

- no key (no payload, no ``authorization``, not ``Bearer <key>``): close **4401**;
- a key that is unknown, expired or revoked, or has no STOCK_READ: close **4403**;
- the key store (the database) away: close **1013** (try again later);
- more than ``settings.max_connections_per_key`` connections of one key open on this process:
  the newest closes with **4429** ("too many connections for this API key");
- more than ``settings.max_subscriptions_per_connection`` operations on one connection: that
  subscribe gets an ``error`` message "Subscription limit reached" (Strawberry's bound);
- a query or mutation sent over the socket gets an ``error`` message (code
  ``BAD_REQUEST``): they go over HTTP, where the body limit and the rate limits apply.

Before connection_init nothing runs (Strawberry closes a subscribe before the ack with 4401).
Once authenticated, the connection's context is the key's: its org, its effective scopes.
With auth ``off`` no key is needed and the served org is used, as over HTTP.

:func:`live_events` is the lifespan hook that runs the process's listener
(:class:`~stockledger.services.live.LiveEvents`, ``app.state.live``) on the runtime's Redis.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from graphql import GraphQLError, GraphQLSyntaxError, OperationType, get_operation_ast, parse
from starlette.applications import Starlette
from starlette.websockets import WebSocketDisconnect
from strawberry.http.exceptions import WebSocketDisconnected
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage,
    Message,
    SubscribeMessage,
)

from stockledger.db.engine import is_connection_lost
from stockledger.domain.access import Scope, effective
from stockledger.observability.logs import caller, get_logger
from stockledger.resolvers import GraphQLContext
from stockledger.services.live import LiveEvents
from stockledger.services.queries import InventoryQueries

log = get_logger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TOO_MANY_CONNECTIONS = 4429
CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455 registry: "Try Again Later"


class _Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class SubscriptionHandler(BaseGraphQLTransportWSHandler[GraphQLContext, None]):
    """Strawberry's graphql-transport-ws handler with the API key check of connection_init,
    the per-key connection bound, and subscriptions only (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state: Any = self.context.request.app.state
        self._counted: str | None = None  # the key id counted in connections_per_key
        if self._state.settings.auth == "required":
            self.context.scopes = frozenset()  # nothing until connection_init authenticates

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        payload = message.get("payload", {})
        if (
            self.connection_timed_out
            or self.connection_init_received
            or not isinstance(payload, dict | None)
        ):
            await super().handle_connection_init(message)  # Strawberry's 4400 / 4429
            return
        try:
            await self._authenticate(payload or {})
        except _Refused as refused:
            self.connection_init_received = True
            if self.connection_init_timeout_task:
                self.connection_init_timeout_task.cancel()
            await self.websocket.close(code=refused.code, reason=refused.reason)
            return
        await super().handle_connection_init({**message, "payload": payload or {}})

    async def _authenticate(self, payload: dict[str, Any]) -> None:
        """Make the context the key's, or raise :class:`_Refused`."""
        settings = self._state.settings
        if settings.auth != "required":
            return
        secret = _bearer(payload)
        if secret is None:
            raise _Refused(
                CLOSE_UNAUTHENTICATED,
                'an API key is needed: connection_init payload {"authorization": "Bearer <key>"}',
            )
        try:
            key = await self._state.api_keys.authenticate(secret)
        except Exception as exc:
            if not (is_connection_lost(exc) or isinstance(exc, TimeoutError)):
                raise
            raise _Refused(CLOSE_TRY_AGAIN_LATER, "the API keys cannot be read now") from exc
        if key is None:
            raise _Refused(CLOSE_FORBIDDEN, "the API key is unknown, expired or revoked")
        scopes = effective(key.scopes)
        if Scope.STOCK_READ not in scopes:
            raise _Refused(CLOSE_FORBIDDEN, "this key has no STOCK_READ scope")
        counts = _connections_per_key(self._state)
        if counts.get(key.id, 0) >= settings.max_connections_per_key:
            raise _Refused(CLOSE_TOO_MANY_CONNECTIONS, "too many connections for this API key")
        counts[key.id] = counts.get(key.id, 0) + 1
        self._counted = key.id
        ctx = self.context
        ctx.api_key = key
        ctx.scopes = scopes
        ctx.service = self._state.service.for_org(key.org)
        ctx.queries = _queries_of(self._state, key.org)
        # The operations' tasks start from this task's context: their log lines name the key.
        caller.set((key.id, key.name, key.org))

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        payload: Any = message.get("payload")
        query = payload.get("query") if isinstance(payload, dict) else None
        if (
            self.connection_acknowledged
            and isinstance(query, str)
            and message.get("id") not in self.operations
        ):
            kind = _operation_type(query, payload.get("operationName"), self._state.settings)
            if kind is not None and kind is not OperationType.SUBSCRIPTION:
                error = GraphQLError(
                    f"only subscriptions go over the websocket; send a {kind.value} over HTTP "
                    "POST /graphql",
                    extensions={"code": "BAD_REQUEST"},
                )
                await self.send_message(
                    {"id": message["id"], "type": "error", "payload": [error.formatted]}
                )
                return
        await super().handle_subscribe(message)

    async def send_message(self, message: Message) -> None:
        """Send ``message`` as a text frame, as graphql-transport-ws requires: the view's
        ``encode_json`` (orjson) gives bytes, which Strawberry's adapter would send as a
        binary frame, and clients such as ``graphql-ws`` refuse those."""
        socket: Any = self.websocket  # Strawberry's ASGIWebSocketAdapter: .ws is Starlette's
        try:
            await socket.ws.send_text(orjson.dumps(message).decode())
        except WebSocketDisconnect as exc:
            raise WebSocketDisconnected from exc

    async def shutdown(self) -> None:
        try:
            await super().shutdown()
        finally:
            if self._counted is not None:
                counts = _connections_per_key(self._state)
                left = counts.get(self._counted, 1) - 1
                if left > 0:
                    counts[self._counted] = left
                else:
                    counts.pop(self._counted, None)
                self._counted = None


def _bearer(payload: dict[str, Any]) -> str | None:
    """The secret of ``{"authorization": "Bearer <secret>"}`` (key name in any case)."""
    for name, value in payload.items():
        if isinstance(name, str) and name.lower() == "authorization" and isinstance(value, str):
            kind, _, token = value.partition(" ")
            return token.strip() if kind.lower() == "bearer" and token.strip() else None
    return None


def _operation_type(query: str, name: Any, settings: Any) -> OperationType | None:
    """The type of the operation ``query`` runs, or None when it does not parse or names no
    single operation (Strawberry then answers as the protocol says)."""
    try:
        document = parse(query, max_tokens=settings.max_tokens, no_location=True)
    except GraphQLSyntaxError:
        return None
    operation = get_operation_ast(document, name if isinstance(name, str) else None)
    return None if operation is None else operation.operation


def _connections_per_key(state: Any) -> dict[str, int]:
    counts: dict[str, int] | None = getattr(state, "ws_connections_per_key", None)
    if counts is None:
        counts = state.ws_connections_per_key = {}
    return counts


def _queries_of(state: Any, org_id: str) -> InventoryQueries:
    """The reads of ``org_id``, shared with the HTTP requests' (``app.state.queries_by_org``)."""
    known: dict[str, InventoryQueries] = state.queries_by_org
    queries = known.get(org_id)
    if queries is None:
        queries = known[org_id] = InventoryQueries(state.database, org_id)
    return queries


@contextlib.asynccontextmanager
async def live_events(app: Starlette) -> AsyncIterator[None]:
    """Lifespan hook: ``app.state.live``, the listener on the runtime's Redis (started on the
    first subscription), closed on shutdown, which ends every subscription's stream."""
    live = LiveEvents(app.state.runtime.redis)
    app.state.live = live
    try:
        yield
    finally:
        await live.aclose()
