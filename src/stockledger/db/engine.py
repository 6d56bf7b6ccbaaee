"""Engine set-up per dialect, and which database errors mean "run the batch again".

MySQL / MariaDB (asyncmy): READ COMMITTED (ARCHITECTURE section 4: a locking read of a missing
row plus INSERT deadlocks under REPEATABLE READ), ``innodb_lock_wait_timeout`` bounded on the
server so no coroutine is ever cancelled mid-query.

SQLite (aiosqlite): WAL, ``busy_timeout``, and ``BEGIN IMMEDIATE`` for writes because
``SELECT ... FOR UPDATE`` renders nothing there (SQLAlchemy docs, "Serializable isolation /
Savepoints / Transactional DDL" for pysqlite/aiosqlite).

Writes and reads use separate engines (pools): the batcher's writers hold one connection each
of the write engine, so a burst of reads never queues a writer behind them; id blocks have a
one-connection engine of their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from stockledger.config import Settings

log = logging.getLogger(__name__)

# MySQL error numbers worth running the whole transaction again for (MySQL 8 reference manual,
# "Server Error Message Reference"; 1020 is MariaDB's "Record has changed since last read").
MYSQL_DEADLOCK = 1213
MYSQL_LOCK_WAIT_TIMEOUT = 1205
MARIADB_RECORD_CHANGED = 1020
MYSQL_DUPLICATE_KEY = 1062
# A statement that ran past its bound: MariaDB max_statement_time, MySQL max_execution_time.
MARIADB_STATEMENT_TIMEOUT = 1969
MYSQL_STATEMENT_TIMEOUT = 3024
RETRYABLE_MYSQL_ERRORS = {
    MYSQL_DEADLOCK: "deadlock",
    MYSQL_LOCK_WAIT_TIMEOUT: "lock_wait_timeout",
    MARIADB_RECORD_CHANGED: "record_changed",
    MYSQL_DUPLICATE_KEY: "duplicate_key",
    MARIADB_STATEMENT_TIMEOUT: "statement_timeout",
    MYSQL_STATEMENT_TIMEOUT: "statement_timeout",
}
# Client errors for a server that is away or a connection that broke (MySQL reference manual,
# "Client Error Message Reference": 2002/2003 cannot connect, 2006 gone away, 2013 lost during
# query, 2055 lost at handshake; 1927 and 4031 are MariaDB's and MySQL's "connection killed" /
# "disconnected for inactivity"; 1053 server shutdown in progress).
MYSQL_CONNECTION_ERRORS = {1053, 1927, 2002, 2003, 2006, 2013, 2055, 4031}


def mysql_error_code(exc: BaseException) -> int | None:
    """The MySQL error number behind a SQLAlchemy DBAPIError, or None."""
    if isinstance(exc, DBAPIError) and exc.orig is not None and exc.orig.args:
        code = exc.orig.args[0]
        if isinstance(code, int):
            return code
    return None


def is_duplicate_key(exc: BaseException) -> bool:
    """True for a unique-key violation: MySQL 1062 or SQLite's UNIQUE/PRIMARY KEY failure."""
    if mysql_error_code(exc) == MYSQL_DUPLICATE_KEY:
        return True
    text = str(getattr(exc, "orig", exc))
    return "UNIQUE constraint failed" in text


