"""Failures of the service itself, as opposed to the domain's (``stockledger.domain.errors``)."""

from __future__ import annotations

# The domain's errors too: the failures a caller of the services may see, in one place.
from stockledger.domain.errors import (
    IdempotencyKeyReusedError,
    InsufficientStockError,
    LockTimeoutError,
    NotFoundError,
    ReservationNotActiveError,
    Shortage,
    StockError,
    ValidationError,
    VersionConflictError,
)


class ServiceUnavailableError(Exception):
    """The database did not answer within a write's wait (or a read's one retry).

    Nothing is known to have changed: a retry with the same idempotency key is safe, after
    ``retry_after_ms``. The API answers it as a top-level error ``UNAVAILABLE`` with HTTP 503.
    """

    code = "UNAVAILABLE"

    def __init__(self, retry_after_ms: int, message: str = "the database is unavailable") -> None:
        super().__init__(f"{message}; retry with the same idempotency key in {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms
        self.message = str(self)


__all__ = [
    "IdempotencyKeyReusedError",
    "InsufficientStockError",
    "LockTimeoutError",
    "NotFoundError",
    "ReservationNotActiveError",
    "ServiceUnavailableError",
    "Shortage",
    "StockError",
    "ValidationError",
    "VersionConflictError",
]
