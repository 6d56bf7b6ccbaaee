"""Alembic migrations on an empty database of each engine: upgrade, no drift from the models,
downgrade to nothing, and the round trip back."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import MYSQL_URL, make_settings, require_server
from sqlalchemy import CheckConstraint, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.sql.elements import conv

from stockledger.db.engine import create_database
from stockledger.db.migrate import current_revision, downgrade, head_revision, upgrade
from stockledger.db.models import LEDGER_TRIGGER_NAMES, metadata
from stockledger.services import InventoryService, Line
from stockledger.services.reconcile import find_violations

MODEL_TABLES = set(metadata.tables)


@pytest.fixture
def empty_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database on ``backend``: a new SQLite file, or a scratch MariaDB
    database (a unique name, dropped afterwards)."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.sqlite3'}"
        return
    require_server("MariaDB/MySQL", MYSQL_URL, 3306)
    name = f"{make_url(MYSQL_URL).database}_migrations_{uuid.uuid4().hex[:8]}"
    server = make_url(MYSQL_URL).set(database="")

    async def run(sql: str) -> None:
        engine = create_async_engine(server)
        try:
            async with engine.connect() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    asyncio.run(run(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    try:
        yield str(make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False))
    finally:
        asyncio.run(run(f"DROP DATABASE IF EXISTS `{name}`"))


def inspect_sync(url: str, fn: Any) -> Any:
    """Run ``fn(sync_connection)`` against ``url`` on a throwaway engine."""

    async def go() -> Any:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(fn)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def revision_of(url: str) -> str | None:
    async def go() -> str | None:
        engine = create_async_engine(url)
        try:
            return await current_revision(engine)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def drift(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, metadata))


def table_names(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def trigger_names(conn: Connection) -> set[str]:
    if conn.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
    else:
        sql = (
            "SELECT trigger_name FROM information_schema.triggers WHERE trigger_schema = DATABASE()"
        )
    return {row[0] for row in conn.execute(text(sql))}


def _norm(sql: str) -> str:
    """A CHECK expression as the server may echo it back: no quotes, spaces or case."""
    return re.sub(r"[\s`\"]", "", sql).lower()


def check_constraints(conn: Connection) -> dict[str, set[tuple[str, str]]]:
    insp = inspect(conn)
    return {
        t: {(ck["name"], _norm(ck["sqltext"])) for ck in insp.get_check_constraints(t)}
        for t in MODEL_TABLES
    }


def _convention_name(table: str, ck: CheckConstraint) -> str:
    """The name after models.py's "ck_%(table_name)s_%(constraint_name)s" convention (SQLAlchemy
    2.1 applies it when the constraint is attached; older versions leave the short name)."""
    name = str(ck.name)
    return name if isinstance(ck.name, conv) else f"ck_{table}_{name}"


def model_check_constraints() -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for name, table in metadata.tables.items():
        out[name] = {
            (_convention_name(name, ck), _norm(str(ck.sqltext)))
            for ck in table.constraints
            if isinstance(ck, CheckConstraint)
        }
    return out


def dialect_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "mysql"


def test_upgrade_empty_database_to_head(empty_url: str) -> None:
    assert revision_of(empty_url) is None
    upgrade(empty_url, "head")
    assert revision_of(empty_url) == head_revision()
    assert inspect_sync(empty_url, table_names) == MODEL_TABLES | {"alembic_version"}
    assert inspect_sync(empty_url, trigger_names) == set(
        LEDGER_TRIGGER_NAMES[dialect_of(empty_url)]
    )
    upgrade(empty_url, "head")  # already at head: a no-op, not an error
    assert revision_of(empty_url) == head_revision()


def test_no_drift_between_models_and_migrations(empty_url: str) -> None:
    upgrade(empty_url, "head")
    # compare_type covers lengths, BIGINT vs INTEGER, nullability and (on MariaDB) the
    # ExactString collation; nothing is filtered.
    assert inspect_sync(empty_url, drift) == []


def test_check_constraints_match_models(empty_url: str) -> None:
    """Alembic's compare_metadata does not compare CHECK constraints, so compare them here."""
    upgrade(empty_url, "head")
    assert inspect_sync(empty_url, check_constraints) == model_check_constraints()


