"""Part EVENTS of ``schema-v2.graphql``: webhook endpoints and their deliveries.

Shapes only; ``resolvers/webhooks.py`` fills them from :mod:`stockledger.services.webhooks`
values. ``EventType`` is the one of ``schema/events.py`` (the outbox's types).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry

from stockledger.schema.errors import IdempotencyKeyReusedError, NotFoundError, ValidationError
from stockledger.schema.events import EventType
from stockledger.schema.types import PageInfo


@strawberry.type(
    description="Where an org's events are POSTed, signed (Standard Webhooks); never its secret."
)
class WebhookEndpoint:
    id: strawberry.ID
    url: str
    event_types: list[EventType]
    active: bool
    circuit_state: str = strawberry.field(
        description="CLOSED (delivering), OPEN (failing: paused until the next probe), "
        "HALF_OPEN (probing)."
    )
    created_at: datetime


@strawberry.type(description="One event's delivery to one endpoint, with its attempts.")
class WebhookDelivery:
    id: strawberry.ID
    event_id: strawberry.ID = strawberry.field(description="The event's id: its webhook-id.")
    event_type: EventType
    status: str = strawberry.field(
        description="PENDING, DELIVERED, FAILED (will retry), DEAD (gave up)."
    )
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None


@strawberry.input
class CreateWebhookEndpointInput:
    idempotency_key: str
    url: str = strawberry.field(
        description="http(s); refused when it resolves to a private, loopback or link-local "
        "address (unless the server allows it)."
    )
    event_types: list[EventType]


@strawberry.type
class CreateWebhookEndpointSuccess:
    endpoint: WebhookEndpoint
    secret: str | None = strawberry.field(
        description="The signing secret (whsec_...), shown only here; null on a replay."
    )
    replayed: bool


@strawberry.input
class DeleteWebhookEndpointInput:
    idempotency_key: str
    id: strawberry.ID


@strawberry.type
class DeleteWebhookEndpointSuccess:
    endpoint: WebhookEndpoint
    replayed: bool


CreateWebhookEndpointResult = Annotated[
    CreateWebhookEndpointSuccess | ValidationError | IdempotencyKeyReusedError,
    strawberry.union("CreateWebhookEndpointResult"),
]
DeleteWebhookEndpointResult = Annotated[
    DeleteWebhookEndpointSuccess | NotFoundError | ValidationError | IdempotencyKeyReusedError,
    strawberry.union("DeleteWebhookEndpointResult"),
]


@strawberry.type
class WebhookEndpointEdge:
    cursor: str
    node: WebhookEndpoint


@strawberry.type
class WebhookEndpointConnection:
    edges: list[WebhookEndpointEdge]
    page_info: PageInfo


@strawberry.type
class WebhookDeliveryEdge:
    cursor: str
    node: WebhookDelivery


@strawberry.type
class WebhookDeliveryConnection:
    edges: list[WebhookDeliveryEdge]
    page_info: PageInfo
