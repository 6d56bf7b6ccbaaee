"""Reservation expiry (ARCHITECTURE sections 6 and 11): the Redis index, the sweeper, the
database scan fallback, and writes that find their reservation past expiry."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter as Tally
from datetime import datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import Clock
from fakeredis import FakeAsyncRedis
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import select

from stockledger.config import Settings
from stockledger.db.engine import Database
from stockledger.db.models import idempotency_key as K
from stockledger.db.models import inventory_ledger as L
from stockledger.locks.redis_locks import RedisBalanceLocker, RedisExpiryIndex, RedisHealth
from stockledger.services import (
    InventoryService,
    Line,
    ReservationNotActiveError,
)
from stockledger.services.queries import InventoryQueries
from stockledger.services.reconcile import find_violations
from stockledger.services.rows import from_db_time
from stockledger.services.sweeper import Sweeper


def expired_total() -> float:
    return REGISTRY.get_sample_value("inventory_reservations_expired_total") or 0.0


@pytest.fixture
def index(redis: aioredis.Redis, org_id: str) -> RedisExpiryIndex:
    return RedisExpiryIndex(redis, org_id)


@pytest.fixture
def indexed(
    db: Database,
    settings: Settings,
    clock: Clock,
    org_id: str,
    redis: aioredis.Redis,
    index: RedisExpiryIndex,
) -> InventoryService:
    """The services with Redis locks and the Redis expiry index, on the test clock."""
    return InventoryService(
        db,
        settings,
        clock=clock,
        locker=RedisBalanceLocker(redis),
        expiry_index=index,
        org_id=org_id,
    )


async def expire_entries(db: Database, org_id: str) -> list[tuple[int, str, str, int, datetime]]:
    """(reservation id, key, sku, reserved delta, created at) of every EXPIRE entry."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(
                L.c.reservation_id,
                L.c.idempotency_key,
                L.c.sku,
                L.c.reserved_delta,
                L.c.created_at,
            )
            .where(L.c.org_id == org_id, L.c.event_type == "EXPIRE")
            .order_by(L.c.id)
        )
        return [(r[0], r[1], r[2], r[3], from_db_time(r[4])) for r in rows]


async def key_claimed(db: Database, org_id: str, key: str) -> bool:
    async with db.read() as conn:
        row = await conn.execute(
            select(K.c.idempotency_key).where(K.c.org_id == org_id, K.c.idempotency_key == key)
        )
        return row.first() is not None


# ----------------------------------------------------------------------------- the sweeper


@pytest.mark.slow
async def test_background_sweeper_expires_within_one_interval(
    db: Database,
    settings: Settings,
    org_id: str,
    redis: aioredis.Redis,
    index: RedisExpiryIndex,
) -> None:
    service = InventoryService(  # the real clock
        db, settings, locker=RedisBalanceLocker(redis), expiry_index=index, org_id=org_id
    )
    queries = InventoryQueries(db, org_id)
    await service.restock("stock", [Line("a", 10), Line("b", 10)])
    sweeper = Sweeper(service, index, interval=1.0)
    passes: list[tuple[float, float]] = []  # (start, end) of each pass, epoch seconds
    run_once = sweeper.run_once

    async def timed_pass(**kwargs: Any) -> int:
        start = time.time()
        try:
            return await run_once(**kwargs)
        finally:
            passes.append((start, time.time()))

    sweeper.run_once = timed_pass  # type: ignore[method-assign]
    before = expired_total()
    task = asyncio.create_task(sweeper.run_forever())
    try:
        made = []
        for i in range(3):
            result = await service.reserve(f"r-{i}", [Line("a", 2), Line("b", 1)], ttl_seconds=3)
            made.append(result.reservation)
            await asyncio.sleep(0.3)  # expiries spread over the sweep interval
        # Read in r-2's own transaction: nothing can have expired by then (3 s TTLs).
        assert [b.reserved for b in result.balances if b.sku == "a"] == [6]
        # Wait past the promise (interval + 1 s after the last expiry) with some slack; the
        # lag of each expiry is checked exactly below.
        deadline = max(r.expires_at for r in made).timestamp() + sweeper.interval + 3.0
        while time.time() < deadline:
            statuses = [(await queries.reservation(r.id)).status for r in made]  # type: ignore[union-attr]
            if all(s == "EXPIRED" for s in statuses):
                break
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert statuses == ["EXPIRED"] * 3
    entries = await expire_entries(db, org_id)
    assert sorted((rid, key, sku, d) for rid, key, sku, d, _ in entries) == sorted(
        (r.id, f"expire:{r.id}", sku, -q) for r in made for sku, q in (("a", 2), ("b", 1))
    )
    # Within one interval, stated without a wall-clock bound: each reservation is expired once
    # due, by the first pass that starts after it is due at the latest, and passes start one
    # interval apart.
    for r in made:
        at = {t for rid, *_, t in entries if rid == r.id}
        assert len(at) == 1
        expired_at = at.pop().timestamp()
        due = r.expires_at.timestamp()
        latest = next(end for start, end in passes if start >= due)
        assert due <= expired_at <= latest, f"reservation {r.id}: {due}, {expired_at}, {passes}"
    for (_, end), (next_start, _) in zip(passes, passes[1:], strict=False):
        assert next_start - end == pytest.approx(sweeper.interval, abs=0.5), passes
    for sku in "ab":
        bal = await queries.balance(sku)
        assert bal is not None and (bal.on_hand, bal.reserved) == (10, 0)
    assert expired_total() - before == 3
    assert await redis.zcard(index.key) == 0
    assert await find_violations(db, org_id) == []


