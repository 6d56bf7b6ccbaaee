"""The ``Error`` interface and its implementations: expected failures, returned as union members.

Each mirrors a domain exception of ``domain/errors.py``; ``resolvers/errors.py`` is the one
place that maps one to the other.
"""

from __future__ import annotations

import strawberry

from stockledger.schema.enums import ErrorCode, ReservationStatus, TransferStatus


@strawberry.interface(
    description="Where a resolver returned a domain failure: every error type implements this."
)
class Error:
    code: ErrorCode
    message: str


@strawberry.type
class Shortage:
    sku: str
    location: str
    requested: int
    available: int


@strawberry.type
class InsufficientStockError(Error):
    shortages: list[Shortage]


@strawberry.type
class NotFoundError(Error):
    entity: str = strawberry.field(description="Balance, Reservation or ApiKey.")
    key: str


@strawberry.type
class ValidationError(Error):
    field: str | None = strawberry.field(
        description="The input field at fault, as a path such as lines.0.quantity."
    )


@strawberry.type
class IdempotencyKeyReusedError(Error):
    idempotency_key: str


@strawberry.type
class ReservationNotActiveError(Error):
    reservation_id: strawberry.ID
    status: ReservationStatus


@strawberry.type
class VersionConflictError(Error):
    expected_version: int
    actual_version: int


@strawberry.type
class LockTimeoutError(Error):
    retry_after_ms: int = strawberry.field(
        description="A hint for when a retry with the same idempotency key may succeed."
    )


@strawberry.type(
    description="The transfer is not in a status that allows this (e.g. receiving a RECEIVED "
    "or CANCELLED transfer)."
)
class TransferNotOpenError(Error):
    transfer_id: strawberry.ID
    status: TransferStatus


@strawberry.type(
    description="A location that does not exist or is inactive where the operation needs an "
    "active one."
)
class LocationUnavailableError(Error):
    location: str
    exists: bool = strawberry.field(description="False when the location does not exist at all.")
