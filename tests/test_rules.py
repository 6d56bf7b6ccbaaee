"""The transaction rules of ARCHITECTURE sections 3 and 11, service by service, on both backends.

Each test drives :class:`InventoryService` (the ``service`` fixture: fresh org, controllable
clock), then checks the balances, the reservations and the ledger entries in the tables
themselves: every change writes exactly one ledger entry per balance touched, with the right
deltas and after-values, and a refused change writes nothing. Every test that writes ends with
the reconciliation query (``find_violations``) returning no violation.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from stockledger.db.models import idempotency_key as K
from stockledger.db.models import inventory_balance as B
from stockledger.db.models import inventory_ledger as L
from stockledger.db.models import reservation as R
from stockledger.db.models import reservation_line as RL
from stockledger.services import (
    InsufficientStockError,
    InventoryService,
    Line,
    NotFoundError,
    Reference,
    ReservationNotActiveError,
    Shortage,
    ValidationError,
    VersionConflictError,
)
from stockledger.services.reconcile import find_violations

LOC = "default"


# ---------------------------------------------------------------------------- table helpers


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


async def ledger(service: InventoryService, **where: Any) -> list[Any]:
    """The org's ledger entries (table rows) in append order, optionally filtered by column."""
    stmt = select(L).where(L.c.org_id == service.org_id)
    for column, value in where.items():
        stmt = stmt.where(L.c[column] == value)
    async with service.db.read() as conn:
        return list((await conn.execute(stmt.order_by(L.c.id))).all())


async def balance(service: InventoryService, sku: str, location: str = LOC) -> Any:
    """The balance row of (location, sku), or None when it does not exist."""
    async with service.db.read() as conn:
        return (
            await conn.execute(
                select(B).where(
                    B.c.org_id == service.org_id, B.c.location == location, B.c.sku == sku
                )
            )
        ).first()


async def stock(service: InventoryService, sku: str, location: str = LOC) -> tuple[int, int, int]:
    """(on_hand, reserved, version) of a balance that must exist."""
    row = await balance(service, sku, location)
    assert row is not None, f"no balance for {location}/{sku}"
    return (row.on_hand, row.reserved, row.version)


async def count(service: InventoryService, table: Any) -> int:
    async with service.db.read() as conn:
        return int(
            (
                await conn.execute(
                    select(func.count()).select_from(table).where(table.c.org_id == service.org_id)
                )
            ).scalar_one()
        )


async def reservation_row(service: InventoryService, rid: int) -> Any:
    async with service.db.read() as conn:
        return (await conn.execute(select(R).where(R.c.id == rid))).one()


async def line_rows(service: InventoryService, rid: int) -> dict[tuple[str, str], Any]:
    async with service.db.read() as conn:
        rows = (await conn.execute(select(RL).where(RL.c.reservation_id == rid))).all()
    return {(r.location, r.sku): r for r in rows}


async def snapshot(service: InventoryService) -> tuple[Any, ...]:
    """Everything the org has in every table, to prove a refused call changed nothing."""
    async with service.db.read() as conn:
        out = []
        for table in (B, L, R, RL, K):
            rows = (await conn.execute(select(table).where(table.c.org_id == service.org_id))).all()
            out.append(sorted(tuple(map(str, r)) for r in rows))
    return tuple(out)


async def assert_invariants(service: InventoryService) -> None:
    assert await find_violations(service.db, service.org_id) == []


def entry_tuple(e: Any) -> tuple[Any, ...]:
    """(event, location, sku, on_hand_delta, reserved_delta, on_hand_after, reserved_after)."""
    return (
        e.event_type,
        e.location,
        e.sku,
        e.on_hand_delta,
        e.reserved_delta,
        e.on_hand_after,
        e.reserved_after,
    )


