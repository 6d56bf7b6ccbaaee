"""The transaction rules (ARCHITECTURE section 3). Every public coroutine of
:class:`~stockledger.services.inventory.InventoryService` is one database transaction."""

from stockledger.services.errors import (
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
from stockledger.services.inventory import InventoryService
from stockledger.services.records import (
    AdjustResult,
    BalanceRecord,
    DeductResult,
    ExtendResult,
    LedgerEntryRecord,
    Line,
    Reference,
    ReleaseResult,
    ReservationLineRecord,
    ReservationRecord,
    ReserveResult,
    RestockResult,
)

__all__ = [
    "AdjustResult",
    "BalanceRecord",
    "DeductResult",
    "ExtendResult",
    "IdempotencyKeyReusedError",
    "InsufficientStockError",
    "InventoryService",
    "LedgerEntryRecord",
    "Line",
    "LockTimeoutError",
    "NotFoundError",
    "Reference",
    "ReleaseResult",
    "ReservationLineRecord",
    "ReservationNotActiveError",
    "ReservationRecord",
    "ReserveResult",
    "RestockResult",
    "Shortage",
    "StockError",
    "ValidationError",
    "VersionConflictError",
]
