"""The contract's enums. Each value equals its name, which is also what the services use."""

from __future__ import annotations

from enum import Enum

import strawberry


@strawberry.enum(description="The code of a domain failure (the Error interface).")
class ErrorCode(Enum):
    INSUFFICIENT_STOCK = "INSUFFICIENT_STOCK"
    NOT_FOUND = "NOT_FOUND"
    VALIDATION_ERROR = "VALIDATION_ERROR"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    RESERVATION_NOT_ACTIVE = "RESERVATION_NOT_ACTIVE"
    VERSION_CONFLICT = "VERSION_CONFLICT"
    LOCK_TIMEOUT = "LOCK_TIMEOUT"
    TRANSFER_NOT_OPEN = "TRANSFER_NOT_OPEN"
    LOCATION_UNAVAILABLE = "LOCATION_UNAVAILABLE"


@strawberry.enum(description="What a ledger entry records.")
class LedgerEventType(Enum):
    RESTOCK = strawberry.enum_value("RESTOCK", description="on_hand += q")
    ADJUST = strawberry.enum_value("ADJUST", description="on_hand += delta (either sign)")
    RESERVE = strawberry.enum_value("RESERVE", description="reserved += q")
    RELEASE = strawberry.enum_value("RELEASE", description="reserved -= q, asked by a client")
    EXPIRE = strawberry.enum_value("EXPIRE", description="reserved -= q, the TTL ran out")
    DEDUCT = strawberry.enum_value(
        "DEDUCT", description="on_hand -= q (and reserved -= q when it consumes a reservation)"
    )
    TRANSFER_OUT = strawberry.enum_value("TRANSFER_OUT", description="on_hand -= q at the source")
    TRANSFER_IN = strawberry.enum_value(
        "TRANSFER_IN",
        description="on_hand += q at the destination (or back at the source on cancel)",
    )


@strawberry.enum(description="Where a reservation is in its life.")
class ReservationStatus(Enum):
    ACTIVE = strawberry.enum_value("ACTIVE", description="holds stock")
    COMMITTED = strawberry.enum_value(
        "COMMITTED", description="nothing remaining, and something was deducted"
    )
    RELEASED = strawberry.enum_value(
        "RELEASED", description="nothing remaining, nothing deducted, released by a client"
    )
    EXPIRED = strawberry.enum_value(
        "EXPIRED", description="the TTL ran out; the remainder was released by the service"
    )
    CONFIRMED = strawberry.enum_value(
        "CONFIRMED", description="holds stock with no expiry; ends COMMITTED (deducted) or RELEASED"
    )


@strawberry.enum
class SortDirection(Enum):
    ASC = "ASC"
    DESC = "DESC"


@strawberry.enum(description="What kind of place a location is.")
class LocationType(Enum):
    WAREHOUSE = "WAREHOUSE"
    STORE = "STORE"
    VIRTUAL = strawberry.enum_value(
        "VIRTUAL", description='e.g. "returns", "damaged", "in-transit bucket" kept by a business'
    )


@strawberry.enum(description="Where a transfer is in its life.")
class TransferStatus(Enum):
    IN_TRANSIT = strawberry.enum_value(
        "IN_TRANSIT",
        description="sent: left the source's on hand, counted as incoming at the destination",
    )
    PARTIALLY_RECEIVED = "PARTIALLY_RECEIVED"
    RECEIVED = "RECEIVED"
    CANCELLED = strawberry.enum_value(
        "CANCELLED", description="what was still in transit went back to the source"
    )
