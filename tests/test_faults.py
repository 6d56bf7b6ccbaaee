"""Faults the batched write path must not carry over from the old one (ARCHITECTURE sections
4, 6 and 12): a row locked by another SQL session, KILLed connections, a MariaDB restart, a
Redis that lost its expiry index, a sweeper that died holding leased ids, a SIGKILLed holder of
Redis locks (and a lease keeper that must let go when its batch ends), and SKUs named like the
internal key suffixes.

Servers a test disturbs are its own: a MariaDB it restarts (started here on a free port) and a
Redis it FLUSHALLs (likewise). The shared servers only see this test's org (and, for KILL, this
session's own test database).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import Clock, make_settings
from graphql_helpers import admin_headers, line, mutation_document
from log_helpers import json_logging
from own_servers import (
    OwnMariaDB,
    mariadb_binaries,
    no_server_binary,
    redis_server,
)
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from stockledger.app.serving import create_served_app
from stockledger.config import Settings
from stockledger.db.engine import Database, create_database
from stockledger.db.migrate import upgrade
from stockledger.locks import IndexChanges
from stockledger.locks.redis_locks import (
    RedisBalanceLocker,
    RedisExpiryIndex,
    expiry_key,
    lock_key,
    turn_key,
)
from stockledger.services import (
    InventoryService,
    Line,
    LockTimeoutError,
    ServiceUnavailableError,
    StockError,
)
from stockledger.services.reconcile import find_violations
from stockledger.services.sweeper import Sweeper

LOCK_WAIT = 1.0  # seconds: the lock wait of the tests that time a stalled write


# ------------------------------------------------------------------------------ helpers


async def _drop_org_keys(client: Any, org_id: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"stockledger:{{{org_id}}}:*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def redis_client(redis_url: str, org_id: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the shared test Redis; this test's org keys are deleted afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await _drop_org_keys(client, org_id)
    await client.aclose()


async def _ledger_counts(db: Database, org_id: str) -> dict[str, int]:
    """Ledger entries per idempotency key of ``org_id``."""
    async with db.read() as conn:
        rows = await conn.execute(
            text(
                "SELECT idempotency_key, COUNT(*) FROM inventory_ledger WHERE org_id = :o "
                "GROUP BY idempotency_key"
            ),
            {"o": org_id},
        )
        return {str(k): int(n) for k, n in rows}


async def _statuses(db: Database, org_id: str, ids: list[int]) -> dict[int, str]:
    async with db.read() as conn:
        rows = await conn.execute(
            text("SELECT id, status FROM reservation WHERE org_id = :o"), {"o": org_id}
        )
        wanted = set(ids)
        return {int(i): str(s) for i, s in rows if int(i) in wanted}


async def _timed(call: Awaitable[Any]) -> tuple[Any, float]:
    """(result or exception, seconds taken)."""
    start = time.monotonic()
    try:
        result = await call
    except Exception as exc:
        result = exc
    return result, time.monotonic() - start


async def _answered(call: Awaitable[Any], what: str, seconds: float = 15.0) -> Any:
    """``await call``, failing the test (instead of hanging it) when no answer comes."""
    try:
        return await asyncio.wait_for(call, seconds)
    except TimeoutError:
        pytest.fail(f"{what}: no answer within {seconds:g} s")


async def _close(service: InventoryService) -> None:
    """Stop the service's writers, bounded (a writer that hangs must not hang the test)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(service.close(), 5)


@pytest.fixture
def json_logs() -> Iterator[None]:
    """:func:`json_logging` for the test (JSON lines, no slow tracebacks)."""
    with json_logging():
        yield


def _kind(result: object) -> str:
    """ok, unavailable (ServiceUnavailableError), typed (a StockError) or bad (anything else)."""
    if isinstance(result, ServiceUnavailableError):
        return "unavailable"
    if isinstance(result, StockError):
        return "typed"
    if isinstance(result, BaseException):
        return "bad"
    return "ok"


def _server_admin(url: str, statements: list[str]) -> None:
    async def run() -> None:
        engine = create_async_engine(make_url(url).set(database=""), poolclass=NullPool)
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
        await engine.dispose()

    asyncio.run(run())


