"""Confirmed reservations (issue 11 item 4, ARCHITECTURE section 14), on both backends: a
confirmed reservation keeps its lines, has no expiry, is never swept, and ends COMMITTED or
RELEASED; ``committed`` (the read path) follows it; the invariants hold after every step."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from conftest import Clock
from sqlalchemy import func, select

from stockledger.db.engine import Database
from stockledger.db.models import inventory_ledger as L
from stockledger.locks.redis_locks import RedisBalanceLocker, RedisExpiryIndex
from stockledger.services import (
    IdempotencyKeyReusedError,
    InventoryService,
    Line,
    NotFoundError,
    Reference,
    ReservationNotActiveError,
    ValidationError,
)
from stockledger.services.queries import InventoryQueries
from stockledger.services.reconcile import find_violations
from stockledger.services.sweeper import Sweeper

ORDER = Reference("ORDER", "A-1001")


async def committed(db: Database, org_id: str, *skus: str) -> dict[str, int]:
    queries = InventoryQueries(db, org_id)
    found = {s: await queries.balance(s) for s in skus}
    return {s: 0 if b is None else b.committed for s, b in found.items()}


async def figures(db: Database, org_id: str, sku: str) -> tuple[int, int, int]:
    b = await InventoryQueries(db, org_id).balance(sku)
    assert b is not None
    return (b.on_hand, b.reserved, b.version)


async def ledger_count(db: Database, org_id: str) -> int:
    async with db.read() as conn:
        n = await conn.execute(select(func.count()).select_from(L).where(L.c.org_id == org_id))
        return int(n.scalar_one())


async def no_violations(db: Database, org_id: str) -> None:
    assert await find_violations(db, org_id) == []


async def test_a_confirmed_reservation_survives_its_old_expiry_with_the_sweeper_running(
    db: Database, settings, clock: Clock, org_id: str, redis: aioredis.Redis
) -> None:
    index = RedisExpiryIndex(redis, org_id)
    service = InventoryService(
        db,
        settings,
        clock=clock,
        locker=RedisBalanceLocker(redis),
        expiry_index=index,
        org_id=org_id,
    )
    try:
        await service.restock("stock", [Line("a", 10)])
        kept = await service.reserve("r-1", [Line("a", 4)], ttl_seconds=30)
        other = await service.reserve("r-2", [Line("a", 1)], ttl_seconds=30)
        assert await redis.zscore(index.key, str(kept.reservation.id)) is not None
        entries = await ledger_count(db, org_id)

        result = await service.confirm_reservation("c-1", reservation_id=kept.reservation.id)
        [confirmed] = result.reservations
        assert (confirmed.status, confirmed.expires_at) == ("CONFIRMED", None)
        assert [(ln.sku, ln.remaining) for ln in confirmed.lines or ()] == [("a", 4)]
        assert [(b.sku, b.reserved, b.version) for b in result.balances] == [("a", 5, 3)]
        assert await ledger_count(db, org_id) == entries  # no ledger entry
        assert await redis.zscore(index.key, str(confirmed.id)) is None  # out of the index
        await no_violations(db, org_id)

        clock.advance(3600)
        sweeper = Sweeper(service, index, interval=0.01)
        assert await sweeper.run_once(scan=True) == 1  # only the other one
        assert await sweeper.run_once(scan=True) == 0
        queries = InventoryQueries(db, org_id)
        found = await queries.reservation(confirmed.id)
        assert found is not None and (found.status, found.expires_at) == ("CONFIRMED", None)
        gone = await queries.reservation(other.reservation.id)
        assert gone is not None and gone.status == "EXPIRED"
        assert await figures(db, org_id, "a") == (10, 4, 4)
        assert await committed(db, org_id, "a") == {"a": 4}
        assert await service.due_reservation_ids() == []
        await no_violations(db, org_id)
    finally:
        await service.close()


async def test_it_deducts_in_parts_then_is_committed_and_committed_follows(
    service: InventoryService, db: Database, clock: Clock, org_id: str
) -> None:
    await service.restock("stock", [Line("a", 10), Line("b", 10)])
    made = await service.reserve("r-1", [Line("a", 3), Line("b", 2)], reference=ORDER)
    rid = made.reservation.id
    assert await committed(db, org_id, "a", "b") == {"a": 0, "b": 0}

    await service.confirm_reservation("c-1", reservation_id=rid)
    assert await committed(db, org_id, "a", "b") == {"a": 3, "b": 2}
    assert await figures(db, org_id, "a") == (10, 3, 2)  # reserved includes it; no version
    clock.advance(7200)

    first = await service.deduct("d-1", reservation_id=rid, lines=[Line("a", 2)])
    assert [(r.status, r.expires_at) for r in first.reservations] == [("CONFIRMED", None)]
    assert await committed(db, org_id, "a", "b") == {"a": 1, "b": 2}
    assert await figures(db, org_id, "a") == (8, 1, 3)
    await no_violations(db, org_id)

    second = await service.deduct("d-2", reference=ORDER, lines=[Line("b", 2)])
    assert [r.status for r in second.reservations] == ["CONFIRMED"]
    assert await committed(db, org_id, "a", "b") == {"a": 1, "b": 0}
    await no_violations(db, org_id)

    last = await service.deduct("d-3", reservation_id=rid)
    assert [r.status for r in last.reservations] == ["COMMITTED"]
    assert await committed(db, org_id, "a", "b") == {"a": 0, "b": 0}
    assert await figures(db, org_id, "a") == (7, 0, 4)
    assert await figures(db, org_id, "b") == (8, 0, 3)
    await no_violations(db, org_id)


async def test_confirming_twice_replays_with_one_key_and_is_refused_with_another(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.restock("stock", [Line("a", 5)])
    rid = (await service.reserve("r-1", [Line("a", 2)])).reservation.id
    first = await service.confirm_reservation("c-1", reservation_id=rid)
    assert not first.replayed

    again = await service.confirm_reservation("c-1", reservation_id=rid)
    assert again.replayed
    assert [(r.id, r.status, r.expires_at) for r in again.reservations] == [
        (rid, "CONFIRMED", None)
    ]
    assert [(b.sku, b.reserved, b.version) for b in again.balances] == [("a", 2, 2)]

    with pytest.raises(ReservationNotActiveError) as err:
        await service.confirm_reservation("c-2", reservation_id=rid)
    assert (err.value.reservation_id, err.value.status) == (rid, "CONFIRMED")
    with pytest.raises(IdempotencyKeyReusedError):
        await service.confirm_reservation("c-1", reference=ORDER)
    await no_violations(db, org_id)


async def test_by_reference_it_confirms_every_active_one(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.restock("stock", [Line("a", 10)])
    one = (await service.reserve("r-1", [Line("a", 1)], reference=ORDER)).reservation.id
    two = (await service.reserve("r-2", [Line("a", 2)], reference=ORDER)).reservation.id
    other = await service.reserve("r-3", [Line("a", 4)], reference=Reference("ORDER", "x"))
    result = await service.confirm_reservation("c-1", reference=ORDER)
    assert [(r.id, r.status) for r in result.reservations] == [
        (one, "CONFIRMED"),
        (two, "CONFIRMED"),
    ]
    assert await committed(db, org_id, "a") == {"a": 3}
    replay = await service.confirm_reservation("c-1", reference=ORDER)
    assert replay.replayed and [r.id for r in replay.reservations] == [one, two]
    left = await InventoryQueries(db, org_id).reservation(other.reservation.id)
    assert left is not None and left.status == "ACTIVE"
    with pytest.raises(NotFoundError):  # none ACTIVE left for it
        await service.confirm_reservation("c-2", reference=ORDER)
    released = await service.release("rl-1", reference=ORDER)
    assert sorted(r.status for r in released.reservations) == ["RELEASED", "RELEASED"]
    assert await committed(db, org_id, "a") == {"a": 0}
    await no_violations(db, org_id)


async def test_confirm_of_a_due_reservation_expires_it(
    service: InventoryService, db: Database, clock: Clock, org_id: str
) -> None:
    await service.restock("stock", [Line("a", 5)])
    rid = (await service.reserve("r-1", [Line("a", 2)], ttl_seconds=10)).reservation.id
    clock.advance(10)
    with pytest.raises(ReservationNotActiveError) as err:
        await service.confirm_reservation("c-1", reservation_id=rid)
    assert err.value.status == "EXPIRED"
    found = await InventoryQueries(db, org_id).reservation(rid)
    assert found is not None and found.status == "EXPIRED"
    assert await figures(db, org_id, "a") == (5, 0, 3)  # the EXPIRE entry committed
    await no_violations(db, org_id)


async def test_extend_of_a_confirmed_reservation_is_refused(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.restock("stock", [Line("a", 5)])
    rid = (await service.reserve("r-1", [Line("a", 2)])).reservation.id
    await service.confirm_reservation("c-1", reservation_id=rid)
    with pytest.raises(ReservationNotActiveError) as err:
        await service.extend_reservation("e-1", rid, 600)
    assert err.value.status == "CONFIRMED"
    found = await InventoryQueries(db, org_id).reservation(rid)
    assert found is not None and found.expires_at is None
    await no_violations(db, org_id)


async def test_release_of_a_confirmed_reservation_gives_its_units_back(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.restock("stock", [Line("a", 5)])
    rid = (await service.reserve("r-1", [Line("a", 3)])).reservation.id
    await service.confirm_reservation("c-1", reservation_id=rid)
    part = await service.release("rl-1", reservation_id=rid, lines=[Line("a", 1)])
    assert [r.status for r in part.reservations] == ["CONFIRMED"]
    assert await committed(db, org_id, "a") == {"a": 2}
    rest = await service.release("rl-2", reservation_id=rid)
    assert [r.status for r in rest.reservations] == ["RELEASED"]
    assert await figures(db, org_id, "a") == (5, 0, 4)
    assert await committed(db, org_id, "a") == {"a": 0}
    with pytest.raises(ReservationNotActiveError) as err:
        await service.confirm_reservation("c-2", reservation_id=rid)
    assert err.value.status == "RELEASED"
    await no_violations(db, org_id)


async def test_confirm_needs_exactly_one_of_id_and_reference(service: InventoryService) -> None:
    with pytest.raises(ValidationError):
        await service.confirm_reservation("c-1")
    with pytest.raises(ValidationError):
        await service.confirm_reservation("c-1", reservation_id="1", reference=ORDER)
