"""The stock model: balances, reservations and ledger entries as plain immutable values.

Quantities are units of stock (integers); timestamps are timezone-aware UTC datetimes. The two
derived figures of ARCHITECTURE section 2 are written here and nowhere else:
``Balance.available`` (on hand - reserved) and ``ReservationLine.remaining`` (quantity -
deducted - released).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

BalanceKey = tuple[str, str]
"""(location, sku): identifies a balance within an org, and is the sort and lock order."""

ACTIVE, COMMITTED, RELEASED, EXPIRED = "ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"
CONFIRMED = "CONFIRMED"
"""Holds stock with no expiry (part LOCATIONS); ends COMMITTED or RELEASED."""
RESERVATION_STATUSES = (ACTIVE, CONFIRMED, COMMITTED, RELEASED, EXPIRED)
HOLDING_STATUSES = (ACTIVE, CONFIRMED)
"""The statuses whose reservations hold stock: their lines' remaining is part of reserved."""
LEDGER_EVENT_TYPES = (
    "RESTOCK",
    "ADJUST",
    "RESERVE",
    "RELEASE",
    "EXPIRE",
    "DEDUCT",
    "TRANSFER_OUT",
    "TRANSFER_IN",
)
WAREHOUSE, STORE, VIRTUAL = "WAREHOUSE", "STORE", "VIRTUAL"
LOCATION_TYPES = (WAREHOUSE, STORE, VIRTUAL)
DEFAULT_LOCATION = "default"
"""The location every org has from the migration on, and that a line names by default."""
IN_TRANSIT, PARTIALLY_RECEIVED, RECEIVED, CANCELLED = (
    "IN_TRANSIT",
    "PARTIALLY_RECEIVED",
    "RECEIVED",
    "CANCELLED",
)
TRANSFER_STATUSES = (IN_TRANSIT, PARTIALLY_RECEIVED, RECEIVED, CANCELLED)
OPEN_TRANSFER_STATUSES = (IN_TRANSIT, PARTIALLY_RECEIVED)
"""The statuses of a transfer with units still in transit (receivable, cancellable)."""
EXPIRE_KEY_PREFIX = "expire:"
"""EXPIRE entries carry the key ``expire:<reservation id>`` (ARCHITECTURE section 11)."""


def expire_key(reservation_id: int) -> str:
    """The idempotency key of a reservation's EXPIRE entries, which makes expiry idempotent."""
    return f"{EXPIRE_KEY_PREFIX}{reservation_id}"


@dataclass(frozen=True, slots=True)
class Line:
    """One requested line: ``quantity`` units of ``sku`` at ``location``."""

    sku: str
    quantity: int
    location: str = "default"

    @property
    def key(self) -> BalanceKey:
        return (self.location, self.sku)


@dataclass(frozen=True, slots=True)
class Reference:
    """What a change was done for, e.g. ``Reference("ORDER", "A-1001")``."""

    type: str
    id: str

    def __str__(self) -> str:
        return f"{self.type}:{self.id}"


OK, LOW, OUT = "OK", "LOW", "OUT"
ALERT_STATES = (OK, LOW, OUT)
"""A balance's stored alert state (ARCHITECTURE section 15); OK when it is created."""


@dataclass(frozen=True, slots=True)
class ReorderPoint:
    """When a balance is low and what to order (section 15), in units of stock:
    ``minimum_level`` >= 0 (low when available <= it), ``reorder_quantity`` >= 1 (what a
    suggestion orders), ``maximum_level`` >= minimum_level or None (a suggestion then fills up
    to it instead)."""

    minimum_level: int
    reorder_quantity: int
    maximum_level: int | None = None