@pytest.fixture
def own_mariadb() -> Iterator[tuple[OwnMariaDB, Callable[[], None]]]:
    """A migrated MariaDB of this test's own and a function that starts it again."""
    server_binary, install_binary = mariadb_binaries()
    base = Path(tempfile.mkdtemp(prefix="sl-mdb-"))  # short: the socket path has a limit
    server = OwnMariaDB(base)
    try:
        server.install(install_binary)
        server.start(server_binary)
        _server_admin(server.url, ["CREATE DATABASE stockledger CHARACTER SET utf8mb4"])
        upgrade(server.url)
        yield server, lambda: server.start(server_binary)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own (it may FLUSHALL it); its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        no_server_binary("redis-server is not installed: cannot start a Redis of its own")
    with redis_server(binary, tmp_path) as port:
        yield f"redis://127.0.0.1:{port}/0"


# ------------------------------------------------------- one row locked by another session


@dataclass
class HeldRow:
    """A service whose balance (default, hot) another SQL session holds (SELECT ... FOR
    UPDATE in an open transaction), with 51 reservations due: one on "hot", 50 on other SKUs."""

    db: Database
    service: InventoryService
    index: RedisExpiryIndex | None
    hot_hold: int  # the due reservation on the held row
    cold_holds: list[int]  # the 50 due reservations on other SKUs
    cold: list[str]  # the other SKUs (10 units each, 2 held)
    release: Callable[[], Awaitable[None]]  # ends the other session's transaction


@pytest.fixture(params=["redis", "database"])
async def held_row(
    request: pytest.FixtureRequest, mysql_url: str, clock: Clock, org_id: str
) -> AsyncIterator[HeldRow]:
    """:class:`HeldRow` on the test MariaDB, with Redis locks and index, or database locks
    alone; lock wait 1 s."""
    settings = make_settings(lock_wait_seconds=LOCK_WAIT)
    db = create_database(settings, mysql_url)
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    locker = index = None
    if request.param == "redis":
        locker = RedisBalanceLocker(client, wait=LOCK_WAIT)
        index = RedisExpiryIndex(client, org_id)
    service = InventoryService(
        db, settings, clock=clock, locker=locker, expiry_index=index, org_id=org_id
    )
    other = create_async_engine(mysql_url, isolation_level="READ COMMITTED", poolclass=NullPool)
    cold = [f"cold-{i:02d}" for i in range(50)]
    try:
        await service.restock("stock", [Line("hot", 10), *(Line(s, 10) for s in cold)])
        hot = await service.reserve("hold-hot", [Line("hot", 1)], ttl_seconds=30)
        held = await asyncio.gather(
            *(service.reserve(f"hold-{s}", [Line(s, 2)], ttl_seconds=30) for s in cold)
        )
        clock.advance(31)  # all 51 holds are due
        async with other.connect() as session:
            await session.begin()
            locked = await session.execute(
                text(
                    "SELECT on_hand FROM inventory_balance WHERE org_id = :o "
                    "AND location = 'default' AND sku = 'hot' FOR UPDATE"
                ),
                {"o": org_id},
            )
            assert locked.scalar_one() == 10
            yield HeldRow(
                db,
                service,
                index,
                hot.reservation.id,
                [r.reservation.id for r in held],
                cold,
                session.rollback,
            )
            if session.in_transaction():
                await session.rollback()
    finally:
        await _close(service)
        await other.dispose()
        await db.dispose()
        await _drop_org_keys(client, org_id)
        await client.aclose()


async def test_a_write_stuck_behind_a_row_lock_times_out_and_stalls_no_other_sku(
    held_row: HeldRow, org_id: str
) -> None:
    """A reserve on the held row answers LockTimeoutError (retryAfterMs) within about the lock
    wait, retries included; reserves on other SKUs made meanwhile go through at once."""
    service = held_row.service
    hot = asyncio.create_task(_timed(service.reserve("hot-1", [Line("hot", 1)], ttl_seconds=600)))
    cold_calls: list[tuple[str, Any, float]] = []  # (sku, result, seconds)
    for wave in range(10):  # spread over the hot reserve's wait
        skus = held_row.cold[wave * 5 : wave * 5 + 5]
        answers = await _answered(
            asyncio.gather(
                *(_timed(service.reserve(f"new-{s}", [Line(s, 1)], ttl_seconds=600)) for s in skus)
            ),
            f"reserves of {skus} (free rows) while another session holds 'hot'",
        )
        cold_calls += [(s, r, t) for s, (r, t) in zip(skus, answers, strict=True)]
        await asyncio.sleep(0.05)
    hot_pending_after_colds = not hot.done()
    hot_result, hot_seconds = await _answered(hot, "the reserve of the held row")

    assert isinstance(hot_result, LockTimeoutError), repr(hot_result)
    assert hot_result.retry_after_ms > 0
    assert hot_seconds < 5.0, f"the write on the held row took {hot_seconds:.1f} s"
    refused = [(s, repr(r), round(t, 2)) for s, r, t in cold_calls if _kind(r) != "ok"]
    assert refused == [], f"writes on free rows refused while 'hot' was held: {refused}"
    slowest = max(cold_calls, key=lambda c: c[2])
    assert slowest[2] < 0.75, (
        f"a write on another SKU ({slowest[0]}) took {slowest[2]:.2f} s while one row was "
        f"held (lock wait {LOCK_WAIT} s); latencies: "
        f"{sorted(round(t, 2) for _, _, t in cold_calls)}"
    )
    assert hot_pending_after_colds, "the other SKUs' writes waited for the held one"

    # Once the row is free the refused call goes through: its key was not consumed.
    await held_row.release()
    again = await _answered(
        service.reserve("hot-1", [Line("hot", 1)], ttl_seconds=600), "the retry"
    )
    assert again.replayed is False
    assert await find_violations(held_row.db, org_id) == []


