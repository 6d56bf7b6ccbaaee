"""Plain value types the services take and return (no database, no GraphQL).

Quantities are units of stock (integers). Timestamps are timezone-aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Line:
    """One requested line: ``quantity`` units of ``sku`` at ``location``."""

    sku: str
    quantity: int
    location: str = "default"


@dataclass(frozen=True)
class Reference:
    """What a change was done for, e.g. ``Reference("ORDER", "A-1001")``."""

    type: str
    id: str

    def __str__(self) -> str:
        return f"{self.type}:{self.id}"


@dataclass(frozen=True)
class BalanceRecord:
    """Stock of one SKU at one location. ``available = on_hand - reserved`` (derived)."""

    sku: str
    location: str
    on_hand: int
    reserved: int
    version: int
    updated_at: datetime

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


@dataclass(frozen=True)
class LedgerEntryRecord:
    """One immutable ledger entry; before-values are ``*_after - *_delta``."""

    id: int
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


@dataclass(frozen=True)
class ReservationLineRecord:
    """A reservation's line; ``remaining = quantity - deducted - released``."""

    sku: str
    location: str
    quantity: int
    deducted: int
    released: int

    @property
    def remaining(self) -> int:
        return self.quantity - self.deducted - self.released


@dataclass(frozen=True)
class ReservationRecord:
    """A reservation; ``lines`` is None when not loaded (GraphQL loads them in batches)."""

    id: int
    status: str
    reference: Reference | None
    expires_at: datetime
    created_at: datetime
    updated_at: datetime
    lines: tuple[ReservationLineRecord, ...] | None = None


@dataclass(frozen=True)
class RestockResult:
    balances: list[BalanceRecord]
    ledger_entries: list[LedgerEntryRecord]
    replayed: bool


@dataclass(frozen=True)
class AdjustResult:
    balance: BalanceRecord
    ledger_entry: LedgerEntryRecord
    replayed: bool


@dataclass(frozen=True)
class ReserveResult:
    reservation: ReservationRecord
    balances: list[BalanceRecord]
    replayed: bool


@dataclass(frozen=True)
class ReleaseResult:
    reservations: list[ReservationRecord]
    balances: list[BalanceRecord]
    replayed: bool


@dataclass(frozen=True)
class DeductResult:
    reservations: list[ReservationRecord]
    balances: list[BalanceRecord]
    ledger_entries: list[LedgerEntryRecord]
    replayed: bool


@dataclass(frozen=True)
class ExtendResult:
    reservation: ReservationRecord
    replayed: bool
