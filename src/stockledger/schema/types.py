"""Object types of the contract (plain data; ``resolvers/convert.py`` builds them from records).

``Balance.committed`` and ``Balance.incoming`` come with the balance (the rules keep them on
its row).
Reservation ``lines`` come preloaded when the service returned them (every mutation result
does); otherwise they are loaded through the request's DataLoader
(``info.context.reservation_lines``, keyed by reservation id), one query per page.
The ``id`` of a Balance or Reservation is its opaque global id (``domain/ids.py``), the
``Node`` interface's.
"""

from __future__ import annotations

from datetime import datetime

import strawberry

from stockledger.schema.enums import (
    LedgerEventType,
    LocationType,
    ReservationStatus,
    TransferStatus,
)


@strawberry.type
class ReorderPoint:
    sku: str
    location: str
    minimum_level: int = strawberry.field(description="Low stock when available <= minimumLevel.")
    reorder_quantity: int = strawberry.field(
        description="What to order when low (a reorder suggestion), unless maximumLevel is set."
    )
    maximum_level: int | None = strawberry.field(
        description="When set, a suggestion fills up to it: maximumLevel - (available + incoming)."
    )


@strawberry.interface(
    description="Anything with a stable, opaque, globally unique id (Relay's object "
    "identification), so that client caches (Apollo, Relay, urql) can normalize it."
)
class Node:
    """A type ``Query.node(id)`` finds again by its ``id`` (``domain/ids.py`` makes and reads
    the ids: base64url of ``<Type>:<key>``)."""

    id: strawberry.ID


@strawberry.type(description="Stock of one SKU at one location. available = onHand - reserved.")
class Balance(Node):
    id: strawberry.ID = strawberry.field(
        description="Stable and opaque; Query.node(id) finds the balance again."
    )
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
        description="Units held by CONFIRMED reservations: a part of reserved, sold but not "
        "shipped."
    )
    incoming: int = strawberry.field(
        description="Units on their way to this balance: transfers IN_TRANSIT to it, plus "
        "open supplier order lines (part SUPPLY)."
    )
    reorder_point: ReorderPoint | None = None
    low_stock: bool = strawberry.field(
        default=False,
        description="True when a reorder point is set and available <= its minimumLevel.",
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
    reservation_id: strawberry.ID | None = strawberry.field(
        description="The reservation's id (as Reservation.id) when the entry is part of one."
    )
    reference: Reference | None
    reason: str | None
    idempotency_key: str
    created_at: datetime
    transfer_id: strawberry.ID | None = strawberry.field(
        default=None,
        description="The transfer a TRANSFER_OUT or TRANSFER_IN entry moves units for.",
    )


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
class Reservation(Node):
    id: strawberry.ID = strawberry.field(
        description="Stable and opaque; Query.node(id) finds the reservation again. Inputs "
        "also take the v1 numeric id (deprecated, accepted until v3)."
    )
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


@strawberry.type
class Location(Node):
    id: strawberry.ID
    code: str = strawberry.field(
        description="Unique per org; what every balance's `location` string refers to."
    )
    name: str
    type: LocationType
    active: bool = strawberry.field(
        description="An inactive location takes no new stock (restock, transfer in, reserve); "
        "what it holds can still be released, deducted or moved out."
    )
    created_at: datetime
    updated_at: datetime


@strawberry.type
class TransferLine:
    sku: str
    quantity: int
    received: int
    remaining: int = strawberry.field(description="In transit: quantity - received - returned.")
    returned: int = strawberry.field(description="Units sent back to the source by a cancel.")


@strawberry.type
class Transfer(Node):
    id: strawberry.ID
    status: TransferStatus
    from_location: str
    to_location: str
    lines: list[TransferLine]
    reference: Reference | None
    reason: str | None
    created_at: datetime
    updated_at: datetime


@strawberry.type(description="All locations' balances of one SKU, with the totals over them.")
class StockLevels:
    sku: str
    on_hand: int
    reserved: int
    available: int
    incoming: int
    locations: list[Balance] = strawberry.field(
        description="One per location that has or had this SKU, ordered by location code."
    )


@strawberry.type
class TransferEdge:
    cursor: str
    node: Transfer


@strawberry.type
class TransferConnection:
    edges: list[TransferEdge]
    page_info: PageInfo


@strawberry.type
class LocationEdge:
    cursor: str
    node: Location


@strawberry.type
class LocationConnection:
    edges: list[LocationEdge]
    page_info: PageInfo


@strawberry.type
class ReorderSuggestion:
    balance: Balance
    quantity: int