async def test_a_row_locked_by_another_session_holds_up_no_other_expiry(
    held_row: HeldRow, org_id: str
) -> None:
    """51 reservations are due, one of them on the held row: the sweeper's pass (Redis index)
    or expire_due (database scan) expires the 50 others promptly, committed without waiting
    for the held one, which stays ACTIVE and expires once its row is free."""
    db, service, index = held_row.db, held_row.service, held_row.index
    polled: list[float] = []

    async def poll_expired(start: float) -> None:
        while True:
            statuses = await _statuses(db, org_id, held_row.cold_holds)
            if list(statuses.values()).count("EXPIRED") == len(held_row.cold_holds):
                polled.append(time.monotonic() - start)
                return
            await asyncio.sleep(0.05)

    start = time.monotonic()
    watcher = asyncio.create_task(poll_expired(start))
    if index is not None:
        sweep = Sweeper(service, index).run_once(scan=False)
        expired, seconds = await _answered(_timed(sweep), "the sweeper's pass")
        assert expired == 50, repr(expired)
    else:
        expired, seconds = await _answered(_timed(service.expire_due()), "expire_due")
        assert isinstance(expired, list), repr(expired)
        assert sorted(expired) == sorted(held_row.cold_holds)
    await _answered(watcher, "the 50 expiries")
    assert seconds < 5.0, f"the expiry pass took {seconds:.1f} s"
    assert polled[0] < 3.0, f"the 50 other expiries were held for {polled[0]:.1f} s"
    assert await _statuses(db, org_id, [held_row.hot_hold]) == {held_row.hot_hold: "ACTIVE"}

    await held_row.release()
    if index is not None:
        await asyncio.sleep(1.1)  # its expiry was put back one sweep interval later
        again = await _answered(Sweeper(service, index).run_once(scan=False), "the next pass")
        assert again == 1
    else:
        assert await _answered(service.expire_due(), "expire_due") == [held_row.hot_hold]
    assert await _statuses(db, org_id, [held_row.hot_hold]) == {held_row.hot_hold: "EXPIRED"}
    assert await find_violations(db, org_id) == []


# ------------------------------------------------------------------- lost connections


@dataclass
class Call:
    """One call of a burst: its key, what it should write, and how it ended."""

    key: str
    entries: int  # ledger entries its effect writes
    phase: str  # when it started
    result: Any
    seconds: float
    again: Callable[[], Awaitable[Any]]  # the same call, same key and payload


def _burst_worker(
    service: InventoryService,
    skus: list[str],
    n: int,
    stop: asyncio.Event,
    calls: list[Call],
    phase: Callable[[], str],
) -> Callable[[], Awaitable[None]]:
    """A loop of reserves, restocks and direct deducts on ``skus``, each with a fresh key, one
    in four sent twice at once (a client retrying while its first try is in flight)."""
    rng = random.Random(n)

    async def run() -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            key = f"w{n}-{i}"
            op = rng.choice(["reserve", "reserve", "restock", "deduct"])
            if op == "reserve":
                lines = [Line(s, 1) for s in rng.sample(skus, rng.choice([1, 2]))]

                def again(key: str = key, lines: list[Line] = lines) -> Awaitable[Any]:
                    return service.reserve(key, lines, ttl_seconds=600)

                entries = len(lines)
            elif op == "restock":
                sku = rng.choice(skus)

                def again(key: str = key, sku: str = sku) -> Awaitable[Any]:
                    return service.restock(key, [Line(sku, 5)])

                entries = 1
            else:
                sku = rng.choice(skus)

                def again(key: str = key, sku: str = sku) -> Awaitable[Any]:
                    return service.deduct(key, lines=[Line(sku, 1)])

                entries = 1
            started = phase()
            copies = 2 if i % 4 == 0 else 1
            done = await asyncio.gather(*(_timed(again()) for _ in range(copies)))
            for result, seconds in done:
                calls.append(Call(key, entries, started, result, seconds, again))

    return run


