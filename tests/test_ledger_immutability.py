"""The ledger is append-only in the database itself, and SKUs, locations and idempotency keys
compare exactly (no case folding, no trailing-space padding) on both engines."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from stockledger.db.engine import Database
from stockledger.db.models import inventory_balance as B
from stockledger.db.models import inventory_ledger as L
from stockledger.services import InventoryService, Line
from stockledger.services.reconcile import find_violations

COLUMNS = (
    "id, org_id, location, sku, event_type, on_hand_delta, reserved_delta, on_hand_after, "
    "reserved_after, reservation_id, ref_type, ref_id, reason, idempotency_key, created_at"
)


async def ledger_rows(db: Database, org_id: str) -> list[Any]:
    async with db.read() as conn:
        return list(await conn.execute(select(L).where(L.c.org_id == org_id).order_by(L.c.id)))


async def restocked(service: InventoryService, org_id: str) -> list[Any]:
    """Restock two SKUs; return the org's ledger entries (the rows the tests try to change)."""
    result = await service.restock("restock-1", [Line("SKU-1", 5), Line("SKU-2", 7)])
    assert [e.on_hand_delta for e in result.ledger_entries] == [5, 7]
    rows = await ledger_rows(service.db, org_id)
    assert len(rows) == 2
    return rows


async def refused(db: Database, sql: str, **params: Any) -> None:
    """Run ``sql`` on a raw connection; the database must refuse it (the append-only trigger)."""
    with pytest.raises(DBAPIError, match="append-only"):
        async with db.engine.connect() as conn:
            async with conn.begin():
                await conn.execute(text(sql), params)


UPDATES = {
    "one column": "UPDATE inventory_ledger SET on_hand_delta = 500 WHERE id = :id",
    "the running totals": (
        "UPDATE inventory_ledger SET on_hand_after = on_hand_after + 1, "
        "reserved_after = reserved_after + 1 WHERE id = :id"
    ),
    "a no-op": "UPDATE inventory_ledger SET reason = reason WHERE id = :id",
    "every row of the org": "UPDATE inventory_ledger SET sku = 'other' WHERE org_id = :org",
}
DELETES = {
    "one row": "DELETE FROM inventory_ledger WHERE id = :id",
    "every row of the org": "DELETE FROM inventory_ledger WHERE org_id = :org",
    "every row": "DELETE FROM inventory_ledger",
}


@pytest.mark.parametrize("sql", UPDATES.values(), ids=UPDATES.keys())
async def test_update_of_a_ledger_entry_is_refused(
    service: InventoryService, db: Database, org_id: str, sql: str
) -> None:
    before = await restocked(service, org_id)
    await refused(db, sql, id=before[0].id, org=org_id)
    assert await ledger_rows(db, org_id) == before


@pytest.mark.parametrize("sql", DELETES.values(), ids=DELETES.keys())
async def test_delete_of_a_ledger_entry_is_refused(
    service: InventoryService, db: Database, org_id: str, sql: str
) -> None:
    before = await restocked(service, org_id)
    await refused(db, sql, id=before[0].id, org=org_id)
    assert await ledger_rows(db, org_id) == before


async def test_replace_of_a_ledger_entry_is_refused(
    service: InventoryService, db: Database, org_id: str, backend: str
) -> None:
    """REPLACE deletes the row with the same id and inserts a new one: a rewrite in disguise."""
    before = await restocked(service, org_id)
    verb = "REPLACE" if backend == "mysql" else "INSERT OR REPLACE"
    await refused(
        db,
        f"{verb} INTO inventory_ledger ({COLUMNS}) "
        "SELECT id, org_id, location, sku, event_type, 500, reserved_delta, 500, "
        "reserved_after, reservation_id, ref_type, ref_id, reason, idempotency_key, created_at "
        "FROM inventory_ledger WHERE id = :id",
        id=before[0].id,
    )
    assert await ledger_rows(db, org_id) == before


async def test_upsert_onto_a_ledger_entry_is_refused(
    service: InventoryService, db: Database, org_id: str, backend: str
) -> None:
    before = await restocked(service, org_id)
    on_conflict = (
        "ON DUPLICATE KEY UPDATE on_hand_delta = 500"
        if backend == "mysql"
        else "ON CONFLICT (id) DO UPDATE SET on_hand_delta = 500"
    )
    await refused(
        db,
        f"INSERT INTO inventory_ledger ({COLUMNS}) "
        f"SELECT {COLUMNS} FROM inventory_ledger WHERE id = :id {on_conflict}",
        id=before[0].id,
    )
    assert await ledger_rows(db, org_id) == before


async def test_refused_statement_leaves_the_service_consistent(
    service: InventoryService, db: Database, org_id: str
) -> None:
    before = await restocked(service, org_id)
    await refused(db, "DELETE FROM inventory_ledger WHERE id = :id", id=before[1].id)
    await service.restock("restock-2", [Line("SKU-1", 1)])
    assert await find_violations(db, org_id) == []
    rows = await ledger_rows(db, org_id)
    assert rows[:2] == before
    assert [(r.sku, r.on_hand_delta, r.on_hand_after) for r in rows[2:]] == [("SKU-1", 1, 6)]


VARIANTS = ["a", "A", "a "]  # distinct SKUs: case and a trailing space both count


async def test_sku_and_location_compare_exactly(
    service: InventoryService, db: Database, org_id: str
) -> None:
    for i, sku in enumerate(VARIANTS, start=1):
        result = await service.restock(f"sku-{i}", [Line(sku, i)])
        assert [(b.sku, b.on_hand, b.version) for b in result.balances] == [(sku, i, 1)]
    for i, location in enumerate(["WH", "wh", "WH "], start=1):
        await service.restock(f"loc-{i}", [Line("SKU", 10 * i, location=location)])

    async with db.read() as conn:
        rows = {
            (r.location, r.sku): r.on_hand
            for r in await conn.execute(select(B).where(B.c.org_id == org_id))
        }
        only_a = list(
            await conn.execute(
                select(B.c.sku, B.c.on_hand).where(B.c.org_id == org_id, B.c.sku == "a")
            )
        )
    assert rows == {
        ("default", "a"): 1,
        ("default", "A"): 2,
        ("default", "a "): 3,
        ("WH", "SKU"): 10,
        ("wh", "SKU"): 20,
        ("WH ", "SKU"): 30,
    }
    assert only_a == [("a", 1)]

    # Reserving all of "a " leaves "a" and "A" untouched; "a " then has nothing available.
    reserved = await service.reserve("reserve-1", [Line("a ", 3)])
    assert [(b.sku, b.reserved) for b in reserved.balances] == [("a ", 3)]
    again = await service.reserve("reserve-2", [Line("a", 1), Line("A", 2)])
    assert sorted((b.sku, b.reserved, b.available) for b in again.balances) == [
        ("A", 2, 0),
        ("a", 1, 0),
    ]
    assert await find_violations(db, org_id) == []


async def test_idempotency_keys_compare_exactly(
    service: InventoryService, db: Database, org_id: str
) -> None:
    """Keys differing only in case or a trailing space are different keys, not replays."""
    results = [await service.restock(key, [Line("SKU-1", 1)]) for key in ["k", "K", "k "]]
    assert [r.replayed for r in results] == [False, False, False]
    assert [r.balances[0].on_hand for r in results] == [1, 2, 3]
    replay = await service.restock("k ", [Line("SKU-1", 1)])
    assert replay.replayed and replay.balances[0].on_hand == 3
    assert await find_violations(db, org_id) == []
