"""The root ``Mutation``: each field is one call of :class:`InventoryService` (one transaction).

Results come from the service's return value only (no read after the write); a domain failure
becomes the matching member of the field's result union (``resolvers/errors.py``).
"""

from __future__ import annotations

import strawberry

from stockledger.domain import errors as e
from stockledger.domain.access import Scope
from stockledger.observability import metrics
from stockledger.resolvers import convert, keys, webhooks
from stockledger.resolvers.access import needs
from stockledger.resolvers.context import GraphQLContext
from stockledger.resolvers.convert import opt
from stockledger.resolvers.errors import mutation_result, mutation_results, union_members
from stockledger.schema import (
    AdjustInput,
    AdjustResult,
    AdjustSuccess,
    CancelTransferInput,
    ClearReorderPointInput,
    ConfirmReservationInput,
    ConfirmReservationResult,
    ConfirmReservationSuccess,
    CreateApiKeyInput,
    CreateApiKeyResult,
    CreateLocationInput,
    CreateWebhookEndpointInput,
    CreateWebhookEndpointResult,
    DeductInput,
    DeductManyInput,
    DeductManyResult,
    DeductResult,
    DeductSuccess,
    DeleteWebhookEndpointInput,
    DeleteWebhookEndpointResult,
    ExtendReservationInput,
    ExtendReservationResult,
    ExtendReservationSuccess,
    LocationResult,
    LocationSuccess,
    ReceiveTransferInput,
    ReleaseInput,
    ReleaseManyInput,
    ReleaseManyResult,
    ReleaseResult,
    ReleaseSuccess,
    ReorderPointResult,
    ReorderPointSuccess,
    ReserveInput,
    ReserveManyInput,
    ReserveManyResult,
    ReserveResult,
    ReserveSuccess,
    RestockInput,
    RestockResult,
    RestockSuccess,
    RevokeApiKeyInput,
    RevokeApiKeyResult,
    SetReorderPointInput,
    TransferInput,
    TransferResult,
    TransferSuccess,
    UpdateLocationInput,
)
from stockledger.services import records as r
from stockledger.services.records import ConsumeRequest, ReserveRequest
from stockledger.services.writes import CALL_OUTCOMES, EXPIRY_OUTCOMES

Info = strawberry.Info[GraphQLContext, None]


def _restock(x: r.RestockResult) -> RestockSuccess:
    return RestockSuccess(
        balances=convert.balances(x.balances),
        ledger_entries=convert.ledger_entries(x.ledger_entries),
        replayed=x.replayed,
    )


def _adjust(x: r.AdjustResult) -> AdjustSuccess:
    return AdjustSuccess(
        balance=convert.balance(x.balance),
        ledger_entry=convert.ledger_entry(x.ledger_entry),
        replayed=x.replayed,
    )


def _reserve(x: r.ReserveResult) -> ReserveSuccess:
    return ReserveSuccess(
        reservation=convert.reservation(x.reservation),
        balances=convert.balances(x.balances),
        replayed=x.replayed,
    )


def _release(x: r.ReleaseResult) -> ReleaseSuccess:
    return ReleaseSuccess(
        reservations=convert.reservations(x.reservations),
        balances=convert.balances(x.balances),
        replayed=x.replayed,
    )


def _deduct(x: r.DeductResult) -> DeductSuccess:
    return DeductSuccess(
        reservations=convert.reservations(x.reservations),
        balances=convert.balances(x.balances),
        ledger_entries=convert.ledger_entries(x.ledger_entries),
        replayed=x.replayed,
    )


def _extend(x: r.ExtendResult) -> ExtendReservationSuccess:
    return ExtendReservationSuccess(
        reservation=convert.reservation(x.reservation), replayed=x.replayed
    )


def _confirm(x: r.ConfirmResult) -> ConfirmReservationSuccess:
    return ConfirmReservationSuccess(
        reservations=convert.reservations(x.reservations),
        balances=convert.balances(x.balances),
        replayed=x.replayed,
    )


def _location(x: r.LocationResult) -> LocationSuccess:
    return LocationSuccess(location=convert.location(x.location), replayed=x.replayed)


def _reorder_point(x: r.ReorderPointResult) -> ReorderPointSuccess:
    return ReorderPointSuccess(balance=convert.balance(x.balance), replayed=x.replayed)