async def _retried(call: Callable[[], Awaitable[Any]]) -> Any:
    """``call()``'s result, called again (as a client would) while it answers
    ServiceUnavailableError, at most three times; the last result or exception."""
    for _ in range(3):
        result, _seconds = await _timed(call())
        if not isinstance(result, ServiceUnavailableError):
            break
        await asyncio.sleep(result.retry_after_ms / 1000)
    return result


async def _check_burst(db: Database, org_id: str, calls: list[Call]) -> None:
    """No call ended in an untyped error; the invariants hold; each key's effects are there
    once if any of its calls succeeded, else zero or once; a retry of every key succeeds and
    leaves each key's effects there exactly once."""
    bad = [(c.key, c.phase, repr(c.result)) for c in calls if _kind(c.result) == "bad"]
    assert bad == [], bad
    assert await find_violations(db, org_id) == []
    counts = await _ledger_counts(db, org_id)
    by_key: dict[str, list[Call]] = {}
    for c in calls:
        by_key.setdefault(c.key, []).append(c)
    for key, same in by_key.items():
        expected = same[0].entries
        found = counts.get(key, 0)
        if any(_kind(c.result) == "ok" for c in same):
            assert found == expected, f"{key}: succeeded, {found} of {expected} entries"
        else:
            assert found in (0, expected), f"{key}: failed, {found} of {expected} entries"
    # Every key, retried with the same payload once the database is fine, succeeds: a replay
    # where it had taken effect, else its first effect.
    retried = await asyncio.gather(*(_retried(same[0].again) for same in by_key.values()))
    failed = [(k, repr(r)) for k, r in zip(by_key, retried, strict=True) if _kind(r) != "ok"]
    assert failed == [], failed
    counts = await _ledger_counts(db, org_id)
    wrong = {k: (counts.get(k, 0), s[0].entries) for k, s in by_key.items()}
    assert {k: v for k, v in wrong.items() if v[0] != v[1]} == {}
    assert await find_violations(db, org_id) == []


@pytest.mark.slow
async def test_killed_connections_mid_burst_answer_success_or_a_typed_error(
    mysql_url: str, clock: Clock, org_id: str, json_logs: None
) -> None:
    """KILL every connection of the service's database (from an admin session) again and
    again while a burst of writes runs: every call succeeds or answers a typed error, and no
    key's effect is lost or doubled."""
    settings = make_settings(lock_wait_seconds=2.0)
    db = create_database(settings, mysql_url)
    service = InventoryService(db, settings, clock=clock, org_id=org_id)
    database_name = make_url(mysql_url).database
    admin = create_async_engine(mysql_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    skus = [f"sku-{i:02d}" for i in range(20)]
    calls: list[Call] = []
    phase = "before"
    stop, stop_killing = asyncio.Event(), asyncio.Event()
    killed = 0

    async def killer() -> None:
        nonlocal killed
        async with admin.connect() as conn:
            while not stop_killing.is_set():
                rows = await conn.execute(
                    text(
                        "SELECT ID FROM information_schema.PROCESSLIST "
                        "WHERE DB = :d AND ID <> CONNECTION_ID()"
                    ),
                    {"d": database_name},
                )
                for (pid,) in rows.all():
                    try:
                        await conn.execute(text(f"KILL {int(pid)}"))
                        killed += 1
                    except DBAPIError:  # gone already
                        pass
                await asyncio.sleep(0.1)

    try:
        await service.restock("stock", [Line(s, 100_000) for s in skus])
        workers = [
            asyncio.create_task(_burst_worker(service, skus, n, stop, calls, lambda: phase)())
            for n in range(8)
        ]
        await asyncio.sleep(0.3)
        phase = "killing"
        kill_task = asyncio.create_task(killer())
        await asyncio.sleep(2.5)
        stop_killing.set()
        await kill_task
        phase = "after"
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 60)

        assert killed > 0
        kinds = [_kind(c.result) for c in calls if c.phase == "killing"]
        assert kinds.count("ok") > 0, kinds
        assert any(_kind(c.result) == "ok" for c in calls if c.phase == "after")
        await _check_burst(db, org_id, calls)
    finally:
        stop.set()
        stop_killing.set()
        await _close(service)
        await admin.dispose()
        await db.dispose()


