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
LEDGER_EVENT_TYPES = ("RESTOCK", "ADJUST", "RESERVE", "RELEASE", "EXPIRE", "DEDUCT")
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


@dataclass(frozen=True, slots=True)
class Balance:
    """Stock of one SKU at one location. ``version`` counts the balance's ledger entries."""

    sku: str
    location: str
    on_hand: int
    reserved: int
    version: int
    updated_at: datetime

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

    @property
    def key(self) -> BalanceKey:
        return (self.location, self.sku)