def _transfer(x: r.TransferResult) -> TransferSuccess:
    return TransferSuccess(
        transfer=convert.transfer(x.transfer),
        balances=convert.balances(x.balances),
        ledger_entries=convert.ledger_entries(x.ledger_entries),
        replayed=x.replayed,
    )


@strawberry.type
class Mutation:
    @strawberry.mutation(
        description="RESTOCK: on hand += quantity on every line.",
        permission_classes=[needs(Scope.STOCK_WRITE)],
    )
    async def restock(self, info: Info, input: RestockInput) -> RestockResult:
        call = info.context.service.restock(
            input.idempotency_key,
            convert.lines_in(input.lines) or [],
            reference=convert.reference_in(input.reference),
            reason=opt(input.reason),
        )
        return await mutation_result(info, call, _restock, RestockResult)

    @strawberry.mutation(
        description="ADJUST one balance by a delta or to a counted on hand.",
        permission_classes=[needs(Scope.STOCK_WRITE)],
    )
    async def adjust(self, info: Info, input: AdjustInput) -> AdjustResult:
        call = info.context.service.adjust(
            input.idempotency_key,
            input.sku,
            input.location,
            delta=opt(input.delta),
            set_on_hand=opt(input.set_on_hand),
            expected_version=opt(input.expected_version),
            reason=input.reason,
            reference=convert.reference_in(input.reference),
        )
        return await mutation_result(info, call, _adjust, AdjustResult)

    @strawberry.mutation(
        description="RESERVE a cart: every line or nothing.",
        permission_classes=[needs(Scope.RESERVATIONS_WRITE)],
    )
    async def reserve(self, info: Info, input: ReserveInput) -> ReserveResult:
        call = info.context.service.reserve(
            input.idempotency_key,
            convert.lines_in(input.lines) or [],
            reference=convert.reference_in(input.reference),
            ttl_seconds=opt(input.ttl_seconds),
        )
        return await mutation_result(info, call, _reserve, ReserveResult)

    @strawberry.mutation(
        description="RELEASE reserved units back to available.",
        permission_classes=[needs(Scope.RESERVATIONS_WRITE)],
    )
    async def release(self, info: Info, input: ReleaseInput) -> ReleaseResult:
        call = info.context.service.release(
            input.idempotency_key,
            reservation_id=opt(input.reservation_id),
            reference=convert.reference_in(input.reference),
            lines=convert.lines_in(input.lines),
        )
        return await mutation_result(info, call, _release, ReleaseResult)

    @strawberry.mutation(
        description="DEDUCT reserved units, or directly from available stock.",
        permission_classes=[needs(Scope.RESERVATIONS_WRITE)],
    )
    async def deduct(self, info: Info, input: DeductInput) -> DeductResult:
        call = info.context.service.deduct(
            input.idempotency_key,
            reservation_id=opt(input.reservation_id),
            reference=convert.reference_in(input.reference),
            lines=convert.lines_in(input.lines),
        )
        return await mutation_result(info, call, _deduct, DeductResult)

    @strawberry.mutation(
        description="Move an ACTIVE reservation's expiry to now + ttlSeconds.",
        permission_classes=[needs(Scope.RESERVATIONS_WRITE)],
    )
    async def extend_reservation(
        self, info: Info, input: ExtendReservationInput
    ) -> ExtendReservationResult:
        call = info.context.service.extend_reservation(
            input.idempotency_key, input.reservation_id, input.ttl_seconds
        )
        return await mutation_result(info, call, _extend, ExtendReservationResult)

    @strawberry.mutation(
        description="CONFIRM an ACTIVE reservation (or every ACTIVE one with a reference): it "
        "keeps its lines and loses its expiry, until deducted or released.",
        permission_classes=[needs(Scope.RESERVATIONS_WRITE)],
    )
    async def confirm_reservation(
        self, info: Info, input: ConfirmReservationInput
    ) -> ConfirmReservationResult:
        call = info.context.service.confirm_reservation(
            input.idempotency_key,
            reservation_id=opt(input.reservation_id),
            reference=convert.reference_in(input.reference),
        )
        return await mutation_result(info, call, _confirm, ConfirmReservationResult)

    # -------------------------------------------------------------- part LOCATIONS

    @strawberry.mutation(
        description="Register a location (code unique per org); it starts active.",
        permission_classes=[needs(Scope.ADMIN)],
    )
    async def create_location(self, info: Info, input: CreateLocationInput) -> LocationResult:
        call = info.context.service.create_location(
            input.idempotency_key, input.code, input.name, input.type.value
        )
        return await mutation_result(info, call, _location, LocationResult)

    @strawberry.mutation(
        description="Rename, deactivate or reactivate a location.",
        permission_classes=[needs(Scope.ADMIN)],
    )
    async def update_location(self, info: Info, input: UpdateLocationInput) -> LocationResult:
        call = info.context.service.update_location(
            input.idempotency_key, input.code, name=opt(input.name), active=opt(input.active)
        )
        return await mutation_result(info, call, _location, LocationResult)

    @strawberry.mutation(
        description="TRANSFER on-hand units between two locations, at once or in transit.",
        permission_classes=[needs(Scope.STOCK_WRITE)],
    )
    async def transfer(self, info: Info, input: TransferInput) -> TransferResult:
        call = info.context.service.transfer(
            input.idempotency_key,
            input.from_location,
            input.to_location,
            convert.transfer_lines_in(input.lines) or [],
            in_transit=input.in_transit,
            reference=convert.reference_in(input.reference),
            reason=opt(input.reason),
        )
        return await mutation_result(info, call, _transfer, TransferResult)

    @strawberry.mutation(
        description="RECEIVE in-transit units (no lines: everything remaining).",
        permission_classes=[needs(Scope.STOCK_WRITE)],
    )
    async def receive_transfer(self, info: Info, input: ReceiveTransferInput) -> TransferResult:
        call = info.context.service.receive_transfer(
            input.idempotency_key, input.transfer_id, convert.transfer_lines_in(input.lines)
        )
        return await mutation_result(info, call, _transfer, TransferResult)

    @strawberry.mutation(
        description="CANCEL a transfer: what is still in transit goes back to the source.",
        permission_classes=[needs(Scope.STOCK_WRITE)],
    )
    async def cancel_transfer(self, info: Info, input: CancelTransferInput) -> TransferResult:
        call = info.context.service.cancel_transfer(
            input.idempotency_key, input.transfer_id, input.reason
        )
        return await mutation_result(info, call, _transfer, TransferResult)

    # -------------------------------------------------------------- part EVENTS

    @strawberry.mutation(
        description="Set a balance's reorder point (creates a never-stocked one, empty).",
        permission_classes=[needs(Scope.STOCK_WRITE)],
    )
    async def set_reorder_point(
        self, info: Info, input: SetReorderPointInput
    ) -> ReorderPointResult:
        call = info.context.service.set_reorder_point(
            input.idempotency_key,
            input.sku,
            input.location,
            minimum_level=input.minimum_level,
            reorder_quantity=input.reorder_quantity,
            maximum_level=opt(input.maximum_level),
        )
        return await mutation_result(info, call, _reorder_point, ReorderPointResult)

    @strawberry.mutation(
        description="Remove a balance's reorder point.",
        permission_classes=[needs(Scope.STOCK_WRITE)],
    )
    async def clear_reorder_point(
        self, info: Info, input: ClearReorderPointInput
    ) -> ReorderPointResult:
        call = info.context.service.clear_reorder_point(
            input.idempotency_key, input.sku, input.location
        )
        return await mutation_result(info, call, _reorder_point, ReorderPointResult)

    # -------------------------------------------------------------- part BATCH

    @strawberry.mutation(
        description="RESERVE many carts, each its own reserve (key, all-or-nothing, result), "
        "in input order.",
        permission_classes=[needs(Scope.RESERVATIONS_WRITE)],
    )
    async def reserve_many(self, info: Info, input: ReserveManyInput) -> ReserveManyResult:
        call = info.context.service.reserve_many(
            [
                ReserveRequest(
                    c.idempotency_key,
                    convert.lines_in(c.lines) or [],
                    convert.reference_in(c.reference),
                    opt(c.ttl_seconds),
                )
                for c in input.carts
            ]
        )
        return ReserveManyResult(
            results=await mutation_results(info, call, _reserve, ReserveResult)
        )

    @strawberry.mutation(
        description="DEDUCT many items, each its own deduct, in input order.",
        permission_classes=[needs(Scope.RESERVATIONS_WRITE)],
    )
    async def deduct_many(self, info: Info, input: DeductManyInput) -> DeductManyResult:
        call = info.context.service.deduct_many([_consume(i) for i in input.items])
        return DeductManyResult(results=await mutation_results(info, call, _deduct, DeductResult))

    @strawberry.mutation(
        description="RELEASE many items, each its own release, in input order.",
        permission_classes=[needs(Scope.RESERVATIONS_WRITE)],
    )
    async def release_many(self, info: Info, input: ReleaseManyInput) -> ReleaseManyResult:
        call = info.context.service.release_many([_consume(i) for i in input.items])
        return ReleaseManyResult(
            results=await mutation_results(info, call, _release, ReleaseResult)
        )

    # -------------------------------------------------------------- part ACCESS

    @strawberry.mutation(
        description="A new API key of the caller's org (or, for an ADMIN key of org 'system', "
        "of another); its secret is in this response only.",
        permission_classes=[needs(Scope.ADMIN)],
    )
    async def create_api_key(self, info: Info, input: CreateApiKeyInput) -> CreateApiKeyResult:
        return await keys.create_api_key(info, input)

    @strawberry.mutation(
        description="Revoke a key of the caller's org; it stops working within 5 s on every "
        "instance.",
        permission_classes=[needs(Scope.ADMIN)],
    )
    async def revoke_api_key(self, info: Info, input: RevokeApiKeyInput) -> RevokeApiKeyResult:
        return await keys.revoke_api_key(info, input)

    # -------------------------------------------------------------- part EVENTS: webhooks

    @strawberry.mutation(
        description="A webhook endpoint of the caller's org; its signing secret is in this "
        "response only.",
        permission_classes=[needs(Scope.ADMIN)],
    )
    async def create_webhook_endpoint(
        self, info: Info, input: CreateWebhookEndpointInput
    ) -> CreateWebhookEndpointResult:
        return await webhooks.create_webhook_endpoint(info, input)

    @strawberry.mutation(
        description="Delete a webhook endpoint of the caller's org: inactive, nothing more is "
        "delivered to it.",
        permission_classes=[needs(Scope.ADMIN)],
    )
    async def delete_webhook_endpoint(
        self, info: Info, input: DeleteWebhookEndpointInput
    ) -> DeleteWebhookEndpointResult:
        return await webhooks.delete_webhook_endpoint(info, input)


