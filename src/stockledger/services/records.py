"""What the write services return: one result type per write (no database, no GraphQL).

Balances, reservations and ledger entries are the domain's own values
(``stockledger.domain.model``). ``replayed`` is True when the idempotency key was already done:
the result is then the current state of what that call changed, and nothing changed now.
"""

from __future__ import annotations

from dataclasses import dataclass

from stockledger.domain.model import Balance, LedgerEntry, Reservation


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


WriteResult = (
    RestockResult | AdjustResult | ReserveResult | ReleaseResult | DeductResult | ExtendResult
)
