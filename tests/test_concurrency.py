"""No amount of concurrency oversells (ARCHITECTURE sections 1, 2 and 4), on both backends.

Many coroutines call the services at once through ``asyncio.gather``; on MariaDB each takes its
own pooled connection, so the row locks, deadlock retries and duplicate-key handling are real.
Only the outcomes the rules allow may reach a caller (success, or the domain error the rules
name); anything else (a deadlock, a lock wait timeout, a constraint violation) is a failure.
Every test ends with the reconciliation query finding no violation and prints its wall time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from typing import Any

import pytest
from sqlalchemy import event, func, select

from stockledger.config import Settings
from stockledger.db.engine import create_database
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
    ValidationError,
)
from stockledger.services.reconcile import find_violations

pytestmark = pytest.mark.slow

LOC = "default"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The test settings with the production retry budget (attempts and backoff), so "no
    deadlock reaches a caller" holds with what a deployment runs, not a padded test budget."""
    production = {
        name: Settings.model_fields[name].default
        for name in (
            "retry_max_attempts",
            "retry_initial_backoff_seconds",
            "retry_max_backoff_seconds",
        )
    }
    return settings.model_copy(update=production)


# ---------------------------------------------------------------------------- helpers


async def gather(calls: list[Any]) -> list[Any]:
    """Run every call at once; exceptions are returned, not raised."""
    return await asyncio.gather(*(c() for c in calls), return_exceptions=True)


def kinds(results: list[Any]) -> Counter[str]:
    return Counter("ok" if not isinstance(r, BaseException) else type(r).__name__ for r in results)


def unexpected(results: list[Any], *allowed: type[BaseException]) -> list[BaseException]:
    return [r for r in results if isinstance(r, BaseException) and not isinstance(r, allowed)]


async def stock(service: InventoryService, sku: str, location: str = LOC) -> tuple[int, int]:
    async with service.db.read() as conn:
        row = (
            await conn.execute(
                select(B.c.on_hand, B.c.reserved).where(
                    B.c.org_id == service.org_id, B.c.location == location, B.c.sku == sku
                )
            )
        ).one()
    return (row.on_hand, row.reserved)


async def count(service: InventoryService, table: Any, **where: Any) -> int:
    stmt = select(func.count()).select_from(table).where(table.c.org_id == service.org_id)
    for column, value in where.items():
        stmt = stmt.where(table.c[column] == value)
    async with service.db.read() as conn:
        return int((await conn.execute(stmt)).scalar_one())


async def line_totals(service: InventoryService, rid: int) -> dict[str, tuple[int, int, int]]:
    async with service.db.read() as conn:
        rows = (await conn.execute(select(RL).where(RL.c.reservation_id == rid))).all()
    return {r.sku: (r.quantity, r.deducted, r.released) for r in rows}


async def assert_invariants(service: InventoryService) -> None:
    assert await find_violations(service.db, service.org_id) == []


class Timer:
    """Wall time of a block, plus (to show the database saw real concurrency) the peak number
    of connections checked out of the pool at once and the transaction retries."""

    def __init__(self, name: str, backend: str, service: InventoryService) -> None:
        self.name = f"[{backend}] {name}"
        self.db = service.db
        self.current = self.peak = 0
        self.retries: Counter[str] = Counter()

    def _checkout(self, *_: object) -> None:
        self.current += 1
        self.peak = max(self.peak, self.current)

    def _checkin(self, *_: object) -> None:
        self.current -= 1

    def __enter__(self) -> Timer:
        pool = self.db.engine.sync_engine.pool
        event.listen(pool, "checkout", self._checkout)
        event.listen(pool, "checkin", self._checkin)
        self.db.on_retry = lambda reason: self.retries.update([reason])
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start
        pool = self.db.engine.sync_engine.pool
        event.remove(pool, "checkout", self._checkout)
        event.remove(pool, "checkin", self._checkin)
        self.db.on_retry = None
        print(
            f"\n{self.name}: {self.elapsed:.2f}s "
            f"(peak connections {self.peak}, retries {dict(self.retries)})"
        )


# ---------------------------------------------------------------------------- hot SKU


