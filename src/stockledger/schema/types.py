"""Object types of the contract (plain data; ``resolvers/convert.py`` builds them from records).

``Balance.committed`` is loaded through the request's DataLoader
(``info.context.committed_units``, keyed by (location, sku)), one query per response.
Reservation ``lines`` come preloaded when the service returned them (every mutation result
does); otherwise they are loaded through the request's DataLoader
(``info.context.reservation_lines``, keyed by reservation id), one query per page.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry

from stockledger.schema.enums import LedgerEventType, ReservationStatus


async def _committed_units(root: Balance, info: strawberry.Info[Any, Any]) -> int:
    """``Balance.committed``: one query for every balance of the response (the request's
    DataLoader)."""
    units: int = await info.context.committed_units.load((root.location, root.sku))
    return units


@strawberry.type(description="Stock of one SKU at one location. available = onHand - reserved.")
class Balance:
    sku: str
    location: str
    on_hand: int
    reserved: int
    available: int
    version: int = strawberry.field(
        description="Increments by one with every change to this balance; usable for "
        "compare-and-set."
    )
    updated_at: datetime

    committed: int = strawberry.field(
        resolver=_committed_units,
        description="Units held by CONFIRMED reservations: a part of reserved, sold but not "
        "shipped.",
    )


@strawberry.type(
    description='What a change was done for, e.g. {type: "ORDER", id: "A-1001"} or '
    '{type: "CHECKOUT", id: "..."}.'
)
class Reference:
    type: str
    id: str


@strawberry.type(
    description="One immutable entry of the append-only ledger. Before-values are after - delta."
)
class LedgerEntry:
    id: strawberry.ID
    event_type: LedgerEventType
    sku: str
    location: str
    on_hand_delta: int
    reserved_delta: int
    on_hand_after: int
    reserved_after: int
    reservation_id: strawberry.ID | None
    reference: Reference | None
    reason: str | None
    idempotency_key: str
    created_at: datetime


@strawberry.type
class ReservationLine:
    sku: str
    location: str
    quantity: int = strawberry.field(description="Units reserved when the reservation was made.")
    remaining: int = strawberry.field(
        description="Units still held: quantity - deducted - released."
    )
    deducted: int
    released: int


@strawberry.type
class Reservation:
    id: strawberry.ID
    status: ReservationStatus
    reference: Reference | None
    expires_at: datetime | None = strawberry.field(
        description="When it expires unless released, deducted or extended; null once CONFIRMED."
    )
    created_at: datetime
    updated_at: datetime
    # The numeric id for the DataLoader, and the lines when the record came with them.
    key: strawberry.Private[int]
    preloaded_lines: strawberry.Private[list[ReservationLine] | None] = None

    @strawberry.field
    async def lines(self, info: strawberry.Info) -> list[ReservationLine]:
        if self.preloaded_lines is not None:
            return self.preloaded_lines
        lines: list[ReservationLine] = await info.context.reservation_lines.load(self.key)
        return lines


@strawberry.type
class PageInfo:
    has_next_page: bool
    has_previous_page: bool
    start_cursor: str | None
    end_cursor: str | None


@strawberry.type
class BalanceEdge:
    cursor: str
    node: Balance


@strawberry.type
class BalanceConnection:
    edges: list[BalanceEdge]
    page_info: PageInfo


@strawberry.type
class LedgerEntryEdge:
    cursor: str
    node: LedgerEntry


@strawberry.type
class LedgerEntryConnection:
    edges: list[LedgerEntryEdge]
    page_info: PageInfo


@strawberry.type
class ReservationEdge:
    cursor: str
    node: Reservation


@strawberry.type
class ReservationConnection:
    edges: list[ReservationEdge]
    page_info: PageInfo