async def _post(http: httpx.AsyncClient, name: str, **input: Any) -> httpx.Response:
    return await http.post(
        "/graphql", json={"query": mutation_document(name), "variables": {"input": input}}
    )


@pytest.mark.slow
async def test_a_mariadb_restart_mid_burst_answers_unavailable_never_unexpected(
    own_mariadb: tuple[OwnMariaDB, Callable[[], None]],
    redis_url: str,
    redis_client: aioredis.Redis,
    clock: Clock,
    org_id: str,
    json_logs: None,
) -> None:
    """SIGKILL the MariaDB during a burst and start it again: calls made while it is down
    answer ServiceUnavailableError (or succeed once it is back), over HTTP a 503 with
    ``UNAVAILABLE`` and retryAfterMs, and no key's effect is lost or doubled."""
    server, start_again = own_mariadb
    settings = make_settings(lock_wait_seconds=LOCK_WAIT)
    db = create_database(settings, server.url)
    service = InventoryService(db, settings, clock=clock, org_id=org_id)
    app = create_served_app(
        Settings(
            database_url=server.url,
            redis_url=redis_url,
            org_id=org_id,
            lock_wait_seconds=LOCK_WAIT,
            retry_max_attempts=30,
            retry_max_backoff_seconds=0.05,
            auth="required",
        )
    )
    skus = [f"sku-{i:02d}" for i in range(20)]
    calls: list[Call] = []
    phase = "before"
    stop = asyncio.Event()
    down_for = 2.0  # seconds, twice the lock wait
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            headers = await admin_headers(app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://sl", headers=headers
            ) as http:
                first = await _post(http, "restock", idempotencyKey="http-0", lines=[line("a", 1)])
                assert first.status_code == 200, first.text
                assert first.json()["data"]["restock"]["__typename"] == "RestockSuccess"
                await service.restock("stock", [Line(s, 100_000) for s in skus])
                unseen_key = await admin_headers(app)  # never used: not in the key cache

                workers = [
                    asyncio.create_task(
                        _burst_worker(service, skus, n, stop, calls, lambda: phase)()
                    )
                    for n in range(8)
                ]
                await asyncio.sleep(0.5)
                phase = "down"
                await asyncio.to_thread(server.kill)
                http_down = asyncio.create_task(
                    _timed(_post(http, "restock", idempotencyKey="http-1", lines=[line("a", 1)]))
                )
                # A key the server must look up while the database is away: 503, not a 500.
                lookup = await asyncio.wait_for(
                    http.post("/graphql", json={"query": "{ __typename }"}, headers=unseen_key),
                    down_for,
                )
                assert lookup.status_code == 503, lookup.text
                assert lookup.json()["errors"][0]["extensions"]["code"] == "UNAVAILABLE"
                assert int(lookup.headers["retry-after"]) >= 1
                await asyncio.sleep(down_for)
                await asyncio.to_thread(start_again)
                phase = "up"
                during, during_seconds = await _answered(http_down, "the HTTP write")
                await asyncio.sleep(1.5)
                stop.set()
                await asyncio.wait_for(asyncio.gather(*workers), 60)

                assert isinstance(during, httpx.Response), repr(during)
                body = during.json()
                assert during.status_code == 503, (during_seconds, body)
                assert body["errors"][0]["message"] != "Unexpected error.", body
                extensions = body["errors"][0]["extensions"]
                assert extensions["code"] == "UNAVAILABLE", body
                assert extensions["retryAfterMs"] > 0, body
                assert int(during.headers["retry-after"]) >= 1
                # Answered while the database was still down (it was down for twice the
                # lock wait), not only once it was back.
                assert during_seconds < down_for, f"answered after {during_seconds:.1f} s"
                # Once the database is back, the same request goes through (key not used).
                after = await _post(http, "restock", idempotencyKey="http-1", lines=[line("a", 1)])
                assert after.status_code == 200, after.text
                restocked = after.json()["data"]["restock"]
                assert (restocked["__typename"], restocked["replayed"]) == ("RestockSuccess", False)

        down = [c for c in calls if c.phase == "down"]
        assert down, "no call was made while the database was down"
        wrong = [
            f"{c.key}: {c.result!r} after {c.seconds:.2f} s"
            for c in down
            if _kind(c.result) not in ("ok", "unavailable")
        ]
        assert wrong == [], f"{len(wrong)} of {len(down)} calls made while down: {wrong[:5]}"
        assert any(_kind(c.result) == "unavailable" for c in down)
        # Each answered within about the lock wait (retries included), not after the outage.
        slow = [c.seconds for c in down if _kind(c.result) == "unavailable"]
        assert max(slow) < LOCK_WAIT + 1.0, slow
        assert any(_kind(c.result) == "ok" for c in calls if c.phase == "up")
        await _check_burst(db, org_id, calls)
    finally:
        stop.set()
        await _close(service)
        await db.dispose()