@dataclass(frozen=True, slots=True)
class Balance:
    """Stock of one SKU at one location. ``version`` counts the balance's ledger entries.

    ``committed`` (units CONFIRMED reservations hold: a part of reserved) and ``incoming``
    (units of open transfers to it still in transit) are derived figures the rules keep
    (ARCHITECTURE section 14): they change no version and post no entry. ``reorder`` is its
    reorder point, if any, and ``alert`` its stored alert state (section 15).
    """

    sku: str
    location: str
    on_hand: int
    reserved: int
    version: int
    updated_at: datetime
    committed: int = 0
    incoming: int = 0
    reorder: ReorderPoint | None = None
    alert: str = OK

    @property
    def low_stock(self) -> bool:
        """A reorder point is set and available <= its minimum level (part EVENTS)."""
        return self.reorder is not None and self.available <= self.reorder.minimum_level

    @property
    def key(self) -> BalanceKey:
        return (self.location, self.sku)

    @property
    def available(self) -> int:
        """Units that can still be reserved or deducted directly: on hand - reserved."""
        return self.on_hand - self.reserved


@dataclass(frozen=True, slots=True)
class ReservationLine:
    """A reservation's hold on one balance."""

    sku: str
    location: str
    quantity: int
    deducted: int
    released: int

    @property
    def key(self) -> BalanceKey:
        return (self.location, self.sku)

    @property
    def remaining(self) -> int:
        """Units still held: quantity - deducted - released."""
        return self.quantity - self.deducted - self.released


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold on stock for a reference until ``expires_at`` (None once CONFIRMED: no expiry).

    ``lines`` is in (location, sku) order, or None where a read did not load them (GraphQL
    loads lines in batches).
    """

    id: int
    status: str
    reference: Reference | None
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    lines: tuple[ReservationLine, ...] | None = None

    def is_due(self, now: datetime) -> bool:
        """ACTIVE and ``now >= expires_at`` (section 11: expired when now >= expires_at)."""
        return self.status == ACTIVE and self.expires_at is not None and now >= self.expires_at

    @property
    def holding(self) -> bool:
        """ACTIVE or CONFIRMED: its remaining units are part of its balances' reserved."""
        return self.status in HOLDING_STATUSES

    def holds(self) -> list[BalanceKey]:
        """The balances this reservation still holds units of (remaining > 0)."""
        return [ln.key for ln in self.lines or () if ln.remaining > 0]


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One immutable ledger entry; before-values are ``*_after - *_delta``.

    ``id`` is None until the entry is written (ids are given by the database).
    """

    id: int | None
    event_type: str
    sku: str
    location: str
    on_hand_delta: int
    reserved_delta: int
    on_hand_after: int
    reserved_after: int
    reservation_id: int | None
    reference: Reference | None
    reason: str | None
    idempotency_key: str
    created_at: datetime
    transfer_id: int | None = None

    @property
    def key(self) -> BalanceKey:
        return (self.location, self.sku)


@dataclass(frozen=True, slots=True)
class Location:
    """A place that holds stock (ARCHITECTURE section 14): ``code`` is unique per org and is
    what every balance's ``location`` names; ``type`` is one of :data:`LOCATION_TYPES`. An
    inactive one takes no new stock, but what it holds can still leave."""

    code: str
    name: str
    type: str
    active: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class TransferLine:
    """Units of one SKU on their way: ``quantity`` sent, ``received`` at the destination,
    ``returned`` to the source by a cancel."""

    sku: str
    quantity: int
    received: int
    returned: int

    @property
    def remaining(self) -> int:
        """Units still in transit: quantity - received - returned."""
        return self.quantity - self.received - self.returned


@dataclass(frozen=True, slots=True)
class Transfer:
    """A move of on-hand units from ``from_location`` to ``to_location`` (section 14).
    ``lines`` is in SKU order, one per SKU."""

    id: int
    status: str
    from_location: str
    to_location: str
    lines: tuple[TransferLine, ...]
    reference: Reference | None
    reason: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def open(self) -> bool:
        """Units still in transit: IN_TRANSIT or PARTIALLY_RECEIVED."""
        return self.status in OPEN_TRANSFER_STATUSES

    def balance_keys(self) -> list[BalanceKey]:
        """The balances it moves units between, sorted (the lock order)."""
        return sorted(
            {(loc, ln.sku) for ln in self.lines for loc in (self.from_location, self.to_location)}
        )
