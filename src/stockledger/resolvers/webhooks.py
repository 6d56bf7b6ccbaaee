"""The GraphQL side of webhooks (part EVENTS; ARCHITECTURE section 15): ``webhookEndpoints``,
``webhookDeliveries``, ``createWebhookEndpoint`` and ``deleteWebhookEndpoint``.

All four need the ADMIN scope (their permission classes, in ``query.py`` and ``mutation.py``)
and act for the caller's org only: another org's endpoint id is NOT_FOUND (a delete) or has no
deliveries (a list). The service is the app's ``app.state.webhooks`` (the runtime's, whose
breakers are the delivery worker's, in ``serve``), else one made on first use over the app's
database (its endpoints then show CLOSED: no worker runs in that process).
"""

from __future__ import annotations

from typing import Any

import strawberry

from stockledger.resolvers.context import GraphQLContext
from stockledger.resolvers.convert import page_info
from stockledger.resolvers.errors import mutation_result, query_errors
from stockledger.schema import (
    CreateWebhookEndpointInput,
    CreateWebhookEndpointResult,
    CreateWebhookEndpointSuccess,
    DeleteWebhookEndpointInput,
    DeleteWebhookEndpointResult,
    DeleteWebhookEndpointSuccess,
    WebhookDelivery,
    WebhookDeliveryConnection,
    WebhookDeliveryEdge,
    WebhookEndpoint,
    WebhookEndpointConnection,
    WebhookEndpointEdge,
)
from stockledger.schema.events import EventType
from stockledger.services import webhooks as w


def service(ctx: GraphQLContext) -> w.Webhooks:
    """The app's endpoint service (``app.state.webhooks``), made on first use if absent."""
    state = ctx.request.app.state
    found = getattr(state, "webhooks", None)
    if found is None:
        found = w.Webhooks(state.database, state.settings)
        state.webhooks = found
    return found


def endpoint(x: w.Endpoint) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=strawberry.ID(str(x.id)),
        url=x.url,
        event_types=[EventType(t) for t in x.event_types],
        active=x.active,
        circuit_state=x.circuit_state,
        created_at=x.created_at,
    )


def delivery(x: w.Delivery) -> WebhookDelivery:
    return WebhookDelivery(
        id=strawberry.ID(str(x.id)),
        event_id=strawberry.ID(str(x.event_id)),
        event_type=EventType(x.event_type),
        status=x.status,
        attempts=x.attempts,
        last_status_code=x.last_status_code,
        last_error=x.last_error,
        next_attempt_at=x.next_attempt_at,
        delivered_at=x.delivered_at,
    )


async def webhook_endpoints(info: Any, first: int, after: str | None) -> WebhookEndpointConnection:
    """The caller's org's endpoints, oldest first, deleted ones included (inactive)."""
    ctx: GraphQLContext = info.context
    with query_errors(info):
        page = await service(ctx).page(ctx.org, first, after)
    return WebhookEndpointConnection(
        edges=[WebhookEndpointEdge(cursor=c, node=endpoint(x)) for c, x in page.edges],
        page_info=page_info(page),
    )


async def webhook_deliveries(
    info: Any, endpoint_id: str, first: int, after: str | None
) -> WebhookDeliveryConnection:
    """The deliveries of one endpoint of the caller's org, newest first."""
    ctx: GraphQLContext = info.context
    with query_errors(info):
        page = await service(ctx).deliveries(ctx.org, endpoint_id, first, after)
    return WebhookDeliveryConnection(
        edges=[WebhookDeliveryEdge(cursor=c, node=delivery(x)) for c, x in page.edges],
        page_info=page_info(page),
    )


async def create_webhook_endpoint(info: Any, input: CreateWebhookEndpointInput) -> Any:
    """``createWebhookEndpoint`` (:meth:`Webhooks.create_once`)."""
    ctx: GraphQLContext = info.context
    call = service(ctx).create_once(
        ctx.org, input.idempotency_key, input.url, [t.value for t in input.event_types]
    )
    return await mutation_result(info, call, _created, CreateWebhookEndpointResult)


async def delete_webhook_endpoint(info: Any, input: DeleteWebhookEndpointInput) -> Any:
    """``deleteWebhookEndpoint`` (:meth:`Webhooks.delete_once`)."""
    ctx: GraphQLContext = info.context
    call = service(ctx).delete_once(ctx.org, input.idempotency_key, str(input.id))
    return await mutation_result(info, call, _deleted, DeleteWebhookEndpointResult)


def _created(x: w.CreatedEndpoint) -> CreateWebhookEndpointSuccess:
    return CreateWebhookEndpointSuccess(
        endpoint=endpoint(x.endpoint), secret=x.secret, replayed=x.replayed
    )


def _deleted(x: w.DeletedEndpoint) -> DeleteWebhookEndpointSuccess:
    return DeleteWebhookEndpointSuccess(endpoint=endpoint(x.endpoint), replayed=x.replayed)
