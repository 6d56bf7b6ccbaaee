"""`stockledger migrate` on a server as MySQL 8 ships it: binary logging on, and a database owner
without SUPER (issue 13). The server refuses CREATE TRIGGER there (error 1419): the migration
completes without the ledger's triggers, says so once, runs again, and `migrate --triggers`
adds them when run by a user that may. The README's least-privilege grants keep the ledger
append-only without triggers.

The server is this module's own MariaDB, started with ``--log-bin`` on a free port.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_settings
from own_servers import OwnMariaDB, mariadb_binaries
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from stockledger.db import ledger_triggers
from stockledger.db.engine import create_database
from stockledger.db.migrate import current_revision, head_revision
from stockledger.services import InventoryService, Line
from stockledger.services.reconcile import find_violations

ADVICE_MARK = "append-only triggers were not created"
# The README's grants for the service's runtime user (section "Least-privilege grants").
RUNTIME_GRANTS = [
    "GRANT SELECT, INSERT, UPDATE ON {db}.inventory_balance TO {user}",
    "GRANT SELECT, INSERT, UPDATE ON {db}.reservation TO {user}",
    "GRANT SELECT, INSERT, UPDATE ON {db}.reservation_line TO {user}",
    "GRANT SELECT, INSERT, UPDATE ON {db}.id_block TO {user}",
    # API keys: authentication reads them, lastUsedAt and revocations update them.
    "GRANT SELECT, INSERT, UPDATE ON {db}.api_key TO {user}",
    "GRANT SELECT, INSERT, UPDATE ON {db}.location TO {user}",
    "GRANT SELECT, INSERT, UPDATE ON {db}.transfer TO {user}",
    "GRANT SELECT, INSERT, UPDATE ON {db}.transfer_line TO {user}",
    # Events: the relay deletes outbox events past their retention (nothing else is deleted).
    "GRANT SELECT, INSERT, DELETE ON {db}.outbox_event TO {user}",
    "GRANT SELECT, INSERT, UPDATE ON {db}.relay_state TO {user}",
    "GRANT SELECT, INSERT, UPDATE ON {db}.webhook_endpoint TO {user}",
    "GRANT SELECT, INSERT, UPDATE ON {db}.webhook_delivery TO {user}",
    "GRANT SELECT, INSERT ON {db}.idempotency_key TO {user}",
    "GRANT SELECT, INSERT ON {db}.inventory_ledger TO {user}",
    "GRANT SELECT ON {db}.alembic_version TO {user}",
]


def _sql(url: str, statements: list[str]) -> list[list[tuple[object, ...]]]:
    """Run ``statements`` on ``url`` in autocommit; the rows each returned."""

    async def run() -> list[list[tuple[object, ...]]]:
        engine = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        out = []
        try:
            async with engine.connect() as conn:
                for statement in statements:
                    result = await conn.execute(text(statement))
                    out.append([tuple(r) for r in result] if result.returns_rows else [])
        finally:
            await engine.dispose()
        return out

    return asyncio.run(run())


def _migrate(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKLEDGER_")}
    env["STOCKLEDGER_DATABASE_URL"] = url
    env["STOCKLEDGER_DATA_DIR"] = tempfile.mkdtemp(prefix="sl-keys-")  # the first API key
    return subprocess.run(
        [sys.executable, "-m", "stockledger.cli", "migrate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _triggers(url: str) -> set[str]:
    async def run() -> set[str]:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(ledger_triggers.present)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _revision(url: str) -> str | None:
    async def run() -> str | None:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            return await current_revision(engine)
        finally:
            await engine.dispose()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def binlog_server() -> Iterator[OwnMariaDB]:
    """A MariaDB of this module's own with binary logging on (MySQL 8's default)."""
    server_binary, install_binary = mariadb_binaries()
    base = Path(tempfile.mkdtemp(prefix="sl-binlog-"))  # short: the socket path has a limit
    server = OwnMariaDB(base, ["--log-bin=binlog", "--server-id=1"])
    try:
        server.install(install_binary)
        server.start(server_binary)
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


class Users:
    """A fresh database on the binlog server, an owner of it without SUPER, and a runtime user
    with the README's grants (given once the tables exist: :meth:`grant_runtime`)."""

    def __init__(self, server: OwnMariaDB) -> None:
        tag = uuid.uuid4().hex[:8]
        self.db = f"sl_{tag}"
        self.root_url = make_url(server.url).set(database=self.db).render_as_string(False)
        root = make_url(server.url).set(database="").render_as_string(False)
        self.root_server_url = root
        self.owner = f"'own_{tag}'@'127.0.0.1'"
        self.runtime = f"'app_{tag}'@'127.0.0.1'"
        port = server.port
        self.owner_url = f"mysql+asyncmy://own_{tag}:pw@127.0.0.1:{port}/{self.db}"
        self.runtime_url = f"mysql+asyncmy://app_{tag}:pw@127.0.0.1:{port}/{self.db}"
        _sql(
            root,
            [
                f"CREATE DATABASE {self.db} CHARACTER SET utf8mb4",
                f"CREATE USER {self.owner} IDENTIFIED BY 'pw'",
                f"CREATE USER {self.runtime} IDENTIFIED BY 'pw'",
                # Everything on its database (TRIGGER included), nothing global: no SUPER.
                f"GRANT ALL PRIVILEGES ON {self.db}.* TO {self.owner}",
            ],
        )

    def grant_runtime(self) -> None:
        _sql(
            self.root_server_url,
            [g.format(db=self.db, user=self.runtime) for g in RUNTIME_GRANTS],
        )

    def drop(self) -> None:
        _sql(
            self.root_server_url,
            [
                f"DROP DATABASE IF EXISTS {self.db}",
                f"DROP USER IF EXISTS {self.owner}",
                f"DROP USER IF EXISTS {self.runtime}",
            ],
        )


