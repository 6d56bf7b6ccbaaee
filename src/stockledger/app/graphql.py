"""The ``/graphql`` endpoint: Strawberry's ASGI view with orjson and our per-request context."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.http import GraphQLHTTPResponse
from strawberry.types import ExecutionResult

from stockledger.resolvers import GraphQLContext
from stockledger.resolvers.errors import top_level_code


class GraphQLView(GraphQL[GraphQLContext, None]):
    """Strawberry's ASGI GraphQL view: JSON through orjson, context from ``app.state``.

    Queries over GET or POST, mutations over POST only (Strawberry refuses a GET mutation);
    a browser's GET serves GraphiQL when enabled.
    """

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

    def encode_json(self, data: object) -> bytes:
        return orjson.dumps(data)

    def decode_json(self, data: str | bytes) -> object:
        # orjson.JSONDecodeError subclasses json.JSONDecodeError, which the view maps to 400.
        return orjson.loads(data)

    async def get_context(
        self, request: Request | WebSocket, response: Response | WebSocket
    ) -> GraphQLContext:
        state: Any = request.app.state
        return GraphQLContext(
            service=state.service, queries=state.queries, request=request, response=response
        )
