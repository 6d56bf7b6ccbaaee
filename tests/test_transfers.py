"""Locations and transfers (issue 11, ARCHITECTURE section 14) on both backends, through the
service and the unit of work: every rule and failure, replays and key reuse, incoming and
stockLevels, and the reconciliation query (conservation included) after every step."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import Clock
from sqlalchemy import select

from stockledger.config import Settings
from stockledger.db.engine import Database
from stockledger.db.models import inventory_ledger as L
from stockledger.domain.errors import (
    IdempotencyKeyReusedError,
    InsufficientStockError,
    LocationUnavailableError,
    NotFoundError,
    TransferNotOpenError,
    ValidationError,
)
from stockledger.domain.ids import transfer_global_id
from stockledger.domain.model import Line, Reference
from stockledger.locks.redis_locks import RedisBalanceLocker
from stockledger.services import InventoryService
from stockledger.services.queries import InventoryQueries
from stockledger.services.reconcile import find_violations
from stockledger.services.records import TransferLineRequest as TL

WAREHOUSE, STORE = "wh", "store"


def tid(n: int) -> str:
    return transfer_global_id(n)


async def figures(db: Database, org_id: str, location: str, sku: str) -> tuple[int, int, int]:
    """(on hand, reserved, incoming) of one balance; zeros when it does not exist."""
    b = await InventoryQueries(db, org_id).balance(sku, location)
    return (0, 0, 0) if b is None else (b.on_hand, b.reserved, b.incoming)


async def no_violations(db: Database, org_id: str) -> None:
    assert await find_violations(db, org_id) == []


async def test_an_immediate_transfer_moves_on_hand_in_one_step(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.restock("s", [Line("a", 10, WAREHOUSE), Line("b", 4, WAREHOUSE)])
    result = await service.transfer(
        "t", WAREHOUSE, STORE, [TL("b", 1), TL("a", 3), TL("a", 2)], reason="rebalance"
    )
    moved = result.transfer
    assert moved.status == "RECEIVED"
    assert [(ln.sku, ln.quantity, ln.received, ln.remaining) for ln in moved.lines] == [
        ("a", 5, 5, 0),
        ("b", 1, 1, 0),
    ]
    assert [(e.event_type, e.location, e.sku, e.on_hand_delta) for e in result.ledger_entries] == [
        ("TRANSFER_OUT", WAREHOUSE, "a", -5),
        ("TRANSFER_OUT", WAREHOUSE, "b", -1),
        ("TRANSFER_IN", STORE, "a", 5),
        ("TRANSFER_IN", STORE, "b", 1),
    ]
    assert {e.transfer_id for e in result.ledger_entries} == {moved.id}
    assert all(e.id is not None and e.reason == "rebalance" for e in result.ledger_entries)
    assert [(b.location, b.sku, b.on_hand, b.version) for b in result.balances] == [
        (STORE, "a", 5, 1),
        (STORE, "b", 1, 1),
        (WAREHOUSE, "a", 5, 2),
        (WAREHOUSE, "b", 3, 2),
    ]
    store = await InventoryQueries(db, org_id).location(STORE)
    assert store is not None and (store.type, store.name, store.active) == (
        "WAREHOUSE",
        STORE,
        True,
    )
    await no_violations(db, org_id)


async def test_in_transit_units_are_incoming_until_received_in_parts(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.restock("s", [Line("a", 10, WAREHOUSE)])
    sent = await service.transfer(
        "t", WAREHOUSE, STORE, [TL("a", 6)], in_transit=True, reference=Reference("PO", "1")
    )
    assert sent.transfer.status == "IN_TRANSIT"
    assert [e.event_type for e in sent.ledger_entries] == ["TRANSFER_OUT"]
    # The destination balance exists with nothing on hand and no entry, showing its incoming.
    assert [(b.location, b.on_hand, b.version) for b in sent.balances] == [
        (STORE, 0, 0),
        (WAREHOUSE, 4, 2),
    ]
    assert await figures(db, org_id, STORE, "a") == (0, 0, 6)
    await no_violations(db, org_id)
    levels = await InventoryQueries(db, org_id).stock_levels("a")
    assert levels is not None
    assert (levels.on_hand, levels.incoming) == (4, 6)

    part = await service.receive_transfer("r1", tid(sent.transfer.id), [TL("a", 2)])
    assert part.transfer.status == "PARTIALLY_RECEIVED"
    assert [(ln.received, ln.remaining) for ln in part.transfer.lines] == [(2, 4)]
    assert [(e.event_type, e.location, e.on_hand_delta) for e in part.ledger_entries] == [
        ("TRANSFER_IN", STORE, 2)
    ]
    assert await figures(db, org_id, STORE, "a") == (2, 0, 4)
    await no_violations(db, org_id)

    rest = await service.receive_transfer("r2", tid(sent.transfer.id))
    assert rest.transfer.status == "RECEIVED"
    assert await figures(db, org_id, STORE, "a") == (6, 0, 0)
    assert rest.ledger_entries[0].reference == Reference("PO", "1")
    await no_violations(db, org_id)


async def test_cancel_returns_only_what_is_still_in_transit(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.restock("s", [Line("a", 10, WAREHOUSE)])
    sent = await service.transfer("t", WAREHOUSE, STORE, [TL("a", 6)], in_transit=True)
    await service.receive_transfer("r1", tid(sent.transfer.id), [TL("a", 2)])
    cancelled = await service.cancel_transfer("c", tid(sent.transfer.id), "truck broke down")
    assert cancelled.transfer.status == "CANCELLED"
    assert [(ln.received, ln.returned, ln.remaining) for ln in cancelled.transfer.lines] == [
        (2, 4, 0)
    ]
    assert [
        (e.event_type, e.location, e.on_hand_delta, e.reason) for e in cancelled.ledger_entries
    ] == [("TRANSFER_IN", WAREHOUSE, 4, "truck broke down")]
    assert await figures(db, org_id, WAREHOUSE, "a") == (8, 0, 0)
    assert await figures(db, org_id, STORE, "a") == (2, 0, 0)
    await no_violations(db, org_id)
    with pytest.raises(TransferNotOpenError) as after_cancel:
        await service.receive_transfer("r2", tid(sent.transfer.id))
    assert after_cancel.value.status == "CANCELLED"
    done = await service.transfer("t2", WAREHOUSE, STORE, [TL("a", 1)], in_transit=True)
    await service.receive_transfer("r3", tid(done.transfer.id))
    with pytest.raises(TransferNotOpenError) as after_receipt:
        await service.cancel_transfer("c2", tid(done.transfer.id), "too late")
    assert after_receipt.value.status == "RECEIVED"
    await no_violations(db, org_id)


async def test_refusals_change_nothing(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.restock("s", [Line("a", 5, WAREHOUSE)])
    await service.reserve("hold", [Line("a", 3, WAREHOUSE)])
    before = await figures(db, org_id, WAREHOUSE, "a")
    with pytest.raises(InsufficientStockError) as short:  # reserved units stay where they are
        await service.transfer("t1", WAREHOUSE, STORE, [TL("a", 3)])
    assert [(s.requested, s.available) for s in short.value.shortages] == [(3, 2)]
    with pytest.raises(ValidationError) as same:
        await service.transfer("t2", WAREHOUSE, WAREHOUSE, [TL("a", 1)])
    assert same.value.field == "toLocation"
    sent = await service.transfer("t3", WAREHOUSE, STORE, [TL("a", 2)], in_transit=True)
    with pytest.raises(ValidationError) as over:
        await service.receive_transfer("r1", tid(sent.transfer.id), [TL("a", 3)])
    assert over.value.field == "lines.0.quantity"
    with pytest.raises(ValidationError) as other_sku:
        await service.receive_transfer("r2", tid(sent.transfer.id), [TL("a", 1), TL("zz", 1)])
    assert other_sku.value.field == "lines.1.sku"
    for unknown in (tid(999_999), "not-an-id", "1"):
        with pytest.raises(NotFoundError):
            await service.receive_transfer(f"r-{unknown}", unknown)
        with pytest.raises(NotFoundError):
            await service.cancel_transfer(f"c-{unknown}", unknown, "why")
    assert await figures(db, org_id, WAREHOUSE, "a") == (before[0] - 2, 3, 0)
    assert await figures(db, org_id, STORE, "a") == (0, 0, 2)
    await no_violations(db, org_id)
    # A refused call consumed no key: the same key does the right request afterwards.
    again = await service.receive_transfer("r1", tid(sent.transfer.id), [TL("a", 2)])
    assert again.transfer.status == "RECEIVED" and not again.replayed


async def test_an_inactive_location_takes_nothing_new_but_can_be_emptied(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.create_location("l1", STORE, "Main Street", "STORE")
    await service.restock("s", [Line("a", 10, STORE), Line("a", 10, WAREHOUSE)])
    held = await service.reserve("hold", [Line("a", 2, STORE)])
    sent = await service.transfer("t-back", STORE, WAREHOUSE, [TL("a", 1)], in_transit=True)
    closed = await service.update_location("l2", STORE, active=False)
    assert closed.location.active is False and closed.location.name == "Main Street"
    for call in (
        service.restock("s2", [Line("a", 1, STORE)]),
        service.reserve("r2", [Line("a", 1, STORE)]),
        service.transfer("t-in", WAREHOUSE, STORE, [TL("a", 1)]),
        service.transfer("t-in2", WAREHOUSE, STORE, [TL("a", 1)], in_transit=True),
    ):
        with pytest.raises(LocationUnavailableError) as refused:
            await call
        assert (refused.value.location, refused.value.exists) == (STORE, True)
    # What it holds can still leave: release, deduct, adjust, transfer out, a cancel back.
    await service.release("rel", reservation_id=held.reservation.id, lines=[Line("a", 1, STORE)])
    await service.deduct("ded", reservation_id=held.reservation.id)
    await service.deduct("direct", lines=[Line("a", 1, STORE)])
    await service.adjust("adj", "a", STORE, delta=-1, reason="damaged")
    await service.transfer("t-out", STORE, WAREHOUSE, [TL("a", 2)])
    await service.cancel_transfer("cancel", tid(sent.transfer.id), "not needed")
    assert await figures(db, org_id, STORE, "a") == (5, 0, 0)
    reopened = await service.update_location("l3", STORE, active=True, name="Main St.")
    assert (reopened.location.active, reopened.location.name) == (True, "Main St.")
    await service.restock("s3", [Line("a", 1, STORE)])
    await no_violations(db, org_id)


async def test_location_commands_and_their_errors(
    service: InventoryService, db: Database, org_id: str
) -> None:
    made = await service.create_location("c1", "returns", "Returns", "VIRTUAL")
    assert (made.location.type, made.replayed) == ("VIRTUAL", False)
    replay = await service.create_location("c1", "returns", "Returns", "VIRTUAL")
    assert replay.replayed and replay.location == made.location
    with pytest.raises(IdempotencyKeyReusedError):
        await service.create_location("c1", "returns", "Other name", "VIRTUAL")
    with pytest.raises(ValidationError) as exists:
        await service.create_location("c2", "returns", "Returns again")
    assert exists.value.field == "code"
    with pytest.raises(ValidationError):
        await service.create_location("c3", "x", "X", "SHOP")
    with pytest.raises(NotFoundError):
        await service.update_location("u1", "nowhere", name="N")
    with pytest.raises(ValidationError):
        await service.update_location("u2", "returns")
    page = await InventoryQueries(db, org_id).locations()
    assert "returns" in [loc.code for _, loc in page.edges]


async def test_registration_can_be_required(
    db: Database, settings: Settings, clock: Clock, org_id: str
) -> None:
    strict = InventoryService(
        db,
        settings.model_copy(update={"require_registered_locations": True}),
        clock=clock,
        org_id=org_id,
    )
    try:
        for call in (
            strict.restock("s", [Line("a", 1, "unregistered")]),
            strict.adjust("a", "a", "unregistered", delta=1, reason="count"),
            strict.reserve("r", [Line("a", 1, "unregistered")]),
            strict.deduct("d", lines=[Line("a", 1, "unregistered")]),
        ):
            with pytest.raises(LocationUnavailableError) as refused:
                await call
            assert (refused.value.location, refused.value.exists) == ("unregistered", False)
        await strict.create_location("c", "unregistered", "Now registered")
        await strict.restock("s", [Line("a", 3, "unregistered")])
        with pytest.raises(LocationUnavailableError):
            await strict.transfer("t", "unregistered", "elsewhere", [TL("a", 1)])
        with pytest.raises(LocationUnavailableError):
            await strict.transfer("t2", "elsewhere", "unregistered", [TL("a", 1)])
        assert await figures(db, org_id, "unregistered", "a") == (3, 0, 0)
    finally:
        await strict.close()


async def test_every_transfer_call_replays_and_keys_are_not_shared_across_them(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.restock("s", [Line("a", 10, WAREHOUSE)])
    sent = await service.transfer("t", WAREHOUSE, STORE, [TL("a", 4)], in_transit=True)
    again = await service.transfer("t", WAREHOUSE, STORE, [TL("a", 4)], in_transit=True)
    assert again.replayed and again.transfer == sent.transfer
    assert [e.id for e in again.ledger_entries] == [e.id for e in sent.ledger_entries]
    assert [b.key for b in again.balances] == [b.key for b in sent.balances]
    part = await service.receive_transfer("r", tid(sent.transfer.id), [TL("a", 1)])
    part_again = await service.receive_transfer("r", tid(sent.transfer.id), [TL("a", 1)])
    assert part_again.replayed and [e.id for e in part_again.ledger_entries] == [
        e.id for e in part.ledger_entries
    ]
    assert part_again.transfer.status == "PARTIALLY_RECEIVED"
    cancel = await service.cancel_transfer("c", tid(sent.transfer.id), "why")
    cancel_again = await service.cancel_transfer("c", tid(sent.transfer.id), "why")
    assert cancel_again.replayed and cancel_again.transfer == cancel.transfer
    reused: list[Any] = [
        service.transfer("r", WAREHOUSE, STORE, [TL("a", 1)]),
        service.receive_transfer("t", tid(sent.transfer.id)),
        service.cancel_transfer("r", tid(sent.transfer.id), "why"),
        service.restock("c", [Line("a", 1, WAREHOUSE)]),
        service.transfer("t", WAREHOUSE, STORE, [TL("a", 5)], in_transit=True),
    ]
    for call in reused:
        with pytest.raises(IdempotencyKeyReusedError):
            await call
    assert await figures(db, org_id, WAREHOUSE, "a") == (9, 0, 0)
    assert await figures(db, org_id, STORE, "a") == (1, 0, 0)
    await no_violations(db, org_id)


async def test_stock_levels_total_the_balances_of_twenty_locations(
    service: InventoryService, db: Database, org_id: str
) -> None:
    codes = [f"loc-{i:02d}" for i in range(20)]
    await service.restock("s", [Line("a", 10 + i, code) for i, code in enumerate(codes)])
    for i in range(0, 20, 4):
        await service.reserve(f"r{i}", [Line("a", i + 1, codes[i])])
        await service.transfer(f"t{i}", codes[i + 1], codes[i + 2], [TL("a", 3)], in_transit=True)
    levels = await InventoryQueries(db, org_id).stock_levels("a")
    assert levels is not None
    assert [b.location for b in levels.balances] == codes
    assert levels.on_hand == sum(b.on_hand for b in levels.balances) == sum(range(10, 30)) - 15
    assert (
        levels.reserved
        == sum(b.reserved for b in levels.balances)
        == sum(i + 1 for i in range(0, 20, 4))
    )
    assert levels.available == levels.on_hand - levels.reserved
    assert levels.incoming == sum(b.incoming for b in levels.balances) == 15
    assert await InventoryQueries(db, org_id).stock_levels("never") is None


async def test_opposite_transfers_race_reserves_at_both_ends(
    db: Database, settings: Settings, clock: Clock, org_id: str, redis: aioredis.Redis
) -> None:
    """A->B and B->A of the same SKUs with reserves at both ends: no deadlock reaches a
    caller, nothing goes negative, and conservation holds once they are done."""
    service = InventoryService(
        db, settings, clock=clock, locker=RedisBalanceLocker(redis), org_id=org_id
    )
    try:
        skus = ["a", "b", "c"]
        await service.restock("s", [Line(s, 200, loc) for s in skus for loc in ("A", "B")])

        async def call(n: int) -> str:
            kind = n % 4
            lines = [TL(skus[n % 3], 2), TL(skus[(n + 1) % 3], 1)]
            try:
                if kind == 0:
                    await service.transfer(f"ab-{n}", "A", "B", lines, in_transit=n % 8 == 0)
                elif kind == 1:
                    await service.transfer(f"ba-{n}", "B", "A", lines)
                else:
                    where = "A" if kind == 2 else "B"
                    await service.reserve(
                        f"r-{n}", [Line(ln.sku, ln.quantity, where) for ln in lines]
                    )
            except InsufficientStockError:
                return "short"
            return "ok"

        outcomes = await asyncio.gather(*(call(n) for n in range(240)))
        assert outcomes.count("ok") > 200, outcomes
        await no_violations(db, org_id)
        async with db.read() as conn:
            rows = (await conn.execute(select(L.c.on_hand_after).where(L.c.org_id == org_id))).all()
        assert min(r.on_hand_after for r in rows) >= 0
    finally:
        await service.close()


async def test_a_transfer_expires_due_holds_at_its_source_first(
    service: InventoryService, db: Database, org_id: str, clock: Clock
) -> None:
    """Section 14 with section 11's "expired holds never refuse": a due, unswept reservation
    at the source is expired in the transfer's transaction, then the units move (found by the
    stateful test: the unit of work loaded due holds for short reserves only)."""
    await service.restock("s", [Line("a", 11, WAREHOUSE)])
    await service.reserve("r1", [Line("a", 5, WAREHOUSE)], ttl_seconds=1)
    await service.reserve("r2", [Line("a", 5, WAREHOUSE)], ttl_seconds=600)
    clock.advance(2)
    moved = await service.transfer("t", WAREHOUSE, STORE, [TL("a", 2)])
    assert moved.transfer.status == "RECEIVED"
    assert await figures(db, org_id, WAREHOUSE, "a") == (9, 5, 0)
    await no_violations(db, org_id)
