"""What the write services return: one result type per write (no database, no GraphQL).

Balances, reservations and ledger entries are the domain's own values
(``stockledger.domain.model``). ``replayed`` is True when the idempotency key was already done:
the result is then the current state of what that call changed, and nothing changed now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stockledger.domain.model import (
    Balance,
    LedgerEntry,
    Line,
    Location,
    Reference,
    Reservation,
    Transfer,
)


@dataclass(frozen=True)
class RestockResult:
    balances: list[Balance]
    ledger_entries: list[LedgerEntry]
    replayed: bool


@dataclass(frozen=True)
class AdjustResult:
    balance: Balance
    ledger_entry: LedgerEntry
    replayed: bool


@dataclass(frozen=True)
class ReserveResult:
    reservation: Reservation
    balances: list[Balance]
    replayed: bool


@dataclass(frozen=True)
class ReleaseResult:
    reservations: list[Reservation]
    balances: list[Balance]
    replayed: bool


@dataclass(frozen=True)
class DeductResult:
    reservations: list[Reservation]
    balances: list[Balance]
    ledger_entries: list[LedgerEntry]
    replayed: bool


@dataclass(frozen=True)
class ExtendResult:
    reservation: Reservation
    replayed: bool


@dataclass(frozen=True)
class ConfirmResult:
    """The reservations a confirm made CONFIRMED, and the balances they hold (unchanged)."""

    reservations: list[Reservation]
    balances: list[Balance]
    replayed: bool


@dataclass(frozen=True)
class LocationResult:
    """The location a createLocation or updateLocation made or changed (as it is now)."""

    location: Location
    replayed: bool


@dataclass(frozen=True)
class TransferResult:
    """A transfer, receipt or cancel: the transfer after it, the balances it changed (an
    in-transit transfer's destination included) and its ledger entries."""

    transfer: Transfer
    balances: list[Balance]
    ledger_entries: list[LedgerEntry]
    replayed: bool


@dataclass(frozen=True)
class ReorderPointResult:
    """The balance a setReorderPoint or clearReorderPoint changed (as it is now)."""

    balance: Balance
    replayed: bool


@dataclass(frozen=True)
class TransferLineRequest:
    """One line of a transfer or a receipt: ``quantity`` units of ``sku``."""

    sku: str
    quantity: int


WriteResult = (
    RestockResult
    | AdjustResult
    | ReserveResult
    | ReleaseResult
    | DeductResult
    | ExtendResult
    | ConfirmResult
    | LocationResult
    | TransferResult
    | ReorderPointResult
)


@dataclass(frozen=True)
class ReserveRequest:
    """One cart of a :meth:`InventoryService.reserve_many` call (the arguments of a reserve)."""

    idempotency_key: str
    lines: Sequence[Line]
    reference: Reference | None = None
    ttl_seconds: int | None = None


@dataclass(frozen=True)
class ConsumeRequest:
    """One item of a ``deduct_many`` or ``release_many`` call (the arguments of one deduct or
    release: a reservation id or a reference, or, for a deduct, neither: direct)."""

    idempotency_key: str
    reservation_id: str | int | None = None
    reference: Reference | None = None
    lines: Sequence[Line] | None = None
