"""The ``/graphql`` endpoint: Strawberry's ASGI view with orjson and our per-request context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from cross_web import HTTPException  # what Strawberry's view turns into an HTTP status
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.http import GraphQLHTTPResponse
from strawberry.types import ExecutionResult

from stockledger.app.subscriptions import SubscriptionHandler
from stockledger.domain.access import Scope, effective
from stockledger.resolvers import GraphQLContext
from stockledger.resolvers.errors import top_level_code
from stockledger.services.queries import InventoryQueries

# GraphiQL's files, vendored (static/graphiql/README.md): served at this path, no CDN.
GRAPHIQL_ASSETS_PATH = "/graphiql"
GRAPHIQL_ASSETS_DIR = Path(__file__).parent / "static" / "graphiql"
_CDN_FILES = {
    "https://unpkg.com/react@18.2.0/umd/react.production.min.js": "react.production.min.js",
    "https://unpkg.com/react-dom@18.2.0/umd/react-dom.production.min.js": (
        "react-dom.production.min.js"
    ),
    "https://unpkg.com/js-cookie@3.0.5/dist/js.cookie.min.js": "js.cookie.min.js",
    "https://unpkg.com/graphiql@3.8.3/graphiql.min.css": "graphiql.min.css",
    "https://unpkg.com/graphiql@3.8.3/graphiql.min.js": "graphiql.min.js",
    "https://unpkg.com/@graphiql/plugin-explorer@1.0.2/dist/style.css": "plugin-explorer.css",
    "https://unpkg.com/@graphiql/plugin-explorer@1.0.2/dist/index.umd.js": (
        "plugin-explorer.umd.js"
    ),
}


class GraphQLView(GraphQL[GraphQLContext, None]):
    """Strawberry's ASGI GraphQL view: JSON through orjson, context from ``app.state``.

    Queries over GET or POST, mutations over POST only (Strawberry refuses a GET mutation);
    a browser's GET serves GraphiQL when enabled. Subscriptions over graphql-transport-ws,
    authenticated in connection_init (:class:`~stockledger.app.subscriptions.SubscriptionHandler`).
    """

    graphql_transport_ws_handler_class = SubscriptionHandler

    async def process_result(
        self, request: Request, result: ExecutionResult
    ) -> GraphQLHTTPResponse:
        """The response body, where every top-level error carries ``extensions.code``
        (:func:`~stockledger.resolvers.errors.top_level_code`)."""
        body = await super().process_result(request, result)
        for error, formatted in zip(result.errors or (), body.get("errors") or (), strict=True):
            if isinstance(formatted, dict):
                formatted.setdefault("extensions", {})["code"] = top_level_code(error)
        return body

    @property
    def graphql_ide_html(self) -> str:
        """Strawberry's GraphiQL page with every asset from :data:`GRAPHIQL_ASSETS_PATH`
        instead of unpkg.com (the same files, so the page's integrity hashes still hold)."""
        html = str(super().graphql_ide_html)
        for url, name in _CDN_FILES.items():
            html = html.replace(url, f"{GRAPHIQL_ASSETS_PATH}/{name}")
        return html

    def encode_json(self, data: object) -> bytes:
        return orjson.dumps(data)

    def parse_json(self, data: str | bytes) -> Any:
        """A request body (or its ``variables`` / ``extensions``) as JSON: an object (or a
        list, which Strawberry refuses as batching) or HTTP 400; a bare ``42``, ``"x"`` or
        ``null`` used to fail later as "Unexpected error." with HTTP 500."""
        parsed = super().parse_json(data)
        if not isinstance(parsed, dict | list):
            kind = "null" if parsed is None else type(parsed).__name__
            raise HTTPException(400, f"the request's JSON must be an object, not {kind}")
        return parsed

    def decode_json(self, data: str | bytes) -> object:
        # orjson.JSONDecodeError subclasses json.JSONDecodeError, which the view maps to 400.
        return orjson.loads(data)

    async def get_context(
        self, request: Request | WebSocket, response: Response | WebSocket
    ) -> GraphQLContext:
        state: Any = request.app.state
        key = request.scope.get("state", {}).get("api_key")  # AuthMiddleware's
        # Tenancy (ARCHITECTURE section 13): everything acts for the key's org; with no key
        # (STOCKLEDGER_AUTH=off), for the served org.
        service = state.service if key is None else state.service.for_org(key.org)
        return GraphQLContext(
            service=service,
            queries=_queries_of(state, service.org_id),
            request=request,
            response=response,
            api_key=key,
            scopes=frozenset(Scope) if key is None else effective(key.scopes),
            key_store=state.api_keys,
        )


def _queries_of(state: Any, org_id: str) -> InventoryQueries:
    """The reads of ``org_id``, made once per org (``app.state.queries`` is the served org's)."""
    known: dict[str, InventoryQueries] = state.queries_by_org
    queries = known.get(org_id)
    if queries is None:
        queries = known[org_id] = InventoryQueries(state.database, org_id)
    return queries
