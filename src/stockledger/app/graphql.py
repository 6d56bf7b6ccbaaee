"""The ``/graphql`` endpoint: Strawberry's ASGI view with orjson and our per-request context."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL

from stockledger.resolvers import GraphQLContext


class GraphQLView(GraphQL[GraphQLContext, None]):
    """Strawberry's ASGI GraphQL view: JSON through orjson, context from ``app.state``.

    Mutations only over POST (queries over GET are off: GET serves GraphiQL when enabled).
    """

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
