"""The use cases: validate, batch, lock, load, apply the domain, write, commit.

:class:`~stockledger.services.writes.InventoryService` is the write side (every write is one
command of a batch), :class:`~stockledger.services.queries.InventoryQueries` the read side.
The domain's values and errors are re-exported here as the services' public vocabulary.
"""

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
from stockledger.domain.model import (
    Balance,
    LedgerEntry,
    Line,
    Reference,
    Reservation,
    ReservationLine,
)
from stockledger.services.errors import ServiceUnavailableError
from stockledger.services.records import (
    AdjustResult,
    ConsumeRequest,
    DeductResult,
    ExtendResult,
    ReleaseResult,
    ReserveRequest,
    ReserveResult,
    RestockResult,
)
from stockledger.services.writes import InventoryService

__all__ = [
    "AdjustResult",
    "Balance",
    "ConsumeRequest",
    "DeductResult",
    "ExtendResult",
    "IdempotencyKeyReusedError",
    "InsufficientStockError",
    "InventoryService",
    "LedgerEntry",
    "Line",
    "LockTimeoutError",
    "NotFoundError",
    "Reference",
    "ReleaseResult",
    "ReservationLine",
    "Reservation",
    "ReservationNotActiveError",
    "ReserveRequest",
    "ReserveResult",
    "RestockResult",
    "ServiceUnavailableError",
    "Shortage",
    "StockError",
    "ValidationError",
    "VersionConflictError",
]