# ---------------------------------------------------------------- a lost expiry index


async def test_expired_holds_a_flushed_index_forgot_do_not_refuse_a_reserve(
    db: Database, settings: Settings, clock: Clock, org_id: str, own_redis: str
) -> None:
    """Only expired carts hold the units, and Redis lost the expiry index (FLUSHALL): a
    1-unit reserve succeeds at once, expiring the due holds in its own transaction."""
    client = aioredis.Redis.from_url(own_redis)
    index = RedisExpiryIndex(client, org_id)
    service = InventoryService(
        db,
        settings,
        clock=clock,
        locker=RedisBalanceLocker(client),
        expiry_index=index,
        org_id=org_id,
    )
    try:
        await service.restock("stock", [Line("a", 3)])
        carts = [
            (await service.reserve(f"cart-{i}", [Line("a", 1)], ttl_seconds=5)).reservation.id
            for i in range(3)
        ]
        assert await client.zcard(index.key) == 3
        clock.advance(6)  # every cart is past its expiry, none swept
        await client.flushall()
        assert await client.zcard(index.key) == 0

        result, seconds = await _timed(service.reserve("new", [Line("a", 1)], ttl_seconds=60))
        assert _kind(result) == "ok", repr(result)
        assert seconds < 1.0
        assert [(b.sku, b.on_hand, b.reserved) for b in result.balances] == [("a", 3, 1)]
        async with db.read() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT event_type, reservation_id, idempotency_key, created_at "
                        "FROM inventory_ledger WHERE org_id = :o AND event_type IN "
                        "('EXPIRE', 'RESERVE') AND created_at = (SELECT created_at FROM "
                        "inventory_ledger WHERE org_id = :o AND idempotency_key = 'new')"
                    ),
                    {"o": org_id},
                )
            ).all()
        # The three EXPIRE entries were written with the new reserve's (same transaction).
        assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
            [("EXPIRE", rid, f"expire:{rid}") for rid in carts]
            + [("RESERVE", result.reservation.id, "new")]
        )
        assert await _statuses(db, org_id, carts) == dict.fromkeys(carts, "EXPIRED")
        assert await find_violations(db, org_id) == []
    finally:
        await _close(service)
        await client.aclose()


# ---------------------------------------------------------- ids of a sweeper that died


async def test_ids_popped_by_a_sweeper_that_died_come_back_after_the_lease(
    db: Database,
    settings: Settings,
    clock: Clock,
    org_id: str,
    redis_client: aioredis.Redis,
) -> None:
    """A sweeper pops due ids (leased for 0.5 s) and dies before expiring them: once the lease
    has run out, the next sweeper's pass finds them in the index again and expires them."""
    lease = 0.5
    index = RedisExpiryIndex(redis_client, org_id, lease=lease)
    service = InventoryService(db, settings, clock=clock, expiry_index=index, org_id=org_id)

    async def no_scan(limit: int = 1000) -> list[int]:
        raise AssertionError("the pass scanned the database")

    try:
        await service.restock("stock", [Line("a", 10)])
        ids = [
            (await service.reserve(f"r-{i}", [Line("a", 2)], ttl_seconds=5)).reservation.id
            for i in range(3)
        ]
        clock.advance(6)
        # A sweeper pops them and dies before expiring them.
        dead = RedisExpiryIndex(redis_client, org_id, lease=lease)
        assert sorted(await dead.pop_due(clock(), 100)) == sorted(ids)

        service.due_reservation_ids = no_scan  # type: ignore[method-assign]
        sweeper = Sweeper(service, index)
        assert await sweeper.run_once(scan=False) == 0  # still leased to the dead one
        assert await _statuses(db, org_id, ids) == dict.fromkeys(ids, "ACTIVE")
        await asyncio.sleep(lease + 0.2)
        assert await sweeper.run_once(scan=False) == 3  # from the index, no database scan
        assert await _statuses(db, org_id, ids) == dict.fromkeys(ids, "EXPIRED")
        assert await redis_client.zcard(index.key) == 0
        counts = await _ledger_counts(db, org_id)
        assert {k: n for k, n in counts.items() if k.startswith("expire:")} == {
            f"expire:{rid}": 1 for rid in ids
        }
        assert await find_violations(db, org_id) == []
    finally:
        await _close(service)


