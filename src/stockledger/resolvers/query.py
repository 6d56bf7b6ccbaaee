"""The root ``Query``: each field is one read of :class:`InventoryQueries`, or of the key store
(``viewer``, ``apiKeys``: :mod:`stockledger.resolvers.keys`)."""

from __future__ import annotations

import strawberry

from stockledger.domain.access import Scope
from stockledger.resolvers import convert, keys
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
    Reservation,
    ReservationConnection,
    ReservationFilter,
    SortDirection,
    Viewer,
)
from stockledger.services import queries as q

Info = strawberry.Info[GraphQLContext, None]


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