async def test_hundred_single_unit_reserves_against_ten_on_hand(service, backend):
    await service.restock("rs", [Line("HOT", 10)])
    calls = [lambda i=i: service.reserve(f"r-{i}", [Line("HOT", 1)]) for i in range(100)]

    with Timer("100 reserves of 1 against 10", backend, service):
        results = await gather(calls)

    assert kinds(results) == {"ok": 10, "InsufficientStockError": 90}, kinds(results)
    for err in results:
        if isinstance(err, InsufficientStockError):
            assert err.shortages[0].requested == 1
            assert 0 <= err.shortages[0].available < 1
    assert await stock(service, "HOT") == (10, 10)
    assert await count(service, R) == 10
    assert await count(service, L, event_type="RESERVE") == 10
    await assert_invariants(service)


async def test_hundred_direct_deducts_against_ten_on_hand(service, backend):
    await service.restock("rs", [Line("HOT", 10)])
    calls = [lambda i=i: service.deduct(f"d-{i}", lines=[Line("HOT", 1)]) for i in range(100)]

    with Timer("100 direct deducts of 1 against 10", backend, service):
        results = await gather(calls)

    assert kinds(results) == {"ok": 10, "InsufficientStockError": 90}, kinds(results)
    assert await stock(service, "HOT") == (0, 0)
    await assert_invariants(service)


async def test_two_sessions_racing_for_the_last_unit(service, backend, database_url, settings):
    """Two engines (two connection pools, as two app processes would have) on one database."""
    other_db = create_database(settings, database_url)
    other = InventoryService(other_db, settings, clock=service.clock, org_id=service.org_id)
    try:
        rounds = 20
        await service.restock("rs", [Line(f"LAST-{i}", 1) for i in range(rounds)])
        with Timer(f"two sessions, {rounds} rounds for the last unit", backend, service):
            for i in range(rounds):
                sku = f"LAST-{i}"
                first, second = (service, other) if i % 2 else (other, service)
                results = await gather(
                    [
                        lambda s=first, sku=sku: s.reserve(f"a-{sku}", [Line(sku, 1)]),
                        lambda s=second, sku=sku: s.deduct(f"b-{sku}", lines=[Line(sku, 1)]),
                    ]
                )
                assert kinds(results) == {"ok": 1, "InsufficientStockError": 1}, (i, results)
                on_hand, reserved = await stock(service, sku)
                assert on_hand - reserved == 0
                assert (on_hand, reserved) in {(1, 1), (0, 0)}
        await assert_invariants(service)
    finally:
        await other_db.dispose()


# ---------------------------------------------------------------------------- carts


async def test_fifty_carts_of_twenty_lines_in_shuffled_orders(service, backend):
    rng = random.Random(20261121)
    skus = [(loc, f"SKU-{i:02d}") for loc in ("north", "south") for i in range(15)]
    await service.restock("rs", [Line(sku, 30, loc) for loc, sku in skus])

    carts: list[list[Line]] = []
    for _ in range(50):
        picked = rng.sample(skus, 20)
        lines = [Line(sku, rng.randint(1, 2), loc) for loc, sku in picked]
        lines += [Line(ln.sku, 1, ln.location) for ln in rng.sample(lines, 3)]  # duplicates
        rng.shuffle(lines)
        carts.append(lines)
    calls = [lambda i=i: service.reserve(f"cart-{i}", carts[i]) for i in range(50)]

    with Timer("50 carts x 20 lines, shuffled", backend, service):
        results = await gather(calls)

    assert unexpected(results, InsufficientStockError) == []
    outcome = kinds(results)
    assert outcome["ok"] >= 1
    # The held units are exactly what the successful carts asked for, all or nothing.
    wanted: dict[tuple[str, str], int] = defaultdict(int)
    for cart, result in zip(carts, results, strict=True):
        if not isinstance(result, BaseException):
            for ln in cart:
                wanted[(ln.location, ln.sku)] += ln.quantity
    for loc, sku in skus:
        on_hand, reserved = await stock(service, sku, loc)
        assert on_hand == 30
        assert reserved == wanted[(loc, sku)] <= 30
    print(f"  outcomes: {dict(outcome)}")
    await assert_invariants(service)


