"""The transactional outbox (issue 12, ARCHITECTURE section 15) on both backends: every write's
events are in ``outbox_event`` in its transaction, shaped as Standard Webhooks bodies; a write
that rolls back leaves none; the balance an event carries is the ledger's at that version."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import Clock
from sqlalchemy import select

from stockledger.config import Settings
from stockledger.db.engine import Database
from stockledger.db.models import inventory_ledger as L
from stockledger.db.models import outbox_event as O
from stockledger.db.store import SqlTransaction
from stockledger.domain.errors import InsufficientStockError
from stockledger.domain.ids import balance_global_id, reservation_global_id
from stockledger.domain.model import Line
from stockledger.services import InventoryService
from stockledger.services.reconcile import find_violations


async def events_of(db: Database, org_id: str) -> list[dict[str, Any]]:
    async with db.read() as conn:
        rows = (await conn.execute(select(O).where(O.c.org_id == org_id).order_by(O.c.id))).all()
    out = []
    for r in rows:
        body = json.loads(r.payload)
        assert body["type"] == r.event_type
        out.append(body)
    return out


async def ledger_of(db: Database, org_id: str) -> list[Any]:
    async with db.read() as conn:
        return list(
            (await conn.execute(select(L).where(L.c.org_id == org_id).order_by(L.c.id))).all()
        )


async def test_each_write_inserts_its_events_with_the_ledgers_balance(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.restock("s", [Line("A", 5), Line("B", 1)])
    await service.set_reorder_point("rp", "A", minimum_level=2, reorder_quantity=10)
    held = await service.reserve("r", [Line("A", 3)])
    await service.deduct("d", lines=[Line("B", 1)])
    with pytest.raises(InsufficientStockError):  # refused: no event
        await service.reserve("r2", [Line("A", 9)])
    events = await events_of(db, org_id)
    assert [(e["type"], e["data"]["balance"]["sku"]) for e in events] == [
        ("STOCK_CHANGED", "A"),
        ("STOCK_CHANGED", "B"),
        ("STOCK_CHANGED", "A"),
        ("STOCK_LOW", "A"),
        ("STOCK_CHANGED", "B"),
        ("STOCK_OUT", "B"),
    ]
    low = events[3]
    assert set(low) == {"type", "timestamp", "data"}
    assert low["data"]["org"] == org_id
    assert low["data"]["balance"] == {
        "id": balance_global_id("default", "A"),
        "sku": "A",
        "location": "default",
        "onHand": 5,
        "reserved": 3,
        "committed": 0,
        "available": 2,
        "incoming": 0,
        "version": 2,
        "lowStock": True,
        "reorderPoint": {"minimumLevel": 2, "reorderQuantity": 10, "maximumLevel": None},
    }
    # Every STOCK_CHANGED names its entries, and its balance is the ledger's after them.
    ledger = {r.id: r for r in await ledger_of(db, org_id)}
    for event in (e for e in events if e["type"] == "STOCK_CHANGED"):
        b = event["data"]["balance"]
        named = [ledger[int(i)] for i in event["data"]["ledgerEntryIds"]]
        assert named and all((n.location, n.sku) == (b["location"], b["sku"]) for n in named)
        last = named[-1]
        assert (last.on_hand_after, last.reserved_after) == (b["onHand"], b["reserved"])
        upto = [r for r in ledger.values() if (r.location, r.sku) == (last.location, last.sku)]
        assert b["version"] == sum(1 for r in upto if r.id <= last.id)
    assert held.reservation.id is not None
    assert await find_violations(db, org_id) == []


async def test_an_expiry_tells_of_the_reservation(
    service: InventoryService, db: Database, org_id: str, clock: Clock
) -> None:
    await service.restock("s", [Line("A", 2)])
    held = await service.reserve("r", [Line("A", 2)], ttl_seconds=60)
    clock.advance(61)
    await service.expire_reservation(held.reservation.id)
    events = await events_of(db, org_id)
    expired = [e for e in events if e["type"] == "RESERVATION_EXPIRED"]
    assert [e["data"]["reservation"]["id"] for e in expired] == [
        reservation_global_id(held.reservation.id)
    ]
    assert expired[0]["data"]["reservation"]["status"] == "EXPIRED"
    # The reserve took the last units (OUT); the expiry gives them back (REPLENISHED).
    assert [e["type"] for e in events] == [
        "STOCK_CHANGED",
        "STOCK_CHANGED",
        "STOCK_OUT",
        "STOCK_CHANGED",
        "STOCK_REPLENISHED",
        "RESERVATION_EXPIRED",
    ]


async def test_a_batch_that_fails_after_its_ledger_insert_leaves_no_event(
    service: InventoryService, db: Database, org_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An injected error at the outbox insert, after the ledger's: the batch rolls back
    whole, so neither the entries nor the events are there; the call runs again and then
    writes both once."""
    real = SqlTransaction.insert_events
    failures = iter([True])

    async def flaky(self: SqlTransaction, rows: Any, now: Any) -> None:
        if next(failures, False):
            raise ConnectionResetError("injected: the connection broke mid-batch")
        await real(self, rows, now)

    monkeypatch.setattr(SqlTransaction, "insert_events", flaky)
    try:
        await service.restock("s", [Line("A", 5)])
    except Exception:  # the injected failure may reach the caller: then it retries itself
        await service.restock("s", [Line("A", 5)])
    assert next(failures, None) is None, "the failure was injected"
    events = await events_of(db, org_id)
    assert [e["type"] for e in events] == ["STOCK_CHANGED"]
    assert len(await ledger_of(db, org_id)) == 1
    assert await find_violations(db, org_id) == []


async def test_the_outbox_can_be_turned_off(
    db: Database, settings: Settings, clock: Clock, org_id: str
) -> None:
    quiet = InventoryService(
        db, settings.model_copy(update={"outbox": False}), clock=clock, org_id=org_id
    )
    try:
        await quiet.restock("s", [Line("A", 5)])
    finally:
        await quiet.close()
    assert await events_of(db, org_id) == []