def test_engine_specific_schema(empty_url: str, backend: str) -> None:
    """What compare_metadata cannot see: DATETIME(6) and InnoDB/utf8mb4 on MariaDB (alembic
    reports no drift for DATETIME vs DATETIME(6)), AUTOINCREMENT (ids never reused) on SQLite."""
    upgrade(empty_url, "head")

    def facts(conn: Connection) -> dict[str, Any]:
        if backend == "sqlite":
            rows = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
            return {"autoincrement": {n for n, sql in rows if "AUTOINCREMENT" in sql.upper()}}
        tables = conn.execute(
            text(
                "SELECT table_name, engine, table_collation FROM information_schema.tables "
                "WHERE table_schema = DATABASE() AND table_name <> 'alembic_version'"
            )
        )
        datetimes = conn.execute(
            text(
                "SELECT table_name, column_name, datetime_precision "
                "FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND data_type = 'datetime'"
            )
        )
        return {
            "tables": {(t, e, c.split("_")[0]) for t, e, c in tables},
            "datetimes": {(t, col, int(p)) for t, col, p in datetimes},
        }

    got = inspect_sync(empty_url, facts)
    if backend == "sqlite":
        # Ids never reused: ledger entries, reservations, API keys, outbox events (the relay
        # reads them in order), webhook endpoints and deliveries.
        assert got == {
            "autoincrement": {
                "api_key",
                "inventory_ledger",
                "reservation",
                "outbox_event",
                "webhook_endpoint",
                "webhook_delivery",
            }
        }
        return
    assert got["tables"] == {(t, "InnoDB", "utf8mb4") for t in MODEL_TABLES}
    expected_datetimes = {
        (t.name, c.name, 6)
        for t in metadata.tables.values()
        for c in t.columns
        if c.name.endswith("_at")
    }
    assert got["datetimes"] == expected_datetimes


def test_downgrade_to_base_and_round_trip(empty_url: str) -> None:
    upgrade(empty_url, "head")
    downgrade(empty_url, "base")
    assert inspect_sync(empty_url, table_names) == {"alembic_version"}
    assert inspect_sync(empty_url, trigger_names) == set()
    assert revision_of(empty_url) is None

    upgrade(empty_url, "head")
    assert revision_of(empty_url) == head_revision()
    assert inspect_sync(empty_url, drift) == []
    assert inspect_sync(empty_url, check_constraints) == model_check_constraints()
    assert inspect_sync(empty_url, trigger_names) == set(
        LEDGER_TRIGGER_NAMES[dialect_of(empty_url)]
    )

    async def use_it() -> list[str]:
        settings = make_settings()
        db = create_database(settings, empty_url)
        try:
            service = InventoryService(db, settings, org_id="round-trip")
            result = await service.restock("k-1", [Line("SKU-1", 3)])
            assert [(b.sku, b.on_hand, b.version) for b in result.balances] == [("SKU-1", 3, 1)]
            return await find_violations(db, "round-trip")
        finally:
            await db.dispose()

    assert asyncio.run(use_it()) == []