@pytest.mark.slow
async def test_two_sweepers_racing_expire_each_reservation_once(
    db: Database,
    settings: Settings,
    clock: Clock,
    org_id: str,
    redis: aioredis.Redis,
    index: RedisExpiryIndex,
) -> None:
    # Two servers: each its own services and index object on the same db and Redis key. No
    # Redis locks: the database row locks alone must make expiry happen exactly once.
    other_index = RedisExpiryIndex(redis, org_id)
    assert other_index.key == index.key
    service = InventoryService(db, settings, clock=clock, expiry_index=index, org_id=org_id)
    other = InventoryService(db, settings, clock=clock, expiry_index=other_index, org_id=org_id)
    rng = random.Random(6)
    skus = [f"sku-{i:03d}" for i in range(100)]
    await service.restock("stock", [Line(s, 10_000) for s in skus])
    carts = [rng.sample(skus, rng.choice([1, 1, 2, 3])) for _ in range(1000)]
    lines_left: dict[int, int] = {}  # reservation id -> lines with remaining
    sem = asyncio.Semaphore(20)

    async def make(i: int, cart: list[str]) -> None:
        async with sem:
            res = await service.reserve(
                f"r-{i}", [Line(s, 1 + i % 3) for s in cart], ttl_seconds=60
            )
            lines_left[res.reservation.id] = len(cart)

    await asyncio.gather(*(make(i, c) for i, c in enumerate(carts)))
    assert len(lines_left) == 1000
    assert await redis.zcard(index.key) == 1000
    # Some lines are given back first, in part or in full: only lines with remaining expire.
    some = sorted(lines_left)[:40]
    held = await InventoryQueries(db, org_id).lines_for(some)
    for n, rid in enumerate(some):
        first = held[rid][0]
        if n % 2 and first.quantity > 1:
            await service.release(f"part-{rid}", reservation_id=rid, lines=[Line(first.sku, 1)])
        elif len(held[rid]) > 1:
            await service.release(
                f"full-{rid}", reservation_id=rid, lines=[Line(first.sku, first.quantity)]
            )
            lines_left[rid] -= 1
    assert sum(lines_left.values()) < sum(len(c) for c in carts)

    clock.advance(61)  # all 1,000 are due at once
    before = expired_total()
    one, two = Sweeper(service, index, batch=50), Sweeper(other, other_index, batch=50)
    counts = await asyncio.gather(one.run_once(), two.run_once())
    assert sum(counts) == 1000, counts
    assert min(counts) > 0, f"the sweepers did not race: {counts}"

    entries = await expire_entries(db, org_id)
    assert Tally(rid for rid, *_ in entries) == Tally(lines_left)
    assert all(key == f"expire:{rid}" for rid, key, *_ in entries)
    assert expired_total() - before == 1000
    assert await redis.zcard(index.key) == 0
    page = await InventoryQueries(db, org_id).balances(first=200)
    assert [(b.sku, b.reserved, b.on_hand) for _, b in page.edges] == [
        (s, 0, 10_000) for s in sorted(skus)
    ]
    assert await find_violations(db, org_id) == []
    # A later pass of either finds nothing to do.
    assert await one.run_once(scan=True) == 0
    assert await two.run_once(scan=True) == 0


