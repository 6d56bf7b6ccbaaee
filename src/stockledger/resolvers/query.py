"""The root ``Query``: each field is one read of :class:`InventoryQueries`, or of the key store
(``viewer``, ``apiKeys``: :mod:`stockledger.resolvers.keys`).

``node(id)`` dispatches on the type name inside the global id (``domain/ids.py``) through
:data:`NODE_FINDERS`: a new ``Node`` type is one finder and one entry there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import strawberry

from stockledger.domain import ids
from stockledger.domain.access import Scope
from stockledger.domain.errors import ValidationError
from stockledger.resolvers import convert, keys, webhooks
from stockledger.resolvers.access import needs
from stockledger.resolvers.context import GraphQLContext
from stockledger.resolvers.convert import opt
from stockledger.resolvers.errors import query_errors
from stockledger.schema import (
    ApiKeyConnection,
    Balance,
    BalanceConnection,
    BalanceFilter,
    LedgerEntryConnection,
    LedgerFilter,
    Location,
    LocationConnection,
    Node,
    ReorderSuggestion,
    Reservation,
    ReservationConnection,
    ReservationFilter,
    SortDirection,
    StockLevels,
    Transfer,
    TransferConnection,
    TransferFilter,
    Viewer,
    WebhookDeliveryConnection,
    WebhookEndpointConnection,
)
from stockledger.services import queries as q

Info = strawberry.Info[GraphQLContext, None]

NodeFinder = Callable[[GraphQLContext, str], Awaitable[Node | None]]
"""Finds the object of one ``Node`` type by the key of its global id, in the caller's org
(the context's services are scoped to it), or None."""


async def _balance_node(ctx: GraphQLContext, key: str) -> Balance | None:
    parts = ids.balance_key_of(key)
    if parts is None:
        return None
    location, sku = parts
    try:
        record = await ctx.queries.balance(sku, location)
    except ValidationError:  # a crafted id whose parts break the string rules names nothing
        return None
    return None if record is None else convert.balance(record)


async def _reservation_node(ctx: GraphQLContext, key: str) -> Reservation | None:
    number = ids.number_of(key)
    if number is None:
        return None
    record = await ctx.queries.reservation(number)
    return None if record is None else convert.reservation(record)


async def _location_node(ctx: GraphQLContext, key: str) -> Location | None:
    try:
        record = await ctx.queries.location(key)
    except ValidationError:
        return None
    return None if record is None else convert.location(record)


async def _transfer_node(ctx: GraphQLContext, key: str) -> Transfer | None:
    number = ids.number_of(key)
    if number is None:
        return None
    record = await ctx.queries.transfer(number)
    return None if record is None else convert.transfer(record)


NODE_FINDERS: dict[str, NodeFinder] = {
    ids.BALANCE: _balance_node,
    ids.RESERVATION: _reservation_node,
    ids.LOCATION: _location_node,
    ids.TRANSFER: _transfer_node,
}
"""The finder of each ``Node`` type, by the type name its global ids carry."""


@strawberry.type
class Query:
    @strawberry.field(
        description="null when the SKU has never been stocked at that location.",
        permission_classes=[needs(Scope.STOCK_READ)],
    )
    async def balance(self, info: Info, sku: str, location: str = "default") -> Balance | None:
        with query_errors(info):
            record = await info.context.queries.balance(sku, location)
        return None if record is None else convert.balance(record)

    @strawberry.field(
        description="Ordered by (location, sku).", permission_classes=[needs(Scope.STOCK_READ)]
    )
    async def balances(
        self,
        info: Info,
        filter: BalanceFilter | None = strawberry.UNSET,
        first: int = 50,
        after: str | None = strawberry.UNSET,
    ) -> BalanceConnection:
        f = None
        if (filter := opt(filter)) is not None:
            f = q.BalanceFilter(
                skus=opt(filter.skus),
                location=opt(filter.location),
                available_below=opt(filter.available_below),
            )
        with query_errors(info):
            page = await info.context.queries.balances(f, first, opt(after))
        return convert.balance_connection(page)

    @strawberry.field(
        description="Append order; DESC (newest first) by default.",
        permission_classes=[needs(Scope.LEDGER_READ)],
    )
    async def ledger(
        self,
        info: Info,
        filter: LedgerFilter | None = strawberry.UNSET,
        first: int = 50,
        after: str | None = strawberry.UNSET,
        direction: SortDirection = SortDirection.DESC,
    ) -> LedgerEntryConnection:
        f = None
        if (filter := opt(filter)) is not None:
            event_types = opt(filter.event_types)
            f = q.LedgerFilter(
                sku=opt(filter.sku),
                location=opt(filter.location),
                event_types=None if event_types is None else [t.name for t in event_types],
                reservation_id=opt(filter.reservation_id),
                reference=convert.reference_in(filter.reference),
                idempotency_key=opt(filter.idempotency_key),
                since=opt(filter.since),
                until=opt(filter.until),
            )
        with query_errors(info):
            page = await info.context.queries.ledger(f, first, opt(after), direction.value)
        return convert.ledger_connection(page)

    @strawberry.field(permission_classes=[needs(Scope.STOCK_READ)])
    async def reservation(self, info: Info, id: strawberry.ID) -> Reservation | None:
        with query_errors(info):
            record = await info.context.queries.reservation(id)
        return None if record is None else convert.reservation(record)

    @strawberry.field(
        description="By id, oldest first.", permission_classes=[needs(Scope.STOCK_READ)]
    )
    async def reservations(
        self,
        info: Info,
        filter: ReservationFilter | None = strawberry.UNSET,
        first: int = 50,
        after: str | None = strawberry.UNSET,
    ) -> ReservationConnection:
        f = None
        if (filter := opt(filter)) is not None:
            status = opt(filter.status)
            f = q.ReservationFilter(
                status=None if status is None else status.name,
                reference=convert.reference_in(filter.reference),
                expires_before=opt(filter.expires_before),
            )
        with query_errors(info):
            page = await info.context.queries.reservations(f, first, opt(after))
        return convert.reservation_connection(page)

    @strawberry.field(
        description="A Balance, Reservation, Location or Transfer by its id (null when none, "
        "or another org's).",
        permission_classes=[needs(Scope.STOCK_READ)],
    )
    async def node(self, info: Info, id: strawberry.ID) -> Node | None:
        """The object of a global id, or null: a malformed id, an unknown type, or none in the
        caller's org (another org's id is indistinguishable from a missing one)."""
        parsed = ids.parse_global_id(id)
        if parsed is None:
            return None
        type_name, key = parsed
        find = NODE_FINDERS.get(type_name)
        if find is None:
            return None
        with query_errors(info):
            return await find(info.context, key)

    # -------------------------------------------------------------- part LOCATIONS

    @strawberry.field(permission_classes=[needs(Scope.STOCK_READ)])
    async def location(self, info: Info, code: str) -> Location | None:
        with query_errors(info):
            record = await info.context.queries.location(code)
        return None if record is None else convert.location(record)

    @strawberry.field(description="By code.", permission_classes=[needs(Scope.STOCK_READ)])
    async def locations(
        self,
        info: Info,
        active_only: bool = False,
        first: int = 50,
        after: str | None = strawberry.UNSET,
    ) -> LocationConnection:
        with query_errors(info):
            page = await info.context.queries.locations(active_only, first, opt(after))
        return convert.location_connection(page)

    @strawberry.field(
        description="null when the SKU has no balance at any location.",
        permission_classes=[needs(Scope.STOCK_READ)],
    )
    async def stock_levels(self, info: Info, sku: str) -> StockLevels | None:
        with query_errors(info):
            record = await info.context.queries.stock_levels(sku)
        return None if record is None else convert.stock_levels(record)

    @strawberry.field(permission_classes=[needs(Scope.STOCK_READ)])
    async def transfer(self, info: Info, id: strawberry.ID) -> Transfer | None:
        with query_errors(info):
            record = await info.context.queries.transfer(id)
        return None if record is None else convert.transfer(record)

    @strawberry.field(
        description="Newest first (by id, descending).",
        permission_classes=[needs(Scope.STOCK_READ)],
    )
    async def transfers(
        self,
        info: Info,
        filter: TransferFilter | None = strawberry.UNSET,
        first: int = 50,
        after: str | None = strawberry.UNSET,
    ) -> TransferConnection:
        f = None
        if (filter := opt(filter)) is not None:
            status = opt(filter.status)
            f = q.TransferFilter(
                status=None if status is None else status.name,
                from_location=opt(filter.from_location),
                to_location=opt(filter.to_location),
                sku=opt(filter.sku),
            )
        with query_errors(info):
            page = await info.context.queries.transfers(f, first, opt(after))
        return convert.transfer_connection(page)

    # -------------------------------------------------------------- part EVENTS

    @strawberry.field(
        description="Balances with a reorder point whose available <= minimumLevel, ordered "
        "by (location, sku).",
        permission_classes=[needs(Scope.STOCK_READ)],
    )
    async def low_stock(
        self,
        info: Info,
        location: str | None = strawberry.UNSET,
        first: int = 50,
        after: str | None = strawberry.UNSET,
    ) -> BalanceConnection:
        with query_errors(info):
            page = await info.context.queries.low_stock(opt(location), first, opt(after))
        return convert.balance_connection(page)

    @strawberry.field(
        description="At most `first`, largest shortfall first.",
        permission_classes=[needs(Scope.STOCK_READ)],
    )
    async def reorder_suggestions(
        self, info: Info, location: str, first: int = 100
    ) -> list[ReorderSuggestion]:
        with query_errors(info):
            found = await info.context.queries.reorder_suggestions(location, first)
        return [ReorderSuggestion(balance=convert.balance(b), quantity=q) for b, q in found]

    # -------------------------------------------------------------- part ACCESS

    @strawberry.field(
        description="The caller: its org, its key and its effective scopes. Any key may read "
        "it (no scope needed: it describes only the caller)."
    )
    def viewer(self, info: Info) -> Viewer:
        return keys.viewer(info.context)

    @strawberry.field(
        description="The keys of the caller's org, by id, oldest first; revoked and expired "
        "ones included.",
        permission_classes=[needs(Scope.ADMIN)],
    )
    async def api_keys(
        self, info: Info, first: int = 50, after: str | None = strawberry.UNSET
    ) -> ApiKeyConnection:
        return await keys.api_keys(info, first, opt(after))

    # -------------------------------------------------------------- part EVENTS: webhooks

    @strawberry.field(
        description="The webhook endpoints of the caller's org, by id, oldest first; deleted "
        "ones included (inactive).",
        permission_classes=[needs(Scope.ADMIN)],
    )
    async def webhook_endpoints(
        self, info: Info, first: int = 50, after: str | None = strawberry.UNSET
    ) -> WebhookEndpointConnection:
        return await webhooks.webhook_endpoints(info, first, opt(after))

    @strawberry.field(
        description="The deliveries of one webhook endpoint, newest first, with their attempts.",
        permission_classes=[needs(Scope.ADMIN)],
    )
    async def webhook_deliveries(
        self,
        info: Info,
        endpoint_id: strawberry.ID,
        first: int = 50,
        after: str | None = strawberry.UNSET,
    ) -> WebhookDeliveryConnection:
        return await webhooks.webhook_deliveries(info, str(endpoint_id), first, opt(after))
