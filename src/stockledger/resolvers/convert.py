"""Service records -> schema types, and schema inputs -> service arguments. No rules here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import strawberry
from strawberry import UNSET

from stockledger.domain import access as a
from stockledger.domain import ids
from stockledger.domain import model as m
from stockledger.schema import (
    ApiKey,
    ApiKeyConnection,
    ApiKeyEdge,
    Balance,
    BalanceConnection,
    BalanceEdge,
    LedgerEntry,
    LedgerEntryConnection,
    LedgerEntryEdge,
    LedgerEventType,
    Location,
    LocationConnection,
    LocationEdge,
    LocationType,
    PageInfo,
    Reference,
    ReferenceInput,
    ReorderPoint,
    Reservation,
    ReservationConnection,
    ReservationEdge,
    ReservationLine,
    ReservationStatus,
    Scope,
    StockLevels,
    Transfer,
    TransferConnection,
    TransferEdge,
    TransferLine,
    TransferLineInput,
    TransferStatus,
)
from stockledger.schema import LineInput as LineInputType
from stockledger.services import queries as q
from stockledger.services.queries import Page
from stockledger.services.records import TransferLineRequest

T = TypeVar("T")

# ------------------------------------------------------------------ records -> types


def reservation_id(n: int) -> strawberry.ID:
    """The id a reservation number is rendered as: its opaque global id (``domain/ids.py``),
    wherever it appears (Reservation.id, LedgerEntry.reservationId, errors)."""
    return strawberry.ID(ids.reservation_global_id(n))


def transfer_id(n: int) -> strawberry.ID:
    """The id a transfer number is rendered as: its opaque global id (``domain/ids.py``)."""
    return strawberry.ID(ids.transfer_global_id(n))


def balance(r: m.Balance) -> Balance:
    return Balance(
        id=strawberry.ID(ids.balance_global_id(r.location, r.sku)),
        sku=r.sku,
        location=r.location,
        on_hand=r.on_hand,
        reserved=r.reserved,
        available=r.available,
        version=r.version,
        updated_at=r.updated_at,
        committed=r.committed,
        incoming=r.incoming,
        reorder_point=None if r.reorder is None else reorder_point(r),
        low_stock=r.low_stock,
    )


def reorder_point(r: m.Balance) -> ReorderPoint:
    """The reorder point of a balance that has one."""
    assert r.reorder is not None
    return ReorderPoint(
        sku=r.sku,
        location=r.location,
        minimum_level=r.reorder.minimum_level,
        reorder_quantity=r.reorder.reorder_quantity,
        maximum_level=r.reorder.maximum_level,
    )


def reference(r: m.Reference | None) -> Reference | None:
    return None if r is None else Reference(type=r.type, id=r.id)


def ledger_entry(r: m.LedgerEntry) -> LedgerEntry:
    return LedgerEntry(
        id=strawberry.ID(str(r.id)),
        event_type=LedgerEventType[r.event_type],
        sku=r.sku,
        location=r.location,
        on_hand_delta=r.on_hand_delta,
        reserved_delta=r.reserved_delta,
        on_hand_after=r.on_hand_after,
        reserved_after=r.reserved_after,
        reservation_id=None if r.reservation_id is None else reservation_id(r.reservation_id),
        transfer_id=None if r.transfer_id is None else transfer_id(r.transfer_id),
        reference=reference(r.reference),
        reason=r.reason,
        idempotency_key=r.idempotency_key,
        created_at=r.created_at,
    )


def reservation_line(r: m.ReservationLine) -> ReservationLine:
    return ReservationLine(
        sku=r.sku,
        location=r.location,
        quantity=r.quantity,
        remaining=r.remaining,
        deducted=r.deducted,
        released=r.released,
    )


def reservation(r: m.Reservation) -> Reservation:
    """A reservation; its lines are used as given when the record carries them (mutations)."""
    return Reservation(
        id=reservation_id(r.id),
        status=ReservationStatus[r.status],
        reference=reference(r.reference),
        expires_at=r.expires_at,
        created_at=r.created_at,
        updated_at=r.updated_at,
        key=r.id,
        preloaded_lines=None if r.lines is None else [reservation_line(ln) for ln in r.lines],
    )


def location(r: m.Location) -> Location:
    return Location(
        id=strawberry.ID(ids.location_global_id(r.code)),
        code=r.code,
        name=r.name,
        type=LocationType[r.type],
        active=r.active,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def transfer(r: m.Transfer) -> Transfer:
    return Transfer(
        id=transfer_id(r.id),
        status=TransferStatus[r.status],
        from_location=r.from_location,
        to_location=r.to_location,
        lines=[
            TransferLine(
                sku=ln.sku,
                quantity=ln.quantity,
                received=ln.received,
                remaining=ln.remaining,
                returned=ln.returned,
            )
            for ln in r.lines
        ],
        reference=reference(r.reference),
        reason=r.reason,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def stock_levels(r: q.StockLevels) -> StockLevels:
    return StockLevels(
        sku=r.sku,
        on_hand=r.on_hand,
        reserved=r.reserved,
        available=r.available,
        incoming=r.incoming,
        locations=[balance(b) for b in r.balances],
    )


def location_connection(page: Page[m.Location]) -> LocationConnection:
    return LocationConnection(
        edges=[LocationEdge(cursor=c, node=location(r)) for c, r in page.edges],
        page_info=page_info(page),
    )


def transfer_connection(page: Page[m.Transfer]) -> TransferConnection:
    return TransferConnection(
        edges=[TransferEdge(cursor=c, node=transfer(r)) for c, r in page.edges],
        page_info=page_info(page),
    )


def balances(records: Sequence[m.Balance]) -> list[Balance]:
    return [balance(r) for r in records]


def ledger_entries(records: Sequence[m.LedgerEntry]) -> list[LedgerEntry]:
    return [ledger_entry(r) for r in records]


def reservations(records: Sequence[m.Reservation]) -> list[Reservation]:
    return [reservation(r) for r in records]


def page_info(page: Page[Any]) -> PageInfo:
    return PageInfo(
        has_next_page=page.has_next_page,
        has_previous_page=page.has_previous_page,
        start_cursor=page.start_cursor,
        end_cursor=page.end_cursor,
    )


def balance_connection(page: Page[m.Balance]) -> BalanceConnection:
    return BalanceConnection(
        edges=[BalanceEdge(cursor=c, node=balance(r)) for c, r in page.edges],
        page_info=page_info(page),
    )


def ledger_connection(page: Page[m.LedgerEntry]) -> LedgerEntryConnection:
    return LedgerEntryConnection(
        edges=[LedgerEntryEdge(cursor=c, node=ledger_entry(r)) for c, r in page.edges],
        page_info=page_info(page),
    )


def reservation_connection(page: Page[m.Reservation]) -> ReservationConnection:
    return ReservationConnection(
        edges=[ReservationEdge(cursor=c, node=reservation(r)) for c, r in page.edges],
        page_info=page_info(page),
    )


def scopes(granted: frozenset[a.Scope]) -> list[Scope]:
    """Scopes in the contract's order (the enum's), whatever order the set has."""
    return [Scope(s.value) for s in a.Scope if s in granted]


def api_key(k: a.ApiKey) -> ApiKey:
    return ApiKey(
        id=strawberry.ID(str(k.id)),
        name=k.name,
        prefix=k.prefix,
        org=k.org,
        scopes=scopes(k.scopes),
        created_at=k.created_at,
        expires_at=k.expires_at,
        last_used_at=k.last_used_at,
        revoked_at=k.revoked_at,
    )


def api_key_connection(page: Page[a.ApiKey]) -> ApiKeyConnection:
    return ApiKeyConnection(
        edges=[ApiKeyEdge(cursor=c, node=api_key(k)) for c, k in page.edges],
        page_info=page_info(page),
    )


# ------------------------------------------------------------------ inputs -> arguments


def opt(value: T | None) -> T | None:
    """An optional input value: None when omitted (UNSET) or given as null."""
    return None if value is UNSET or value is None else value


def lines_in(lines: Sequence[LineInputType] | None) -> list[m.Line] | None:
    lines = opt(lines)
    if lines is None:
        return None
    return [m.Line(sku=ln.sku, quantity=ln.quantity, location=ln.location) for ln in lines]


def reference_in(ref: ReferenceInput | None) -> m.Reference | None:
    ref = opt(ref)
    return None if ref is None else m.Reference(type=ref.type, id=ref.id)


def transfer_lines_in(
    lines: Sequence[TransferLineInput] | None,
) -> list[TransferLineRequest] | None:
    lines = opt(lines)
    if lines is None:
        return None
    return [TransferLineRequest(sku=ln.sku, quantity=ln.quantity) for ln in lines]
