"""Shared fixtures: the same tests run on SQLite (embedded default) and MariaDB/MySQL.

Servers: ``STOCKLEDGER_TEST_MYSQL_URL`` (default ``mysql+asyncmy://root@127.0.0.1:3306/stockledger_test``)
and ``STOCKLEDGER_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``). When one does not
answer, its tests skip with the reason, unless ``STOCKLEDGER_TEST_REQUIRE_SERVERS=1`` (set by
``.ci/run``), which turns the skip into a failure.

Isolation: SQLite gets a fresh file per test (copied from a migrated template); MariaDB is
migrated once per session and each test works in its own ``org_id``.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis

from stockledger.config import Settings
from stockledger.db.engine import Database, create_database
from stockledger.db.migrate import upgrade
from stockledger.services import InventoryService

MYSQL_URL = os.environ.get(
    "STOCKLEDGER_TEST_MYSQL_URL", "mysql+asyncmy://root@127.0.0.1:3306/stockledger_test"
)
REDIS_URL = os.environ.get("STOCKLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_SERVERS = os.environ.get("STOCKLEDGER_TEST_REQUIRE_SERVERS") == "1"


def _answers(url: str, default_port: int) -> bool:
    parsed = urlparse(url.replace("+asyncmy", ""))
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def require_server(name: str, url: str, default_port: int) -> None:
    """Skip (or, with STOCKLEDGER_TEST_REQUIRE_SERVERS=1, fail) when a server does not answer."""
    if _answers(url, default_port):
        return
    reason = f"{name} does not answer at {url}"
    if REQUIRE_SERVERS:
        pytest.fail(f"{reason} and STOCKLEDGER_TEST_REQUIRE_SERVERS=1", pytrace=False)
    pytest.skip(reason)


class Clock:
    """A controllable UTC clock for the services: ``clock()`` is now, ``advance(s)`` moves it."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


def make_settings(**overrides: object) -> Settings:
    """Settings for tests: no environment, small backoffs."""
    base: dict[str, object] = {"retry_max_attempts": 30, "retry_max_backoff_seconds": 0.05}
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test copies."""
    path = tmp_path_factory.mktemp("sqlite") / "template.sqlite3"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


def _mysql_admin(sql: list[str]) -> None:
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> None:
        server = create_async_engine(make_url(MYSQL_URL).set(database=""))
        async with server.connect() as conn:
            for statement in sql:
                await conn.execute(text(statement))
        await server.dispose()

    asyncio.run(run())


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    """A test MySQL database of this session's own (name suffixed with the process id, so
    concurrent test runs do not drop each other's), migrated once, dropped at the end."""
    require_server("MariaDB/MySQL", MYSQL_URL, 3306)
    from sqlalchemy.engine import make_url

    url = make_url(MYSQL_URL)
    name = f"{url.database}_{os.getpid()}"
    _mysql_admin(
        [f"DROP DATABASE IF EXISTS `{name}`", f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"]
    )
    session_url = url.set(database=name).render_as_string(hide_password=False)
    upgrade(session_url)
    yield session_url
    _mysql_admin([f"DROP DATABASE IF EXISTS `{name}`"])


@pytest.fixture
def own_mysql_url() -> Iterator[str]:
    """A MySQL database of this test's own (``<configured>_own_<random>``), migrated, dropped
    afterwards: for a test whose server sweeps every org, so that no other test's due carts
    move its counts."""
    require_server("MariaDB/MySQL", MYSQL_URL, 3306)
    from sqlalchemy.engine import make_url

    url = make_url(MYSQL_URL)
    name = f"{url.database}_own_{uuid.uuid4().hex[:8]}"
    own = url.set(database=name).render_as_string(hide_password=False)
    # In a thread: an async fixture may ask for this one inside its running event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(_mysql_admin, [f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"]).result()
        try:
            pool.submit(upgrade, own).result()
            yield own
        finally:
            pool.submit(_mysql_admin, [f"DROP DATABASE IF EXISTS `{name}`"]).result()


@pytest.fixture(params=["sqlite", "mysql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name; tests taking it run once per backend."""
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database URL for this test on ``backend``."""
    if backend == "mysql":
        return str(request.getfixturevalue("mysql_url"))
    template = request.getfixturevalue("sqlite_template")
    path = tmp_path / "stockledger.sqlite3"
    shutil.copy(template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def org_id() -> str:
    """A fresh tenant per test, so tests on the shared MariaDB database never see each other."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
async def db(database_url: str, settings: Settings) -> AsyncIterator[Database]:
    database = create_database(settings, database_url)
    yield database
    await database.dispose()


@pytest.fixture
async def service(db: Database, settings: Settings, clock: Clock, org_id: str) -> InventoryService:
    """The write services on this test's backend, tenant and clock."""
    return InventoryService(db, settings, clock=clock, org_id=org_id)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis: ``STOCKLEDGER_TEST_REDIS_URL`` (default database 15 of 127.0.0.1)."""
    require_server("Redis", REDIS_URL, 6379)
    yield REDIS_URL


def drop_org_keys(redis_url: str, org_id: str) -> None:
    """Delete every Redis key of ``org_id`` (locks, turn markers, expiry index)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"stockledger:{{{org_id}}}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def redis(redis_url: str, org_id: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client on the test Redis; this test's org keys are deleted afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    keys = [k async for k in client.scan_iter(match=f"stockledger:{{{org_id}}}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def tenant(org_id: str, redis_url: str) -> Iterator[str]:
    """This test's org id; its Redis keys (locks, expiry index) are deleted afterwards."""
    yield org_id
    drop_org_keys(redis_url, org_id)
