"""Input types of the contract. Values are checked by the services, not here."""

from __future__ import annotations

from datetime import datetime

import strawberry

from stockledger.schema.enums import (
    LedgerEventType,
    LocationType,
    ReservationStatus,
    TransferStatus,
)


@strawberry.input
class ReferenceInput:
    type: str
    id: str


@strawberry.input
class BalanceFilter:
    skus: list[str] | None = strawberry.UNSET
    location: str | None = strawberry.UNSET
    available_below: int | None = strawberry.field(
        default=strawberry.UNSET,
        description="Only balances whose available is strictly below this number.",
    )


@strawberry.input
class LedgerFilter:
    sku: str | None = strawberry.UNSET
    location: str | None = strawberry.UNSET
    event_types: list[LedgerEventType] | None = strawberry.UNSET
    reservation_id: strawberry.ID | None = strawberry.UNSET
    reference: ReferenceInput | None = strawberry.UNSET
    idempotency_key: str | None = strawberry.UNSET
    since: datetime | None = strawberry.field(default=strawberry.UNSET, description="Inclusive.")
    until: datetime | None = strawberry.field(default=strawberry.UNSET, description="Exclusive.")


@strawberry.input
class ReservationFilter:
    status: ReservationStatus | None = strawberry.UNSET
    reference: ReferenceInput | None = strawberry.UNSET
    expires_before: datetime | None = strawberry.field(
        default=strawberry.UNSET,
        description="Only reservations whose expiresAt is strictly before this.",
    )


@strawberry.input
class LineInput:
    sku: str
    location: str = "default"
    quantity: int


@strawberry.input
class RestockInput:
    idempotency_key: str
    lines: list[LineInput]
    reference: ReferenceInput | None = strawberry.UNSET
    reason: str | None = strawberry.UNSET


@strawberry.input(
    description="Exactly one of delta and setOnHand. expectedVersion turns the call into a "
    "compare-and-set."
)
class AdjustInput:
    idempotency_key: str
    sku: str
    location: str = "default"
    delta: int | None = strawberry.UNSET
    set_on_hand: int | None = strawberry.UNSET
    expected_version: int | None = strawberry.UNSET
    reason: str
    reference: ReferenceInput | None = strawberry.UNSET


@strawberry.input(
    description="All lines or none. ttlSeconds defaults to the server's setting (1800)."
)
class ReserveInput:
    idempotency_key: str
    lines: list[LineInput]
    reference: ReferenceInput | None = strawberry.UNSET
    ttl_seconds: int | None = strawberry.UNSET


@strawberry.input(
    description="Exactly one of reservationId and reference (all ACTIVE reservations with it). "
    "No lines: everything remaining."
)
class ReleaseInput:
    idempotency_key: str
    reservation_id: strawberry.ID | None = strawberry.UNSET
    reference: ReferenceInput | None = strawberry.UNSET
    lines: list[LineInput] | None = strawberry.UNSET


@strawberry.input(
    description="With reservationId or reference: commits reserved units (no lines: everything "
    "remaining).\nWithout either: a direct deduction from available stock, and lines are required."
)
class DeductInput:
    idempotency_key: str
    reservation_id: strawberry.ID | None = strawberry.UNSET
    reference: ReferenceInput | None = strawberry.UNSET
    lines: list[LineInput] | None = strawberry.UNSET


@strawberry.input
class ExtendReservationInput:
    idempotency_key: str
    reservation_id: strawberry.ID
    ttl_seconds: int = strawberry.field(description="The new expiry is now + ttlSeconds.")


@strawberry.input(
    description="Exactly one of reservationId and reference (every ACTIVE reservation with it). "
    "The lines keep their remaining units; only the expiry goes. Deduct and release work on it "
    "as before."
)
class ConfirmReservationInput:
    idempotency_key: str
    reservation_id: strawberry.ID | None = strawberry.UNSET
    reference: ReferenceInput | None = strawberry.UNSET


# Part BATCH (schema-v2.graphql): many carts in one request, each its own call.


@strawberry.input(description="At most 500 carts and 5,000 lines in all; each cart is one reserve.")
class ReserveManyInput:
    carts: list[ReserveInput]


@strawberry.input(description="At most 500 items and 5,000 lines in all; each item is one deduct.")
class DeductManyInput:
    items: list[DeductInput]


@strawberry.input(description="At most 500 items and 5,000 lines in all; each item is one release.")
class ReleaseManyInput:
    items: list[ReleaseInput]


@strawberry.input
class CreateLocationInput:
    idempotency_key: str
    code: str
    name: str
    type: LocationType = LocationType.WAREHOUSE


@strawberry.input
class UpdateLocationInput:
    idempotency_key: str
    code: str
    name: str | None = strawberry.UNSET
    active: bool | None = strawberry.UNSET


@strawberry.input
class TransferLineInput:
    sku: str
    quantity: int


@strawberry.input(
    description="Moves on-hand units between two locations. inTransit false: sent and received "
    "at once (one transaction: TRANSFER_OUT at the source, TRANSFER_IN at the destination). "
    "inTransit true: TRANSFER_OUT now; the units are `incoming` at the destination until "
    "receiveTransfer."
)
class TransferInput:
    idempotency_key: str
    from_location: str
    to_location: str
    lines: list[TransferLineInput]
    in_transit: bool = False
    reference: ReferenceInput | None = strawberry.UNSET
    reason: str | None = strawberry.UNSET


@strawberry.input(
    description="Receives in-transit units (no lines: everything remaining). Partial receipts "
    "leave the rest in transit."
)
class ReceiveTransferInput:
    idempotency_key: str
    transfer_id: strawberry.ID
    lines: list[TransferLineInput] | None = strawberry.UNSET


@strawberry.input(
    description="Sends every remaining in-transit unit back to the source (TRANSFER_IN there)."
)
class CancelTransferInput:
    idempotency_key: str
    transfer_id: strawberry.ID
    reason: str


@strawberry.input
class TransferFilter:
    status: TransferStatus | None = strawberry.UNSET
    from_location: str | None = strawberry.UNSET
    to_location: str | None = strawberry.UNSET
    sku: str | None = strawberry.UNSET


@strawberry.input
class SetReorderPointInput:
    idempotency_key: str
    sku: str
    location: str = "default"
    minimum_level: int
    reorder_quantity: int
    maximum_level: int | None = strawberry.UNSET


@strawberry.input
class ClearReorderPointInput:
    idempotency_key: str
    sku: str
    location: str = "default"
