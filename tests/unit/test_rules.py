"""The transaction rules of ARCHITECTURE sections 3 and 11, on the pure domain core, no I/O.

Each test builds a :class:`Stock` from plain values, decides one command at a fixed time with
``rules.decide`` and checks the returned :class:`Changes` (balances after, reservations after,
ledger entries) or :class:`Refusal` (one domain error, plus what it still commits).

Every decision goes through :func:`changes_of` or :func:`refusal_of`, which also check what holds
for all of them: ``decide`` never changes the stock it is given; a success writes exactly one
ledger entry per (balance, reservation) touched, whose deltas and after-values chain from the
balance before to the balance after, with the version up by one per entry.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from stockledger.domain import rules
from stockledger.domain.commands import (
    Adjust,
    Confirm,
    Deduct,
    DeductDirect,
    Expire,
    Extend,
    Release,
    Reserve,
    Restock,
)
from stockledger.domain.errors import (
    InsufficientStockError,
    NotFoundError,
    ReservationNotActiveError,
    Shortage,
    StockError,
    ValidationError,
    VersionConflictError,
)
from stockledger.domain.model import (
    ACTIVE,
    COMMITTED,
    CONFIRMED,
    EXPIRED,
    RELEASED,
    Balance,
    BalanceKey,
    LedgerEntry,
    Line,
    Reference,
    Reservation,
    ReservationLine,
)
from stockledger.domain.state import Changes, KeyRow, Refusal, Stock
from stockledger.domain.validation import MAX_BALANCE
from unit.fakes import with_derived

NOW = datetime(2030, 6, 1, 8, 0, 0, 123_457, tzinfo=UTC)
EARLIER = NOW - timedelta(hours=1)
LATER = NOW + timedelta(minutes=30)
LOC = "default"
DEFAULT_TTL = 1800
MAX_TTL = 7 * 24 * 3600
NEW_ID = 100  # the id the unit of work hands a new reservation
ORDER = Reference("ORDER", "o-1")


# ---------------------------------------------------------------------------- building state


def bal(sku: str, on_hand: int, reserved: int = 0, version: int = 1, location: str = LOC):
    return Balance(sku, location, on_hand, reserved, version, EARLIER)


def rline(sku: str, quantity: int, deducted: int = 0, released: int = 0, location: str = LOC):
    return ReservationLine(sku, location, quantity, deducted, released)


def resv(
    rid: int,
    *lines: ReservationLine,
    status: str = ACTIVE,
    reference: Reference | None = None,
    created_at: datetime = EARLIER,
    expires_at: datetime = LATER,
) -> Reservation:
    return Reservation(
        id=rid,
        status=status,
        reference=reference,
        expires_at=expires_at,
        created_at=created_at,
        updated_at=created_at,
        lines=tuple(sorted(lines, key=lambda ln: ln.key)),
    )


def stock_with(*balances: Balance, reservations: tuple[Reservation, ...] = ()) -> Stock:
    return Stock(with_derived(balances, reservations), reservations)


def cart_stock(**kw: Any) -> Stock:
    """A=10 (4 reserved), B=5 (2 reserved), held by reservation 1 (A 4, B 2), ACTIVE."""
    return stock_with(
        bal("A", 10, 4, version=2),
        bal("B", 5, 2, version=2),
        reservations=(resv(1, rline("A", 4), rline("B", 2), **kw),),
    )


def two_for_order() -> Stock:
    """A=10, B=10; reservation 1 (A 3, B 1) then 2 (A 4), both for ORDER, 2 made a second later;
    reservation 3 (A 1) for another order."""
    return stock_with(
        bal("A", 10, 8, version=4),
        bal("B", 10, 1, version=2),
        reservations=(
            resv(1, rline("A", 3), rline("B", 1), reference=ORDER),
            resv(2, rline("A", 4), reference=ORDER, created_at=EARLIER + timedelta(seconds=1)),
            resv(3, rline("A", 1), reference=Reference("ORDER", "o-2")),
        ),
    )


# ---------------------------------------------------------------------------- building commands


def restock(*lines: Line, key: str = "rs-1", **kw: Any) -> Restock:
    return Restock.validated(key, list(lines), **kw)


def adjust(sku: str = "A", location: str = LOC, *, key: str = "adj-1", **kw: Any) -> Adjust:
    kw.setdefault("reason", "count")
    return Adjust.validated(key, sku, location, **kw)


def reserve(
    *lines: Line, key: str = "rv-1", ttl: int | None = None, reference: Reference | None = None
) -> Reserve:
    return Reserve.validated(
        key,
        list(lines),
        reference=reference,
        ttl_seconds=ttl,
        default_ttl_seconds=DEFAULT_TTL,
        max_ttl_seconds=MAX_TTL,
    )


def release(rid: int | None = None, ref: Reference | None = None, lines=None, key="rl-1"):
    return Release.validated(key, reservation_id=rid, reference=ref, lines=lines)


def deduct(rid: int | None = None, ref: Reference | None = None, lines=None, key="dd-1"):
    return Deduct.validated(key, reservation_id=rid, reference=ref, lines=lines)


def deduct_direct(*lines: Line, key: str = "dd-1") -> DeductDirect:
    command = Deduct.validated(key, lines=list(lines))
    assert isinstance(command, DeductDirect)
    return command


def consume(operation: str, **kw: Any) -> Release | Deduct:
    return release(**kw) if operation == "release" else deduct(**kw)  # type: ignore[return-value]


def extend(rid: int, ttl: int, key: str = "ex-1") -> Extend:
    return Extend.validated(key, rid, ttl, max_ttl_seconds=MAX_TTL)


def confirm(rid: int | None = None, ref: Reference | None = None, key: str = "cf-1") -> Confirm:
    return Confirm.validated(key, reservation_id=rid, reference=ref)


# ---------------------------------------------------------------------------- deciding


def snapshot(stock: Stock) -> tuple[Any, ...]:
    return (dict(stock.balances), dict(stock.reservations))


def zero(key: BalanceKey, now: datetime) -> Balance:
    return Balance(key[1], key[0], 0, 0, 0, now)


def check_entries(stock: Stock, changes: Changes, now: datetime) -> None:
    """The ledger of ``changes`` explains its balances exactly (sections 2 and 3)."""
    keys = [e.key for e in changes.entries]
    shown = [b.key for b in changes.balances]
    assert shown == sorted(shown), "balances in key order"
    assert set(keys) <= set(shown), "every balance touched is listed"
    for b in changes.balances:
        if b.key not in keys:  # listed without entries (a confirm's result shows its balances)
            before = stock.balance(b.key) or zero(b.key, now)
            assert (b.on_hand, b.reserved, b.version) == (
                before.on_hand,
                before.reserved,
                before.version,
            ), "a balance without entries keeps its quantities and version"
    # The derived figures (section 14), counted here from the reservations and transfers as
    # they are after the changes: committed = what CONFIRMED ones hold, incoming = what open
    # transfers to it still carry.
    reservations = {**stock.reservations, **{r.id: r for r in changes.reservations}}
    transfers = {**stock.transfers, **{t.id: t for t in changes.transfers}}
    for b in changes.balances:
        held = sum(
            ln.quantity - ln.deducted - ln.released
            for r in reservations.values()
            if r.status == "CONFIRMED"
            for ln in r.lines or ()
            if (ln.location, ln.sku) == b.key
        )
        on_the_way = sum(
            ln.quantity - ln.received - ln.returned
            for t in transfers.values()
            if t.status in ("IN_TRANSIT", "PARTIALLY_RECEIVED") and t.to_location == b.location
            for ln in t.lines
            if ln.sku == b.sku
        )
        assert (b.committed, b.incoming) == (held, on_the_way), b
    per_reservation = [(e.key, e.reservation_id) for e in changes.entries]
    assert len(per_reservation) == len(set(per_reservation)), "one entry per balance touched"
    after = {b.key: b for b in changes.balances}
    for key in set(keys):
        before = stock.balance(key) or zero(key, now)
        on_hand, reserved = before.on_hand, before.reserved
        for e in (e for e in changes.entries if e.key == key):
            on_hand += e.on_hand_delta
            reserved += e.reserved_delta
            assert (e.on_hand_after, e.reserved_after) == (on_hand, reserved), e
            assert 0 <= reserved <= on_hand, e
            assert e.created_at == now
            assert e.id is None
        b = after[key]
        assert (b.on_hand, b.reserved) == (on_hand, reserved)
        assert b.version == before.version + Counter(keys)[key], "version +1 per entry"
        assert b.updated_at == now


def changes_of(stock: Stock, command: Any, now: datetime = NOW, rid: int | None = None) -> Changes:
    """Decide ``command``; it must succeed. The stock itself is left as it was."""
    before = snapshot(stock)
    decision = rules.decide(stock, command, now, new_reservation_id=rid)
    assert snapshot(stock) == before, "decide changed the stock"
    assert isinstance(decision, Changes), decision
    check_entries(stock, decision, now)
    return decision


def refusal_of(stock: Stock, command: Any, now: datetime = NOW, rid: int | None = None) -> Refusal:
    """Decide ``command``; it must be refused. The stock itself is left as it was."""
    before = snapshot(stock)
    decision = rules.decide(stock, command, now, new_reservation_id=rid)
    assert snapshot(stock) == before, "decide changed the stock"
    assert isinstance(decision, Refusal), decision
    assert isinstance(decision.error, StockError)
    if decision.committed is not None:
        check_entries(stock, decision.committed, now)
        assert decision.committed.key_row is None, "a refused command consumes no key"
    return decision


def apply(stock: Stock, command: Any, now: datetime = NOW, rid: int | None = None) -> Changes:
    changes = changes_of(stock, command, now, rid)
    stock.apply(changes)
    return changes


def entry(e: LedgerEntry) -> tuple[Any, ...]:
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


def entries(changes: Changes) -> list[tuple[Any, ...]]:
    return [entry(e) for e in changes.entries]


def figures(changes: Changes) -> dict[BalanceKey, tuple[int, int, int]]:
    """(on_hand, reserved, version) of every balance the changes leave."""
    return {b.key: (b.on_hand, b.reserved, b.version) for b in changes.balances}


def held(stock: Stock, key: BalanceKey) -> tuple[int, int, int]:
    b = stock.balance(key)
    assert b is not None, key
    return (b.on_hand, b.reserved, b.version)


def reservation_after(changes: Changes, rid: int) -> Reservation:
    (found,) = [r for r in changes.reservations if r.id == rid]
    return found


def lines_of(r: Reservation) -> dict[str, tuple[int, int, int]]:
    """sku -> (quantity, deducted, released)."""
    return {ln.sku: (ln.quantity, ln.deducted, ln.released) for ln in r.lines or ()}


def assert_consistent(stock: Stock) -> None:
    """Invariants 1 and 3 of section 2 on the in-memory state."""
    held_by: Counter[BalanceKey] = Counter()
    for r in stock.reservations.values():
        if r.status in (ACTIVE, "CONFIRMED"):
            for ln in r.lines or ():
                assert ln.remaining >= 0
                held_by[ln.key] += ln.remaining
    for b in stock.balances.values():
        assert 0 <= b.reserved <= b.on_hand, b
        assert b.reserved == held_by[b.key], b


def error_of(refusal: Refusal, kind: type[StockError]) -> Any:
    assert isinstance(refusal.error, kind), refusal.error
    return refusal.error


# ============================================================================ RESTOCK


def test_restock_creates_missing_balances_at_version_one():
    changes = changes_of(Stock(), restock(Line("A", 5), Line("B", 3, "wh-2"), Line("C", 10**9)))

    assert figures(changes) == {
        (LOC, "A"): (5, 0, 1),
        (LOC, "C"): (10**9, 0, 1),
        ("wh-2", "B"): (3, 0, 1),
    }
    assert entries(changes) == [
        ("RESTOCK", LOC, "A", 5, 0, 5, 0),
        ("RESTOCK", LOC, "C", 10**9, 0, 10**9, 0),
        ("RESTOCK", "wh-2", "B", 3, 0, 3, 0),
    ]
    assert {e.idempotency_key for e in changes.entries} == {"rs-1"}
    assert all(e.reservation_id is None for e in changes.entries)
    assert changes.reservations == ()


def test_restock_adds_to_an_existing_balance():
    changes = changes_of(stock_with(bal("A", 5, 2, version=2)), restock(Line("A", 7)))

    assert figures(changes) == {(LOC, "A"): (12, 2, 3)}
    assert changes.balances[0].available == 10
    assert entries(changes) == [("RESTOCK", LOC, "A", 7, 0, 12, 2)]


def test_restock_merges_duplicate_lines_into_one_entry_per_balance():
    command = restock(Line("A", 2), Line("B", 1), Line("A", 3), Line("A", 4, "wh-2"))
    changes = changes_of(Stock(), command)

    assert entries(changes) == [
        ("RESTOCK", LOC, "A", 5, 0, 5, 0),
        ("RESTOCK", LOC, "B", 1, 0, 1, 0),
        ("RESTOCK", "wh-2", "A", 4, 0, 4, 0),
    ]


def test_restock_entries_carry_reference_and_reason():
    ref = Reference("PO", "PO-77")
    changes = changes_of(
        Stock(), restock(Line("A", 1), Line("B", 2), reference=ref, reason="supplier delivery")
    )
    assert {(e.reference, e.reason) for e in changes.entries} == {(ref, "supplier delivery")}


def test_restock_writes_its_key_row():
    command = restock(Line("A", 1))
    changes = changes_of(Stock(), command)
    assert changes.key_row == KeyRow("rs-1", "restock", command.request_hash)
    assert changes.answer == ()


def test_restock_compares_strings_exactly():
    stock = stock_with(bal("a", 1), bal("A", 2))
    changes = changes_of(stock, restock(Line("a", 10), Line("a ", 3), Line("a", 5, "WH")))
    assert figures(changes) == {
        (LOC, "a"): (11, 0, 2),
        (LOC, "a "): (3, 0, 1),
        ("WH", "a"): (5, 0, 1),
    }


def test_restock_up_to_the_32_bit_bound_is_accepted():
    changes = changes_of(stock_with(bal("A", MAX_BALANCE - 5)), restock(Line("A", 5)))
    assert figures(changes) == {(LOC, "A"): (MAX_BALANCE, 0, 2)}


def test_restock_past_the_32_bit_bound_is_refused_naming_the_line():
    stock = stock_with(bal("A", MAX_BALANCE - 9))
    refusal = refusal_of(stock, restock(Line("B", 1), Line("A", 10)))

    assert error_of(refusal, ValidationError).field == "lines.1.quantity"
    assert refusal.committed is None


def test_restock_past_the_bound_by_merged_lines_names_the_first_line():
    stock = stock_with(bal("A", MAX_BALANCE - 9))
    refusal = refusal_of(stock, restock(Line("A", 5), Line("B", 1), Line("A", 5)))
    assert error_of(refusal, ValidationError).field == "lines.0.quantity"


def test_restock_of_a_billion_on_a_new_balance_twice_passes_the_bound_on_the_third():
    stock = Stock()
    apply(stock, restock(Line("A", 10**9), key="rs-1"))
    apply(stock, restock(Line("A", 10**9), key="rs-2"))
    refusal = refusal_of(stock, restock(Line("A", 10**9), key="rs-3"))
    assert error_of(refusal, ValidationError).field == "lines.0.quantity"
    assert held(stock, (LOC, "A")) == (2 * 10**9, 0, 2)


# ============================================================================ ADJUST


def test_adjust_positive_delta():
    changes = changes_of(stock_with(bal("A", 10)), adjust(delta=5, reason="found a box"))
    assert figures(changes) == {(LOC, "A"): (15, 0, 2)}
    assert entries(changes) == [("ADJUST", LOC, "A", 5, 0, 15, 0)]
    assert changes.entries[0].reason == "found a box"


def test_adjust_negative_delta():
    changes = changes_of(stock_with(bal("A", 10, 3, version=4)), adjust(delta=-4))
    assert figures(changes) == {(LOC, "A"): (6, 3, 5)}
    assert entries(changes) == [("ADJUST", LOC, "A", -4, 0, 6, 3)]


def test_adjust_entry_carries_reason_and_reference_but_no_reservation():
    ref = Reference("RMA", "r-9")
    changes = changes_of(
        stock_with(bal("A", 10)), adjust(delta=-2, reason="damaged", reference=ref)
    )
    (e,) = changes.entries
    assert (e.reference, e.reason, e.reservation_id, e.idempotency_key) == (
        ref,
        "damaged",
        None,
        "adj-1",
    )


@pytest.mark.parametrize(("target", "delta"), [(3, -7), (20, 10), (0, -10)])
def test_adjust_set_on_hand_records_the_difference(target, delta):
    changes = changes_of(stock_with(bal("A", 10)), adjust(set_on_hand=target))
    assert entries(changes) == [("ADJUST", LOC, "A", delta, 0, target, 0)]
    assert figures(changes) == {(LOC, "A"): (target, 0, 2)}


@pytest.mark.parametrize("how", [{"delta": 0}, {"set_on_hand": 10}], ids=["delta", "set"])
def test_adjust_zero_change_is_recorded_with_version_plus_one(how):
    changes = changes_of(stock_with(bal("A", 10, 2, version=3)), adjust(**how))
    assert entries(changes) == [("ADJUST", LOC, "A", 0, 0, 10, 2)]
    assert figures(changes) == {(LOC, "A"): (10, 2, 4)}


def test_adjust_with_the_expected_version_applies():
    changes = changes_of(stock_with(bal("A", 11, version=2)), adjust(delta=-1, expected_version=2))
    assert figures(changes) == {(LOC, "A"): (10, 0, 3)}


@pytest.mark.parametrize("expected", [0, 1, 3, 99])
def test_adjust_with_another_version_is_a_conflict(expected):
    refusal = refusal_of(
        stock_with(bal("A", 11, version=2)), adjust(delta=-1, expected_version=expected)
    )
    err = error_of(refusal, VersionConflictError)
    assert (err.expected_version, err.actual_version) == (expected, 2)
    assert refusal.committed is None


def test_adjust_expected_version_of_a_never_stocked_balance_is_zero():
    err = error_of(
        refusal_of(Stock(), adjust("NEW", delta=1, expected_version=3)), VersionConflictError
    )
    assert (err.expected_version, err.actual_version) == (3, 0)
    changes = changes_of(Stock(), adjust("NEW", delta=1, expected_version=0))
    assert figures(changes) == {(LOC, "NEW"): (1, 0, 1)}


def test_adjust_version_conflict_is_checked_before_stock():
    refusal = refusal_of(
        stock_with(bal("A", 10, 4, version=2)), adjust(delta=-9, expected_version=1)
    )
    error_of(refusal, VersionConflictError)


@pytest.mark.parametrize("how", [{"delta": -7}, {"set_on_hand": 3}], ids=["delta", "set"])
def test_adjust_below_reserved_is_insufficient_stock_with_one_shortage(how):
    refusal = refusal_of(stock_with(bal("A", 10, 4, version=2)), adjust(**how))
    err = error_of(refusal, InsufficientStockError)
    # requested: the units removed (7); available: the current available (10 - 4).
    assert err.shortages == [Shortage("A", LOC, requested=7, available=6)]
    assert err.code == "INSUFFICIENT_STOCK"
    assert refusal.committed is None


@pytest.mark.parametrize("how", [{"delta": -6}, {"set_on_hand": 4}], ids=["delta", "set"])
def test_adjust_down_to_exactly_the_reserved_units_is_allowed(how):
    changes = changes_of(stock_with(bal("A", 10, 4, version=2)), adjust(**how))
    assert figures(changes) == {(LOC, "A"): (4, 4, 3)}
    assert changes.balances[0].available == 0


@pytest.mark.parametrize("how", [{"delta": 4}, {"set_on_hand": 4}], ids=["delta", "set"])
def test_adjust_of_a_never_stocked_balance_creates_it(how):
    changes = changes_of(Stock(), adjust("NEW", "wh-9", reason="first count", **how))
    assert figures(changes) == {("wh-9", "NEW"): (4, 0, 1)}
    assert entries(changes) == [("ADJUST", "wh-9", "NEW", 4, 0, 4, 0)]
    assert (changes.balances[0].sku, changes.balances[0].location) == ("NEW", "wh-9")


@pytest.mark.parametrize("how", [{"delta": 0}, {"set_on_hand": 0}], ids=["delta", "set"])
def test_adjust_to_zero_of_a_never_stocked_balance_creates_it_at_zero(how):
    changes = changes_of(Stock(), adjust("NEW", **how))
    assert figures(changes) == {(LOC, "NEW"): (0, 0, 1)}
    assert entries(changes) == [("ADJUST", LOC, "NEW", 0, 0, 0, 0)]


def test_adjust_negative_result_on_a_new_balance_is_refused():
    refusal = refusal_of(Stock(), adjust("NEW", delta=-1, reason="shrinkage"))
    err = error_of(refusal, InsufficientStockError)
    assert err.shortages == [Shortage("NEW", LOC, requested=1, available=0)]
    assert refusal.committed is None


def test_adjust_past_the_32_bit_bound_is_refused():
    refusal = refusal_of(stock_with(bal("A", MAX_BALANCE)), adjust(delta=1))
    assert error_of(refusal, ValidationError).field == "delta"
    changes = changes_of(stock_with(bal("A", MAX_BALANCE - 1)), adjust(delta=1))
    assert figures(changes) == {(LOC, "A"): (MAX_BALANCE, 0, 2)}


def test_adjust_writes_its_key_row():
    command = adjust(delta=1)
    assert changes_of(stock_with(bal("A", 1)), command).key_row == KeyRow(
        "adj-1", "adjust", command.request_hash
    )


# ============================================================================ RESERVE


def test_reserve_a_cart():
    stock = stock_with(bal("A", 10), bal("B", 5, location="wh-2"))
    ref = Reference("CHECKOUT", "c-1")
    command = reserve(Line("A", 3), Line("B", 5, "wh-2"), reference=ref)

    changes = changes_of(stock, command, rid=NEW_ID)

    r = reservation_after(changes, NEW_ID)
    assert (r.status, r.reference, r.created_at, r.updated_at) == (ACTIVE, ref, NOW, NOW)
    assert [(ln.location, ln.sku, ln.quantity, ln.remaining) for ln in r.lines or ()] == [
        (LOC, "A", 3, 3),
        ("wh-2", "B", 5, 5),
    ]
    assert figures(changes) == {(LOC, "A"): (10, 3, 2), ("wh-2", "B"): (5, 5, 2)}
    assert entries(changes) == [
        ("RESERVE", LOC, "A", 0, 3, 10, 3),
        ("RESERVE", "wh-2", "B", 0, 5, 5, 5),
    ]
    assert {(e.reservation_id, e.reference, e.idempotency_key) for e in changes.entries} == {
        (NEW_ID, ref, "rv-1")
    }
    assert changes.answer == (NEW_ID,)
    assert changes.key_row == KeyRow("rv-1", "reserve", command.request_hash)


def test_reserve_needs_the_id_of_the_reservation_it_creates():
    with pytest.raises(ValueError):
        rules.decide(stock_with(bal("A", 1)), reserve(Line("A", 1)), NOW)


def test_reserve_is_all_or_nothing():
    stock = stock_with(bal("A", 10), bal("B", 5))
    refusal = refusal_of(stock, reserve(Line("A", 3), Line("B", 6)), rid=NEW_ID)

    err = error_of(refusal, InsufficientStockError)
    assert err.shortages == [Shortage("B", LOC, requested=6, available=5)]
    assert refusal.committed is None


def test_reserve_sums_lines_of_one_balance_before_checking():
    stock = stock_with(bal("A", 5))
    refusal = refusal_of(stock, reserve(Line("A", 3), Line("A", 3)), rid=NEW_ID)
    assert error_of(refusal, InsufficientStockError).shortages == [Shortage("A", LOC, 6, 5)]

    changes = changes_of(stock, reserve(Line("A", 2), Line("A", 3)), rid=NEW_ID)
    assert lines_of(reservation_after(changes, NEW_ID)) == {"A": (5, 0, 0)}
    assert entries(changes) == [("RESERVE", LOC, "A", 0, 5, 5, 5)]


def test_reserve_counts_earlier_holds_against_available():
    stock = stock_with(bal("A", 10, 6, version=2), reservations=(resv(1, rline("A", 6)),))
    refusal = refusal_of(stock, reserve(Line("A", 5)), rid=NEW_ID)
    assert error_of(refusal, InsufficientStockError).shortages == [Shortage("A", LOC, 5, 4)]

    changes = changes_of(stock, reserve(Line("A", 4)), rid=NEW_ID)
    assert figures(changes) == {(LOC, "A"): (10, 10, 3)}
    assert changes.balances[0].available == 0


def test_reserve_of_a_never_stocked_sku_is_short_with_available_zero():
    refusal = refusal_of(
        stock_with(bal("A", 10)), reserve(Line("A", 1), Line("GHOST", 2, "wh-2")), rid=NEW_ID
    )
    err = error_of(refusal, InsufficientStockError)
    assert err.shortages == [Shortage("GHOST", "wh-2", requested=2, available=0)]


def test_reserve_lists_every_shortage_in_key_order():
    stock = stock_with(
        bal("A", 10), bal("B", 5, 2, version=2), bal("D", 1), reservations=(resv(1, rline("B", 2)),)
    )
    command = reserve(Line("D", 1), Line("A", 11), Line("C", 1, "wh-2"), Line("B", 4))
    err = error_of(refusal_of(stock, command, rid=NEW_ID), InsufficientStockError)
    assert err.shortages == [
        Shortage("A", LOC, requested=11, available=10),
        Shortage("B", LOC, requested=4, available=3),
        Shortage("C", "wh-2", requested=1, available=0),
    ]
    assert "A" in err.message and "C" in err.message


def test_reserve_ttl_defaults_to_1800_seconds():
    changes = changes_of(stock_with(bal("A", 10)), reserve(Line("A", 1)), rid=NEW_ID)
    r = reservation_after(changes, NEW_ID)
    assert r.expires_at == NOW + timedelta(seconds=1800)
    assert r.expires_at - r.created_at == timedelta(seconds=DEFAULT_TTL)


@pytest.mark.parametrize("ttl", [1, 60, MAX_TTL])
def test_reserve_expires_after_its_own_ttl(ttl):
    changes = changes_of(stock_with(bal("A", 10)), reserve(Line("A", 1), ttl=ttl), rid=NEW_ID)
    assert reservation_after(changes, NEW_ID).expires_at == NOW + timedelta(seconds=ttl)


def test_reserve_of_a_sku_at_another_location_is_another_balance():
    stock = stock_with(bal("A", 10, location="wh-1"))
    err = error_of(refusal_of(stock, reserve(Line("A", 1)), rid=NEW_ID), InsufficientStockError)
    assert err.shortages == [Shortage("A", LOC, 1, 0)]


# ============================================================================ RELEASE


def test_release_by_id_all_remaining():
    changes = changes_of(cart_stock(), release(1))

    r = reservation_after(changes, 1)
    assert (r.status, r.updated_at) == (RELEASED, NOW)
    assert lines_of(r) == {"A": (4, 0, 4), "B": (2, 0, 2)}
    assert figures(changes) == {(LOC, "A"): (10, 0, 3), (LOC, "B"): (5, 0, 3)}
    assert entries(changes) == [
        ("RELEASE", LOC, "A", 0, -4, 10, 0),
        ("RELEASE", LOC, "B", 0, -2, 5, 0),
    ]
    assert {(e.reservation_id, e.idempotency_key) for e in changes.entries} == {(1, "rl-1")}
    assert changes.answer == (1,)


def test_release_entries_carry_the_reservations_reference():
    changes = changes_of(cart_stock(reference=ORDER), release(1))
    assert {e.reference for e in changes.entries} == {ORDER}


def test_release_given_lines_keeps_the_reservation_active_then_the_rest_releases_it():
    stock = cart_stock()
    part = apply(stock, release(1, lines=[Line("A", 1), Line("A", 2)], key="rl-1"))

    assert reservation_after(part, 1).status == ACTIVE
    assert lines_of(reservation_after(part, 1)) == {"A": (4, 0, 3), "B": (2, 0, 0)}
    assert entries(part) == [("RELEASE", LOC, "A", 0, -3, 10, 1)]
    assert held(stock, (LOC, "B")) == (5, 2, 2)  # untouched: no entry, no version

    rest = apply(stock, release(1, key="rl-2"))
    assert reservation_after(rest, 1).status == RELEASED
    assert entries(rest) == [
        ("RELEASE", LOC, "A", 0, -1, 10, 0),
        ("RELEASE", LOC, "B", 0, -2, 5, 0),
    ]
    assert_consistent(stock)


def test_release_writes_its_key_row():
    command = release(1)
    assert changes_of(cart_stock(), command).key_row == KeyRow(
        "rl-1", "release", command.request_hash
    )


# ============================================================================ DEDUCT, reserved


def test_deduct_by_id_all_remaining_commits():
    changes = changes_of(cart_stock(), deduct(1))

    r = reservation_after(changes, 1)
    assert r.status == COMMITTED
    assert lines_of(r) == {"A": (4, 4, 0), "B": (2, 2, 0)}
    assert figures(changes) == {(LOC, "A"): (6, 0, 3), (LOC, "B"): (3, 0, 3)}
    assert entries(changes) == [
        ("DEDUCT", LOC, "A", -4, -4, 6, 0),
        ("DEDUCT", LOC, "B", -2, -2, 3, 0),
    ]
    assert {e.reservation_id for e in changes.entries} == {1}
    assert changes.answer == (1,)


def test_deduct_given_lines_keeps_the_reservation_active_then_the_rest_commits_it():
    stock = cart_stock()
    part = apply(stock, deduct(1, lines=[Line("B", 2)], key="dd-1"))
    assert reservation_after(part, 1).status == ACTIVE
    assert entries(part) == [("DEDUCT", LOC, "B", -2, -2, 3, 0)]
    assert held(stock, (LOC, "A")) == (10, 4, 2)

    done = apply(stock, deduct(1, lines=[Line("A", 4)], key="dd-2"))
    assert reservation_after(done, 1).status == COMMITTED
    assert held(stock, (LOC, "A")) == (6, 0, 3)
    assert_consistent(stock)


def test_a_reservation_partly_deducted_then_released_ends_committed():
    stock = cart_stock()
    apply(stock, deduct(1, lines=[Line("A", 1)], key="dd-1"))
    rest = apply(stock, release(1, key="rl-1"))
    r = reservation_after(rest, 1)
    assert r.status == COMMITTED
    assert lines_of(r) == {"A": (4, 1, 3), "B": (2, 0, 2)}


def test_a_reservation_partly_released_then_deducted_ends_committed():
    stock = cart_stock()
    apply(stock, release(1, lines=[Line("A", 4)], key="rl-1"))
    rest = apply(stock, deduct(1, key="dd-1"))
    assert reservation_after(rest, 1).status == COMMITTED
    assert entries(rest) == [("DEDUCT", LOC, "B", -2, -2, 3, 0)]


def test_deduct_writes_its_key_row():
    command = deduct(1)
    assert changes_of(cart_stock(), command).key_row == KeyRow(
        "dd-1", "deduct", command.request_hash
    )


# ============================================================================ release / deduct


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_over_asking_a_reservation_line_names_its_quantity(operation):
    refusal = refusal_of(
        cart_stock(), consume(operation, rid=1, lines=[Line("B", 1), Line("A", 5)])
    )
    assert error_of(refusal, ValidationError).field == "lines.1.quantity"
    assert refusal.committed is None


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_over_asking_by_merged_lines_names_the_first_line(operation):
    command = consume(operation, rid=1, lines=[Line("A", 3), Line("B", 1), Line("A", 2)])
    assert error_of(refusal_of(cart_stock(), command), ValidationError).field == "lines.0.quantity"


@pytest.mark.parametrize("operation", ["release", "deduct"])
@pytest.mark.parametrize(
    "bad",
    [Line("C", 1), Line("A", 1, "wh-2"), Line("a", 1)],
    ids=["other-sku", "other-loc", "case"],
)
def test_a_balance_the_reservation_does_not_hold_names_the_lines_sku(operation, bad):
    stock = cart_stock()
    stock.add(balances=[bal("C", 3)])
    refusal = refusal_of(stock, consume(operation, rid=1, lines=[Line("A", 1), bad]))
    assert error_of(refusal, ValidationError).field == "lines.1.sku"
    assert refusal.committed is None


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_asking_a_line_already_used_up_is_a_validation_error_on_that_line(operation):
    stock = cart_stock()
    apply(stock, release(1, lines=[Line("A", 4)], key="rl-0"))
    refusal = refusal_of(stock, consume(operation, rid=1, lines=[Line("B", 1), Line("A", 1)]))
    field = error_of(refusal, ValidationError).field
    assert field in ("lines.1.quantity", "lines.1.sku")


@pytest.mark.parametrize("operation", ["release", "deduct", "extend"])
def test_an_unknown_reservation_id_is_not_found(operation):
    command = extend(987654321, 60) if operation == "extend" else consume(operation, rid=987654321)
    refusal = refusal_of(cart_stock(), command)
    err = error_of(refusal, NotFoundError)
    assert (err.entity, err.key, err.code) == ("Reservation", "987654321", "NOT_FOUND")
    assert refusal.committed is None


@pytest.mark.parametrize("operation", ["release", "deduct", "extend"])
@pytest.mark.parametrize("status", [COMMITTED, RELEASED, EXPIRED])
@pytest.mark.parametrize("expires_at", [LATER, EARLIER], ids=["not-due", "past-due"])
def test_a_reservation_that_is_not_active_is_refused_with_its_status(operation, status, expires_at):
    done = resv(1, rline("A", 4, released=4), status=status, expires_at=expires_at)
    stock = stock_with(bal("A", 10), reservations=(done,))
    for command in (
        [extend(1, 60)]
        if operation == "extend"
        else [consume(operation, rid=1), consume(operation, rid=1, lines=[Line("A", 1)])]
    ):
        refusal = refusal_of(stock, command)
        err = error_of(refusal, ReservationNotActiveError)
        assert (err.reservation_id, err.status, err.code) == (1, status, "RESERVATION_NOT_ACTIVE")
        assert refusal.committed is None


@pytest.mark.parametrize(("first", "status"), [("release", RELEASED), ("deduct", COMMITTED)])
@pytest.mark.parametrize("then", ["release", "deduct", "extend"])
def test_a_finished_reservation_refuses_further_release_deduct_and_extend(first, status, then):
    stock = cart_stock()
    apply(stock, consume(first, rid=1, key="k-1"))
    command = extend(1, 60) if then == "extend" else consume(then, rid=1, key="k-2")
    assert error_of(refusal_of(stock, command), ReservationNotActiveError).status == status


# ============================================================================ by reference


@pytest.mark.parametrize("operation", ["release", "deduct"])
@pytest.mark.parametrize(
    "ref",
    [Reference("ORDER", "o-9"), Reference("order", "o-1"), Reference("ORDER", "O-1")],
    ids=["other-id", "type-case", "id-case"],
)
def test_a_reference_with_no_reservation_is_not_found(operation, ref):
    refusal = refusal_of(cart_stock(reference=ORDER), consume(operation, ref=ref))
    err = error_of(refusal, NotFoundError)
    assert (err.entity, err.key) == ("Reservation", f"{ref.type}:{ref.id}")
    assert refusal.committed is None


@pytest.mark.parametrize("operation", ["release", "deduct"])
@pytest.mark.parametrize("status", [COMMITTED, RELEASED, EXPIRED])
def test_a_reference_with_no_active_reservation_is_not_found(operation, status):
    done = resv(1, rline("A", 4, released=4), status=status, reference=ORDER)
    refusal = refusal_of(
        stock_with(bal("A", 10), reservations=(done,)), consume(operation, ref=ORDER)
    )
    assert error_of(refusal, NotFoundError).key == "ORDER:o-1"
    assert refusal.committed is None


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_by_reference_all_remaining_across_reservations_oldest_first(operation):
    stock = two_for_order()
    changes = changes_of(stock, consume(operation, ref=ORDER, key="k-1"))

    status = COMMITTED if operation == "deduct" else RELEASED
    assert changes.answer == (1, 2)
    assert {r.id: r.status for r in changes.reservations} == {1: status, 2: status}
    sign = -1 if operation == "deduct" else 0
    assert [
        (e.reservation_id, e.sku, e.on_hand_delta, e.reserved_delta) for e in changes.entries
    ] == [
        (1, "A", 3 * sign, -3),
        (1, "B", 1 * sign, -1),
        (2, "A", 4 * sign, -4),
    ]
    assert {e.event_type for e in changes.entries} == {operation.upper()}
    assert {e.reference for e in changes.entries} == {ORDER}
    # Each entry of A starts where the previous one ended.
    assert [(e.on_hand_after, e.reserved_after) for e in changes.entries if e.sku == "A"] == [
        (10 + 3 * sign, 5),
        (10 + 7 * sign, 1),
    ]
    # Two entries for A: its version goes up by two.
    assert figures(changes)[(LOC, "A")] == (10 + 7 * sign, 1, 6)
    # The other order's reservation is left alone.
    assert 3 not in {r.id for r in changes.reservations}


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_by_reference_given_lines_are_taken_oldest_first(operation):
    changes = changes_of(two_for_order(), consume(operation, ref=ORDER, lines=[Line("A", 5)]))

    assert [(e.reservation_id, e.sku, e.reserved_delta) for e in changes.entries] == [
        (1, "A", -3),
        (2, "A", -2),
    ]
    column = 1 if operation == "deduct" else 2  # (quantity, deducted, released)
    assert lines_of(reservation_after(changes, 1))["A"][column] == 3
    assert lines_of(reservation_after(changes, 1))["B"] == (1, 0, 0)
    assert lines_of(reservation_after(changes, 2))["A"][column] == 2
    # The first still holds B, the second 2 of A: both stay ACTIVE.
    assert {r.id: r.status for r in changes.reservations} == {1: ACTIVE, 2: ACTIVE}
    assert changes.answer == (1, 2)


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_by_reference_lines_skip_reservations_that_do_not_hold_the_balance(operation):
    changes = changes_of(two_for_order(), consume(operation, ref=ORDER, lines=[Line("A", 4)]))
    assert [(e.reservation_id, e.reserved_delta) for e in changes.entries] == [(1, -3), (2, -1)]
    only_b = changes_of(two_for_order(), consume(operation, ref=ORDER, lines=[Line("B", 1)]))
    assert [(e.reservation_id, e.sku) for e in only_b.entries] == [(1, "B")]
    assert only_b.answer == (1,)  # the second reservation was not touched
    assert [r.id for r in only_b.reservations] == [1]


def test_by_reference_order_is_created_at_then_id():
    t0 = EARLIER
    stock = stock_with(
        bal("A", 10, 8, version=5),
        reservations=(
            resv(1, rline("A", 2), reference=ORDER, created_at=t0 + timedelta(seconds=5)),
            resv(2, rline("A", 2), reference=ORDER, created_at=t0),
            resv(4, rline("A", 2), reference=ORDER, created_at=t0),
            resv(3, rline("A", 2), reference=ORDER, created_at=t0),
        ),
    )
    changes = changes_of(stock, release(ref=ORDER, lines=[Line("A", 5)]))

    assert [(e.reservation_id, e.reserved_delta) for e in changes.entries] == [
        (2, -2),
        (3, -2),
        (4, -1),
    ]
    assert changes.answer == (2, 3, 4)
    assert {r.id: r.status for r in changes.reservations} == {2: RELEASED, 3: RELEASED, 4: ACTIVE}


def test_by_reference_order_is_by_microsecond():
    stock = stock_with(
        bal("A", 4, 4, version=3),
        reservations=(
            resv(1, rline("A", 2), reference=ORDER, created_at=EARLIER + timedelta(microseconds=1)),
            resv(2, rline("A", 2), reference=ORDER, created_at=EARLIER),
        ),
    )
    changes = changes_of(stock, deduct(ref=ORDER, lines=[Line("A", 1)]))
    assert [e.reservation_id for e in changes.entries] == [2]


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_by_reference_over_asking_the_sum_of_reservations_names_the_line(operation):
    command = consume(operation, ref=ORDER, lines=[Line("B", 1), Line("A", 8)])
    refusal = refusal_of(two_for_order(), command)
    assert error_of(refusal, ValidationError).field == "lines.1.quantity"
    assert refusal.committed is None


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_by_reference_a_balance_none_of_them_holds_names_the_lines_sku(operation):
    stock = two_for_order()
    stock.add(balances=[bal("C", 1)])
    refusal = refusal_of(stock, consume(operation, ref=ORDER, lines=[Line("A", 1), Line("C", 1)]))
    assert error_of(refusal, ValidationError).field == "lines.1.sku"


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_by_reference_exactly_the_sum_ends_both_reservations(operation):
    changes = changes_of(
        two_for_order(), consume(operation, ref=ORDER, lines=[Line("A", 7), Line("B", 1)])
    )
    status = COMMITTED if operation == "deduct" else RELEASED
    assert {r.id: r.status for r in changes.reservations} == {1: status, 2: status}


# ============================================================================ DEDUCT, direct


def test_direct_deduct_takes_from_available():
    stock = stock_with(
        bal("A", 10, 3, version=2), bal("B", 2), reservations=(resv(1, rline("A", 3)),)
    )
    command = deduct_direct(Line("A", 7), Line("B", 1))
    changes = changes_of(stock, command)

    assert figures(changes) == {(LOC, "A"): (3, 3, 3), (LOC, "B"): (1, 0, 2)}
    assert entries(changes) == [
        ("DEDUCT", LOC, "A", -7, 0, 3, 3),
        ("DEDUCT", LOC, "B", -1, 0, 1, 0),
    ]
    assert all(e.reservation_id is None and e.reference is None for e in changes.entries)
    assert (changes.reservations, changes.answer) == ((), ())
    assert changes.key_row == KeyRow("dd-1", "deduct", command.request_hash)


def test_direct_deduct_cannot_take_reserved_units():
    stock = stock_with(bal("A", 3, 3, version=2), reservations=(resv(1, rline("A", 3)),))
    refusal = refusal_of(stock, deduct_direct(Line("A", 1)))
    assert error_of(refusal, InsufficientStockError).shortages == [Shortage("A", LOC, 1, 0)]
    assert refusal.committed is None


def test_direct_deduct_is_all_or_nothing_and_lists_every_shortage():
    stock = stock_with(
        bal("A", 10, 4, version=2), bal("B", 2), reservations=(resv(1, rline("A", 4)),)
    )
    command = deduct_direct(Line("B", 1), Line("A", 7), Line("GHOST", 1), Line("B", 2))
    err = error_of(refusal_of(stock, command), InsufficientStockError)
    assert err.shortages == [
        Shortage("A", LOC, requested=7, available=6),
        Shortage("B", LOC, requested=3, available=2),
        Shortage("GHOST", LOC, requested=1, available=0),
    ]


def test_direct_deduct_of_a_never_stocked_sku_has_available_zero():
    refusal = refusal_of(Stock(), deduct_direct(Line("GHOST", 1, "wh-3")))
    err = error_of(refusal, InsufficientStockError)
    assert err.shortages == [Shortage("GHOST", "wh-3", requested=1, available=0)]
    assert refusal.committed is None


def test_direct_deduct_of_everything_available_leaves_zero_on_hand():
    changes = changes_of(stock_with(bal("A", 5)), deduct_direct(Line("A", 5)))
    assert figures(changes) == {(LOC, "A"): (0, 0, 2)}


# ============================================================================ EXTEND


def test_extend_sets_expiry_to_now_plus_ttl_and_writes_no_ledger_entry():
    stock = cart_stock(expires_at=NOW + timedelta(seconds=30))
    command = extend(1, 600)
    changes = changes_of(stock, command)

    r = reservation_after(changes, 1)
    assert (r.status, r.expires_at, r.updated_at) == (ACTIVE, NOW + timedelta(seconds=600), NOW)
    assert r.lines == stock.reservation(1).lines  # type: ignore[union-attr]
    assert (changes.entries, changes.balances) == ((), ())
    assert changes.answer == (1,)
    assert changes.key_row == KeyRow("ex-1", "extend", command.request_hash, "1")


def test_extend_key_row_remembers_the_reservation_id():
    stock = stock_with(bal("A", 1, 1, version=2), reservations=(resv(42, rline("A", 1)),))
    changes = changes_of(stock, extend(42, 60))
    assert changes.key_row is not None and changes.key_row.result_ref == "42"


def test_extend_can_shorten():
    stock = cart_stock(expires_at=NOW + timedelta(hours=1))
    apply(stock, extend(1, 5))
    assert stock.reservation(1).expires_at == NOW + timedelta(seconds=5)  # type: ignore[union-attr]
    expired = changes_of(stock, Expire(1), now=NOW + timedelta(seconds=5))
    assert expired.expired() == [1]


def test_an_extended_reservation_is_not_due_at_its_old_expiry():
    stock = cart_stock(expires_at=NOW + timedelta(seconds=30))
    apply(stock, extend(1, 600))
    assert changes_of(stock, Expire(1), now=NOW + timedelta(seconds=100)) == Changes()
    later = NOW + timedelta(seconds=100)
    assert reservation_after(changes_of(stock, deduct(1), now=later), 1).status == COMMITTED


def test_extend_of_a_past_due_reservation_expires_it_and_is_refused():
    stock = cart_stock(expires_at=NOW - timedelta(seconds=1))
    refusal = refusal_of(stock, extend(1, 600))

    err = error_of(refusal, ReservationNotActiveError)
    assert (err.reservation_id, err.status) == (1, EXPIRED)
    assert refusal.committed is not None
    assert refusal.committed.expired() == [1]
    assert reservation_after(refusal.committed, 1).status == EXPIRED
    assert entries(refusal.committed) == [
        ("EXPIRE", LOC, "A", 0, -4, 10, 0),
        ("EXPIRE", LOC, "B", 0, -2, 5, 0),
    ]


# ============================================================================ EXPIRE


def test_expire_gives_back_the_remaining_and_sets_expired():
    stock = stock_with(
        bal("A", 9, 5, version=4),
        bal("B", 5, 2, version=2),
        reservations=(
            resv(1, rline("A", 4, deducted=1), rline("B", 2), reference=ORDER, expires_at=NOW),
            resv(2, rline("A", 2)),
        ),
    )
    changes = changes_of(stock, Expire(1))

    r = reservation_after(changes, 1)
    assert (r.status, r.updated_at) == (EXPIRED, NOW)
    assert lines_of(r) == {"A": (4, 1, 3), "B": (2, 0, 2)}
    assert entries(changes) == [
        ("EXPIRE", LOC, "A", 0, -3, 9, 2),
        ("EXPIRE", LOC, "B", 0, -2, 5, 0),
    ]
    assert {(e.idempotency_key, e.reservation_id, e.reference) for e in changes.entries} == {
        ("expire:1", 1, ORDER)
    }
    assert figures(changes) == {(LOC, "A"): (9, 2, 5), (LOC, "B"): (5, 0, 3)}
    assert changes.key_row is None
    assert changes.answer == (1,)
    assert changes.expired() == [1]
    assert [r.id for r in changes.reservations] == [1]  # the other one is untouched


def test_expire_writes_no_entry_for_a_line_with_nothing_remaining():
    stock = stock_with(
        bal("A", 6, 0, version=3),
        bal("B", 5, 2, version=2),
        reservations=(resv(1, rline("A", 4, deducted=4), rline("B", 2), expires_at=NOW),),
    )
    changes = changes_of(stock, Expire(1))
    assert entries(changes) == [("EXPIRE", LOC, "B", 0, -2, 5, 0)]


def test_expire_is_idempotent():
    stock = cart_stock(expires_at=EARLIER)
    first = apply(stock, Expire(1))
    assert first.expired() == [1]
    after = snapshot(stock)

    assert changes_of(stock, Expire(1)) == Changes()
    assert changes_of(stock, Expire(1), now=NOW + timedelta(days=1)) == Changes()
    assert snapshot(stock) == after
    assert_consistent(stock)


@pytest.mark.parametrize("status", [COMMITTED, RELEASED, EXPIRED])
def test_expire_of_a_reservation_that_is_not_active_is_a_no_op(status):
    done = resv(1, rline("A", 4, released=4), status=status, expires_at=EARLIER)
    assert changes_of(stock_with(bal("A", 10), reservations=(done,)), Expire(1)) == Changes()


def test_expire_of_a_reservation_not_yet_due_is_a_no_op():
    stock = cart_stock(expires_at=NOW + timedelta(microseconds=1))
    assert changes_of(stock, Expire(1)) == Changes()


def test_expire_of_a_missing_reservation_is_a_no_op():
    assert changes_of(cart_stock(), Expire(999)) == Changes()


def test_expire_command_carries_the_expire_key():
    assert Expire(12).idempotency_key == "expire:12"


@pytest.mark.parametrize(
    ("offset", "due"),
    [(timedelta(microseconds=-1), False), (timedelta(0), True), (timedelta(microseconds=1), True)],
    ids=["one-microsecond-before", "exactly-at", "one-microsecond-after"],
)
def test_expiry_boundary_is_now_at_or_after_expires_at(offset, due):
    stock = cart_stock(expires_at=NOW)
    now = NOW + offset
    assert stock.reservation(1).is_due(now) is due  # type: ignore[union-attr]
    assert bool(changes_of(stock, Expire(1), now=now).entries) is due
    decision = rules.decide(stock, deduct(1), now)
    if due:
        assert isinstance(decision, Refusal)
        assert error_of(decision, ReservationNotActiveError).status == EXPIRED
    else:
        assert isinstance(decision, Changes)
        assert reservation_after(decision, 1).status == COMMITTED


def test_a_reservation_made_now_with_ttl_one_is_due_one_second_later():
    stock = stock_with(bal("A", 10))
    apply(stock, reserve(Line("A", 1), ttl=1), rid=NEW_ID)
    almost = NOW + timedelta(seconds=1) - timedelta(microseconds=1)
    assert changes_of(stock, Expire(NEW_ID), now=almost) == Changes()
    assert changes_of(stock, Expire(NEW_ID), now=NOW + timedelta(seconds=1)).expired() == [NEW_ID]


# ============================================================================ past due, unswept


@pytest.mark.parametrize("operation", ["release", "deduct"])
@pytest.mark.parametrize("lines", [None, [Line("A", 1)]], ids=["all", "some"])
def test_by_id_a_past_due_reservation_is_expired_and_the_call_refused(operation, lines):
    stock = cart_stock(expires_at=NOW - timedelta(milliseconds=500))
    refusal = refusal_of(stock, consume(operation, rid=1, lines=lines, key="k-1"))

    err = error_of(refusal, ReservationNotActiveError)
    assert (err.reservation_id, err.status) == (1, EXPIRED)
    committed = refusal.committed
    assert committed is not None
    assert committed.expired() == [1]
    assert {e.event_type for e in committed.entries} == {"EXPIRE"}
    assert {e.idempotency_key for e in committed.entries} == {"expire:1"}
    assert figures(committed) == {(LOC, "A"): (10, 0, 3), (LOC, "B"): (5, 0, 3)}
    assert reservation_after(committed, 1).status == EXPIRED


@pytest.mark.parametrize("operation", ["release", "deduct", "extend"])
def test_by_id_once_the_expiry_is_applied_a_retry_expires_nothing_twice(operation):
    stock = cart_stock(expires_at=EARLIER)
    command = extend(1, 60) if operation == "extend" else consume(operation, rid=1)
    first = refusal_of(stock, command)
    assert first.committed is not None
    stock.apply(first.committed)
    assert_consistent(stock)

    again = refusal_of(stock, command)
    assert error_of(again, ReservationNotActiveError).status == EXPIRED
    assert again.committed is None


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_by_reference_the_due_ones_are_expired_and_the_rest_acted_on(operation):
    ref = Reference("CART", "c-9")
    stock = stock_with(
        bal("A", 10, 5, version=3),
        reservations=(
            resv(1, rline("A", 3), reference=ref, expires_at=NOW - timedelta(seconds=1)),
            resv(2, rline("A", 2), reference=ref, created_at=EARLIER + timedelta(seconds=1)),
        ),
    )
    changes = changes_of(stock, consume(operation, ref=ref, key="k-1"))

    assert changes.answer == (2,)
    assert changes.expired() == [1]
    status = COMMITTED if operation == "deduct" else RELEASED
    assert {r.id: r.status for r in changes.reservations} == {1: EXPIRED, 2: status}
    sign = -1 if operation == "deduct" else 0
    assert [(entry(e), e.idempotency_key, e.reservation_id) for e in changes.entries] == [
        (("EXPIRE", LOC, "A", 0, -3, 10, 2), "expire:1", 1),
        ((operation.upper(), LOC, "A", 2 * sign, -2, 10 + 2 * sign, 0), "k-1", 2),
    ]
    assert changes.key_row is not None and changes.key_row.idempotency_key == "k-1"


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_by_reference_lines_are_taken_only_from_the_reservations_left(operation):
    ref = Reference("CART", "c-9")
    stock = stock_with(
        bal("A", 10, 5, version=3),
        reservations=(
            resv(1, rline("A", 3), reference=ref, expires_at=EARLIER),
            resv(2, rline("A", 2), reference=ref),
        ),
    )
    changes = changes_of(stock, consume(operation, ref=ref, lines=[Line("A", 2)]))
    assert [(e.event_type, e.reservation_id) for e in changes.entries] == [
        ("EXPIRE", 1),
        (operation.upper(), 2),
    ]


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_by_reference_all_past_due_is_not_found_with_the_expiry_committed(operation):
    ref = Reference("CART", "c-9")
    stock = stock_with(
        bal("A", 10, 3, version=2),
        reservations=(resv(1, rline("A", 3), reference=ref, expires_at=EARLIER),),
    )
    refusal = refusal_of(stock, consume(operation, ref=ref, key="k-1"))

    err = error_of(refusal, NotFoundError)
    assert (err.entity, err.key) == ("Reservation", "CART:c-9")
    assert refusal.committed is not None
    assert refusal.committed.expired() == [1]
    assert entries(refusal.committed) == [("EXPIRE", LOC, "A", 0, -3, 10, 0)]

    stock.apply(refusal.committed)
    again = refusal_of(stock, consume(operation, ref=ref, key="k-1"))
    assert error_of(again, NotFoundError).key == "CART:c-9"
    assert again.committed is None


@pytest.mark.parametrize("operation", ["release", "deduct"])
def test_a_validation_error_after_expiring_on_the_way_commits_nothing(operation):
    ref = Reference("CART", "c-9")
    stock = stock_with(
        bal("A", 10, 5, version=3),
        reservations=(
            resv(1, rline("A", 3), reference=ref, expires_at=EARLIER),
            resv(2, rline("A", 2), reference=ref),
        ),
    )
    refusal = refusal_of(stock, consume(operation, ref=ref, lines=[Line("A", 3)]))
    assert error_of(refusal, ValidationError).field == "lines.0.quantity"
    assert refusal.committed is None


# =================================================== NEW RULE: expire the due holds of a short line


def due_hold_stock(quantity: int = 4, *, expires_at: datetime = EARLIER) -> Stock:
    """A=10 with ``quantity`` held by reservation 1 (past due unless told), B=5 held 2 by it."""
    return stock_with(
        bal("A", 10, quantity, version=2),
        bal("B", 5, 2, version=2),
        reservations=(
            resv(1, rline("A", quantity), rline("B", 2), reference=ORDER, expires_at=expires_at),
        ),
    )


def test_reserve_short_of_stock_first_expires_due_holds_of_that_balance():
    stock = due_hold_stock(quantity=8)
    command = reserve(Line("A", 5))
    changes = changes_of(stock, command, rid=NEW_ID)

    assert changes.expired() == [1]
    assert [(entry(e), e.idempotency_key, e.reservation_id) for e in changes.entries] == [
        (("EXPIRE", LOC, "A", 0, -8, 10, 0), "expire:1", 1),
        (("EXPIRE", LOC, "B", 0, -2, 5, 0), "expire:1", 1),
        (("RESERVE", LOC, "A", 0, 5, 10, 5), "rv-1", NEW_ID),
    ]
    assert {r.id: r.status for r in changes.reservations} == {1: EXPIRED, NEW_ID: ACTIVE}
    assert figures(changes) == {(LOC, "A"): (10, 5, 4), (LOC, "B"): (5, 0, 3)}
    assert changes.answer == (NEW_ID,)
    assert changes.key_row == KeyRow("rv-1", "reserve", command.request_hash)


def test_reserve_still_short_after_expiring_is_refused_with_the_expiry_committed():
    stock = due_hold_stock(quantity=4)
    refusal = refusal_of(stock, reserve(Line("A", 11)), rid=NEW_ID)

    err = error_of(refusal, InsufficientStockError)
    assert err.shortages == [Shortage("A", LOC, requested=11, available=10)]
    assert refusal.committed is not None
    assert refusal.committed.expired() == [1]
    assert {e.event_type for e in refusal.committed.entries} == {"EXPIRE"}
    assert [r.id for r in refusal.committed.reservations] == [1]
    assert reservation_after(refusal.committed, 1).status == EXPIRED


def test_reserve_that_is_not_short_leaves_due_holds_alone():
    stock = due_hold_stock(quantity=4)
    changes = changes_of(stock, reserve(Line("A", 6)), rid=NEW_ID)
    assert changes.expired() == []
    assert [e.event_type for e in changes.entries] == ["RESERVE"]
    assert [r.id for r in changes.reservations] == [NEW_ID]


def test_reserve_short_does_not_expire_holds_that_are_not_due():
    stock = due_hold_stock(quantity=8, expires_at=NOW + timedelta(microseconds=1))
    refusal = refusal_of(stock, reserve(Line("A", 5)), rid=NEW_ID)
    assert error_of(refusal, InsufficientStockError).shortages == [Shortage("A", LOC, 5, 2)]
    assert refusal.committed is None


def test_reserve_short_expires_a_hold_that_is_due_exactly_now():
    stock = due_hold_stock(quantity=8, expires_at=NOW)
    assert changes_of(stock, reserve(Line("A", 5)), rid=NEW_ID).expired() == [1]


def test_reserve_short_does_not_expire_due_holds_of_other_balances():
    stock = stock_with(
        bal("A", 1),
        bal("B", 5, 2, version=2),
        reservations=(resv(1, rline("B", 2), expires_at=EARLIER),),
    )
    refusal = refusal_of(stock, reserve(Line("A", 2), Line("B", 1)), rid=NEW_ID)
    assert error_of(refusal, InsufficientStockError).shortages == [Shortage("A", LOC, 2, 1)]
    assert refusal.committed is None


def test_reserve_short_ignores_due_reservations_that_no_longer_hold_that_balance():
    stock = stock_with(
        bal("A", 6, 0, version=3),
        bal("B", 5, 2, version=2),
        reservations=(resv(1, rline("A", 4, deducted=4), rline("B", 2), expires_at=EARLIER),),
    )
    refusal = refusal_of(stock, reserve(Line("A", 7)), rid=NEW_ID)
    assert refusal.committed is None


def test_reserve_short_expires_every_due_hold_of_the_balance_soonest_first():
    stock = stock_with(
        bal("A", 10, 9, version=4),
        reservations=(
            resv(5, rline("A", 3), expires_at=EARLIER + timedelta(seconds=2)),
            resv(6, rline("A", 3), expires_at=EARLIER),
            resv(7, rline("A", 3)),  # not due: keeps its hold
        ),
    )
    changes = changes_of(stock, reserve(Line("A", 7)), rid=NEW_ID)
    assert changes.expired() == [6, 5]
    assert figures(changes) == {(LOC, "A"): (10, 10, 7)}


def test_expiring_a_hold_for_a_short_line_gives_back_its_other_balances_too():
    stock = due_hold_stock(quantity=8)  # B has 3 available: only A is short
    changes = changes_of(stock, reserve(Line("A", 9), Line("B", 1)), rid=NEW_ID)
    assert changes.expired() == [1]
    assert lines_of(reservation_after(changes, NEW_ID)) == {"A": (9, 0, 0), "B": (1, 0, 0)}
    assert figures(changes) == {(LOC, "A"): (10, 9, 4), (LOC, "B"): (5, 1, 4)}


def test_direct_deduct_short_of_stock_first_expires_due_holds_of_that_balance():
    stock = due_hold_stock(quantity=8)
    changes = changes_of(stock, deduct_direct(Line("A", 10)))

    assert changes.expired() == [1]
    assert entries(changes) == [
        ("EXPIRE", LOC, "A", 0, -8, 10, 0),
        ("EXPIRE", LOC, "B", 0, -2, 5, 0),
        ("DEDUCT", LOC, "A", -10, 0, 0, 0),
    ]
    assert changes.key_row is not None and changes.key_row.operation == "deduct"


def test_direct_deduct_still_short_after_expiring_is_refused_with_the_expiry_committed():
    stock = due_hold_stock(quantity=4)
    refusal = refusal_of(stock, deduct_direct(Line("A", 11), Line("B", 6)))

    err = error_of(refusal, InsufficientStockError)
    assert err.shortages == [Shortage("A", LOC, 11, 10), Shortage("B", LOC, 6, 5)]
    assert refusal.committed is not None and refusal.committed.expired() == [1]


def test_direct_deduct_that_is_not_short_leaves_due_holds_alone():
    changes = changes_of(due_hold_stock(quantity=4), deduct_direct(Line("A", 6)))
    assert changes.expired() == []


def test_after_a_refused_reserve_commits_its_expiry_a_smaller_reserve_fits():
    stock = due_hold_stock(quantity=4)
    refusal = refusal_of(stock, reserve(Line("A", 11), key="rv-1"), rid=NEW_ID)
    assert refusal.committed is not None
    stock.apply(refusal.committed)
    assert_consistent(stock)

    changes = apply(stock, reserve(Line("A", 10), key="rv-1"), rid=NEW_ID + 1)
    assert changes.expired() == []
    assert held(stock, (LOC, "A")) == (10, 10, 4)
    assert_consistent(stock)


# ============================================================================ sequences


def test_commands_applied_in_sequence_see_each_others_effects():
    """A scripted day on one Stock, checked after every command."""
    stock = Stock()
    apply(stock, restock(Line("A", 5), Line("B", 5), Line("A", 5), key="s1"))
    apply(stock, adjust("B", delta=-1, reason="damaged", key="s2"))
    apply(stock, reserve(Line("A", 2), Line("B", 2), reference=ORDER, key="s3"), rid=1)
    apply(
        stock,
        reserve(Line("A", 1), reference=ORDER, key="s4"),
        now=NOW + timedelta(seconds=1),
        rid=2,
    )
    assert held(stock, (LOC, "A")) == (10, 3, 3)

    later = NOW + timedelta(seconds=2)
    released = apply(stock, release(ref=ORDER, lines=[Line("A", 3)], key="s5"), now=later)
    assert [(e.reservation_id, e.reserved_delta) for e in released.entries] == [(1, -2), (2, -1)]
    assert stock.reservation(2).status == RELEASED  # type: ignore[union-attr]

    deducted = apply(stock, deduct(ref=ORDER, key="s6"), now=later)
    assert entries(deducted) == [("DEDUCT", LOC, "B", -2, -2, 2, 0)]
    assert stock.reservation(1).status == COMMITTED  # type: ignore[union-attr]
    assert stock.by_reference(ORDER) == []

    apply(stock, deduct_direct(Line("A", 1), Line("B", 1), key="s7"), now=later)
    assert held(stock, (LOC, "A")) == (9, 0, 6)
    assert held(stock, (LOC, "B")) == (1, 0, 5)
    assert_consistent(stock)


def test_a_reserve_sees_the_restock_before_it():
    stock = Stock()
    assert isinstance(
        rules.decide(stock, reserve(Line("A", 3)), NOW, new_reservation_id=1), Refusal
    )
    apply(stock, restock(Line("A", 3)))
    apply(stock, reserve(Line("A", 3)), rid=1)
    assert held(stock, (LOC, "A")) == (3, 3, 2)
    refusal = refusal_of(stock, reserve(Line("A", 1), key="rv-2"), rid=2)
    assert error_of(refusal, InsufficientStockError).shortages == [Shortage("A", LOC, 1, 0)]


def test_a_release_makes_stock_available_to_the_next_reserve():
    stock = cart_stock()
    apply(stock, reserve(Line("A", 6)), rid=2)
    assert isinstance(
        rules.decide(stock, reserve(Line("A", 1), key="rv-2"), NOW, new_reservation_id=3),
        Refusal,
    )
    apply(stock, release(1, lines=[Line("A", 1)]))
    apply(stock, reserve(Line("A", 1), key="rv-2"), rid=3)
    assert held(stock, (LOC, "A")) == (10, 10, 5)
    assert_consistent(stock)


def test_a_new_reservation_can_be_addressed_by_id_and_reference_after_apply():
    stock = stock_with(bal("A", 10))
    apply(stock, reserve(Line("A", 2), reference=ORDER), rid=NEW_ID)
    assert [r.id for r in stock.by_reference(ORDER)] == [NEW_ID]
    changes = apply(stock, deduct(NEW_ID, lines=[Line("A", 1)]))
    assert reservation_after(changes, NEW_ID).status == ACTIVE
    apply(stock, release(ref=ORDER))
    assert stock.reservation(NEW_ID).status == COMMITTED  # type: ignore[union-attr]
    assert held(stock, (LOC, "A")) == (9, 0, 4)
    assert_consistent(stock)


def test_an_adjust_sees_the_version_of_the_command_before_it():
    stock = stock_with(bal("A", 10))
    apply(stock, restock(Line("A", 1)))
    refusal = refusal_of(stock, adjust(delta=-1, expected_version=1))
    assert error_of(refusal, VersionConflictError).actual_version == 2
    apply(stock, adjust(delta=-1, expected_version=2))
    assert held(stock, (LOC, "A")) == (10, 0, 3)


REFUSED = {
    "adjust-below-reserved": lambda: adjust(delta=-7),
    "adjust-version": lambda: adjust(delta=1, expected_version=0),
    "reserve-short": lambda: reserve(Line("A", 7), Line("B", 1)),
    "reserve-never-stocked": lambda: reserve(Line("GHOST", 1)),
    "release-over-ask": lambda: release(1, lines=[Line("A", 5)]),
    "deduct-not-held": lambda: deduct(1, lines=[Line("C", 1)]),
    "release-not-found": lambda: release(2),
    "deduct-reference-not-found": lambda: deduct(ref=Reference("X", "y")),
    "direct-deduct-short": lambda: deduct_direct(Line("A", 1), Line("B", 4)),
    "extend-not-found": lambda: extend(2, 60),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_refusal_leaves_the_stock_untouched_and_commits_nothing(name):
    stock = cart_stock()
    before = snapshot(stock)
    refusal = refusal_of(stock, REFUSED[name](), rid=NEW_ID)
    assert refusal.committed is None
    assert snapshot(stock) == before
    # The same stock still takes a valid command afterwards.
    apply(stock, release(1, key="after"))
    assert_consistent(stock)


def test_decide_never_changes_the_stock_even_on_success():
    stock = cart_stock()
    before = snapshot(stock)
    for command, rid in (
        (restock(Line("A", 1)), None),
        (adjust(delta=1), None),
        (reserve(Line("A", 1)), NEW_ID),
        (release(1), None),
        (deduct(1), None),
        (deduct_direct(Line("A", 1)), None),
        (extend(1, 60), None),
        (Expire(1), None),
    ):
        rules.decide(stock, command, NOW + timedelta(hours=2), new_reservation_id=rid)
        assert snapshot(stock) == before, command


def test_changes_list_balances_in_key_order():
    command = restock(Line("B", 1, "wh-2"), Line("C", 1), Line("A", 1, "wh-2"), Line("A", 1))
    changes = changes_of(Stock(), command)
    assert [b.key for b in changes.balances] == [
        (LOC, "A"),
        (LOC, "C"),
        ("wh-2", "A"),
        ("wh-2", "B"),
    ]


def test_applying_changes_replaces_balances_and_reservations():
    stock = cart_stock(reference=ORDER)
    assert [r.id for r in stock.by_reference(ORDER)] == [1]
    changes = apply(stock, deduct(1))
    assert stock.balance((LOC, "A")) == dataclasses.replace(
        bal("A", 6, 0, version=3), updated_at=NOW
    )
    assert stock.reservation(1) == reservation_after(changes, 1)
    assert stock.by_reference(ORDER) == []


def test_a_used_key_replays_the_same_request_only():
    """Section 5: the same (operation, request hash) replays; anything else is refused."""
    from stockledger.domain.errors import IdempotencyKeyReusedError
    from stockledger.domain.state import key_reused

    assert key_reused("k", ("reserve", "h1"), ("reserve", "h1")) is None
    for asked in (("reserve", "h2"), ("restock", "h1"), ("createApiKey", "h1")):
        error = key_reused("k", ("reserve", "h1"), asked)
        assert isinstance(error, IdempotencyKeyReusedError)
        assert (error.idempotency_key, error.code) == ("k", "IDEMPOTENCY_KEY_REUSED")


# ============================================================================ confirm (section 14)


def test_confirm_by_id_drops_the_expiry_keeps_the_lines_and_writes_no_entry():
    stock = cart_stock()
    command = confirm(1)
    changes = changes_of(stock, command)

    r = reservation_after(changes, 1)
    assert (r.status, r.expires_at, r.updated_at) == (CONFIRMED, None, NOW)
    assert r.lines == stock.reservation(1).lines  # type: ignore[union-attr]
    assert changes.entries == ()
    # The balances it holds, listed unchanged (same version: a derived figure changes).
    assert figures(changes) == {(LOC, "A"): (10, 4, 2), (LOC, "B"): (5, 2, 2)}
    assert changes.answer == (1,)
    assert changes.key_row == KeyRow("cf-1", "confirm", command.request_hash, "1")


def test_a_confirmed_reservation_is_never_due():
    stock = cart_stock(expires_at=NOW + timedelta(seconds=30))
    apply(stock, confirm(1))
    much_later = NOW + timedelta(days=365)
    assert changes_of(stock, Expire(1), now=much_later) == Changes()
    assert stock.due_holding([(LOC, "A")], much_later) == []
    assert_consistent(stock)


def test_a_confirmed_reservation_deducts_in_parts_then_commits():
    stock = cart_stock()
    apply(stock, confirm(1))
    later = NOW + timedelta(hours=2)  # past its old expiry
    first = apply(stock, deduct(1, lines=[Line("A", 3)], key="d-1"), now=later)
    assert reservation_after(first, 1).status == CONFIRMED
    assert reservation_after(first, 1).expires_at is None
    assert figures(first) == {(LOC, "A"): (7, 1, 3)}
    rest = apply(stock, deduct(1, key="d-2"), now=later)
    assert reservation_after(rest, 1).status == COMMITTED
    assert figures(rest) == {(LOC, "A"): (6, 0, 4), (LOC, "B"): (3, 0, 3)}
    assert_consistent(stock)


def test_releasing_a_confirmed_reservation_gives_its_units_back():
    stock = cart_stock()
    apply(stock, confirm(1))
    changes = apply(stock, release(1))
    assert reservation_after(changes, 1).status == RELEASED
    assert figures(changes) == {(LOC, "A"): (10, 0, 3), (LOC, "B"): (5, 0, 3)}
    assert_consistent(stock)


def test_release_and_deduct_by_reference_include_confirmed_reservations():
    stock = two_for_order()
    apply(stock, confirm(1))
    changes = apply(stock, deduct(ref=ORDER))
    assert [r.id for r in changes.reservations] == [1, 2]
    assert {r.id: r.status for r in changes.reservations} == {1: COMMITTED, 2: COMMITTED}
    assert_consistent(stock)


@pytest.mark.parametrize("then", ["confirm", "extend"])
def test_confirm_and_extend_of_a_confirmed_reservation_are_refused_with_its_status(then):
    stock = cart_stock()
    apply(stock, confirm(1))
    command = extend(1, 60) if then == "extend" else confirm(1, key="cf-2")
    err = error_of(refusal_of(stock, command), ReservationNotActiveError)
    assert (err.reservation_id, err.status) == (1, CONFIRMED)


@pytest.mark.parametrize("first", ["release", "deduct"])
def test_confirm_of_a_finished_reservation_is_refused_with_its_status(first):
    stock = cart_stock()
    apply(stock, consume(first, rid=1))
    err = error_of(refusal_of(stock, confirm(1)), ReservationNotActiveError)
    assert err.status == (RELEASED if first == "release" else COMMITTED)


def test_confirm_of_an_expired_reservation_is_refused_expired():
    stock = cart_stock(expires_at=NOW - timedelta(seconds=1))
    apply(stock, Expire(1))
    refusal = refusal_of(stock, confirm(1))
    assert error_of(refusal, ReservationNotActiveError).status == EXPIRED
    assert refusal.committed is None


def test_confirm_of_a_past_due_reservation_expires_it_and_is_refused():
    stock = cart_stock(expires_at=NOW)  # due: now >= expires_at
    refusal = refusal_of(stock, confirm(1))
    err = error_of(refusal, ReservationNotActiveError)
    assert (err.reservation_id, err.status) == (1, EXPIRED)
    assert refusal.committed is not None and refusal.committed.expired() == [1]
    assert reservation_after(refusal.committed, 1).status == EXPIRED


def test_confirm_by_reference_confirms_every_active_one_oldest_first():
    stock = two_for_order()
    command = confirm(ref=ORDER)
    changes = changes_of(stock, command)
    assert changes.answer == (1, 2)
    assert {r.id: (r.status, r.expires_at) for r in changes.reservations} == {
        1: (CONFIRMED, None),
        2: (CONFIRMED, None),
    }
    assert changes.entries == ()
    assert changes.key_row == KeyRow("cf-1", "confirm", command.request_hash, "1,2")
    assert stock.reservation(3).status == ACTIVE  # type: ignore[union-attr]


def test_confirm_by_reference_skips_confirmed_ones_and_expires_due_ones():
    stock = stock_with(
        bal("A", 10, 6, version=3),
        reservations=(
            resv(1, rline("A", 1), reference=ORDER, status=CONFIRMED),
            resv(2, rline("A", 2), reference=ORDER, expires_at=NOW - timedelta(seconds=1)),
            resv(3, rline("A", 3), reference=ORDER),
        ),
    )
    stock.reservations[1] = dataclasses.replace(stock.reservations[1], expires_at=None)
    changes = changes_of(stock, confirm(ref=ORDER))
    assert changes.answer == (3,)
    assert {r.id: r.status for r in changes.reservations} == {2: EXPIRED, 3: CONFIRMED}
    assert changes.expired() == [2]


def test_confirm_by_reference_with_nothing_active_is_not_found():
    stock = cart_stock(status=CONFIRMED, reference=ORDER)
    err = error_of(refusal_of(stock, confirm(ref=ORDER)), NotFoundError)
    assert err.key == "ORDER:o-1"


def test_confirm_of_an_unknown_reservation_is_not_found():
    error_of(refusal_of(cart_stock(), confirm(99)), NotFoundError)


@pytest.mark.parametrize(
    "kw", [{}, {"reservation_id": "1", "reference": ORDER}], ids=["neither", "both"]
)
def test_confirm_needs_exactly_one_of_id_and_reference(kw):
    with pytest.raises(ValidationError) as err:
        Confirm.validated("cf-1", **kw)
    assert err.value.field == "reservationId"


def test_confirm_payload_differs_by_id_and_by_reference():
    assert confirm(1).request_hash != confirm(ref=ORDER).request_hash
    assert confirm(1).request_hash == confirm(1, key="other").request_hash