def is_connection_lost(exc: BaseException) -> bool:
    """True when the database is away or the connection broke (nothing is known to have
    committed; a retry on a fresh connection is safe for idempotent writes)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if mysql_error_code(exc) in MYSQL_CONNECTION_ERRORS:
        return True
    cause = getattr(exc, "orig", None) or exc
    return isinstance(cause, ConnectionError | asyncio.IncompleteReadError | BrokenPipeError) or (
        isinstance(cause, OSError) and not isinstance(cause, DBAPIError)
    )


# Every label retry_reason() gives (for the metric's series at 0 from the start).
RETRY_REASONS = (*sorted(set(RETRYABLE_MYSQL_ERRORS.values())), "sqlite_busy", "connection_lost")


def retry_reason(exc: BaseException) -> str | None:
    """A label (for ``inventory_transaction_retries_total``) when ``exc`` means "run the
    whole transaction again", else None: deadlock, lock wait timeout, MariaDB's 1020, a
    duplicate key (a concurrent transaction wrote it first), a statement past its time bound,
    SQLite busy, a lost connection."""
    code = mysql_error_code(exc)
    if code in RETRYABLE_MYSQL_ERRORS:
        return RETRYABLE_MYSQL_ERRORS[code]
    if is_duplicate_key(exc):
        return "duplicate_key"
    if isinstance(exc, DBAPIError) and "database is locked" in str(exc.orig):
        return "sqlite_busy"
    if is_connection_lost(exc):
        return "connection_lost"
    return None


class Database:
    """The async engines (writes, reads) plus the dialect facts the services need.

    Build with :func:`create_database`. ``dialect`` is ``"mysql"`` or ``"sqlite"``.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        read_engine: AsyncEngine | None = None,
        sequence_engine: AsyncEngine | None = None,
    ) -> None:
        self.engine = engine
        self.read_engine = read_engine or engine
        self.sequence_engine = sequence_engine or self.read_engine
        self.settings = settings
        self.dialect = engine.dialect.name
        self.is_sqlite = self.dialect == "sqlite"

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (a deferred BEGIN on SQLite, so reads never block writers)."""
        async with self.read_engine.connect() as conn:
            if self.is_sqlite:
                conn = await conn.execution_options(stockledger_read=True)
            async with conn.begin():
                yield conn

    async def dispose(self) -> None:
        """Close every pooled connection."""
        for engine in {self.engine, self.read_engine, self.sequence_engine}:
            await engine.dispose()


def _setup_sqlite(engine: AsyncEngine, settings: Settings) -> None:
    busy = settings.sqlite_busy_timeout_ms

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (the driver's own BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("stockledger_read"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _setup_mysql(engine: AsyncEngine, settings: Settings, *, writes: bool) -> None:
    """Per session: row-lock and metadata-lock waits of one statement bounded by the setting
    (``innodb_lock_wait_timeout``, ``lock_wait_timeout``: a DDL or a backup cannot hold a
    write for a day); on the write engines also each statement's run time, by the write's
    whole wait (MariaDB ``max_statement_time`` in seconds; MySQL 8 ``max_execution_time`` in
    ms, which bounds SELECTs only). The asyncmy read timeout is the last resort."""
    wait = int(settings.db_lock_wait_timeout_seconds)
    # Above one lock wait, so a waiting statement times out as a lock wait (and retries).
    statement = max(settings.lock_wait_seconds, wait + 1.0)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {wait}")
        cursor.execute(f"SET SESSION lock_wait_timeout = {wait}")
        if writes:
            cursor.execute("SELECT VERSION()")
            version = str(cursor.fetchone()[0])
            if "MariaDB" in version:
                cursor.execute(f"SET SESSION max_statement_time = {statement:g}")
            else:
                cursor.execute(f"SET SESSION max_execution_time = {int(statement * 1000)}")
        cursor.close()


def create_database(settings: Settings, url: str | None = None) -> Database:
    """Create the engines for ``url`` (default: the URL in force per ``settings``).

    Raises ``ValueError`` for a dialect other than mysql or sqlite.
    """
    url = url or settings.resolved_database_url()
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # One writer (BEGIN IMMEDIATE is the database lock), the patient lane and migrations.
        engine = create_async_engine(url, pool_size=2, max_overflow=2)
        _setup_sqlite(engine, settings)
        read_engine = create_async_engine(url, pool_size=5, max_overflow=5)
        _setup_sqlite(read_engine, settings)
        sequence_engine = create_async_engine(url, pool_size=1, max_overflow=1)
        _setup_sqlite(sequence_engine, settings)
        return Database(engine, settings, read_engine, sequence_engine)
    if backend in ("mysql", "mariadb"):
        options: dict[str, Any] = {
            "isolation_level": "READ COMMITTED",
            "pool_recycle": 3600,
            "pool_pre_ping": False,
        }
        # A statement that runs past every server-side bound fails as a lost connection.
        writes = {"connect_args": {"read_timeout": settings.lock_wait_seconds + 5}}
        # The writers hold one connection each while they have work. No reset round trip when
        # one goes back: every batch ends its transaction itself (SQLAlchemy docs, "Reset On
        # Return": safe when the application always ends its transactions).
        engine = create_async_engine(
            url,
            pool_size=settings.write_connections + 1,  # and the patient lane
            max_overflow=2,
            pool_reset_on_return=None,
            **writes,
            **options,
        )
        _setup_mysql(engine, settings, writes=True)
        read_engine = create_async_engine(
            url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow, **options
        )
        _setup_mysql(read_engine, settings, writes=False)
        # Id blocks: short transactions of their own, never behind a burst of reads.
        sequence_engine = create_async_engine(url, pool_size=1, max_overflow=1, **writes, **options)
        _setup_mysql(sequence_engine, settings, writes=True)
        return Database(engine, settings, read_engine, sequence_engine)
    raise ValueError(
        f"unsupported database {backend!r}: use mysql+asyncmy:// or sqlite+aiosqlite://"
    )