def _migrate_process(url: str, data_dir: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKLEDGER_")}
    env["STOCKLEDGER_DATABASE_URL"] = url
    env["STOCKLEDGER_DATA_DIR"] = str(data_dir)  # where the first API key is written
    return subprocess.Popen(
        [sys.executable, "-m", "stockledger.cli", "migrate"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_migration_that_failed_half_way_runs_again(empty_url: str) -> None:
    """The state a failed first run left (issue 13): the tables there, no version row. The
    next run must complete instead of failing on "table already exists"."""
    upgrade(empty_url, "head")
    inspect_sync(
        empty_url, lambda conn: (conn.execute(text("DELETE FROM alembic_version")), conn.commit())
    )
    assert revision_of(empty_url) is None

    upgrade(empty_url, "head")
    assert revision_of(empty_url) == head_revision()
    assert inspect_sync(empty_url, drift) == []
    assert inspect_sync(empty_url, trigger_names) == set(
        LEDGER_TRIGGER_NAMES[dialect_of(empty_url)]
    )


def test_replicas_that_migrate_at_once_all_succeed(empty_url: str, tmp_path: Path) -> None:
    """Four `stockledger migrate` processes started together on an empty database: one
    migrates, the others wait for its lock and find the schema at head; and one of them,
    not four, makes the first API key."""
    procs = [_migrate_process(empty_url, tmp_path / f"data-{i}") for i in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in outputs]
    assert revision_of(empty_url) == head_revision()
    assert inspect_sync(empty_url, drift) == []
    keys = inspect_sync(
        empty_url, lambda c: c.execute(text("SELECT COUNT(*) FROM api_key")).scalar()
    )
    assert keys == 1
    assert sum("created the first API key" in out for out, _ in outputs) == 1


def test_0005_keeps_every_reservation_and_line_and_its_downgrade_keeps_the_holds(
    empty_url: str,
) -> None:
    """Revision 0005 rebuilds the reservation table on SQLite (batch mode), whose lines point
    at it with ON DELETE CASCADE: every reservation and line must survive the upgrade. Its
    downgrade turns CONFIRMED holds into ACTIVE ones that never expire, and gives an ended
    reservation that was confirmed first an expiry, so v1's NOT NULL holds; nothing held is
    dropped."""
    upgrade(empty_url, "0004")
    org, now = "m-org", "2026-12-01 10:00:00"
    rows = [(1, "ACTIVE", f"'{now}'"), (2, "COMMITTED", f"'{now}'"), (3, "RELEASED", f"'{now}'")]

    def seed(conn: Connection) -> None:
        for rid, status, expires in rows:
            conn.execute(
                text(
                    "INSERT INTO reservation (id, org_id, status, expires_at, created_at, "
                    f"updated_at) VALUES ({rid}, '{org}', '{status}', {expires}, '{now}', '{now}')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO reservation_line (org_id, reservation_id, location, sku, "
                    f"quantity, deducted, released) VALUES ('{org}', {rid}, 'wh', 'A', 3, "
                    f"{3 if status == 'COMMITTED' else 0}, {3 if status == 'RELEASED' else 0})"
                )
            )
        conn.commit()

    def snapshot(conn: Connection) -> tuple[list[Any], list[Any]]:
        reservations = conn.execute(
            text("SELECT id, status, expires_at IS NULL FROM reservation ORDER BY id")
        ).all()
        lines = conn.execute(
            text(
                "SELECT reservation_id, location, sku, quantity, deducted, released "
                "FROM reservation_line ORDER BY reservation_id"
            )
        ).all()
        return [tuple(r) for r in reservations], [tuple(r) for r in lines]

    inspect_sync(empty_url, seed)
    before = inspect_sync(empty_url, snapshot)
    upgrade(empty_url)
    assert inspect_sync(empty_url, snapshot) == before  # nothing lost in the rebuild

    def confirm_two(conn: Connection) -> None:
        # 1 is confirmed (a hold, no expiry); 2 was confirmed, then shipped (no expiry left).
        conn.execute(
            text("UPDATE reservation SET status = 'CONFIRMED', expires_at = NULL WHERE id = 1")
        )
        conn.execute(text("UPDATE reservation SET expires_at = NULL WHERE id = 2"))
        conn.commit()

    inspect_sync(empty_url, confirm_two)
    downgrade(empty_url, "0004")
    reservations, lines = inspect_sync(empty_url, snapshot)
    assert reservations == [(1, "ACTIVE", 0), (2, "COMMITTED", 0), (3, "RELEASED", 0)]
    assert lines == before[1]
    far = inspect_sync(
        empty_url,
        lambda c: c.execute(text("SELECT expires_at FROM reservation WHERE id = 1")).one(),
    )
    assert str(far[0]).startswith("9999-12-31")


def test_0006_registers_every_named_location_and_keeps_the_ledger_append_only(
    empty_url: str,
) -> None:
    """Revision 0006 registers every location a balance names and `default` of every org it
    finds; on SQLite it rebuilds the ledger (a new event type CHECK): every entry survives,
    and so do the append-only triggers. Its downgrade refuses while transfer entries exist."""
    upgrade(empty_url, "0005")
    now = "2026-12-01 10:00:00"

    def seed(conn: Connection) -> None:
        for org, location, sku in (("m-org", "wh", "A"), ("m-org", "store", "A")):
            conn.execute(
                text(
                    "INSERT INTO inventory_balance (org_id, location, sku, on_hand, reserved, "
                    f"version, updated_at) VALUES ('{org}', '{location}', '{sku}', 3, 0, 1, "
                    f"'{now}')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO inventory_ledger (org_id, location, sku, event_type, "
                    "on_hand_delta, reserved_delta, on_hand_after, reserved_after, "
                    f"idempotency_key, created_at) VALUES ('{org}', '{location}', '{sku}', "
                    f"'RESTOCK', 3, 0, 3, 0, 'k-{location}', '{now}')"
                )
            )
        conn.execute(
            text(
                "INSERT INTO api_key (org_id, name, prefix, secret_sha256, scopes, created_at) "
                f"VALUES ('keys-only', 'k', 'sl_x', '{'0' * 64}', 'ADMIN', '{now}')"
            )
        )
        conn.commit()

    def ledger(conn: Connection) -> list[Any]:
        return [tuple(r) for r in conn.execute(text("SELECT * FROM inventory_ledger ORDER BY id"))]

    inspect_sync(empty_url, seed)
    before = inspect_sync(empty_url, ledger)
    upgrade(empty_url)
    after = inspect_sync(empty_url, ledger)
    assert [row[:-1] for row in after] == before  # the same rows, transfer_id (NULL) added
    assert [row[-1] for row in after] == [None, None]
    assert inspect_sync(empty_url, trigger_names) == set(
        LEDGER_TRIGGER_NAMES[dialect_of(empty_url)]
    )
    registered = inspect_sync(
        empty_url,
        lambda c: sorted(
            tuple(r)
            for r in c.execute(text("SELECT org_id, code, name, type, active FROM location"))
        ),
    )
    assert registered == [
        ("default", "default", "default", "WAREHOUSE", 1),
        ("keys-only", "default", "default", "WAREHOUSE", 1),
        ("m-org", "default", "default", "WAREHOUSE", 1),
        ("m-org", "store", "store", "WAREHOUSE", 1),
        ("m-org", "wh", "wh", "WAREHOUSE", 1),
    ]

    def update_an_entry(conn: Connection) -> None:
        conn.execute(text("UPDATE inventory_ledger SET on_hand_delta = 4"))

    with pytest.raises(Exception, match="append-only"):
        inspect_sync(empty_url, update_an_entry)

    def post_a_transfer(conn: Connection) -> None:
        conn.execute(
            text(
                "INSERT INTO inventory_ledger (org_id, location, sku, event_type, on_hand_delta, "
                "reserved_delta, on_hand_after, reserved_after, idempotency_key, created_at, "
                f"transfer_id) VALUES ('m-org', 'wh', 'A', 'TRANSFER_OUT', -1, 0, 2, 0, 't', "
                f"'{now}', 1)"
            )
        )
        conn.commit()

    inspect_sync(empty_url, post_a_transfer)
    downgrade(empty_url, "0006")
    with pytest.raises(RuntimeError, match="transfer entries"):
        downgrade(empty_url, "0005")
    assert revision_of(empty_url) == "0006"


def test_0007_fills_committed_and_incoming_from_their_definitions(empty_url: str) -> None:
    """Revision 0007 keeps Balance.committed and Balance.incoming on the row: it fills them
    from the CONFIRMED reservation lines and the open transfer lines already there."""
    upgrade(empty_url, "0006")
    now = "2026-12-01 10:00:00"
    statements = [
        "INSERT INTO inventory_balance (org_id, location, sku, on_hand, reserved, version, "
        f"updated_at) VALUES ('o', 'wh', 'A', 9, 5, 3, '{now}'), ('o', 'st', 'A', 0, 0, 0, "
        f"'{now}'), ('o', 'wh', 'B', 1, 0, 1, '{now}')",
        "INSERT INTO reservation (id, org_id, status, expires_at, created_at, updated_at) VALUES "
        f"(1, 'o', 'CONFIRMED', NULL, '{now}', '{now}'), (2, 'o', 'ACTIVE', '{now}', '{now}', "
        f"'{now}')",
        "INSERT INTO reservation_line (org_id, reservation_id, location, sku, quantity, "
        "deducted, released) VALUES ('o', 1, 'wh', 'A', 4, 1, 0), ('o', 2, 'wh', 'A', 2, 0, 0)",
        "INSERT INTO transfer (id, org_id, status, from_location, to_location, created_at, "
        f"updated_at) VALUES (1, 'o', 'PARTIALLY_RECEIVED', 'wh', 'st', '{now}', '{now}'), "
        f"(2, 'o', 'RECEIVED', 'wh', 'st', '{now}', '{now}')",
        "INSERT INTO transfer_line (org_id, transfer_id, sku, quantity, received, returned) "
        "VALUES ('o', 1, 'A', 5, 2, 0), ('o', 2, 'A', 3, 3, 0)",
    ]

    def seed(conn: Connection) -> None:
        for statement in statements:
            conn.execute(text(statement))
        conn.commit()

    inspect_sync(empty_url, seed)
    upgrade(empty_url)
    figures = inspect_sync(
        empty_url,
        lambda c: sorted(
            tuple(r)
            for r in c.execute(
                text("SELECT location, sku, committed, incoming FROM inventory_balance")
            )
        ),
    )
    assert figures == [("st", "A", 0, 3), ("wh", "A", 3, 0), ("wh", "B", 0, 0)]
