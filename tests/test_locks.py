"""Redis balance locks (ARCHITECTURE section 4): owner-verified leases, all-or-nothing acquire,
sorted order under concurrency, lost leases, a Redis outage, and the org hash tag."""

from __future__ import annotations

import asyncio
import random
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import ParseResult, urlparse, urlunparse

import pytest
import redis.asyncio as aioredis
from conftest import Clock, make_settings
from fakeredis import FakeAsyncRedis
from own_servers import redis_server
from prometheus_client import REGISTRY
from redis.cluster import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from stockledger.config import Settings
from stockledger.db.engine import Database
from stockledger.db.models import idempotency_key as K
from stockledger.db.models import inventory_ledger as L
from stockledger.db.models import reservation as R
from stockledger.locks import IndexChanges, LocksBusy
from stockledger.locks.redis_locks import (
    RedisBalanceLocker,
    RedisExpiryIndex,
    RedisHealth,
    lock_key,
)
from stockledger.runtime import create_redis
from stockledger.services import (
    IdempotencyKeyReusedError,
    InsufficientStockError,
    InventoryService,
    Line,
    LockTimeoutError,
)
from stockledger.services.queries import InventoryQueries
from stockledger.services.reconcile import find_violations


def metric(name: str) -> float:
    """The current value of an unlabelled Prometheus counter (0 when never set)."""
    return REGISTRY.get_sample_value(name) or 0.0


