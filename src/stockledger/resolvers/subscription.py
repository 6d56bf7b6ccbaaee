"""The ``Subscription`` root type (part EVENTS, ARCHITECTURE section 15), served over
graphql-transport-ws on ``/graphql`` (``app/subscriptions.py`` authenticates the connection).

Each subscription takes the events of the caller's org (its key's; never another's) from the
process's listener (:class:`~stockledger.services.live.LiveEvents`, ``app.state.live``), which
the relay feeds through Redis pub/sub once each event's transaction committed. The balance a
subscription yields is the one in the event's payload (``data.balance``), not a read: it is the
balance right after that change, at that version, and ``updatedAt`` is the event's timestamp.

Errors (each a GraphQL error with ``extensions.code``, sent as the operation's ``error``
message before any event): ``BAD_USER_INPUT`` for an empty or oversized ``skus`` or an invalid
SKU or location; ``UNAVAILABLE`` when the process has no listener or Redis does not answer;
``FORBIDDEN`` without STOCK_READ.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Any

import strawberry
from graphql import GraphQLError

from stockledger.domain import events as ev
from stockledger.domain import ids
from stockledger.domain.access import Scope
from stockledger.domain.errors import ValidationError
from stockledger.domain.validation import MAX_LINES, check_string
from stockledger.resolvers.access import needs
from stockledger.schema import Balance, ReorderPoint
from stockledger.schema.events import EventType, StockAlert
from stockledger.services.live import LiveEvent, LiveEvents, LiveEventsUnavailable

# SKUs one stockChanged may watch: as many as one input's lines (section 11).
MAX_WATCHED_SKUS = MAX_LINES
_ALERTS = frozenset(ev.ALERT_EVENTS)


@strawberry.type(
    description="Over graphql-transport-ws at /graphql; the API key goes in connection_init's "
    'payload as {"authorization": "Bearer <key>"}. Events arrive after their transaction '
    "committed."
)
class Subscription:
    @strawberry.subscription(
        permission_classes=[needs(Scope.STOCK_READ)],
        description="The balance after every committed change to one of these SKUs (any "
        "location when location is null).",
    )
    async def stock_changed(
        self, info: strawberry.Info, skus: list[str], location: str | None = strawberry.UNSET
    ) -> AsyncGenerator[Balance, None]:
        watched = _check_skus(skus)
        where = _check_location(location)

        def matches(event: LiveEvent) -> bool:
            b = event.balance
            return (
                event.type == ev.STOCK_CHANGED
                and b is not None
                and b.get("sku") in watched
                and (where is None or b.get("location") == where)
            )

        async for event in _stream(info, matches):
            yield balance_of(event)

    @strawberry.subscription(
        permission_classes=[needs(Scope.STOCK_READ)],
        description="Every STOCK_LOW / STOCK_OUT / STOCK_REPLENISHED transition at that "
        "location (all when null).",
    )
    async def low_stock_alerts(
        self, info: strawberry.Info, location: str | None = strawberry.UNSET
    ) -> AsyncGenerator[StockAlert, None]:
        where = _check_location(location)

        def matches(event: LiveEvent) -> bool:
            b = event.balance
            return (
                event.type in _ALERTS
                and b is not None
                and (where is None or b.get("location") == where)
            )

        async for event in _stream(info, matches):
            yield StockAlert(
                event_type=EventType(event.type),
                balance=balance_of(event),
                occurred_at=_timestamp(event),
            )


async def _stream(info: strawberry.Info, matches: Any) -> AsyncGenerator[LiveEvent, None]:
    """The caller's org's events that ``matches`` takes, until the client completes (the
    generator is closed) or the listener closes."""
    live = _live(info)
    try:
        async with live.subscribe(info.context.org, matches) as subscriber:
            async for event in subscriber.events():
                yield event
    except LiveEventsUnavailable as exc:
        raise GraphQLError(str(exc), extensions={"code": "UNAVAILABLE"}) from exc


def _live(info: strawberry.Info) -> LiveEvents:
    app = getattr(info.context.request, "app", None)
    live: LiveEvents | None = None if app is None else getattr(app.state, "live", None)
    if live is None:
        raise GraphQLError(
            "subscriptions are not served by this process (no live events listener)",
            extensions={"code": "UNAVAILABLE"},
        )
    return live


def _bad_input(message: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": "BAD_USER_INPUT"})


def _check_skus(skus: list[str]) -> frozenset[str]:
    """1 to :data:`MAX_WATCHED_SKUS` SKUs, each a valid string (section 11)."""
    if not skus:
        raise _bad_input("skus: give at least one SKU")
    if len(skus) > MAX_WATCHED_SKUS:
        raise _bad_input(f"skus: at most {MAX_WATCHED_SKUS} SKUs per subscription")
    try:
        return frozenset(check_string(s, f"skus.{i}") for i, s in enumerate(skus))
    except ValidationError as exc:
        raise _bad_input(str(exc)) from exc


def _check_location(location: str | None) -> str | None:
    if location is None or location is strawberry.UNSET:  # null or left out: every location
        return None
    try:
        return check_string(location, "location")
    except ValidationError as exc:
        raise _bad_input(str(exc)) from exc


def _timestamp(event: LiveEvent) -> datetime:
    return datetime.fromisoformat(event.timestamp)


def balance_of(event: LiveEvent) -> Balance:
    """The schema Balance of a stock event's ``data.balance`` (``services/outbox.py``'s
    ``balance_data``), ``updatedAt`` being the event's timestamp.

    ``reorderPoint`` and ``lowStock`` come from the payload when it carries them
    (``reorderPoint``: ``{minimumLevel, reorderQuantity, maximumLevel}`` or null;
    ``lowStock``: a boolean); otherwise null and false."""
    b = event.balance
    assert b is not None  # the matchers only take events with a balance
    sku, location = str(b["sku"]), str(b["location"])
    rp = b.get("reorderPoint")
    return Balance(
        id=strawberry.ID(str(b.get("id") or ids.balance_global_id(location, sku))),
        sku=sku,
        location=location,
        on_hand=int(b["onHand"]),
        reserved=int(b["reserved"]),
        available=int(b["available"]),
        version=int(b["version"]),
        updated_at=_timestamp(event),
        committed=int(b.get("committed", 0)),
        incoming=int(b.get("incoming", 0)),
        reorder_point=None
        if not isinstance(rp, dict)
        else ReorderPoint(
            sku=sku,
            location=location,
            minimum_level=int(rp["minimumLevel"]),
            reorder_quantity=int(rp["reorderQuantity"]),
            maximum_level=None if rp.get("maximumLevel") is None else int(rp["maximumLevel"]),
        ),
        low_stock=bool(b.get("lowStock", False)),
    )