# ------------------------------------------------------------ a SIGKILLed lock holder

_HOLDER = textwrap.dedent(
    """
    import asyncio
    import sys

    import redis.asyncio as aioredis

    from stockledger.locks.redis_locks import RedisBalanceLocker


    async def main() -> None:
        client = aioredis.Redis.from_url(sys.argv[1])
        locker = RedisBalanceLocker(client, ttl=3.0, wait=1.0)
        claim = await locker.claim(sys.argv[2], [[("default", "hot")]])
        if claim.granted != [True] or not claim.names:
            print("REFUSED", flush=True)
            return
        async with locker.keep(claim):  # the batch is still in the database
            print("HELD", claim.token, flush=True)
            await asyncio.sleep(3600)


    asyncio.run(main())
    """
)


@pytest.mark.slow
async def test_a_sigkilled_holders_locks_stop_blocking_within_the_lease(
    redis_url: str, redis_client: aioredis.Redis, org_id: str
) -> None:
    """Another process claims a balance's lock (3 s TTL) and keeps its batch "in the
    database": alive, its lease is extended past the TTL; SIGKILLed, the key is free again
    within the TTL (measured: under 4 s)."""
    name = lock_key(org_id, "default", "hot")
    key = ("default", "hot")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLDER,
        redis_url,
        org_id,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    locker = RedisBalanceLocker(redis_client, ttl=3.0, wait=0.05)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        marker = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not marker.startswith(b"HELD"):
            os.kill(proc.pid, signal.SIGKILL)
            err = await asyncio.wait_for(proc.stderr.read(), 10)
            pytest.fail(f"the holder did not take the lock: {marker!r} {err.decode()}")
        token = marker.split()[1]
        # Alive, it keeps its lease past the TTL.
        await asyncio.sleep(3.5)
        assert proc.returncode is None
        assert await redis_client.get(name) == token
        assert 0 < await redis_client.pttl(name) <= 3000
        refused = await locker.claim(org_id, [[key]])
        assert refused.granted == [False]

        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.wait_for(proc.wait(), 10)
        while True:
            claim = await locker.claim(org_id, [[key]])
            if claim.granted == [True]:
                break
            assert time.monotonic() - killed_at < 10, "the dead holder's lock never lapsed"
            await asyncio.sleep(0.02)
        freed_after = time.monotonic() - killed_at
        assert await redis_client.get(name) == claim.token.encode()
        await locker.release_with(claim, None, IndexChanges())
        assert freed_after < 4.0, f"the dead holder's lock blocked for {freed_after:.1f} s"
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)


@pytest.mark.slow
async def test_the_lease_keeper_lets_go_when_its_batch_ends_mid_renewal(
    redis_client: aioredis.Redis, org_id: str
) -> None:
    """keep() extends a claim's leases while its batch is in the database. A batch that ends
    while an extension is in flight (a batch lasting about a third of the TTL, e.g. one that
    waited out innodb_lock_wait_timeout with the default 3 s TTL) must still leave keep() at
    once: its writer, and every command queued on it, waits for that."""
    locker = RedisBalanceLocker(redis_client, ttl=0.15, wait=1.0)  # renews every 50 ms
    key = [("default", "k")]
    rng = random.Random(7)
    for i in range(100):
        claim = await locker.claim(org_id, [key])
        assert claim.granted == [True]

        async def batch(claim: Any = claim) -> None:
            async with locker.keep(claim):
                await asyncio.sleep(0.05 + rng.uniform(-0.003, 0.003))

        task = asyncio.create_task(batch())
        done, _ = await asyncio.wait({task}, timeout=2)
        if not done:
            leases = [t for t in asyncio.all_tasks() if t.get_name() == "stockledger-lease"]
            states = [repr(t) for t in leases]
            for _ in range(20):  # end the renewal that outlived its cancellation
                for t in leases:
                    t.cancel()
                await asyncio.wait({task}, timeout=0.2)
                if task.done():
                    break
            pytest.fail(f"batch {i}: keep() still waits 2 s after its block ended: {states}")
        await locker.release_with(claim, None, IndexChanges())
    assert await redis_client.exists(lock_key(org_id, "default", "k")) == 0