async def _drop_org_keys(client: Any, org_id: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"stockledger:{{{org_id}}}:*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def real_redis(redis_url: str, org_id: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test Redis (db 15); this test's org keys are deleted afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await _drop_org_keys(client, org_id)
    await client.aclose()


@pytest.fixture(params=["redis", "fakeredis"])
async def any_redis(request: pytest.FixtureRequest, org_id: str) -> AsyncIterator[Any]:
    """The real test Redis, or the in-process fakeredis of the embedded default."""
    if request.param == "redis":
        client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        client = FakeAsyncRedis()
    yield client
    await _drop_org_keys(client, org_id)
    await client.aclose()


@pytest.fixture
async def pooled_redis(redis_url: str, org_id: str) -> AsyncIterator[aioredis.Redis]:
    """A client built like production's (runtime.create_redis: blocking pool, short timeouts)."""
    client = create_redis(make_settings(redis_url=redis_url))
    yield client
    await _drop_org_keys(client, org_id)
    await client.aclose()


def _names(org_id: str, *skus: str, location: str = "default") -> list[str]:
    return sorted(lock_key(org_id, location, s) for s in skus)


async def _ledger_count(db: Database, org_id: str) -> int:
    async with db.read() as conn:
        return int(
            (
                await conn.execute(select(func.count()).select_from(L).where(L.c.org_id == org_id))
            ).scalar_one()
        )


# ----------------------------------------------------------------------------- lost leases


async def test_expired_lease_cannot_release_or_extend_the_next_holders_lock(
    any_redis: Any, org_id: str
) -> None:
    locker = RedisBalanceLocker(any_redis, ttl=0.05, wait=1.0)
    other = RedisBalanceLocker(any_redis, ttl=5.0, wait=1.0)  # the second holder
    names = _names(org_id, "a", "b")
    first, second = secrets.token_hex(8), secrets.token_hex(8)
    lost_before = metric("inventory_lock_lost_total")

    assert await locker.acquire(names, first) is True
    await asyncio.sleep(0.15)  # the first holder's lease runs out
    assert await any_redis.exists(*names) == 0
    assert await other.acquire(names, second) is True  # free again, without waiting

    assert await locker.extend(names, first, ttl=60) == 0
    assert await locker.release(names, first) == 0
    for name in names:
        assert await any_redis.get(name) == second.encode()
        assert 0 < await any_redis.pttl(name) <= 5000  # not extended by the first holder
    assert metric("inventory_lock_lost_total") - lost_before == len(names)

    # The real owner still can.
    assert await other.extend(names, second, ttl=60) == len(names)
    assert await any_redis.pttl(names[0]) > 5000
    assert await other.release(names, second) == len(names)
    assert await any_redis.exists(*names) == 0
    assert metric("inventory_lock_lost_total") - lost_before == len(names)


async def test_hold_that_outlives_its_lease_leaves_the_next_holder_alone(
    any_redis: Any, org_id: str
) -> None:
    locker = RedisBalanceLocker(any_redis, ttl=0.05, wait=1.0)
    other = RedisBalanceLocker(any_redis, ttl=5.0, wait=1.0)
    key = [("default", "hot")]
    name = lock_key(org_id, "default", "hot")
    lost_before = metric("inventory_lock_lost_total")
    async with locker.hold(org_id, key):
        assert await any_redis.exists(name) == 1
        await asyncio.sleep(0.15)  # the write outlives its lease
        second = secrets.token_hex(8)
        assert await other.acquire([name], second) is True
    # The first hold's exit (release in finally) did not delete the second holder's lock.
    assert await any_redis.get(name) == second.encode()
    assert metric("inventory_lock_lost_total") - lost_before == 1


# ------------------------------------------------------------------------- all or nothing


@pytest.mark.parametrize("busy_index", [0, 1, 2])
async def test_acquire_is_all_or_nothing(any_redis: Any, org_id: str, busy_index: int) -> None:
    locker = RedisBalanceLocker(any_redis, ttl=5.0, wait=0.05)
    cart = [("default", "c"), ("default", "a"), ("default", "b")]
    names = _names(org_id, "a", "b", "c")
    other = secrets.token_hex(8)
    await any_redis.set(names[busy_index], other, px=10_000)
    timeouts_before = metric("inventory_lock_timeouts_total")

    started = time.monotonic()
    with pytest.raises(LocksBusy) as caught:
        async with locker.hold(org_id, cart):
            pytest.fail("the hold must not be entered while a key is held by another token")
    # Gave up after its own wait, not after the other holder's 10 s lease.
    assert time.monotonic() - started < 5.0
    assert caught.value.retry_after_ms > 0
    for i, name in enumerate(names):
        if i == busy_index:
            assert await any_redis.get(name) == other.encode()
        else:
            assert await any_redis.exists(name) == 0, f"{name} left behind"
    assert metric("inventory_lock_timeouts_total") - timeouts_before == 1


async def test_busy_lock_through_the_service_is_lock_timeout_and_changes_nothing(
    db: Database, settings: Settings, clock: Clock, org_id: str, real_redis: aioredis.Redis
) -> None:
    locker = RedisBalanceLocker(real_redis, ttl=5.0, wait=0.05)
    service = InventoryService(db, settings, clock=clock, locker=locker, org_id=org_id)
    queries = InventoryQueries(db, org_id)
    await service.restock("stock", [Line("a", 10), Line("b", 10), Line("c", 10)])
    before = {s: await queries.balance(s) for s in "abc"}
    entries_before = await _ledger_count(db, org_id)
    names = _names(org_id, "a", "b", "c")
    other = secrets.token_hex(8)
    await real_redis.set(names[1], other, px=10_000)
    timeouts_before = metric("inventory_lock_timeouts_total")

    cart = [Line("c", 1), Line("a", 2), Line("b", 3)]
    with pytest.raises(LockTimeoutError) as caught:
        await service.reserve("cart-1", cart, ttl_seconds=60)
    assert caught.value.retry_after_ms > 0
    assert caught.value.code == "LOCK_TIMEOUT"
    assert metric("inventory_lock_timeouts_total") - timeouts_before == 1

    assert {s: await queries.balance(s) for s in "abc"} == before
    assert await _ledger_count(db, org_id) == entries_before
    async with db.read() as conn:
        assert (await conn.execute(select(R.c.id).where(R.c.org_id == org_id))).all() == []
        assert (
            await conn.execute(
                select(K.c.idempotency_key).where(
                    K.c.org_id == org_id, K.c.idempotency_key == "cart-1"
                )
            )
        ).all() == []
    assert await real_redis.exists(names[0], names[2]) == 0
    assert await real_redis.get(names[1]) == other.encode()

    # The key was not consumed: once the lock is free the same request goes through.
    await real_redis.delete(names[1])
    result = await service.reserve("cart-1", cart, ttl_seconds=60)
    assert result.replayed is False
    assert [(b.sku, b.reserved) for b in result.balances] == [("a", 2), ("b", 3), ("c", 1)]
    assert await real_redis.exists(*names) == 0  # released after the write


async def test_retry_of_a_completed_call_replays_while_its_locks_are_busy(
    db: Database, settings: Settings, clock: Clock, org_id: str, real_redis: aioredis.Redis
) -> None:
    locker = RedisBalanceLocker(real_redis, ttl=5.0, wait=0.05)
    service = InventoryService(db, settings, clock=clock, locker=locker, org_id=org_id)
    first = await service.restock("stock", [Line("a", 10)])
    reserved = await service.reserve("cart", [Line("a", 2)], ttl_seconds=60)
    await real_redis.set(_names(org_id, "a")[0], secrets.token_hex(8), px=10_000)
    timeouts_before = metric("inventory_lock_timeouts_total")
    entries_before = await _ledger_count(db, org_id)

    again = await service.restock("stock", [Line("a", 10)])
    assert again.replayed is True
    assert [e.id for e in again.ledger_entries] == [e.id for e in first.ledger_entries]
    replay = await service.reserve("cart", [Line("a", 2)], ttl_seconds=60)
    assert (replay.replayed, replay.reservation.id) == (True, reserved.reservation.id)
    with pytest.raises(IdempotencyKeyReusedError):  # the key, another payload
        await service.reserve("cart", [Line("a", 3)], ttl_seconds=60)
    with pytest.raises(LockTimeoutError):  # a new call still waits for the locks
        await service.reserve("cart-2", [Line("a", 1)], ttl_seconds=60)
    assert metric("inventory_lock_timeouts_total") - timeouts_before == 4
    assert await _ledger_count(db, org_id) == entries_before


async def test_a_failed_read_after_a_lock_timeout_still_answers_lock_timeout(
    db: Database,
    settings: Settings,
    clock: Clock,
    org_id: str,
    real_redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    locker = RedisBalanceLocker(real_redis, ttl=5.0, wait=0.05)
    service = InventoryService(db, settings, clock=clock, locker=locker, org_id=org_id)
    await service.restock("stock", [Line("a", 10)])
    await real_redis.set(_names(org_id, "a")[0], secrets.token_hex(8), px=10_000)

    def database_gone(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("SELECT ...", {}, ConnectionError("Lost connection to server"))

    monkeypatch.setattr(db, "read", database_gone)  # the reads that follow the timeout
    with pytest.raises(LockTimeoutError) as caught:
        await service.reserve("cart", [Line("a", 1)], ttl_seconds=60)
    assert caught.value.retry_after_ms > 0
    with pytest.raises(LockTimeoutError):  # its only follow-up read is the replay lookup
        await service.restock("more", [Line("a", 5)])


@pytest.mark.parametrize("operation", ["reserve", "deduct"])
async def test_lock_wait_that_runs_out_on_sold_out_stock_is_insufficient_stock(
    db: Database,
    settings: Settings,
    clock: Clock,
    org_id: str,
    real_redis: aioredis.Redis,
    operation: str,
) -> None:
    """A waiter queued behind the sale of the last unit learns "insufficient stock" (the
    definite answer), not "retry later"; with units left it is still LOCK_TIMEOUT."""
    locker = RedisBalanceLocker(real_redis, ttl=5.0, wait=0.05)
    service = InventoryService(db, settings, clock=clock, locker=locker, org_id=org_id)
    queries = InventoryQueries(db, org_id)
    await service.restock("stock", [Line("a", 3), Line("b", 5)])
    await service.reserve("sell-a", [Line("a", 3)], ttl_seconds=60)
    # Another process holds both balances' locks.
    await real_redis.set(_names(org_id, "a")[0], secrets.token_hex(8), px=10_000)
    await real_redis.set(_names(org_id, "b")[0], secrets.token_hex(8), px=10_000)
    before = {s: await queries.balance(s) for s in "ab"}
    entries_before = await _ledger_count(db, org_id)
    timeouts_before = metric("inventory_lock_timeouts_total")

    async def call(key: str, lines: list[Line]) -> object:
        if operation == "reserve":
            return await service.reserve(key, lines, ttl_seconds=60)
        return await service.deduct(key, lines=lines)

    with pytest.raises(InsufficientStockError) as short:
        await call("late", [Line("b", 1), Line("a", 1)])
    assert [(s.sku, s.requested, s.available) for s in short.value.shortages] == [("a", 1, 0)]
    with pytest.raises(LockTimeoutError):
        await call("in-time", [Line("b", 5)])
    assert metric("inventory_lock_timeouts_total") - timeouts_before == 2

    assert {s: await queries.balance(s) for s in "ab"} == before
    assert await _ledger_count(db, org_id) == entries_before


async def test_contended_call_on_stock_seen_sold_out_is_refused_without_queueing(
    db: Database, settings: Settings, clock: Clock, org_id: str, real_redis: aioredis.Redis
) -> None:
    locker = RedisBalanceLocker(real_redis, ttl=60.0, wait=60.0)
    service = InventoryService(db, settings, clock=clock, locker=locker, org_id=org_id)
    await service.restock("stock", [Line("a", 2)])
    sold = await service.reserve("sell-a", [Line("a", 2)], ttl_seconds=60)  # seen: 0 left
    release = asyncio.Event()
    held = asyncio.Event()

    async def holder() -> None:  # another request of this process, mid-write on "a"
        async with locker.hold(org_id, [("default", "a")]):
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    try:
        # Queueing would wait for the holder (60 s); the refusal must come while it holds.
        with pytest.raises(InsufficientStockError):
            await asyncio.wait_for(service.reserve("late", [Line("a", 1)]), timeout=10)
        assert not task.done()
    finally:
        release.set()
        await task
    # The refusal was not stored against the key: with stock back, the same call succeeds.
    await service.release("give-back", reservation_id=sold.reservation.id)
    result = await service.reserve("late", [Line("a", 1)])
    assert (result.replayed, result.balances[0].reserved) == (False, 1)


# ----------------------------------------------------------------------------- concurrency


@pytest.mark.slow
async def test_overlapping_carts_in_shuffled_order_neither_deadlock_nor_time_out(
    db: Database,
    settings: Settings,
    clock: Clock,
    org_id: str,
    pooled_redis: aioredis.Redis,
) -> None:
    # A wait far above the run's length: a deadlock would still show as a timeout, while a
    # slow machine cannot make the burst's last cart time out.
    locker = RedisBalanceLocker(pooled_redis, ttl=settings.lock_ttl_seconds, wait=60.0)
    service = InventoryService(db, settings, clock=clock, locker=locker, org_id=org_id)
    rng = random.Random(4)
    balances = [(f"wh-{i % 2 + 1}", f"sku-{i:02d}") for i in range(30)]
    await service.restock("stock", [Line(sku, 200, loc) for loc, sku in balances])
    timeouts_before = metric("inventory_lock_timeouts_total")

    carts: list[list[Line]] = []
    expected = dict.fromkeys(balances, 0)
    for _ in range(50):
        lines = []
        for loc, sku in rng.sample(balances, 20):
            q = rng.randint(1, 3)
            expected[(loc, sku)] += q
            lines.append(Line(sku, q, loc))
        # One key split over two lines: the cart is merged before locking.
        split = lines.pop()
        lines += [Line(split.sku, 1, split.location)] * split.quantity
        rng.shuffle(lines)
        carts.append(lines)

    results = await asyncio.wait_for(
        asyncio.gather(
            *(service.reserve(f"cart-{i}", c, ttl_seconds=600) for i, c in enumerate(carts)),
            return_exceptions=True,
        ),
        timeout=120,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert metric("inventory_lock_timeouts_total") == timeouts_before
    queries = InventoryQueries(db, org_id)
    for (loc, sku), q in expected.items():
        bal = await queries.balance(sku, loc)
        assert bal is not None
        assert (bal.on_hand, bal.reserved) == (200, q)
    assert await find_violations(db, org_id) == []
    assert [k async for k in pooled_redis.scan_iter(match=f"stockledger:{{{org_id}}}:lock:*")] == []


@pytest.mark.slow
async def test_lock_ttl_of_milliseconds_never_oversells(
    db: Database,
    settings: Settings,
    clock: Clock,
    org_id: str,
    pooled_redis: aioredis.Redis,
) -> None:
    # The burst queues for the whole run: a wait far above its length (the test is about
    # leases running out, not waits).
    locker = RedisBalanceLocker(pooled_redis, ttl=0.003, wait=60.0)
    service = InventoryService(db, settings, clock=clock, locker=locker, org_id=org_id)
    await service.restock("stock", [Line("hot", 50)])
    lost_before = metric("inventory_lock_lost_total")

    results = await asyncio.gather(
        *(service.reserve(f"r-{i}", [Line("hot", 1)], ttl_seconds=600) for i in range(200)),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(ok) == 50
    assert all(isinstance(e, InsufficientStockError) for e in failed), {
        type(e).__name__ for e in failed
    }
    bal = await InventoryQueries(db, org_id).balance("hot")
    assert bal is not None
    assert (bal.on_hand, bal.reserved) == (50, 50)
    assert await find_violations(db, org_id) == []
    # The scenario did happen: writes outlived their 3 ms leases (counted, and harmless).
    assert metric("inventory_lock_lost_total") > lost_before


# --------------------------------------------------------------------------- Redis outage


def _via(proxy: TcpProxy, parsed: ParseResult) -> str:
    """The configured Redis URL (its database number and credentials) through ``proxy``."""
    auth = parsed.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{proxy.port}" if auth else f"127.0.0.1:{proxy.port}"
    return urlunparse(parsed._replace(netloc=netloc))


class TcpProxy:
    """A TCP forwarder to Redis that the test can take down (listener and live connections)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.transports: set[asyncio.BaseTransport] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.drop_replies = False  # when set, what Redis sends back is swallowed

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.transports |= {writer.transport, up_writer.transport}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            try:
                while data := await src.read(65536):
                    if replies and self.drop_replies:
                        continue
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        tasks = {
            asyncio.create_task(pipe(reader, up_writer, replies=False)),
            asyncio.create_task(pipe(up_reader, writer, replies=True)),
        }
        self.tasks |= tasks
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Stop listening and cut every open connection."""
        assert self.server is not None
        self.server.close()
        for transport in self.transports:
            transport.abort()  # type: ignore[attr-defined]
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()
        self.transports.clear()
        self.tasks.clear()


@pytest.mark.slow
async def test_redis_outage_degrades_to_database_locks_and_recovers(
    db: Database,
    settings: Settings,
    clock: Clock,
    org_id: str,
    redis_url: str,
    real_redis: aioredis.Redis,
) -> None:
    parsed = urlparse(redis_url)
    proxy = TcpProxy((parsed.hostname or "127.0.0.1", parsed.port or 6379))
    await proxy.start()
    # Production's wiring (runtime.create_redis: no command retries, short socket timeouts).
    # A bare redis.asyncio.Redis(...) would retry each command 10 times with backoff up to 1 s
    # (redis-py 8 default), stalling every request for seconds before the locker degrades.
    client = create_redis(make_settings(redis_url=_via(proxy, parsed)))
    health = RedisHealth(retry_interval=0.1)
    locker = RedisBalanceLocker(client, health=health)
    index = RedisExpiryIndex(client, org_id, health)
    service = InventoryService(
        db, settings, clock=clock, locker=locker, expiry_index=index, org_id=org_id
    )
    probe = [("default", "probe")]
    probe_name = lock_key(org_id, "default", "probe")
    try:
        await service.restock("stock", [Line("hot", 10_000), Line("cold", 10_000)])
        async with locker.hold(org_id, probe):
            assert await real_redis.exists(probe_name) == 1  # locking through the proxy

        degraded_before = metric("inventory_redis_degraded_total")
        stop = asyncio.Event()
        done: list[float] = []  # latency of each successful reserve (seconds)
        slow: list[tuple[str, str, float]] = []
        failed: list[tuple[str, BaseException]] = []
        phase = "before"
        counter = iter(range(1_000_000))

        async def worker() -> None:
            while not stop.is_set():
                start, started_in = time.monotonic(), phase
                try:
                    await service.reserve(
                        f"r-{next(counter)}", [Line("hot", 1), Line("cold", 1)], ttl_seconds=600
                    )
                except Exception as exc:
                    failed.append((started_in, exc))
                else:
                    done.append(time.monotonic() - start)
                    if done[-1] > 0.5:
                        slow.append((started_in, phase, done[-1]))

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        await asyncio.sleep(0.3)
        before_outage = len(done)
        await proxy.stop()
        phase = "outage"
        await asyncio.sleep(1.5)
        during_outage = len(done) - before_outage
        left_in_redis = {
            k.decode(): await real_redis.pttl(k)
            async for k in real_redis.scan_iter(match=f"stockledger:{{{org_id}}}:lock:*")
        }
        await proxy.start()  # same port
        phase = "after"
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*workers)

        assert before_outage > 0
        assert during_outage > 0, "no request completed while Redis was unreachable"
        # No request sat out a Redis timeout: the client's socket timeout is 2 s and a bare
        # client's retries take longer still (the proxy refuses connections, so every failed
        # call fails at once unless something waits).
        assert max(done) < 2.0, f"slow requests (started, ended, seconds): {slow}"
        assert metric("inventory_redis_degraded_total") > degraded_before
        bal = await InventoryQueries(db, org_id).balance("hot")
        assert bal is not None and bal.reserved == len(done)
        assert await find_violations(db, org_id) == []

        # Locking resumed on the same locker once Redis answered again.
        await asyncio.sleep(health.retry_interval * 2)
        async with locker.hold(org_id, probe):
            assert await real_redis.exists(probe_name) == 1
        assert await real_redis.exists(probe_name) == 0

        # Every request succeeded, through the outage and after it.
        assert [(p, type(e).__name__) for p, e in failed] == [], (
            f"lock keys left in Redis during the outage (pttl ms): {left_in_redis}"
        )
    finally:
        if proxy.server is not None and proxy.server.is_serving():
            await proxy.stop()
        await client.aclose()


@pytest.fixture
def read_only_replica(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A real Redis replica of the test Redis (replicas refuse writes: READONLY); its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: cannot start a replica")
    parsed = urlparse(redis_url)
    primary = ["--replicaof", parsed.hostname or "127.0.0.1", str(parsed.port or 6379)]
    with redis_server(binary, tmp_path, *primary) as port:
        yield f"redis://127.0.0.1:{port}{parsed.path or '/0'}"  # the configured database


async def test_a_read_only_replica_degrades_to_database_locks(
    db: Database, settings: Settings, clock: Clock, org_id: str, read_only_replica: str
) -> None:
    """Clients left on an old primary after a failover get READONLY: the service carries on
    on database locks alone (like an outage) instead of failing every write."""
    client = create_redis(make_settings(redis_url=read_only_replica))
    health = RedisHealth(retry_interval=0.1)
    locker = RedisBalanceLocker(client, health=health)
    index = RedisExpiryIndex(client, org_id, health)
    service = InventoryService(
        db, settings, clock=clock, locker=locker, expiry_index=index, org_id=org_id
    )
    degraded_before = metric("inventory_redis_degraded_total")
    try:
        await service.restock("stock", [Line("a", 5)])
        result = await service.reserve("r-1", [Line("a", 2)], ttl_seconds=60)
    finally:
        await client.aclose()
    assert (result.replayed, [b.reserved for b in result.balances]) == (False, [2])
    assert not health.usable()  # the outage is on record (retried after 0.1 s)
    assert metric("inventory_redis_degraded_total") > degraded_before
    assert await find_violations(db, org_id) == []


class ScriptErrors(FakeAsyncRedis):
    """Fails every Lua script with ``error`` (a ResponseError message)."""

    error = ""

    async def evalsha(self, *args: Any, **kwargs: Any) -> Any:
        raise ResponseError(self.error)


class Redis6Replica(ScriptErrors):
    """A Redis 6 replica: the READONLY refusal wrapped in a plain script error, which
    redis-py raises as ResponseError, not ReadOnlyError."""

    error = (
        "Error running script (call to f_70fb5105): @user_script:13: @user_script: 13: "
        "-READONLY You can't write against a read only replica."
    )


class ReleaseFails(FakeAsyncRedis):
    """fakeredis that drops the connection on the release script while ``failing`` is set."""

    failing = False

    async def evalsha(self, sha: Any, numkeys: int, *keys_and_args: Any) -> Any:
        if self.failing and len(keys_and_args) - numkeys == 1:  # release: ARGV is the token
            raise RedisConnectionError("connection dropped")
        return await super().evalsha(sha, numkeys, *keys_and_args)


async def test_keys_a_failed_release_could_not_give_back_are_released_later(
    org_id: str,
) -> None:
    # Claims are all or nothing (a timed-out wait holds no key), so the lease left behind
    # is a hold's whose release did not reach Redis.
    client = ReleaseFails()
    locker = RedisBalanceLocker(client, ttl=15.0, wait=0.05, health=RedisHealth(0))
    a, b = _names(org_id, "a", "b")
    await client.set(b, "another-owner", px=10_000)
    try:
        with pytest.raises(LocksBusy):  # "b" is busy: nothing is taken
            async with locker.hold(org_id, [("default", "a"), ("default", "b")]):
                pytest.fail("entered without the lock")
        assert await client.exists(a) == 0
        client.failing = True
        async with locker.hold(org_id, [("default", "a")]):  # its release will not arrive
            assert await client.exists(a) == 1
        assert await client.exists(a) == 1
        client.failing = False
        # The next acquire releases it first, instead of waiting out its 15 s lease.
        async with locker.hold(org_id, [("default", "a")]):
            assert await client.exists(a) == 1
        assert await client.exists(a) == 0
    finally:
        await client.aclose()


async def test_a_redis6_replica_degrades_too(org_id: str) -> None:
    client = Redis6Replica()
    health = RedisHealth(retry_interval=60)
    locker = RedisBalanceLocker(client, health=health)
    index = RedisExpiryIndex(client, org_id, RedisHealth(retry_interval=60))
    degraded_before = metric("inventory_redis_degraded_total")
    try:
        async with locker.hold(org_id, [("default", "a")]):
            assert not health.usable()  # held on database locks alone
        assert await index.pop_due(datetime.now(UTC), 10) == []
        assert not index.health.usable()
    finally:
        await client.aclose()
    assert metric("inventory_redis_degraded_total") - degraded_before == 2


async def test_other_script_errors_are_not_an_outage(org_id: str) -> None:
    client = ScriptErrors()
    client.error = (
        "ERR Error running script: @user_script:3: Script attempted to access a non local key"
    )
    locker = RedisBalanceLocker(client, health=RedisHealth(retry_interval=60))
    try:
        with pytest.raises(ResponseError, match="non local key"):
            async with locker.hold(org_id, [("default", "a")]):
                pytest.fail("entered without the lock")
        assert locker.health.usable()
    finally:
        await client.aclose()


@pytest.mark.parametrize("failure", ["connection_drops_while_held", "reply_lost_in_acquire"])
async def test_locks_left_by_a_redis_failure_do_not_block_writes_once_redis_is_back(
    redis_url: str, real_redis: aioredis.Redis, org_id: str, failure: str
) -> None:
    """A write whose lock could not be given back (the connection dropped while it was held) or
    whose acquire reply was lost (the script ran, the client timed out) leaves a lease in Redis.
    Once Redis answers again, that stale lease must not keep refusing the balance's writes."""
    parsed = urlparse(redis_url)
    proxy = TcpProxy((parsed.hostname or "127.0.0.1", parsed.port or 6379))
    await proxy.start()
    client = create_redis(make_settings(redis_url=_via(proxy, parsed)))
    locker = RedisBalanceLocker(client, ttl=15.0, wait=1.0, health=RedisHealth(0.1))
    key = [("default", "hot")]
    name = lock_key(org_id, "default", "hot")
    try:
        if failure == "connection_drops_while_held":
            async with locker.hold(org_id, key):  # a write is under way ...
                assert await real_redis.exists(name) == 1
                await proxy.stop()  # ... when the connection to Redis drops
            await proxy.start()
        else:
            await client.ping()  # a pooled connection past its handshake
            proxy.drop_replies = True  # Redis runs the script; its reply never arrives
            async with locker.hold(org_id, key):
                assert not locker.health.usable()  # ran on database locks alone
            proxy.drop_replies = False
        await asyncio.sleep(0.3)
        try:
            async with locker.hold(org_id, key):
                assert await real_redis.exists(name) == 1
        except LocksBusy:
            pytest.fail(
                f"after the outage the balance stays locked by the interrupted write's lease "
                f"(pttl {await real_redis.pttl(name)} ms of {locker.ttl_ms})"
            )
    finally:
        if proxy.server is not None and proxy.server.is_serving():
            await proxy.stop()
        await client.aclose()


async def test_a_release_is_one_round_trip_and_survives_a_lost_script_cache(
    any_redis: Any, org_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release pipeline sends no SCRIPT EXISTS first (redis-py does, for a Script object
    on a pipeline), and still frees the keys when Redis lost its scripts (a restart)."""
    from redis.asyncio.client import Pipeline

    immediate: list[object] = []
    send = Pipeline.immediate_execute_command

    async def recorded(self: Pipeline, *args: Any, **options: Any) -> Any:
        immediate.append(args[0])
        return await send(self, *args, **options)

    monkeypatch.setattr(Pipeline, "immediate_execute_command", recorded)
    locker = RedisBalanceLocker(any_redis, ttl=5.0, wait=0.5)
    keys = (("east", "A"), ("west", "B"))
    names = [lock_key(org_id, loc, sku) for loc, sku in keys]
    lost_before = metric("inventory_lock_lost_total")

    claim = await locker.claim(org_id, [keys])
    assert claim.granted == [True]
    await locker.release_with(claim, None, IndexChanges())
    assert immediate == []
    assert await any_redis.exists(*names) == 0

    claim = await locker.claim(org_id, [keys])
    assert claim.granted == [True]
    if isinstance(any_redis, FakeAsyncRedis):  # server-wide on a real Redis: not on a shared one
        await any_redis.script_flush()
    await locker.release_with(claim, None, IndexChanges())
    assert await any_redis.exists(*names) == 0
    assert metric("inventory_lock_lost_total") == lost_before


# ------------------------------------------------------------------------------- hash tag


async def test_lock_keys_of_one_org_share_a_cluster_slot(
    real_redis: aioredis.Redis, org_id: str
) -> None:
    keys = [
        ("default", "SKU-1"),
        ("wh-2", "SKU-2"),
        ("{a}", "}b{"),  # braces in location or SKU do not move the tag
        ("", "{"),
        ("ÄÖ", "日本"),
    ]
    slot = key_slot(org_id.encode())
    for loc, sku in keys:
        name = lock_key(org_id, loc, sku)
        assert name.startswith(f"stockledger:{{{org_id}}}:")
        assert key_slot(name.encode()) == slot, name
    assert key_slot(lock_key("another-org", "default", "SKU-1").encode()) == key_slot(
        b"another-org"
    )

    # The keys the locker actually writes carry the tag too.
    locker = RedisBalanceLocker(real_redis, ttl=5.0, wait=0.5)
    async with locker.hold(org_id, keys):
        written = [k async for k in real_redis.scan_iter(match=f"stockledger:{{{org_id}}}:lock:*")]
        assert len(written) == len(keys)
        assert {key_slot(k) for k in written} == {slot}
