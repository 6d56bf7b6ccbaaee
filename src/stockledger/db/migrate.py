"""Run the Alembic migrations programmatically (``stockledger migrate``) and check the revision.

The script directory ships inside the package (``stockledger/db/migrations``), so migrations run
from an installed wheel with no ``alembic.ini`` at hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from stockledger.db import ledger_triggers
from stockledger.db.ledger_triggers import TriggerOutcome

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# How long a `migrate` waits for another one on the same database to finish (seconds).
LOCK_WAIT_SECONDS = 600


class MigrationLockTimeout(RuntimeError):
    """Another ``stockledger migrate`` held the database's migration lock for longer than
    :data:`LOCK_WAIT_SECONDS`."""


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` (an async SQLAlchemy URL) and the packaged scripts."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> TriggerOutcome:
    """Upgrade the database at ``url`` to ``revision`` (blocking; runs its own event loop).

    Serialized against every other ``migrate`` of the same database (:func:`migration_lock`),
    so replicas that start together do not race. Returns what became of the ledger's
    triggers: ``missing`` names them when the server refused them (revision 0003), with the
    server's words in ``refused``.

    Raises :class:`MigrationLockTimeout`, or the database's error when a revision fails (the
    revisions are idempotent: run it again after the fix).
    """
    cfg = alembic_config(url)
    command.upgrade(cfg, revision)
    outcome = cfg.attributes.get("ledger_triggers")
    return outcome if isinstance(outcome, TriggerOutcome) else TriggerOutcome((), ())


def add_ledger_triggers(url: str) -> TriggerOutcome:
    """Create the ledger triggers missing from the database at ``url`` (blocking), for
    ``stockledger migrate --triggers`` run by a user allowed to. The outcome's ``refused``
    says why when the server still refuses."""

    async def run() -> TriggerOutcome:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        try:
            async with engine.begin() as conn:
                return await conn.run_sync(ledger_triggers.create_missing)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def record_triggers(connection: Connection, config: Config) -> None:
    """After the revisions ran (in ``env.py``): note in ``config.attributes`` which ledger
    triggers are missing, with the refusal revision 0003 noted there, if any."""
    if not inspect(connection).has_table("inventory_ledger"):
        return
    refused = config.attributes.get("ledger_triggers_refused")
    config.attributes["ledger_triggers"] = TriggerOutcome(
        (), ledger_triggers.missing(connection), refused if isinstance(refused, str) else None
    )


@contextlib.contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """Hold the database's migration lock while entered (:func:`acquire_migration_lock`)."""
    release = acquire_migration_lock(connection)
    try:
        yield
    finally:
        release(connection)


def acquire_migration_lock(connection: Connection) -> Callable[[Connection], None]:
    """Take the database's migration lock: MySQL's ``GET_LOCK`` (a named lock of the session,
    freed when it ends, also by a crash; MySQL manual, "Locking Functions"), or on SQLite an
    exclusive ``flock`` on a file beside the database. Waits up to :data:`LOCK_WAIT_SECONDS`,
    then raises :class:`MigrationLockTimeout`. Returns the function that frees it, to be
    called with the same connection."""
    if connection.dialect.name == "sqlite":
        database = connection.engine.url.database
        if not database or database == ":memory:":
            return lambda _connection: None
        handle = open(f"{database}.migrate-lock", "a")  # noqa: SIM115 (closed by the release)
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks; freed with the file

        def unlock(_connection: Connection) -> None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

        return unlock
    schema = connection.exec_driver_sql("SELECT DATABASE()").scalar()
    # Lock names are server-wide and at most 64 characters: one per database.
    name = "stockledger-migrate-" + hashlib.sha256(str(schema).encode()).hexdigest()[:32]
    got = connection.execute(
        text("SELECT GET_LOCK(:name, :wait)"), {"name": name, "wait": LOCK_WAIT_SECONDS}
    ).scalar()
    connection.commit()  # the lock is the session's; no transaction stays open for it
    if got != 1:
        raise MigrationLockTimeout(
            f"another `stockledger migrate` held {schema}'s migration lock for "
            f"{LOCK_WAIT_SECONDS} s"
        )

    def release(conn: Connection) -> None:
        conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})
        conn.commit()

    return release


def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database at ``url`` to ``revision`` (blocking)."""
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    """The newest revision of the packaged migration scripts."""
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    head = script.get_current_head()
    assert head is not None
    return head


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None when never migrated)."""
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync_conn: MigrationContext.configure(sync_conn).get_current_revision()
        )
