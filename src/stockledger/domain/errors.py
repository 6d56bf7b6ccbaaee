"""Domain failures, one class per error type of the contract (schema.graphql, ``Error``).

Each carries the structured attributes its GraphQL type exposes; ``code`` is the ``ErrorCode``
enum value. The rules (``domain/rules.py``) return them as values inside a ``Refusal``; the
services raise them to their callers. A call that fails with one of these changed nothing
(except a past-due reservation expired on the way, ARCHITECTURE section 11) and did not consume
its idempotency key (ARCHITECTURE section 5).
"""

from __future__ import annotations

from dataclasses import dataclass


class StockError(Exception):
    """Base of every expected failure. ``code`` is the contract's ``ErrorCode`` value."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Shortage:
    """One line that could not be met: units ``requested`` against units ``available``."""

    sku: str
    location: str
    requested: int
    available: int


class InsufficientStockError(StockError):
    """Available stock is below what a line asks for. ``shortages`` lists every short line."""

    code = "INSUFFICIENT_STOCK"

    def __init__(self, shortages: list[Shortage]) -> None:
        parts = ", ".join(
            f"{s.location}/{s.sku}: requested {s.requested}, available {s.available}"
            for s in shortages
        )
        super().__init__(f"insufficient stock ({parts})")
        self.shortages = shortages


class NotFoundError(StockError):
    """No such ``entity`` (``"Reservation"``) under ``key`` (an id, or ``TYPE:ID``)."""

    code = "NOT_FOUND"

    def __init__(self, entity: str, key: str, message: str | None = None) -> None:
        super().__init__(message or f"{entity} {key!r} not found")
        self.entity = entity
        self.key = key


class ValidationError(StockError):
    """Bad input. ``field`` is the input path at fault, e.g. ``lines.0.quantity``."""

    code = "VALIDATION_ERROR"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class IdempotencyKeyReusedError(StockError):
    """The key was already used for another operation or another payload."""

    code = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self, idempotency_key: str, operation: str) -> None:
        super().__init__(
            f"idempotency key {idempotency_key!r} was already used for a different request "
            f"(first used by {operation})"
        )
        self.idempotency_key = idempotency_key


class ReservationNotActiveError(StockError):
    """The reservation is ``status`` (COMMITTED, RELEASED or EXPIRED; CONFIRMED for a confirm
    or an extend), not ACTIVE."""

    code = "RESERVATION_NOT_ACTIVE"

    def __init__(self, reservation_id: int, status: str) -> None:
        super().__init__(f"reservation {reservation_id} is {status}, not ACTIVE")
        self.reservation_id = reservation_id
        self.status = status


class VersionConflictError(StockError):
    """An adjust's ``expected_version`` did not match the balance's ``actual_version``."""

    code = "VERSION_CONFLICT"

    def __init__(self, expected_version: int, actual_version: int) -> None:
        super().__init__(
            f"balance is at version {actual_version}, the request expected {expected_version}"
        )
        self.expected_version = expected_version
        self.actual_version = actual_version


class LockTimeoutError(StockError):
    """The Redis locks of the request could not be taken in time; retry after ``retry_after_ms``."""

    code = "LOCK_TIMEOUT"

    def __init__(self, retry_after_ms: int, message: str | None = None) -> None:
        super().__init__(message or f"stock is busy, retry in {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class TransferNotOpenError(StockError):
    """The transfer is ``status`` (RECEIVED or CANCELLED): nothing of it is in transit to
    receive or cancel (schema-v2, part LOCATIONS)."""

    code = "TRANSFER_NOT_OPEN"

    def __init__(self, transfer_id: int, status: str) -> None:
        super().__init__(f"transfer {transfer_id} is {status}: nothing of it is in transit")
        self.transfer_id = transfer_id
        self.status = status


class LocationUnavailableError(StockError):
    """``location`` is inactive where the operation needs an active one, or (``exists``
    False) is not registered where locations must be (ARCHITECTURE section 14)."""

    code = "LOCATION_UNAVAILABLE"

    def __init__(self, location: str, exists: bool) -> None:
        why = "is inactive" if exists else "is not a registered location"
        super().__init__(f"location {location!r} {why}")
        self.location = location
        self.exists = exists