async def test_database_scan_expires_what_the_redis_index_lost(
    db: Database,
    clock: Clock,
    org_id: str,
    redis: aioredis.Redis,
    index: RedisExpiryIndex,
    indexed: InventoryService,
) -> None:
    await indexed.restock("stock", [Line("a", 10)])
    ids = [
        (await indexed.reserve(f"r-{i}", [Line("a", 2)], ttl_seconds=30)).reservation.id
        for i in range(3)
    ]
    assert await redis.zcard(index.key) == 3
    await redis.delete(index.key)  # Redis lost its data
    clock.advance(31)
    before = expired_total()

    sweeper = Sweeper(indexed, index)
    assert await sweeper.run_once(scan=False) == 0  # nothing left in the index
    assert await sweeper.run_once(scan=True) == 3
    entries = await expire_entries(db, org_id)
    assert sorted((rid, key, d) for rid, key, _, d, _ in entries) == [
        (rid, f"expire:{rid}", -2) for rid in sorted(ids)
    ]
    bal = await InventoryQueries(db, org_id).balance("a")
    assert bal is not None and (bal.on_hand, bal.reserved) == (10, 0)
    assert expired_total() - before == 3
    assert await find_violations(db, org_id) == []


class FlakyRedis(FakeAsyncRedis):
    """fakeredis whose ZADD fails as if Redis were unreachable while ``down`` is set."""

    down = False

    async def zadd(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise RedisConnectionError("Redis is down")
        return await super().zadd(*args, **kwargs)


async def test_expiries_lost_to_a_redis_failure_are_scanned_for_until_due(
    db: Database, settings: Settings, clock: Clock, org_id: str
) -> None:
    client = FlakyRedis()
    index = RedisExpiryIndex(client, org_id, RedisHealth(retry_interval=0))
    service = InventoryService(db, settings, clock=clock, expiry_index=index, org_id=org_id)
    scans = 0
    due_ids = service.due_reservation_ids

    async def counted(limit: int) -> list[int]:
        nonlocal scans
        scans += 1
        return await due_ids(limit)

    service.due_reservation_ids = counted  # type: ignore[method-assign]
    sweeper = Sweeper(service, index, scan_interval=3600)
    try:
        await service.restock("stock", [Line("a", 10)])
        client.down = True
        lost = (await service.reserve("lost", [Line("a", 1)], ttl_seconds=60)).reservation
        client.down = False
        kept = (await service.reserve("kept", [Line("a", 2)], ttl_seconds=600)).reservation
        assert index.unindexed_until == lost.expires_at
        assert await client.zcard(index.key) == 1  # only "kept" reached Redis

        assert await sweeper.run_once() == 0  # the first pass scans anyway
        clock.advance(30)
        assert await sweeper.run_once() == 0
        assert scans == 2  # scanned again: a lost expiry is not yet past
        clock.advance(31)
        assert await sweeper.run_once() == 1  # the scan found "lost", one pass after due
        assert scans == 3
        clock.advance(1)
        assert await sweeper.run_once() == 0
        assert scans == 3  # every lost expiry is past: back to the periodic scan
        clock.advance(600)
        assert await sweeper.run_once() == 1  # "kept", from the index
        assert scans == 3
    finally:
        await client.aclose()
    statuses = {r.id: (await InventoryQueries(db, org_id).reservation(r.id)) for r in (lost, kept)}
    assert {rid: r.status for rid, r in statuses.items() if r} == {
        lost.id: "EXPIRED",
        kept.id: "EXPIRED",
    }
    assert await find_violations(db, org_id) == []


async def test_expire_due_is_the_scan_without_a_sweeper(
    db: Database, clock: Clock, org_id: str, redis: aioredis.Redis, indexed: InventoryService
) -> None:
    await indexed.restock("stock", [Line("a", 10)])
    due = (await indexed.reserve("r-due", [Line("a", 3)], ttl_seconds=30)).reservation.id
    later = (await indexed.reserve("r-later", [Line("a", 4)], ttl_seconds=600)).reservation.id
    await redis.delete(indexed.expiry_index.key)  # type: ignore[attr-defined]
    clock.advance(31)
    assert await indexed.due_reservation_ids() == [due]
    assert await indexed.expire_due() == [due]
    assert await indexed.expire_due() == []
    queries = InventoryQueries(db, org_id)
    assert (await queries.reservation(due)).status == "EXPIRED"  # type: ignore[union-attr]
    assert (await queries.reservation(later)).status == "ACTIVE"  # type: ignore[union-attr]
    bal = await queries.balance("a")
    assert bal is not None and bal.reserved == 4
    assert await find_violations(db, org_id) == []


# --------------------------------------------------------------- writes past the expiry


@pytest.mark.parametrize("operation", ["deduct", "extend", "release"])
async def test_write_past_expiry_expires_and_is_refused_without_consuming_the_key(
    db: Database, clock: Clock, org_id: str, indexed: InventoryService, operation: str
) -> None:
    await indexed.restock("stock", [Line("a", 10), Line("b", 10)])
    rid = (
        await indexed.reserve("r-1", [Line("a", 3), Line("b", 2)], ttl_seconds=60)
    ).reservation.id
    clock.advance(60)  # now == expires_at: expired (section 11)
    before = expired_total()

    async def call() -> object:
        if operation == "deduct":
            return await indexed.deduct("w-1", reservation_id=rid)
        if operation == "release":
            return await indexed.release("w-1", reservation_id=rid)
        return await indexed.extend_reservation("w-1", rid, ttl_seconds=600)

    with pytest.raises(ReservationNotActiveError) as caught:
        await call()
    assert caught.value.status == "EXPIRED"
    assert caught.value.reservation_id == rid

    queries = InventoryQueries(db, org_id)
    assert (await queries.reservation(rid)).status == "EXPIRED"  # type: ignore[union-attr]
    entries = await expire_entries(db, org_id)
    assert sorted((r, k, s, d) for r, k, s, d, _ in entries) == [
        (rid, f"expire:{rid}", "a", -3),
        (rid, f"expire:{rid}", "b", -2),
    ]
    for sku in "ab":
        bal = await queries.balance(sku)
        assert bal is not None and (bal.on_hand, bal.reserved) == (10, 0)
    assert expired_total() - before == 1
    assert not await key_claimed(db, org_id, "w-1")

    # Retrying is refused the same way and expires nothing twice.
    with pytest.raises(ReservationNotActiveError):
        await call()
    assert len(await expire_entries(db, org_id)) == 2
    assert expired_total() - before == 1
    # The key is still free for another request.
    result = await indexed.restock("w-1", [Line("a", 1)])
    assert result.replayed is False
    # A sweeper that comes later has nothing to do.
    assert await Sweeper(indexed, indexed.expiry_index).run_once(scan=True) == 0
    assert await find_violations(db, org_id) == []


# --------------------------------------------------------------------- index in step


async def test_reserve_extend_release_deduct_keep_the_index_in_step(
    db: Database, clock: Clock, org_id: str, redis: aioredis.Redis, indexed: InventoryService
) -> None:
    key = indexed.expiry_index.key  # type: ignore[attr-defined]
    queries = InventoryQueries(db, org_id)
    await indexed.restock("stock", [Line("a", 10), Line("b", 10)])

    one = (await indexed.reserve("r-1", [Line("a", 2), Line("b", 2)], ttl_seconds=90)).reservation
    two = (await indexed.reserve("r-2", [Line("a", 1)], ttl_seconds=300)).reservation
    stored = await queries.reservation(one.id)
    assert stored is not None and stored.expires_at == one.expires_at
    assert await redis.zscore(key, str(one.id)) == pytest.approx(
        one.expires_at.timestamp(), abs=1e-3
    )
    assert await redis.zscore(key, str(two.id)) == pytest.approx(
        two.expires_at.timestamp(), abs=1e-3
    )

    clock.advance(10)
    extended = (await indexed.extend_reservation("x-1", one.id, ttl_seconds=600)).reservation
    assert extended.expires_at > one.expires_at
    stored = await queries.reservation(one.id)
    assert stored is not None and stored.expires_at == extended.expires_at
    assert await redis.zscore(key, str(one.id)) == pytest.approx(
        extended.expires_at.timestamp(), abs=1e-3
    )

    # Giving back part keeps it scheduled; giving back the rest takes it out.
    await indexed.release("rel-1", reservation_id=one.id, lines=[Line("a", 2)])
    assert await redis.zscore(key, str(one.id)) is not None
    await indexed.release("rel-2", reservation_id=one.id)
    assert await redis.zscore(key, str(one.id)) is None
    assert (await queries.reservation(one.id)).status == "RELEASED"  # type: ignore[union-attr]

    await indexed.deduct("d-1", reservation_id=two.id)
    assert await redis.zscore(key, str(two.id)) is None
    assert (await queries.reservation(two.id)).status == "COMMITTED"  # type: ignore[union-attr]

    three = (await indexed.reserve("r-3", [Line("b", 1)], ttl_seconds=30)).reservation
    assert await redis.zscore(key, str(three.id)) is not None
    clock.advance(31)
    assert await Sweeper(indexed, indexed.expiry_index).run_once(scan=False) == 1
    assert await redis.zscore(key, str(three.id)) is None
    assert await redis.zcard(key) == 0
    assert await find_violations(db, org_id) == []
