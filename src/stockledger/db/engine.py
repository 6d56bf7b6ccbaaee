"""Engine set-up per dialect and the one transaction runner every write goes through.

MySQL / MariaDB (asyncmy): READ COMMITTED (ARCHITECTURE section 4: a locking read of a missing
row plus INSERT deadlocks under REPEATABLE READ), ``innodb_lock_wait_timeout`` bounded on the
server so no coroutine is ever cancelled mid-query.

SQLite (aiosqlite): WAL, ``busy_timeout``, and ``BEGIN IMMEDIATE`` for writes because
``SELECT ... FOR UPDATE`` renders nothing there (SQLAlchemy docs, "Serializable isolation /
Savepoints / Transactional DDL" for pysqlite/aiosqlite). Writers in one process also queue on an
``asyncio.Lock`` so they do not spin in SQLite's busy handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from stockledger.config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# MySQL error numbers worth retrying the whole transaction for (MySQL 8 reference manual,
# "Server Error Message Reference"; 1020 is MariaDB's "Record has changed since last read").
MYSQL_DEADLOCK = 1213
MYSQL_LOCK_WAIT_TIMEOUT = 1205
MARIADB_RECORD_CHANGED = 1020
MYSQL_DUPLICATE_KEY = 1062
RETRYABLE_MYSQL_ERRORS = {
    MYSQL_DEADLOCK: "deadlock",
    MYSQL_LOCK_WAIT_TIMEOUT: "lock_wait_timeout",
    MARIADB_RECORD_CHANGED: "record_changed",
}


class RetryTransaction(Exception):
    """Raised inside a transaction body to have the whole transaction rolled back and run again.

    ``reason`` is a short label for the retries metric (e.g. ``balance_created_concurrently``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CommitThenRaise(Exception):
    """Raised inside a transaction body to commit what was done so far, then raise ``error``.

    Used where a failed call must still persist a side effect, e.g. expiring a reservation
    found past its expiry (ARCHITECTURE section 11, "Expiry").
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


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


def retry_reason(exc: BaseException) -> str | None:
    """A label when ``exc`` means "run the whole transaction again", else None."""
    if isinstance(exc, RetryTransaction):
        return exc.reason
    code = mysql_error_code(exc)
    if code in RETRYABLE_MYSQL_ERRORS:
        return RETRYABLE_MYSQL_ERRORS[code]
    if isinstance(exc, DBAPIError) and "database is locked" in str(exc.orig):
        return "sqlite_busy"
    return None


class Database:
    """An async engine plus the rules for running transactions on it.

    Build with :func:`create_database`. ``dialect`` is ``"mysql"`` or ``"sqlite"``.
    ``on_retry`` (if set) is called with the reason label each time a transaction is retried.
    """

    def __init__(
        self, engine: AsyncEngine, settings: Settings, read_engine: AsyncEngine | None = None
    ) -> None:
        self.engine = engine
        # SQLite reads get their own pool so a burst of reads never queues a writer (which
        # holds the one write slot and the hot SKU's lock) behind them for a connection.
        self.read_engine = read_engine or engine
        self.settings = settings
        self.dialect = engine.dialect.name
        self.is_sqlite = self.dialect == "sqlite"
        self._sqlite_writer = asyncio.Lock() if self.is_sqlite else None
        self.on_retry: Callable[[str], None] | None = None

    async def run_write(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``body(conn)`` in one write transaction and commit; retry it whole when asked.

        Retried (bounded by ``retry_max_attempts``, exponential backoff with full jitter via
        tenacity) on deadlock 1213, lock wait timeout 1205, MariaDB 1020, SQLite busy, and
        :class:`RetryTransaction`. Any other exception rolls back and propagates, except
        :class:`CommitThenRaise`, which commits and then raises its ``error``.
        """
        s = self.settings

        def _log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            reason = retry_reason(exc) if exc else None
            if self.on_retry and reason:
                self.on_retry(reason)

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: retry_reason(e) is not None),
            stop=stop_after_attempt(s.retry_max_attempts),
            wait=wait_random_exponential(
                multiplier=s.retry_initial_backoff_seconds, max=s.retry_max_backoff_seconds
            ),
            before_sleep=_log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._write_once(body)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write_once(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        if self._sqlite_writer is not None:
            async with self._sqlite_writer:
                return await self._transaction(body)
        return await self._transaction(body)

    async def _transaction(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with self.engine.connect() as conn:
            trans = await conn.begin()
            try:
                result = await body(conn)
            except CommitThenRaise as signal:
                await trans.commit()
                raise signal.error from None
            except BaseException:
                await trans.rollback()
                raise
            await trans.commit()
            return result

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
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()


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


def _setup_mysql(engine: AsyncEngine, settings: Settings) -> None:
    wait = int(settings.db_lock_wait_timeout_seconds)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {wait}")
        cursor.close()


def create_database(settings: Settings, url: str | None = None) -> Database:
    """Create the engine for ``url`` (default: the URL in force per ``settings``).

    Raises ``ValueError`` for a dialect other than mysql or sqlite.
    """
    url = url or settings.resolved_database_url()
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # Writes run one at a time (BEGIN IMMEDIATE plus the writer lock): a small pool.
        engine = create_async_engine(url, pool_size=2, max_overflow=2)
        _setup_sqlite(engine, settings)
        read_engine = create_async_engine(url, pool_size=5, max_overflow=5)
        _setup_sqlite(read_engine, settings)
        return Database(engine, settings, read_engine)
    elif backend in ("mysql", "mariadb"):
        engine = create_async_engine(
            url,
            isolation_level="READ COMMITTED",
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_recycle=3600,
            pool_pre_ping=False,
        )
        _setup_mysql(engine, settings)
    else:
        raise ValueError(
            f"unsupported database {backend!r}: use mysql+asyncmy:// or sqlite+aiosqlite://"
        )
    return Database(engine, settings)