async def test_mixed_workload_never_oversells(service, backend):
    """Reserve, release, deduct (by id, reference, direct), restock and adjust all at once."""
    rng = random.Random(7)
    skus = [f"M-{i}" for i in range(8)]
    await service.restock("rs", [Line(s, 20) for s in skus])
    ref = Reference("ORDER", "shared")
    held = []
    for i in range(10):
        lines = [Line(s, 1) for s in rng.sample(skus, 4)]
        held.append((await service.reserve(f"pre-{i}", lines, reference=ref)).reservation.id)

    calls: list[Any] = []
    for i in range(40):
        lines = [Line(s, rng.randint(1, 3)) for s in rng.sample(skus, 5)]
        calls.append(lambda i=i, lines=lines: service.reserve(f"mx-r-{i}", lines))
    for i, rid in enumerate(held):
        op = service.deduct if i % 2 else service.release
        calls.append(lambda i=i, rid=rid, op=op: op(f"mx-c-{i}", reservation_id=rid))
    for i in range(5):
        calls.append(
            lambda i=i: service.deduct(f"mx-ref-{i}", reference=ref, lines=[Line("M-0", 1)])
        )
        calls.append(lambda i=i: service.deduct(f"mx-d-{i}", lines=[Line(skus[i], 2)]))
        calls.append(lambda i=i: service.restock(f"mx-s-{i}", [Line(skus[-1 - i], 1)]))
        calls.append(
            lambda i=i: service.adjust(f"mx-a-{i}", skus[i + 2], delta=-1, reason="damaged")
        )
    rng.shuffle(calls)

    with Timer(f"mixed workload, {len(calls)} calls", backend, service):
        results = await gather(calls)

    assert (
        unexpected(
            results,
            InsufficientStockError,
            ReservationNotActiveError,
            NotFoundError,
            ValidationError,
        )
        == []
    )
    print(f"  outcomes: {dict(kinds(results))}")
    for s in skus:
        on_hand, reserved = await stock(service, s)
        assert 0 <= reserved <= on_hand
    await assert_invariants(service)


# ---------------------------------------------------------------------------- balance creation


async def test_concurrent_first_restocks_of_a_new_sku_are_all_applied(service, backend):
    with Timer("2 concurrent first restocks of one new SKU", backend, service):
        results = await gather(
            [
                lambda: service.restock("first-a", [Line("NEW", 3)]),
                lambda: service.restock("first-b", [Line("NEW", 4)]),
            ]
        )
    assert kinds(results) == {"ok": 2}, results
    assert await stock(service, "NEW") == (7, 0)

    calls = [lambda i=i: service.restock(f"many-{i}", [Line("NEWER", i + 1)]) for i in range(20)]
    with Timer("20 concurrent first restocks of one new SKU", backend, service):
        results = await gather(calls)
    assert kinds(results) == {"ok": 20}, results
    assert await stock(service, "NEWER") == (sum(range(1, 21)), 0)
    assert await count(service, L, sku="NEWER") == 20
    async with service.db.read() as conn:
        version = (
            await conn.execute(
                select(B.c.version).where(B.c.org_id == service.org_id, B.c.sku == "NEWER")
            )
        ).scalar_one()
    assert version == 20
    await assert_invariants(service)


async def test_concurrent_creation_of_overlapping_new_balances(service, backend):
    names = [f"N-{i}" for i in range(6)]
    carts = [[Line(names[(i + j) % 6], 1) for j in range(3)] for i in range(12)]
    calls: list[Any] = [lambda i=i: service.restock(f"ov-{i}", carts[i]) for i in range(12)]
    calls += [
        lambda i=i: service.adjust(f"adj-{i}", names[i], delta=2, reason="first count")
        for i in range(6)
    ]

    with Timer("12 restocks + 6 adjusts creating 6 overlapping balances", backend, service):
        results = await gather(calls)

    assert kinds(results) == {"ok": 18}, results
    for name in names:
        assert await stock(service, name) == (6 + 2, 0)
    await assert_invariants(service)


# ---------------------------------------------------------------------------- one reservation