def _consume(item: DeductInput | ReleaseInput) -> ConsumeRequest:
    return ConsumeRequest(
        item.idempotency_key,
        reservation_id=opt(item.reservation_id),
        reference=convert.reference_in(item.reference),
        lines=convert.lines_in(item.lines),
    )


# The union of each write's result, by the operation name its metrics carry.
_RESULTS = {
    "restock": RestockResult,
    "adjust": AdjustResult,
    "reserve": ReserveResult,
    "release": ReleaseResult,
    "deduct": DeductResult,
    "extend": ExtendReservationResult,
    "confirm": ConfirmReservationResult,
    "createLocation": LocationResult,
    "updateLocation": LocationResult,
    "transfer": TransferResult,
    "receiveTransfer": TransferResult,
    "cancelTransfer": TransferResult,
    "setReorderPoint": ReorderPointResult,
    "clearReorderPoint": ReorderPointResult,
}


def declare_outcome_series() -> None:
    """Create every series of the per-call counters at 0 (``stock_movements_total``,
    ``inventory_reserve_total``, ``inventory_deduct_total``), so that an alert or a rate over
    one sees a series before the first such call. The outcomes of an operation: those of
    every call (``CALL_OUTCOMES`` of services/writes.py) and the code of every domain error its
    result union carries (the schema decides, as it does for the answers)."""
    for operation, result_type in _RESULTS.items():
        # The union's members that are domain errors (the success type is not one).
        kinds = [getattr(e, name, None) for name in union_members(result_type)]
        errors = [
            k.code.lower() for k in kinds if isinstance(k, type) and issubclass(k, e.StockError)
        ]
        reason = "given" if operation == "adjust" else "none"
        for outcome in (*CALL_OUTCOMES, *errors):
            metrics.STOCK_MOVEMENTS_TOTAL.labels(type=operation, result=outcome, reason=reason)
            if operation == "reserve":
                metrics.RESERVE_TOTAL.labels(status=outcome)
            elif operation == "deduct":
                metrics.DEDUCT_TOTAL.labels(status=outcome)
    for outcome in EXPIRY_OUTCOMES:
        metrics.STOCK_MOVEMENTS_TOTAL.labels(type="expire", result=outcome, reason="none")
