"""Success types and one union per mutation result (the contract's ``*Result`` unions)."""

from __future__ import annotations

from typing import Annotated

import strawberry

from stockledger.schema.errors import (
    IdempotencyKeyReusedError,
    InsufficientStockError,
    LocationUnavailableError,
    LockTimeoutError,
    NotFoundError,
    ReservationNotActiveError,
    TransferNotOpenError,
    ValidationError,
    VersionConflictError,
)
from stockledger.schema.types import Balance, LedgerEntry, Location, Reservation, Transfer


@strawberry.type
class RestockSuccess:
    balances: list[Balance]
    ledger_entries: list[LedgerEntry]
    replayed: bool = strawberry.field(
        description="True when this idempotency key was already done: nothing changed now."
    )


@strawberry.type
class AdjustSuccess:
    balance: Balance
    ledger_entry: LedgerEntry
    replayed: bool


@strawberry.type
class ReserveSuccess:
    reservation: Reservation
    balances: list[Balance]
    replayed: bool


@strawberry.type
class ReleaseSuccess:
    reservations: list[Reservation]
    balances: list[Balance]
    replayed: bool


@strawberry.type
class DeductSuccess:
    reservations: list[Reservation]
    balances: list[Balance]
    ledger_entries: list[LedgerEntry]
    replayed: bool


@strawberry.type
class ExtendReservationSuccess:
    reservation: Reservation
    replayed: bool


@strawberry.type
class ConfirmReservationSuccess:
    reservations: list[Reservation]
    balances: list[Balance]
    replayed: bool


@strawberry.type
class LocationSuccess:
    location: Location
    replayed: bool


@strawberry.type
class ReorderPointSuccess:
    balance: Balance
    replayed: bool


@strawberry.type
class TransferSuccess:
    transfer: Transfer
    balances: list[Balance]
    ledger_entries: list[LedgerEntry]
    replayed: bool


RestockResult = Annotated[
    RestockSuccess
    | ValidationError
    | IdempotencyKeyReusedError
    | LockTimeoutError
    | LocationUnavailableError,
    strawberry.union("RestockResult"),
]
AdjustResult = Annotated[
    AdjustSuccess
    | InsufficientStockError
    | NotFoundError
    | ValidationError
    | VersionConflictError
    | IdempotencyKeyReusedError
    | LockTimeoutError
    | LocationUnavailableError,
    strawberry.union("AdjustResult"),
]
ReserveResult = Annotated[
    ReserveSuccess
    | InsufficientStockError
    | NotFoundError
    | ValidationError
    | IdempotencyKeyReusedError
    | LockTimeoutError
    | LocationUnavailableError,
    strawberry.union("ReserveResult"),
]
ReleaseResult = Annotated[
    ReleaseSuccess
    | NotFoundError
    | ReservationNotActiveError
    | ValidationError
    | IdempotencyKeyReusedError
    | LockTimeoutError,
    strawberry.union("ReleaseResult"),
]
DeductResult = Annotated[
    DeductSuccess
    | InsufficientStockError
    | NotFoundError
    | ReservationNotActiveError
    | ValidationError
    | IdempotencyKeyReusedError
    | LockTimeoutError
    | LocationUnavailableError,
    strawberry.union("DeductResult"),
]
ExtendReservationResult = Annotated[
    ExtendReservationSuccess
    | NotFoundError
    | ReservationNotActiveError
    | ValidationError
    | IdempotencyKeyReusedError
    | LockTimeoutError,
    strawberry.union("ExtendReservationResult"),
]
ConfirmReservationResult = Annotated[
    ConfirmReservationSuccess
    | NotFoundError
    | ReservationNotActiveError
    | ValidationError
    | IdempotencyKeyReusedError
    | LockTimeoutError,
    strawberry.union("ConfirmReservationResult"),
]

LocationResult = Annotated[
    LocationSuccess | NotFoundError | ValidationError | IdempotencyKeyReusedError,
    strawberry.union("LocationResult"),
]
ReorderPointResult = Annotated[
    ReorderPointSuccess | ValidationError | IdempotencyKeyReusedError | LocationUnavailableError,
    strawberry.union("ReorderPointResult"),
]
TransferResult = Annotated[
    TransferSuccess
    | InsufficientStockError
    | LocationUnavailableError
    | NotFoundError
    | TransferNotOpenError
    | ValidationError
    | IdempotencyKeyReusedError
    | LockTimeoutError,
    strawberry.union("TransferResult"),
]


# Part BATCH (schema-v2.graphql): one result per item, in input order.


@strawberry.type
class ReserveManyResult:
    results: list[ReserveResult]


@strawberry.type
class DeductManyResult:
    results: list[DeductResult]


@strawberry.type
class ReleaseManyResult:
    results: list[ReleaseResult]