@pytest.fixture
def users(binlog_server: OwnMariaDB) -> Iterator[Users]:
    made = Users(binlog_server)
    try:
        yield made
    finally:
        made.drop()


def test_the_server_has_binary_logging_on_and_the_owner_no_super(users: Users) -> None:
    [[(log_bin,)], grants] = _sql(users.owner_url, ["SELECT @@log_bin", "SHOW GRANTS"])
    assert log_bin == 1
    assert not any("SUPER" in str(g[0]) for g in grants)


def test_migrate_without_super_completes_without_triggers_and_says_so_once(
    users: Users,
) -> None:
    first = _migrate(users.owner_url)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(ADVICE_MARK) == 1, first.stderr
    assert "1419" in first.stderr  # the server's own reason, and what to set or grant
    assert "SET GLOBAL log_bin_trust_function_creators = 1" in first.stderr
    assert "migrate --triggers" in first.stderr
    assert _revision(users.root_url) == head_revision()
    assert _triggers(users.root_url) == set()

    # Run again (as after a failed deploy): it completes, and says it once more.
    again = _migrate(users.owner_url)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count(ADVICE_MARK) == 1, again.stderr
    assert _revision(users.root_url) == head_revision()


def test_migrate_triggers_needs_a_user_that_may_and_then_the_warning_is_gone(
    users: Users,
) -> None:
    assert _migrate(users.owner_url).returncode == 0

    refused = _migrate(users.owner_url, "--triggers")
    assert refused.returncode != 0
    assert "still refused" in refused.stderr
    assert _triggers(users.root_url) == set()

    done = _migrate(users.root_url, "--triggers")
    assert done.returncode == 0, done.stderr
    assert "created the ledger triggers" in done.stdout
    assert _triggers(users.root_url) == set(ledger_triggers.LEDGER_TRIGGER_NAMES["mysql"])

    quiet = _migrate(users.owner_url)
    assert quiet.returncode == 0
    assert ADVICE_MARK not in quiet.stderr
    # The triggers now refuse even the root user's UPDATE of the ledger.
    _sql(
        users.root_url,
        [
            "INSERT INTO inventory_ledger (org_id, location, sku, event_type, on_hand_delta, "
            "reserved_delta, on_hand_after, reserved_after, idempotency_key, created_at) "
            "VALUES ('o', 'l', 's', 'RESTOCK', 1, 0, 1, 0, 'k', NOW())"
        ],
    )
    with pytest.raises(DBAPIError, match="append-only"):
        _sql(users.root_url, ["UPDATE inventory_ledger SET reason = 'x'"])


def test_the_runtime_grants_run_the_service_and_keep_the_ledger_append_only(
    users: Users,
) -> None:
    assert _migrate(users.owner_url).returncode == 0
    users.grant_runtime()

    async def use_it() -> list[str]:
        settings = make_settings()
        db = create_database(settings, users.runtime_url)
        try:
            service = InventoryService(db, settings, org_id="grants")
            await service.restock("r-1", [Line("SKU-1", 5)])
            held = await service.reserve("c-1", [Line("SKU-1", 2)])
            await service.deduct("d-1", reservation_id=held.reservation.id)
            await service.reserve("c-2", [Line("SKU-1", 1)])
            return await find_violations(db, "grants")
        finally:
            await db.dispose()

    assert asyncio.run(use_it()) == []
    [[(entries,)]] = _sql(users.runtime_url, ["SELECT COUNT(*) FROM inventory_ledger"])
    assert entries == 4
    for statement in (
        "UPDATE inventory_ledger SET reason = 'x'",
        "DELETE FROM inventory_ledger",
    ):
        with pytest.raises(DBAPIError, match="1142"):
            _sql(users.runtime_url, [statement])
    [[(after,)]] = _sql(users.runtime_url, ["SELECT COUNT(*) FROM inventory_ledger"])
    assert after == 4