# ------------------------------------------------------------- keys named like suffixes

TRICKY = [
    "A",
    "A:turn",
    "A:lock",
    "turn",
    "lock",
    "expiry",
    "turn:A",
    "lock:A",
    "lock:1:A",
    "turn:7:default:A",
    "1:A",
    "1",
    "A:1",
    "1:A:turn",
    ":",
    "::",
    ":A",
    "A:",
    "0:",
    "default",
    "default:A",
    "7:default:A",
    "{x}",
    "}",
    "{",
    "stockledger",
    "expiry:1",
    "",
]


def test_lock_turn_and_expiry_keys_never_collide(org_id: str) -> None:
    seen: dict[str, tuple[str, str, str, str]] = {}
    orgs = [org_id, f"{org_id}:lock", f"{org_id}:turn:1"]
    for org in orgs:
        for location, sku in itertools.product(TRICKY, TRICKY):
            for kind, make in (("lock", lock_key), ("turn", turn_key)):
                name = make(org, location, sku)
                assert name not in seen, (name, seen.get(name), (org, kind, location, sku))
                seen[name] = (org, kind, location, sku)
    for org in orgs:
        assert expiry_key(org) not in seen, (expiry_key(org), seen[expiry_key(org)])
    assert len({expiry_key(org) for org in orgs}) == len(orgs)


async def test_reserves_on_skus_named_like_key_suffixes_do_not_block_each_other(
    db: Database,
    settings: Settings,
    clock: Clock,
    org_id: str,
    redis_client: aioredis.Redis,
) -> None:
    """Another process holds the locks of (default, X) and (1, A:B), and a reserve of X waits
    for it (its turn marker set). Reserves of X:turn, X:lock and (1:A, B) go through at once."""
    locker = RedisBalanceLocker(redis_client, wait=LOCK_WAIT)
    service = InventoryService(db, settings, clock=clock, locker=locker, org_id=org_id)
    held = [("default", "X"), ("1", "A:B")]
    free = [("default", "X:turn"), ("default", "X:lock"), ("1:A", "B"), ("default", "turn")]
    try:
        await service.restock("stock", [Line(s, 100, loc) for loc, s in held + free])
        # Side by side, nothing held: both succeed, promptly.
        both = await asyncio.gather(
            *(
                _timed(service.reserve(f"pair-{sku}-{i}", [Line(sku, 1)], ttl_seconds=600))
                for i in range(10)
                for sku in ("X", "X:turn")
            )
        )
        assert [repr(r) for r, _ in both if _kind(r) != "ok"] == []
        assert max(s for _, s in both) < LOCK_WAIT

        other = RedisBalanceLocker(redis_client, wait=LOCK_WAIT)  # another process
        holding, release = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with other.hold(org_id, held):
                holding.set()
                await release.wait()

        hold_task = asyncio.create_task(holder())
        await holding.wait()
        try:
            waiter = asyncio.create_task(
                _timed(service.reserve("wait-X", [Line("X", 1)], ttl_seconds=600))
            )
            await asyncio.sleep(0.2)  # the waiter has set its turn marker on X
            assert await redis_client.exists(turn_key(org_id, "default", "X")) == 1
            results = await asyncio.gather(
                *(
                    _timed(service.reserve(f"free-{loc}-{sku}", [Line(sku, 1, loc)]))
                    for loc, sku in free
                )
            )
            report = [
                (key, type(r).__name__, round(t, 2))
                for key, (r, t) in zip(free, results, strict=True)
            ]
            # Each through at once: not refused, and not let through only once the waiter
            # on X gave up (its lock wait, 1 s).
            assert all(_kind(r) == "ok" and t < 0.5 for r, t in results), report
            assert not waiter.done()
        finally:
            release.set()
            await hold_task
        result, _ = await waiter
        assert _kind(result) == "ok", repr(result)  # X was given its turn once free
        assert await find_violations(db, org_id) == []
    finally:
        await _close(service)