async def test_concurrent_release_and_deduct_of_one_reservation(service, backend):
    await service.restock("rs", [Line("A", 100), Line("B", 100)])
    rounds = 10
    with Timer(f"release-all vs deduct-all, {rounds} reservations", backend, service):
        for i in range(rounds):
            res = (await service.reserve(f"rv-{i}", [Line("A", 5), Line("B", 2)])).reservation
            results = await gather(
                [
                    lambda i=i, rid=res.id: service.release(f"rl-{i}", reservation_id=rid),
                    lambda i=i, rid=res.id: service.deduct(f"dd-{i}", reservation_id=rid),
                ]
            )
            assert kinds(results) == {"ok": 1, "ReservationNotActiveError": 1}, results
            winner = next(r for r in results if not isinstance(r, BaseException))
            loser = next(r for r in results if isinstance(r, BaseException))
            assert loser.status == winner.reservations[0].status
            totals = await line_totals(service, res.id)
            assert all(d + r == q for q, d, r in totals.values())
            assert all(d == 0 or r == 0 for _, d, r in totals.values())
    await assert_invariants(service)


async def test_many_partial_deducts_of_one_reservation(service, backend):
    await service.restock("rs", [Line("A", 50)])
    res = (await service.reserve("rv", [Line("A", 10)])).reservation
    calls = [
        lambda i=i: service.deduct(f"dd-{i}", reservation_id=res.id, lines=[Line("A", 1)])
        for i in range(30)
    ]

    with Timer("30 partial deducts of 1 from a reservation of 10", backend, service):
        results = await gather(calls)

    assert kinds(results) == {"ok": 10, "ReservationNotActiveError": 20}, kinds(results)
    assert all(r.status == "COMMITTED" for r in results if isinstance(r, ReservationNotActiveError))
    assert await line_totals(service, res.id) == {"A": (10, 10, 0)}
    assert await stock(service, "A") == (40, 0)
    await assert_invariants(service)


async def test_concurrent_partial_release_and_deduct_never_over_consume(service, backend):
    await service.restock("rs", [Line("A", 50)])
    res = (await service.reserve("rv", [Line("A", 10)])).reservation
    calls = [
        lambda i=i: (service.deduct if i % 2 else service.release)(
            f"c-{i}", reservation_id=res.id, lines=[Line("A", 1 + i % 3)]
        )
        for i in range(30)
    ]

    with Timer("30 partial releases/deducts of 1-3 from a reservation of 10", backend, service):
        results = await gather(calls)

    assert unexpected(results, ReservationNotActiveError, ValidationError) == []
    taken = sum(1 + i % 3 for i, r in enumerate(results) if not isinstance(r, BaseException))
    quantity, deducted, released = (await line_totals(service, res.id))["A"]
    assert deducted + released == taken <= quantity
    # Over-asking is only refused when the remaining really was short.
    if taken < quantity:
        assert all(not isinstance(r, ReservationNotActiveError) for r in results)
    await assert_invariants(service)


async def test_concurrent_by_reference_release_and_deduct(service, backend, clock):
    await service.restock("rs", [Line("A", 100), Line("B", 100)])
    rounds = 5
    with Timer(f"by-reference release/deduct races, {rounds} references", backend, service):
        for n in range(rounds):
            ref = Reference("ORDER", f"o-{n}")
            for i in range(3):
                await service.reserve(f"rv-{n}-{i}", [Line("A", 2), Line("B", 1)], reference=ref)
                clock.advance(0.001)
            calls = [
                lambda n=n, ref=ref: service.release(f"rl-{n}", reference=ref),
                lambda n=n, ref=ref: service.deduct(f"dd-{n}", reference=ref),
            ] + [
                lambda n=n, i=i, ref=ref: service.deduct(
                    f"pd-{n}-{i}", reference=ref, lines=[Line("A", 1)]
                )
                for i in range(4)
            ]
            results = await gather(calls)
            assert unexpected(results, NotFoundError, ValidationError) == [], results
            assert kinds(results)["ok"] >= 1
        await assert_invariants(service)
    async with service.db.read() as conn:
        active = (
            await conn.execute(
                select(func.count())
                .select_from(R)
                .where(R.c.org_id == service.org_id, R.c.status == "ACTIVE")
            )
        ).scalar_one()
        deducted = (
            await conn.execute(
                select(RL.c.sku, func.sum(RL.c.deducted))
                .where(RL.c.org_id == service.org_id)
                .group_by(RL.c.sku)
            )
        ).all()
    assert active == 0  # the release-all or deduct-all of each reference ran at some point
    for sku, units in deducted:
        assert await stock(service, sku) == (100 - int(units), 0)