class FixedClock:
    """A clock that stays where it is put (for exact expiry boundaries and created_at ties)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# ---------------------------------------------------------------------------- RESTOCK


async def test_restock_many_lines_creates_balances_and_one_entry_per_balance(service):
    result = await service.restock(
        "rs-1", [Line("A", 5), Line("B", 3, "wh-2"), Line("C", 1_000_000_000)]
    )

    assert result.replayed is False
    got = {(b.location, b.sku): (b.on_hand, b.reserved, b.version) for b in result.balances}
    assert got == {
        (LOC, "A"): (5, 0, 1),
        ("wh-2", "B"): (3, 0, 1),
        (LOC, "C"): (1_000_000_000, 0, 1),
    }
    assert await stock(service, "A") == (5, 0, 1)
    assert await stock(service, "B", "wh-2") == (3, 0, 1)
    assert await stock(service, "C") == (1_000_000_000, 0, 1)

    entries = await ledger(service)
    assert sorted(entry_tuple(e) for e in entries) == [
        ("RESTOCK", LOC, "A", 5, 0, 5, 0),
        ("RESTOCK", LOC, "C", 1_000_000_000, 0, 1_000_000_000, 0),
        ("RESTOCK", "wh-2", "B", 3, 0, 3, 0),
    ]
    assert {e.idempotency_key for e in entries} == {"rs-1"}
    assert all(e.reservation_id is None for e in entries)
    assert [e.id for e in result.ledger_entries] == [e.id for e in entries]
    await assert_invariants(service)


async def test_restock_adds_to_an_existing_balance(service):
    await service.restock("rs-1", [Line("A", 5)])
    await service.reserve("rv-1", [Line("A", 2)])
    result = await service.restock("rs-2", [Line("A", 7)])

    assert [(b.on_hand, b.reserved, b.version) for b in result.balances] == [(12, 2, 3)]
    assert result.balances[0].available == 10
    assert await stock(service, "A") == (12, 2, 3)
    entries = await ledger(service, idempotency_key="rs-2")
    assert [entry_tuple(e) for e in entries] == [("RESTOCK", LOC, "A", 7, 0, 12, 2)]
    await assert_invariants(service)


async def test_restock_merges_duplicate_lines_into_one_entry(service):
    result = await service.restock(
        "rs-1", [Line("A", 2), Line("B", 1), Line("A", 3), Line("A", 4, "wh-2")]
    )

    assert len(result.balances) == 3
    assert await stock(service, "A") == (5, 0, 1)
    assert await stock(service, "A", "wh-2") == (4, 0, 1)
    assert await stock(service, "B") == (1, 0, 1)
    entries = await ledger(service)
    assert sorted(entry_tuple(e) for e in entries) == [
        ("RESTOCK", LOC, "A", 5, 0, 5, 0),
        ("RESTOCK", LOC, "B", 1, 0, 1, 0),
        ("RESTOCK", "wh-2", "A", 4, 0, 4, 0),
    ]
    await assert_invariants(service)


async def test_restock_records_reference_and_reason_on_every_entry(service):
    ref = Reference("PO", "PO-77")
    result = await service.restock(
        "rs-1", [Line("A", 1), Line("B", 2)], reference=ref, reason="supplier delivery"
    )

    entries = await ledger(service)
    assert len(entries) == 2
    for e in entries:
        assert (e.ref_type, e.ref_id, e.reason) == ("PO", "PO-77", "supplier delivery")
    for e in result.ledger_entries:
        assert e.reference == ref
        assert e.reason == "supplier delivery"
        assert e.idempotency_key == "rs-1"
    await assert_invariants(service)


async def test_strings_are_compared_exactly(service):
    await service.restock("rs-1", [Line("a", 1), Line("A", 2), Line("a ", 3)])
    await service.restock("rs-2", [Line("a", 10, "WH"), Line("a", 20, "wh")])

    assert await stock(service, "a") == (1, 0, 1)
    assert await stock(service, "A") == (2, 0, 1)
    assert await stock(service, "a ") == (3, 0, 1)
    assert await stock(service, "a", "WH") == (10, 0, 1)
    assert await stock(service, "a", "wh") == (20, 0, 1)
    assert await count(service, B) == 5

    # Reserving "A" touches only "A"; "a" has only 1 available.
    await service.reserve("rv-1", [Line("A", 2)])
    with pytest.raises(InsufficientStockError) as err:
        await service.reserve("rv-2", [Line("a", 2)])
    assert err.value.shortages == [Shortage("a", LOC, 2, 1)]
    assert await stock(service, "A") == (2, 2, 2)
    assert await stock(service, "a") == (1, 0, 1)
    assert await stock(service, "a ") == (3, 0, 1)
    await assert_invariants(service)


async def test_unicode_strings_are_not_normalized_or_folded(service):
    variants = ["caf\u00e9", "cafe\u0301", "stra\u00dfe", "strasse", "\uff53\uff4b\uff55", "sku"]
    await service.restock("rs-1", [Line(v, i + 1) for i, v in enumerate(variants)])

    for i, v in enumerate(variants):
        assert await stock(service, v) == (i + 1, 0, 1), v
    assert await count(service, B) == len(variants)
    with pytest.raises(InsufficientStockError) as err:
        await service.reserve("rv-1", [Line("cafe\u0301", 3)])
    assert err.value.shortages == [Shortage("cafe\u0301", LOC, 3, 2)]
    await assert_invariants(service)


# ---------------------------------------------------------------------------- ADJUST


async def test_adjust_positive_and_negative_delta(service):
    await service.restock("rs-1", [Line("A", 10)])

    up = await service.adjust("adj-1", "A", delta=5, reason="found a box")
    assert (up.balance.on_hand, up.balance.reserved, up.balance.version) == (15, 0, 2)
    assert entry_tuple(up.ledger_entry) == ("ADJUST", LOC, "A", 5, 0, 15, 0)
    assert up.ledger_entry.reason == "found a box"
    assert up.replayed is False

    down = await service.adjust("adj-2", "A", delta=-4, reason="damaged")
    assert (down.balance.on_hand, down.balance.version) == (11, 3)
    assert entry_tuple(down.ledger_entry) == ("ADJUST", LOC, "A", -4, 0, 11, 0)

    assert await stock(service, "A") == (11, 0, 3)
    entries = await ledger(service, event_type="ADJUST")
    assert [(e.on_hand_delta, e.on_hand_after, e.reason) for e in entries] == [
        (5, 15, "found a box"),
        (-4, 11, "damaged"),
    ]
    await assert_invariants(service)


async def test_adjust_records_reason_and_reference(service):
    await service.restock("rs-1", [Line("A", 10)])
    result = await service.adjust(
        "adj-1", "A", delta=-2, reason="damaged in transit", reference=Reference("RMA", "r-9")
    )
    assert result.ledger_entry.reference == Reference("RMA", "r-9")
    (entry,) = await ledger(service, idempotency_key="adj-1")
    assert (entry.ref_type, entry.ref_id, entry.reason) == ("RMA", "r-9", "damaged in transit")
    assert entry.reservation_id is None
    await assert_invariants(service)


async def test_adjust_set_on_hand_records_the_difference(service):
    await service.restock("rs-1", [Line("A", 10)])

    down = await service.adjust("adj-1", "A", set_on_hand=3, reason="cycle count")
    assert entry_tuple(down.ledger_entry) == ("ADJUST", LOC, "A", -7, 0, 3, 0)
    up = await service.adjust("adj-2", "A", set_on_hand=20, reason="cycle count")
    assert entry_tuple(up.ledger_entry) == ("ADJUST", LOC, "A", 17, 0, 20, 0)
    assert await stock(service, "A") == (20, 0, 3)
    await assert_invariants(service)


@pytest.mark.parametrize("how", [{"delta": 0}, {"set_on_hand": 10}])
async def test_adjust_zero_change_is_recorded_with_version_plus_one(service, how):
    await service.restock("rs-1", [Line("A", 10)])

    result = await service.adjust("adj-1", "A", reason="count found nothing wrong", **how)

    assert (result.balance.on_hand, result.balance.version) == (10, 2)
    assert entry_tuple(result.ledger_entry) == ("ADJUST", LOC, "A", 0, 0, 10, 0)
    assert await stock(service, "A") == (10, 0, 2)
    assert len(await ledger(service, event_type="ADJUST")) == 1
    await assert_invariants(service)


async def test_adjust_expected_version_match_applies(service):
    await service.restock("rs-1", [Line("A", 10)])
    await service.restock("rs-2", [Line("A", 1)])

    result = await service.adjust("adj-1", "A", delta=-1, expected_version=2, reason="count")
    assert (result.balance.on_hand, result.balance.version) == (10, 3)
    await assert_invariants(service)


async def test_adjust_expected_version_mismatch_is_a_conflict_that_changes_nothing(service):
    await service.restock("rs-1", [Line("A", 10)])
    await service.restock("rs-2", [Line("A", 1)])
    before = await snapshot(service)

    with pytest.raises(VersionConflictError) as err:
        await service.adjust("adj-1", "A", delta=-1, expected_version=1, reason="count")
    assert (err.value.expected_version, err.value.actual_version) == (1, 2)
    assert await snapshot(service) == before

    # The key was not consumed: the same key with the right version now works.
    ok = await service.adjust("adj-1", "A", delta=-1, expected_version=2, reason="count")
    assert ok.replayed is False
    assert await stock(service, "A") == (10, 0, 3)
    await assert_invariants(service)


async def test_adjust_expected_version_of_a_never_stocked_balance_is_zero(service):
    with pytest.raises(VersionConflictError) as err:
        await service.adjust("adj-1", "NEW", delta=1, expected_version=3, reason="count")
    assert (err.value.expected_version, err.value.actual_version) == (3, 0)
    assert await balance(service, "NEW") is None

    result = await service.adjust("adj-1", "NEW", delta=1, expected_version=0, reason="count")
    assert (result.balance.on_hand, result.balance.version) == (1, 1)
    await assert_invariants(service)


@pytest.mark.parametrize("how", [{"delta": -7}, {"set_on_hand": 3}])
async def test_adjust_below_reserved_is_insufficient_stock_with_one_shortage(service, how):
    await service.restock("rs-1", [Line("A", 10)])
    await service.reserve("rv-1", [Line("A", 4)])
    before = await snapshot(service)

    with pytest.raises(InsufficientStockError) as err:
        await service.adjust("adj-1", "A", reason="damaged", **how)
    # requested: the units removed (7); available: the current available (10 - 4).
    assert err.value.shortages == [Shortage("A", LOC, requested=7, available=6)]
    assert await snapshot(service) == before

    # Down to exactly the reserved units is allowed.
    result = await service.adjust("adj-1", "A", delta=-6, reason="damaged")
    assert (result.balance.on_hand, result.balance.reserved) == (4, 4)
    assert result.balance.available == 0
    await assert_invariants(service)


@pytest.mark.parametrize("how", [{"delta": 4}, {"set_on_hand": 4}])
async def test_adjust_of_a_never_stocked_balance_creates_it(service, how):
    result = await service.adjust("adj-1", "NEW", "wh-9", reason="first count", **how)

    assert (result.balance.sku, result.balance.location) == ("NEW", "wh-9")
    assert (result.balance.on_hand, result.balance.reserved, result.balance.version) == (4, 0, 1)
    assert await stock(service, "NEW", "wh-9") == (4, 0, 1)
    entries = await ledger(service)
    assert [entry_tuple(e) for e in entries] == [("ADJUST", "wh-9", "NEW", 4, 0, 4, 0)]
    await assert_invariants(service)


async def test_adjust_to_zero_of_a_never_stocked_balance_creates_it_at_zero(service):
    result = await service.adjust("adj-1", "NEW", set_on_hand=0, reason="count: none")

    assert (result.balance.on_hand, result.balance.version) == (0, 1)
    assert await stock(service, "NEW") == (0, 0, 1)
    assert [entry_tuple(e) for e in await ledger(service)] == [("ADJUST", LOC, "NEW", 0, 0, 0, 0)]
    await assert_invariants(service)


async def test_adjust_negative_result_on_a_new_balance_is_refused(service):
    with pytest.raises(InsufficientStockError) as err:
        await service.adjust("adj-1", "NEW", delta=-1, reason="shrinkage")
    assert err.value.shortages == [Shortage("NEW", LOC, requested=1, available=0)]

    assert await balance(service, "NEW") is None
    assert await count(service, B) == 0
    assert await count(service, L) == 0
    assert await count(service, K) == 0
    await assert_invariants(service)


# ---------------------------------------------------------------------------- RESERVE


async def test_reserve_a_cart(service):
    await service.restock("rs-1", [Line("A", 10), Line("B", 5, "wh-2")])
    ref = Reference("CHECKOUT", "c-1")

    result = await service.reserve("rv-1", [Line("A", 3), Line("B", 5, "wh-2")], reference=ref)

    res = result.reservation
    assert result.replayed is False
    assert res.status == "ACTIVE"
    assert res.reference == ref
    assert sorted((ln.location, ln.sku, ln.quantity, ln.remaining) for ln in res.lines) == [
        (LOC, "A", 3, 3),
        ("wh-2", "B", 5, 5),
    ]
    got = {(b.location, b.sku): (b.on_hand, b.reserved, b.version) for b in result.balances}
    assert got == {(LOC, "A"): (10, 3, 2), ("wh-2", "B"): (5, 5, 2)}
    assert await stock(service, "A") == (10, 3, 2)
    assert await stock(service, "B", "wh-2") == (5, 5, 2)

    row = await reservation_row(service, res.id)
    assert (row.status, row.ref_type, row.ref_id) == ("ACTIVE", "CHECKOUT", "c-1")
    lines = await line_rows(service, res.id)
    assert {k: (v.quantity, v.deducted, v.released) for k, v in lines.items()} == {
        (LOC, "A"): (3, 0, 0),
        ("wh-2", "B"): (5, 0, 0),
    }

    entries = await ledger(service, event_type="RESERVE")
    assert sorted(entry_tuple(e) for e in entries) == [
        ("RESERVE", LOC, "A", 0, 3, 10, 3),
        ("RESERVE", "wh-2", "B", 0, 5, 5, 5),
    ]
    assert {(e.reservation_id, e.ref_type, e.ref_id, e.idempotency_key) for e in entries} == {
        (res.id, "CHECKOUT", "c-1", "rv-1")
    }
    await assert_invariants(service)


async def test_reserve_is_all_or_nothing(service):
    await service.restock("rs-1", [Line("A", 10), Line("B", 5)])
    before = await snapshot(service)

    with pytest.raises(InsufficientStockError) as err:
        await service.reserve("rv-1", [Line("A", 3), Line("B", 6)])
    assert err.value.shortages == [Shortage("B", LOC, requested=6, available=5)]

    assert await snapshot(service) == before
    assert await stock(service, "A") == (10, 0, 1)
    assert await count(service, R) == 0
    await assert_invariants(service)


async def test_reserve_sums_lines_of_the_same_balance_before_checking(service):
    await service.restock("rs-1", [Line("A", 5)])

    with pytest.raises(InsufficientStockError) as err:
        await service.reserve("rv-1", [Line("A", 3), Line("A", 3)])
    assert err.value.shortages == [Shortage("A", LOC, requested=6, available=5)]
    assert await stock(service, "A") == (5, 0, 1)

    result = await service.reserve("rv-2", [Line("A", 2), Line("A", 3)])
    assert [(ln.sku, ln.quantity) for ln in result.reservation.lines] == [("A", 5)]
    assert [entry_tuple(e) for e in await ledger(service, event_type="RESERVE")] == [
        ("RESERVE", LOC, "A", 0, 5, 5, 5)
    ]
    assert len(await line_rows(service, result.reservation.id)) == 1
    await assert_invariants(service)


async def test_reserve_counts_earlier_reservations_against_available(service):
    await service.restock("rs-1", [Line("A", 10)])
    await service.reserve("rv-1", [Line("A", 6)])

    with pytest.raises(InsufficientStockError) as err:
        await service.reserve("rv-2", [Line("A", 5)])
    assert err.value.shortages == [Shortage("A", LOC, requested=5, available=4)]

    await service.reserve("rv-3", [Line("A", 4)])
    assert await stock(service, "A") == (10, 10, 3)
    await assert_invariants(service)


async def test_reserve_of_a_never_stocked_sku_is_insufficient_with_available_zero(service):
    await service.restock("rs-1", [Line("A", 10)])

    with pytest.raises(InsufficientStockError) as err:
        await service.reserve("rv-1", [Line("A", 1), Line("GHOST", 2)])
    assert err.value.shortages == [Shortage("GHOST", LOC, requested=2, available=0)]

    assert await balance(service, "GHOST") is None
    assert await stock(service, "A") == (10, 0, 1)
    assert await count(service, R) == 0
    await assert_invariants(service)


async def test_reserve_lists_every_shortage(service):
    await service.restock("rs-1", [Line("A", 10), Line("B", 5), Line("D", 1)])
    await service.reserve("rv-0", [Line("B", 2)])

    with pytest.raises(InsufficientStockError) as err:
        await service.reserve(
            "rv-1", [Line("D", 1), Line("A", 11), Line("C", 1, "wh-2"), Line("B", 4)]
        )
    assert sorted(err.value.shortages, key=lambda s: (s.location, s.sku)) == [
        Shortage("A", LOC, requested=11, available=10),
        Shortage("B", LOC, requested=4, available=3),
        Shortage("C", "wh-2", requested=1, available=0),
    ]
    assert await stock(service, "D") == (1, 0, 1)
    await assert_invariants(service)


async def test_reserve_ttl_defaults_to_1800_seconds(service):
    await service.restock("rs-1", [Line("A", 10)])

    res = (await service.reserve("rv-1", [Line("A", 1)])).reservation

    assert res.expires_at - res.created_at == timedelta(seconds=1800)
    row = await reservation_row(service, res.id)
    assert _utc(row.expires_at) == res.expires_at
    assert _utc(row.expires_at) - _utc(row.created_at) == timedelta(seconds=1800)
    await assert_invariants(service)


async def test_reserve_per_call_ttl_up_to_the_maximum(service, settings):
    await service.restock("rs-1", [Line("A", 10)])

    short = (await service.reserve("rv-1", [Line("A", 1)], ttl_seconds=60)).reservation
    assert short.expires_at - short.created_at == timedelta(seconds=60)
    longest = settings.max_reservation_ttl_seconds
    long = (await service.reserve("rv-2", [Line("A", 1)], ttl_seconds=longest)).reservation
    assert long.expires_at - long.created_at == timedelta(seconds=longest)
    row = await reservation_row(service, long.id)
    assert _utc(row.expires_at) == long.expires_at
    await assert_invariants(service)


async def test_reserve_ttl_above_the_maximum_is_refused_not_clamped(service, settings):
    await service.restock("rs-1", [Line("A", 10)])
    before = await snapshot(service)

    with pytest.raises(ValidationError) as err:
        await service.reserve(
            "rv-1", [Line("A", 1)], ttl_seconds=settings.max_reservation_ttl_seconds + 1
        )
    assert err.value.field == "ttlSeconds"
    assert await snapshot(service) == before
    await assert_invariants(service)


# ---------------------------------------------------------------------------- RELEASE


async def _stocked_cart(service: InventoryService, **kw: Any) -> Any:
    """Restock A=10, B=5 and reserve A 4, B 2; returns the reservation."""
    await service.restock("setup-rs", [Line("A", 10), Line("B", 5)])
    return (await service.reserve("setup-rv", [Line("A", 4), Line("B", 2)], **kw)).reservation


async def test_release_by_id_all_remaining(service):
    res = await _stocked_cart(service)

    result = await service.release("rl-1", reservation_id=res.id)

    assert result.replayed is False
    assert [(r.id, r.status) for r in result.reservations] == [(res.id, "RELEASED")]
    assert sorted((ln.sku, ln.released, ln.remaining) for ln in result.reservations[0].lines) == [
        ("A", 4, 0),
        ("B", 2, 0),
    ]
    assert sorted((b.sku, b.on_hand, b.reserved) for b in result.balances) == [
        ("A", 10, 0),
        ("B", 5, 0),
    ]
    assert await stock(service, "A") == (10, 0, 3)
    assert await stock(service, "B") == (5, 0, 3)
    assert (await reservation_row(service, res.id)).status == "RELEASED"
    entries = await ledger(service, idempotency_key="rl-1")
    assert sorted(entry_tuple(e) for e in entries) == [
        ("RELEASE", LOC, "A", 0, -4, 10, 0),
        ("RELEASE", LOC, "B", 0, -2, 5, 0),
    ]
    assert {e.reservation_id for e in entries} == {res.id}
    await assert_invariants(service)


async def test_release_given_lines_then_the_rest(service):
    res = await _stocked_cart(service)

    part = await service.release("rl-1", reservation_id=res.id, lines=[Line("A", 1), Line("A", 2)])
    assert part.reservations[0].status == "ACTIVE"
    assert await stock(service, "A") == (10, 1, 3)
    assert await stock(service, "B") == (5, 2, 2)  # untouched balance: no entry, no version
    lines = await line_rows(service, res.id)
    assert (lines[(LOC, "A")].released, lines[(LOC, "B")].released) == (3, 0)
    assert [entry_tuple(e) for e in await ledger(service, idempotency_key="rl-1")] == [
        ("RELEASE", LOC, "A", 0, -3, 10, 1)
    ]

    rest = await service.release("rl-2", reservation_id=res.id)
    assert rest.reservations[0].status == "RELEASED"
    assert sorted(entry_tuple(e) for e in await ledger(service, idempotency_key="rl-2")) == [
        ("RELEASE", LOC, "A", 0, -1, 10, 0),
        ("RELEASE", LOC, "B", 0, -2, 5, 0),
    ]
    await assert_invariants(service)


@pytest.mark.parametrize("operation", ["release", "deduct"])
async def test_over_asking_a_reservation_line_names_the_line(service, operation):
    res = await _stocked_cart(service)
    before = await snapshot(service)

    with pytest.raises(ValidationError) as err:
        await getattr(service, operation)(
            "k-1", reservation_id=res.id, lines=[Line("B", 1), Line("A", 5)]
        )
    assert err.value.field == "lines.1.quantity"
    assert await snapshot(service) == before
    await assert_invariants(service)


@pytest.mark.parametrize("operation", ["release", "deduct"])
async def test_a_balance_the_reservation_does_not_hold_is_a_validation_error(service, operation):
    res = await _stocked_cart(service)
    await service.restock("rs-2", [Line("C", 3)])
    before = await snapshot(service)

    for bad in (Line("C", 1), Line("A", 1, "wh-2"), Line("a", 1)):
        with pytest.raises(ValidationError) as err:
            await getattr(service, operation)(
                "k-1", reservation_id=res.id, lines=[Line("A", 1), bad]
            )
        assert err.value.field is not None and err.value.field.startswith("lines.1."), (
            bad,
            err.value.field,
        )
    assert await snapshot(service) == before
    await assert_invariants(service)


@pytest.mark.parametrize("operation", ["release", "deduct", "extend"])
async def test_unknown_reservation_id_is_not_found(service, operation):
    await _stocked_cart(service)

    for rid in (987654321, "987654321", "not-a-number"):
        with pytest.raises(NotFoundError) as err:
            if operation == "extend":
                await service.extend_reservation("k-1", rid, 60)
            else:
                await getattr(service, operation)("k-1", reservation_id=rid)
        assert (err.value.entity, err.value.key) == ("Reservation", str(rid))
    await assert_invariants(service)


async def test_another_orgs_reservation_is_not_found(service, db, settings, clock):
    res = await _stocked_cart(service)
    other = InventoryService(db, settings, clock=clock, org_id=service.org_id + "-other")

    with pytest.raises(NotFoundError):
        await other.deduct("k-1", reservation_id=res.id)
    assert (await reservation_row(service, res.id)).status == "ACTIVE"
    await assert_invariants(service)


@pytest.mark.parametrize("operation", ["release", "deduct"])
async def test_reference_with_no_active_reservation_is_not_found(service, operation):
    res = await _stocked_cart(service, reference=Reference("ORDER", "o-1"))
    await service.release("rl-0", reservation_id=res.id)
    before = await snapshot(service)

    for ref in (Reference("ORDER", "o-1"), Reference("ORDER", "o-2"), Reference("order", "o-1")):
        with pytest.raises(NotFoundError) as err:
            await getattr(service, operation)("k-1", reference=ref)
        assert (err.value.entity, err.value.key) == ("Reservation", f"{ref.type}:{ref.id}")
    assert await snapshot(service) == before
    await assert_invariants(service)


async def _two_reservations_for(service: InventoryService, ref: Reference, clock: Any) -> tuple:
    await service.restock("setup-rs", [Line("A", 10), Line("B", 10)])
    first = (await service.reserve("rv-1", [Line("A", 3), Line("B", 1)], reference=ref)).reservation
    clock.advance(1)
    second = (await service.reserve("rv-2", [Line("A", 4)], reference=ref)).reservation
    return first, second


@pytest.mark.parametrize("operation", ["release", "deduct"])
async def test_by_reference_all_remaining_across_reservations(service, clock, operation):
    ref = Reference("ORDER", "o-1")
    first, second = await _two_reservations_for(service, ref, clock)
    # An unrelated reservation stays as it is.
    other = await service.reserve("rv-3", [Line("A", 1)], reference=Reference("ORDER", "o-2"))
    other = other.reservation

    result = await getattr(service, operation)("k-1", reference=ref)

    status = "COMMITTED" if operation == "deduct" else "RELEASED"
    assert [(r.id, r.status) for r in result.reservations] == [
        (first.id, status),
        (second.id, status),
    ]
    entries = await ledger(service, idempotency_key="k-1")
    event = operation.upper()
    sign = -1 if operation == "deduct" else 0
    # One entry per (reservation, balance), oldest reservation first.
    assert [(e.reservation_id, e.sku, e.on_hand_delta, e.reserved_delta) for e in entries] == [
        (first.id, "A", 3 * sign, -3),
        (first.id, "B", 1 * sign, -1),
        (second.id, "A", 4 * sign, -4),
    ]
    assert {e.event_type for e in entries} == {event}
    assert {(e.ref_type, e.ref_id) for e in entries} == {("ORDER", "o-1")}
    on_hand_a = 10 - 7 if operation == "deduct" else 10
    assert (await stock(service, "A"))[:2] == (on_hand_a, 1)
    # The after-values chain: each entry starts where the previous one for the balance ended.
    a_entries = [e for e in entries if e.sku == "A"]
    assert [(e.on_hand_after, e.reserved_after) for e in a_entries] == [
        (10 + 3 * sign, 5),
        (10 + 7 * sign, 1),
    ]
    assert (await reservation_row(service, other.id)).status == "ACTIVE"
    await assert_invariants(service)


@pytest.mark.parametrize("operation", ["release", "deduct"])
async def test_by_reference_given_lines_are_taken_oldest_first(service, clock, operation):
    ref = Reference("ORDER", "o-1")
    first, second = await _two_reservations_for(service, ref, clock)

    result = await getattr(service, operation)("k-1", reference=ref, lines=[Line("A", 5)])

    entries = await ledger(service, idempotency_key="k-1")
    assert [(e.reservation_id, e.sku, e.reserved_delta) for e in entries] == [
        (first.id, "A", -3),
        (second.id, "A", -2),
    ]
    lines_first = await line_rows(service, first.id)
    lines_second = await line_rows(service, second.id)
    column = "deducted" if operation == "deduct" else "released"
    assert getattr(lines_first[(LOC, "A")], column) == 3
    assert getattr(lines_first[(LOC, "B")], column) == 0
    assert getattr(lines_second[(LOC, "A")], column) == 2
    # The first still holds B, so both stay ACTIVE.
    assert {r.id: r.status for r in result.reservations} == {
        first.id: "ACTIVE",
        second.id: "ACTIVE",
    }
    await assert_invariants(service)


async def test_by_reference_order_is_created_at_before_id(db, settings, org_id):
    """A reservation with a higher id but an earlier created_at comes first."""
    t0 = datetime(2030, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    fixed = FixedClock(t0)
    service = InventoryService(db, settings, clock=fixed, org_id=org_id)
    ref = Reference("ORDER", "o-1")
    await service.restock("rs-1", [Line("A", 10)])
    fixed.now = t0 + timedelta(seconds=5)
    later = (await service.reserve("rv-1", [Line("A", 2)], reference=ref)).reservation
    fixed.now = t0
    earlier = (await service.reserve("rv-2", [Line("A", 2)], reference=ref)).reservation
    # And two created in the same microsecond: id decides.
    tie_a = (await service.reserve("rv-3", [Line("A", 2)], reference=ref)).reservation
    tie_b = (await service.reserve("rv-4", [Line("A", 2)], reference=ref)).reservation
    assert later.id < earlier.id < tie_a.id < tie_b.id

    fixed.now = t0 + timedelta(seconds=10)
    await service.release("rl-1", reference=ref, lines=[Line("A", 5)])

    entries = await ledger(service, idempotency_key="rl-1")
    assert [(e.reservation_id, e.reserved_delta) for e in entries] == [
        (earlier.id, -2),
        (tie_a.id, -2),
        (tie_b.id, -1),
    ]
    assert (await reservation_row(service, later.id)).status == "ACTIVE"
    await assert_invariants(service)


@pytest.mark.parametrize("operation", ["release", "deduct"])
async def test_by_reference_over_asking_the_sum_of_reservations(service, clock, operation):
    ref = Reference("ORDER", "o-1")
    await _two_reservations_for(service, ref, clock)
    before = await snapshot(service)

    with pytest.raises(ValidationError) as err:
        await getattr(service, operation)("k-1", reference=ref, lines=[Line("B", 1), Line("A", 8)])
    assert err.value.field == "lines.1.quantity"
    assert await snapshot(service) == before
    await assert_invariants(service)


@pytest.mark.parametrize(
    ("first", "then", "status"),
    [
        ("release", "release", "RELEASED"),
        ("release", "deduct", "RELEASED"),
        ("deduct", "release", "COMMITTED"),
        ("deduct", "deduct", "COMMITTED"),
    ],
)
async def test_a_reservation_that_is_not_active_refuses_release_and_deduct(
    service, first, then, status
):
    res = await _stocked_cart(service)
    await getattr(service, first)("k-1", reservation_id=res.id)
    before = await snapshot(service)

    with pytest.raises(ReservationNotActiveError) as err:
        await getattr(service, then)("k-2", reservation_id=res.id)
    assert (err.value.reservation_id, err.value.status) == (res.id, status)
    with pytest.raises(ReservationNotActiveError):
        await getattr(service, then)("k-3", reservation_id=res.id, lines=[Line("A", 1)])
    with pytest.raises(ReservationNotActiveError) as err:
        await service.extend_reservation("k-4", res.id, 60)
    assert err.value.status == status
    assert await snapshot(service) == before
    await assert_invariants(service)


# ---------------------------------------------------------------------------- DEDUCT


async def test_deduct_by_id_all_remaining_commits(service):
    res = await _stocked_cart(service)

    result = await service.deduct("dd-1", reservation_id=res.id)

    assert [(r.id, r.status) for r in result.reservations] == [(res.id, "COMMITTED")]
    assert sorted((ln.sku, ln.deducted, ln.remaining) for ln in result.reservations[0].lines) == [
        ("A", 4, 0),
        ("B", 2, 0),
    ]
    assert await stock(service, "A") == (6, 0, 3)
    assert await stock(service, "B") == (3, 0, 3)
    entries = await ledger(service, idempotency_key="dd-1")
    assert sorted(entry_tuple(e) for e in entries) == [
        ("DEDUCT", LOC, "A", -4, -4, 6, 0),
        ("DEDUCT", LOC, "B", -2, -2, 3, 0),
    ]
    assert [e.id for e in result.ledger_entries] == [e.id for e in entries]
    assert (await reservation_row(service, res.id)).status == "COMMITTED"
    await assert_invariants(service)


async def test_deduct_given_lines_keeps_the_reservation_active(service):
    res = await _stocked_cart(service)

    result = await service.deduct("dd-1", reservation_id=res.id, lines=[Line("B", 2)])

    assert result.reservations[0].status == "ACTIVE"
    assert [entry_tuple(e) for e in await ledger(service, idempotency_key="dd-1")] == [
        ("DEDUCT", LOC, "B", -2, -2, 3, 0)
    ]
    assert await stock(service, "A") == (10, 4, 2)
    assert await stock(service, "B") == (3, 0, 3)

    done = await service.deduct("dd-2", reservation_id=res.id, lines=[Line("A", 4)])
    assert done.reservations[0].status == "COMMITTED"
    assert await stock(service, "A") == (6, 0, 3)
    await assert_invariants(service)


async def test_direct_deduct_takes_from_available(service):
    await service.restock("rs-1", [Line("A", 10), Line("B", 2)])
    await service.reserve("rv-1", [Line("A", 3)])

    result = await service.deduct("dd-1", lines=[Line("A", 7), Line("B", 1)])

    assert result.reservations == []
    assert sorted((b.sku, b.on_hand, b.reserved, b.version) for b in result.balances) == [
        ("A", 3, 3, 3),
        ("B", 1, 0, 2),
    ]
    entries = await ledger(service, idempotency_key="dd-1")
    assert sorted(entry_tuple(e) for e in entries) == [
        ("DEDUCT", LOC, "A", -7, 0, 3, 3),
        ("DEDUCT", LOC, "B", -1, 0, 1, 0),
    ]
    assert all(e.reservation_id is None for e in entries)

    # Nothing available is left of A (3 on hand, 3 reserved).
    with pytest.raises(InsufficientStockError) as err:
        await service.deduct("dd-2", lines=[Line("A", 1)])
    assert err.value.shortages == [Shortage("A", LOC, requested=1, available=0)]
    await assert_invariants(service)


async def test_direct_deduct_is_all_or_nothing_and_lists_every_shortage(service):
    await service.restock("rs-1", [Line("A", 10), Line("B", 2)])
    await service.reserve("rv-1", [Line("A", 4)])
    before = await snapshot(service)

    with pytest.raises(InsufficientStockError) as err:
        await service.deduct(
            "dd-1", lines=[Line("B", 1), Line("A", 7), Line("GHOST", 1), Line("B", 2)]
        )
    assert sorted(err.value.shortages, key=lambda s: s.sku) == [
        Shortage("A", LOC, requested=7, available=6),
        Shortage("B", LOC, requested=3, available=2),
        Shortage("GHOST", LOC, requested=1, available=0),
    ]
    assert await snapshot(service) == before
    assert await balance(service, "GHOST") is None
    await assert_invariants(service)


async def test_direct_deduct_of_a_never_stocked_sku_has_available_zero(service):
    with pytest.raises(InsufficientStockError) as err:
        await service.deduct("dd-1", lines=[Line("GHOST", 1, "wh-3")])
    assert err.value.shortages == [Shortage("GHOST", "wh-3", requested=1, available=0)]
    assert await count(service, B) == 0
    assert await count(service, L) == 0
    assert await count(service, K) == 0
    await assert_invariants(service)


# ---------------------------------------------------------------------------- EXTEND


async def test_extend_sets_expiry_to_now_plus_ttl(service, clock):
    res = await _stocked_cart(service, ttl_seconds=60)
    clock.advance(30)
    entries_before = await ledger(service)

    start = clock()
    result = await service.extend_reservation("ex-1", res.id, 600)
    end = clock()

    assert result.replayed is False
    assert result.reservation.status == "ACTIVE"
    assert start + timedelta(seconds=600) <= result.reservation.expires_at
    assert result.reservation.expires_at <= end + timedelta(seconds=600)
    row = await reservation_row(service, res.id)
    assert _utc(row.expires_at) == result.reservation.expires_at
    assert row.status == "ACTIVE"
    # No balance changed, so no ledger entry.
    assert await ledger(service) == entries_before

    # Alive past the original expiry, and the sweep leaves it alone.
    clock.advance(100)
    assert await service.expire_due() == []
    await service.deduct("dd-1", reservation_id=res.id)
    assert await stock(service, "A") == (6, 0, 3)
    await assert_invariants(service)


async def test_extend_can_shorten(service, clock):
    res = await _stocked_cart(service)
    result = await service.extend_reservation("ex-1", res.id, 5)
    assert result.reservation.expires_at < res.expires_at
    clock.advance(6)
    assert await service.expire_due() == [res.id]
    await assert_invariants(service)


async def test_extend_ttl_above_the_maximum_is_refused(service, settings):
    res = await _stocked_cart(service)
    with pytest.raises(ValidationError) as err:
        await service.extend_reservation("ex-1", res.id, settings.max_reservation_ttl_seconds + 1)
    assert err.value.field == "ttlSeconds"
    assert _utc((await reservation_row(service, res.id)).expires_at) == res.expires_at
    await assert_invariants(service)


async def test_extend_past_expiry_expires_the_reservation_and_keeps_the_key(service, clock):
    res = await _stocked_cart(service, ttl_seconds=60)
    await service.restock("rs-2", [Line("C", 1)])
    valid = (await service.reserve("rv-2", [Line("C", 1)], ttl_seconds=3600)).reservation
    clock.advance(61)

    with pytest.raises(ReservationNotActiveError) as err:
        await service.extend_reservation("ex-1", res.id, 600)
    assert (err.value.reservation_id, err.value.status) == (res.id, "EXPIRED")

    # The expiry committed: status EXPIRED, EXPIRE entries keyed expire:<id>, stock back.
    assert (await reservation_row(service, res.id)).status == "EXPIRED"
    expire = await ledger(service, event_type="EXPIRE")
    assert sorted(entry_tuple(e) for e in expire) == [
        ("EXPIRE", LOC, "A", 0, -4, 10, 0),
        ("EXPIRE", LOC, "B", 0, -2, 5, 0),
    ]
    assert {(e.idempotency_key, e.reservation_id) for e in expire} == {(f"expire:{res.id}", res.id)}
    assert await stock(service, "A") == (10, 0, 3)
    assert len(await ledger(service, idempotency_key="ex-1")) == 0

    # The caller's key was not consumed: it works on a valid target.
    ok = await service.extend_reservation("ex-1", valid.id, 600)
    assert ok.replayed is False
    assert ok.reservation.id == valid.id
    # And the sweep finds nothing left to expire.
    assert await service.expire_due() == []
    await assert_invariants(service)


# ---------------------------------------------------------------------------- EXPIRE


async def test_expire_due_expires_and_restores_balances(service, clock):
    res = await _stocked_cart(service, ttl_seconds=60)
    await service.deduct("dd-1", reservation_id=res.id, lines=[Line("A", 1)])
    keep = (await service.reserve("rv-2", [Line("A", 2)], ttl_seconds=3600)).reservation

    clock.advance(59)
    assert await service.expire_due() == []
    clock.advance(2)
    assert await service.expire_due() == [res.id]

    assert (await reservation_row(service, res.id)).status == "EXPIRED"
    assert (await reservation_row(service, keep.id)).status == "ACTIVE"
    lines = await line_rows(service, res.id)
    assert {k[1]: (v.quantity, v.deducted, v.released) for k, v in lines.items()} == {
        "A": (4, 1, 3),
        "B": (2, 0, 2),
    }
    expire = await ledger(service, idempotency_key=f"expire:{res.id}")
    assert sorted(entry_tuple(e) for e in expire) == [
        ("EXPIRE", LOC, "A", 0, -3, 9, 2),
        ("EXPIRE", LOC, "B", 0, -2, 5, 0),
    ]
    assert {e.reservation_id for e in expire} == {res.id}
    assert await stock(service, "A") == (9, 2, 5)
    assert await stock(service, "B") == (5, 0, 3)
    await assert_invariants(service)


async def test_expire_due_is_idempotent(service, clock):
    res = await _stocked_cart(service, ttl_seconds=60)
    clock.advance(61)

    assert await service.expire_due() == [res.id]
    after_first = await snapshot(service)
    assert await service.expire_due() == []
    assert await service.expire_reservation(res.id) is None
    assert await snapshot(service) == after_first
    assert len(await ledger(service, event_type="EXPIRE")) == 2
    await assert_invariants(service)


@pytest.mark.parametrize("operation", ["release", "deduct"])
async def test_past_due_unswept_reservation_cannot_be_released_or_deducted(
    service, clock, operation
):
    res = await _stocked_cart(service, ttl_seconds=60)
    other = (await service.reserve("rv-2", [Line("A", 1)], ttl_seconds=3600)).reservation
    clock.advance(60.5)

    for lines in (None, [Line("A", 1)]):
        with pytest.raises(ReservationNotActiveError) as err:
            await getattr(service, operation)("k-1", reservation_id=res.id, lines=lines)
        assert (err.value.reservation_id, err.value.status) == (res.id, "EXPIRED")

    # It was expired (once), nothing was released or deducted under the caller's key.
    assert (await reservation_row(service, res.id)).status == "EXPIRED"
    assert len(await ledger(service, idempotency_key=f"expire:{res.id}")) == 2
    assert await ledger(service, idempotency_key="k-1") == []
    assert await stock(service, "A") == (10, 1, 4)
    assert await stock(service, "B") == (5, 0, 3)

    # The caller's key is free for a valid target.
    ok = await getattr(service, operation)("k-1", reservation_id=other.id)
    assert ok.replayed is False
    assert await service.expire_due() == []
    await assert_invariants(service)


@pytest.mark.parametrize("operation", ["release", "deduct"])
async def test_by_reference_past_due_reservation_is_expired_not_consumed(service, clock, operation):
    ref = Reference("CART", "c-9")
    await service.restock("rs-1", [Line("A", 10)])
    due = await service.reserve("rv-1", [Line("A", 3)], reference=ref, ttl_seconds=60)
    due = due.reservation
    live = await service.reserve("rv-2", [Line("A", 2)], reference=ref, ttl_seconds=3600)
    live = live.reservation
    clock.advance(61)

    result = await getattr(service, operation)("k-1", reference=ref)

    assert [r.id for r in result.reservations] == [live.id]
    assert (await reservation_row(service, due.id)).status == "EXPIRED"
    assert [entry_tuple(e) for e in await ledger(service, idempotency_key=f"expire:{due.id}")] == [
        ("EXPIRE", LOC, "A", 0, -3, 10, 2)
    ]
    entries = await ledger(service, idempotency_key="k-1")
    assert [e.reservation_id for e in entries] == [live.id]
    await assert_invariants(service)


@pytest.mark.parametrize("operation", ["release", "deduct"])
async def test_by_reference_all_past_due_expires_them_and_keeps_the_key(service, clock, operation):
    ref = Reference("CART", "c-9")
    await service.restock("rs-1", [Line("A", 10)])
    due = await service.reserve("rv-1", [Line("A", 3)], reference=ref, ttl_seconds=60)
    due = due.reservation
    clock.advance(61)

    # Section 11: the expiry commits and the call fails (NotFound for "no ACTIVE reservation
    # with this reference", or ReservationNotActive EXPIRED).
    with pytest.raises((NotFoundError, ReservationNotActiveError)) as err:
        await getattr(service, operation)("k-1", reference=ref)
    if isinstance(err.value, NotFoundError):
        assert (err.value.entity, err.value.key) == ("Reservation", "CART:c-9")
    else:
        assert (err.value.reservation_id, err.value.status) == (due.id, "EXPIRED")
    assert (await reservation_row(service, due.id)).status == "EXPIRED"
    assert await stock(service, "A") == (10, 0, 3)
    assert await ledger(service, idempotency_key="k-1") == []

    await service.reserve("rv-2", [Line("A", 1)], reference=ref)
    ok = await getattr(service, operation)("k-1", reference=ref)
    assert ok.replayed is False
    await assert_invariants(service)


async def test_expiry_boundary_is_now_at_or_after_expires_at(db, settings, org_id):
    """Microseconds are stored: expired exactly at expires_at, not one microsecond before."""
    t0 = datetime(2030, 6, 1, 8, 0, 0, 123_457, tzinfo=UTC)
    fixed = FixedClock(t0)
    service = InventoryService(db, settings, clock=fixed, org_id=org_id)
    await service.restock("rs-1", [Line("A", 10)])
    first = (await service.reserve("rv-1", [Line("A", 1)], ttl_seconds=10)).reservation
    second = (await service.reserve("rv-2", [Line("A", 1)], ttl_seconds=10)).reservation
    assert _utc((await reservation_row(service, first.id)).expires_at) == t0 + timedelta(seconds=10)

    fixed.now = t0 + timedelta(seconds=10) - timedelta(microseconds=1)
    assert await service.due_reservation_ids() == []
    assert await service.expire_due() == []
    part = await service.deduct("dd-1", reservation_id=first.id, lines=[Line("A", 1)])
    assert part.reservations[0].status == "COMMITTED"

    fixed.now = t0 + timedelta(seconds=10)
    assert await service.due_reservation_ids() == [second.id]
    with pytest.raises(ReservationNotActiveError) as err:
        await service.deduct("dd-2", reservation_id=second.id)
    assert err.value.status == "EXPIRED"
    assert await stock(service, "A") == (9, 0, 5)
    await assert_invariants(service)


# ---------------------------------------------------------------------------- the ledger


async def test_every_change_writes_one_entry_per_balance_touched(service, clock):
    """A scripted day: after every call, entries == balances touched, after-values == state."""
    ref = Reference("ORDER", "o-1")
    calls = [
        ("restock", lambda: service.restock("s1", [Line("A", 5), Line("B", 5), Line("A", 5)])),
        ("adjust", lambda: service.adjust("s2", "B", delta=-1, reason="damaged")),
        ("reserve", lambda: service.reserve("s3", [Line("A", 2), Line("B", 2)], reference=ref)),
        ("reserve", lambda: service.reserve("s4", [Line("A", 1)], reference=ref)),
        ("release", lambda: service.release("s5", reference=ref, lines=[Line("A", 3)])),
        ("deduct", lambda: service.deduct("s6", reference=ref)),
        ("deduct", lambda: service.deduct("s7", lines=[Line("A", 1), Line("B", 1)])),
    ]
    for i, (_, call) in enumerate(calls, start=1):
        before = {e.id for e in await ledger(service)}
        await call()
        new = [e for e in await ledger(service) if e.id not in before]
        assert new and {e.idempotency_key for e in new} == {f"s{i}"}
        touched = [(e.location, e.sku, e.reservation_id) for e in new]
        assert len(touched) == len(set(touched)), touched
        # The last entry of each balance carries that balance's state after the call.
        last: dict[tuple[str, str], Any] = {}
        for e in new:
            last[(e.location, e.sku)] = e
        for (loc, sku), e in last.items():
            on_hand, reserved, _ = await stock(service, sku, loc)
            assert (e.on_hand_after, e.reserved_after) == (on_hand, reserved)
        await assert_invariants(service)

    assert (await stock(service, "A"))[:2] == (9, 0)
    assert await stock(service, "B") == (1, 0, 5)


# ---------------------------------------------------------------------------- storage at the bounds
# (moved from the validation tests, which run without a database now)


async def test_strings_of_255_characters_are_accepted_and_stored_exactly(service):
    sku = "s" * 254 + "S"
    location = "L" * 255
    emoji_sku = "\U0001f4e6" * 255  # 4-byte UTF-8 characters
    key = "k" * 255
    ref = Reference("T" * 255, "I" * 255)
    reason = "r" * 255

    await service.restock(key, [Line(sku, 1, location), Line(emoji_sku, 2)], reference=ref)
    await service.adjust("adj-1", emoji_sku, delta=1, reason=reason)

    async with service.db.read() as conn:
        rows = (await conn.execute(select(B).where(B.c.org_id == service.org_id))).all()
        entries = (await conn.execute(select(L).where(L.c.org_id == service.org_id))).all()
    assert sorted((r.location, r.sku, r.on_hand) for r in rows) == sorted(
        [(location, sku, 1), ("default", emoji_sku, 3)]
    )
    assert {e.idempotency_key for e in entries} == {key, "adj-1"}
    assert {(e.ref_type, e.ref_id) for e in entries if e.idempotency_key == key} == {
        ("T" * 255, "I" * 255)
    }
    assert [e.reason for e in entries if e.event_type == "ADJUST"] == [reason]
    replay = await service.restock(key, [Line(emoji_sku, 2), Line(sku, 1, location)], reference=ref)
    assert replay.replayed is True
    assert await find_violations(service.db, service.org_id) == []


async def test_exactly_500_lines_are_accepted(service):
    lines = [Line(f"SKU-{i:03d}", 2) for i in range(500)]

    restocked = await service.restock("rs-1", lines)
    assert len(restocked.balances) == 500
    assert len(restocked.ledger_entries) == 500
    reserved = await service.reserve("rv-1", lines)
    assert len(reserved.reservation.lines) == 500
    released = await service.release(
        "rl-1", reservation_id=reserved.reservation.id, lines=[Line(ln.sku, 1) for ln in lines]
    )
    assert released.reservations[0].status == "ACTIVE"
    deducted = await service.deduct("dd-1", lines=[Line(ln.sku, 1) for ln in lines])
    assert len(deducted.ledger_entries) == 500

    assert await count(service, B) == 500
    assert await count(service, L) == 2000
    async with service.db.read() as conn:
        totals = (
            await conn.execute(
                select(func.sum(B.c.on_hand), func.sum(B.c.reserved)).where(
                    B.c.org_id == service.org_id
                )
            )
        ).one()
    assert (int(totals[0]), int(totals[1])) == (500, 500)
    assert await find_violations(service.db, service.org_id) == []