async def test_sweep_racing_deduct_and_extend_expires_once(service, backend, clock):
    await service.restock("rs", [Line("A", 100)])
    ids = [
        (await service.reserve(f"rv-{i}", [Line("A", 2)], ttl_seconds=60)).reservation.id
        for i in range(10)
    ]
    clock.advance(61)
    calls: list[Any] = [service.expire_due for _ in range(4)]
    for i, rid in enumerate(ids):
        calls.append(lambda i=i, rid=rid: service.deduct(f"dd-{i}", reservation_id=rid))
        calls.append(lambda i=i, rid=rid: service.extend_reservation(f"ex-{i}", rid, 600))
        calls.append(lambda rid=rid: service.expire_reservation(rid))

    name = f"sweepers, deducts and extends on 10 due reservations ({len(calls)} calls)"
    with Timer(name, backend, service):
        results = await gather(calls)

    assert unexpected(results, ReservationNotActiveError) == [], results
    for r in results:
        if isinstance(r, ReservationNotActiveError):
            assert r.status == "EXPIRED"
    for r in results[:4]:
        assert isinstance(r, list)
    assert await stock(service, "A") == (100, 0)
    for rid in ids:
        assert await count(service, L, idempotency_key=f"expire:{rid}") == 1
    assert await count(service, L, event_type="DEDUCT") == 0
    await assert_invariants(service)


# ---------------------------------------------------------------------------- one key, many copies


@pytest.mark.parametrize("copies", [20, 100])
async def test_copies_of_one_request_have_one_effect(service, backend, copies):
    await service.restock("rs", [Line("A", 10)])
    calls = [lambda: service.reserve("dup", [Line("A", 1)])] * copies

    with Timer(f"{copies} copies of one reserve", backend, service):
        results = await gather(calls)

    assert kinds(results) == {"ok": copies}, kinds(results)
    assert Counter(r.replayed for r in results) == {False: 1, True: copies - 1}
    assert len({r.reservation.id for r in results}) == 1
    assert await stock(service, "A") == (10, 1)
    await assert_invariants(service)


@pytest.mark.parametrize("copies", [20, 100])
async def test_copies_of_a_failing_request_fail_alike_and_consume_nothing(service, backend, copies):
    """Every copy gets InsufficientStockError; no deadlock or other database error."""
    await service.restock("rs", [Line("A", 10)])
    calls = [lambda: service.reserve("dup", [Line("A", 11)])] * copies

    with Timer(f"{copies} copies of one reserve that is short", backend, service):
        results = await gather(calls)

    assert kinds(results) == {"InsufficientStockError": copies}, kinds(results)
    assert await count(service, L, idempotency_key="dup") == 0
    assert (await service.reserve("dup", [Line("A", 10)])).replayed is False
    await assert_invariants(service)


@pytest.mark.parametrize("copies", [20, 100])
async def test_copies_of_a_deduct_on_a_past_due_reservation(service, backend, clock, copies):
    """Each copy finds the reservation EXPIRED; it is expired once and the key stays free."""
    await service.restock("rs", [Line("A", 10)])
    res = (await service.reserve("rv", [Line("A", 4)], ttl_seconds=60)).reservation
    clock.advance(61)
    calls = [lambda: service.deduct("dup", reservation_id=res.id)] * copies

    with Timer(f"{copies} copies of one deduct on a past-due reservation", backend, service):
        results = await gather(calls)

    assert kinds(results) == {"ReservationNotActiveError": copies}, kinds(results)
    assert {r.status for r in results} == {"EXPIRED"}
    assert await count(service, L, idempotency_key=f"expire:{res.id}") == 1
    assert await count(service, L, idempotency_key="dup") == 0
    assert await stock(service, "A") == (10, 0)
    other = (await service.reserve("rv-2", [Line("A", 1)])).reservation
    assert (await service.deduct("dup", reservation_id=other.id)).replayed is False
    await assert_invariants(service)
