"""Group commit (ARCHITECTURE section 12): concurrent commands meet in batches, one transaction
each, and every caller still gets the answer of its own command.

On both backends (SQLite, MariaDB): a hot SKU's burst sells exactly its stock, with and without
Redis locks, in far fewer batches than calls; copies of one request inside a batch have one
effect; a batch mixing operations and failures answers each command on its own; a deadlock
(injected) reruns the batch; a command that crashes in the rules or that the database refuses
fails alone; commands that compete for the last units win in arrival order. On MariaDB + Redis:
two ``stockledger serve`` processes batch on the same hot SKU without overselling.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import Clock, make_settings
from graphql_helpers import line, mutation_document
from prometheus_client import REGISTRY
from server_process import Server, base_env
from sqlalchemy import func, select
from sqlalchemy.exc import DataError, OperationalError

from stockledger.config import Settings
from stockledger.db import store as store_module
from stockledger.db.engine import Database, create_database, retry_reason
from stockledger.db.models import inventory_ledger as L
from stockledger.domain.commands import Reserve
from stockledger.domain.errors import StockError
from stockledger.locks.redis_locks import RedisBalanceLocker
from stockledger.runtime import create_redis
from stockledger.services import (
    IdempotencyKeyReusedError,
    InsufficientStockError,
    InventoryService,
    Line,
    NotFoundError,
    ReleaseResult,
    ReservationNotActiveError,
    ReserveResult,
)
from stockledger.services import unit_of_work as uow_module
from stockledger.services.queries import InventoryQueries
from stockledger.services.reconcile import find_violations
from stockledger.services.unit_of_work import Applied, Refused

LONG_WAIT = 60.0  # a lock wait far above any run's length: nothing here may time out


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def settings() -> Settings:
    """The test settings with a long lock wait (a burst queues at once; a slow machine must not
    turn the last calls into LOCK_TIMEOUT, which is tested in test_locks.py)."""
    return make_settings(lock_wait_seconds=LONG_WAIT)


@pytest.fixture
async def service(
    db: Database, settings: Settings, clock: Clock, org_id: str
) -> AsyncIterator[InventoryService]:
    """The write services without Redis; the batcher's writers are stopped afterwards."""
    svc = InventoryService(db, settings, clock=clock, org_id=org_id)
    yield svc
    await svc.close()


@pytest.fixture(params=["redis", "none"])
async def burst_redis(
    request: pytest.FixtureRequest, org_id: str
) -> AsyncIterator[aioredis.Redis | None]:
    """A production-like client on the test Redis, or None (no Redis locks)."""
    if request.param == "none":
        yield None
        return
    client = create_redis(make_settings(redis_url=request.getfixturevalue("redis_url")))
    yield client
    await _drop_org_keys(client, org_id)
    await client.aclose()


async def _drop_org_keys(client: Any, org_id: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"stockledger:{{{org_id}}}:*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def pooled_redis(redis_url: str, org_id: str) -> AsyncIterator[aioredis.Redis]:
    """A client built like production's; this test's org keys are deleted afterwards."""
    client = create_redis(make_settings(redis_url=redis_url))
    yield client
    await _drop_org_keys(client, org_id)
    await client.aclose()


# ---------------------------------------------------------------------------- helpers


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


class Batches:
    """How many batches committed (``inventory_batch_size`` count) and how many commands they
    held (its sum) since this object was made."""

    def __init__(self) -> None:
        self.count0 = sample("inventory_batch_size_count")
        self.sum0 = sample("inventory_batch_size_sum")

    @property
    def count(self) -> int:
        return int(sample("inventory_batch_size_count") - self.count0)

    @property
    def commands(self) -> int:
        return int(sample("inventory_batch_size_sum") - self.sum0)


def retries(reason: str) -> float:
    return sample("inventory_transaction_retries_total", {"reason": reason})


def kinds(results: list[Any]) -> Counter[str]:
    return Counter(type(r).__name__ for r in results)


async def balance(service: InventoryService, sku: str) -> tuple[int, int, int]:
    """(on hand, reserved, version) of ``sku`` at the default location."""
    found = await InventoryQueries(service.db, service.org_id).balance(sku)
    assert found is not None
    return (found.on_hand, found.reserved, found.version)


async def ledger_entries(db: Database, org_id: str, key: str) -> int:
    async with db.read() as conn:
        return int(
            (
                await conn.execute(
                    select(func.count())
                    .select_from(L)
                    .where(L.c.org_id == org_id, L.c.idempotency_key == key)
                )
            ).scalar_one()
        )


def reserve_command(settings: Settings, key: str, sku: str, quantity: int) -> Reserve:
    return Reserve.validated(
        key,
        [Line(sku, quantity)],
        default_ttl_seconds=settings.default_reservation_ttl_seconds,
        max_ttl_seconds=settings.max_reservation_ttl_seconds,
    )


class _DriverError(Exception):
    """Stands in for the driver's exception: ``args[0]`` is the MySQL error number, which is
    what ``stockledger.db.engine.mysql_error_code`` reads (``exc.orig.args[0]``)."""


# ---------------------------------------------------------------------------- 1. hot SKU burst

BURST = 500
BURST_STOCK = 100


@pytest.mark.slow
async def test_burst_on_a_hot_sku_sells_exactly_the_stock_in_few_batches(
    burst_redis: aioredis.Redis | None,
    backend: str,
    db: Database,
    settings: Settings,
    clock: Clock,
    org_id: str,
) -> None:
    locks = "none" if burst_redis is None else "redis"
    locker = None
    if burst_redis is not None:
        locker = RedisBalanceLocker(burst_redis, ttl=settings.lock_ttl_seconds, wait=LONG_WAIT)
    service = InventoryService(db, settings, clock=clock, locker=locker, org_id=org_id)
    try:
        sku = f"HOT-{uuid.uuid4().hex[:6]}"
        await service.restock("stock", [Line(sku, BURST_STOCK)])
        batches = Batches()

        start = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(service.reserve(f"r-{i}", [Line(sku, 1)]) for i in range(BURST)),
                return_exceptions=True,
            ),
            timeout=120,
        )
        wall = time.perf_counter() - start
        print(
            f"\n[{backend}, locks {locks}] {BURST} reserves in {wall:.2f} s, "
            f"{batches.count} batches"
        )

        assert kinds(results) == {
            "ReserveResult": BURST_STOCK,
            "InsufficientStockError": BURST - BURST_STOCK,
        }
        ok = [r for r in results if isinstance(r, ReserveResult)]
        assert not any(r.replayed for r in ok)
        assert len({r.reservation.id for r in ok}) == BURST_STOCK
        for r in results:
            if isinstance(r, InsufficientStockError):
                assert [(s.sku, s.requested, s.available) for s in r.shortages] == [(sku, 1, 0)]
        assert await balance(service, sku) == (BURST_STOCK, BURST_STOCK, 1 + BURST_STOCK)
        assert await find_violations(db, org_id) == []
        # Group commit: the burst went through in far fewer transactions than calls.
        assert 1 <= batches.count < BURST // 2
    finally:
        await service.close()
    if burst_redis is not None:
        left = [k async for k in burst_redis.scan_iter(match=f"stockledger:{{{org_id}}}:lock:*")]
        assert left == []


# ---------------------------------------------------------------------------- 2. copies


async def test_copies_of_one_request_in_one_batch_have_one_effect(
    service: InventoryService, db: Database, org_id: str
) -> None:
    await service.restock("stock", [Line("MUG", 10)])
    batches = Batches()

    results = await asyncio.gather(
        *(service.reserve("dup", [Line("MUG", 2)], ttl_seconds=600) for _ in range(20)),
        return_exceptions=True,
    )

    assert kinds(results) == {"ReserveResult": 20}
    assert sorted(r.replayed for r in results) == [False] + [True] * 19
    assert len({r.reservation.id for r in results}) == 1
    assert (batches.count, batches.commands) == (1, 20)  # all 20 met in one batch
    assert await ledger_entries(db, org_id, "dup") == 1
    assert await balance(service, "MUG") == (10, 2, 2)
    # Replays show the current state, the same for every copy.
    assert {(r.balances[0].on_hand, r.balances[0].reserved) for r in results} == {(10, 2)}

    # The same key with another payload, interleaved with copies of the first: the first
    # arrival wins, its copies replay, the others are refused.
    batches = Batches()
    calls = [
        service.reserve("dup-2", [Line("MUG", 1 if i % 2 == 0 else 3)], ttl_seconds=600)
        for i in range(10)
    ]
    mixed = await asyncio.gather(*calls, return_exceptions=True)
    first, other = mixed[0::2], mixed[1::2]
    assert kinds(first) == {"ReserveResult": 5}
    assert sorted(r.replayed for r in first) == [False] + [True] * 4
    assert len({r.reservation.id for r in first}) == 1
    assert kinds(other) == {"IdempotencyKeyReusedError": 5}
    assert all(e.idempotency_key == "dup-2" for e in other)
    assert batches.count == 1
    assert await ledger_entries(db, org_id, "dup-2") == 1
    assert await balance(service, "MUG") == (10, 3, 3)
    # Once committed, another payload under the key is refused too, and a copy replays.
    with pytest.raises(IdempotencyKeyReusedError):
        await service.reserve("dup", [Line("MUG", 1)], ttl_seconds=600)
    again = await service.reserve("dup", [Line("MUG", 2)], ttl_seconds=600)
    assert (again.replayed, again.reservation.id) == (True, results[0].reservation.id)
    assert await balance(service, "MUG") == (10, 3, 3)
    assert await find_violations(db, org_id) == []


# ---------------------------------------------------------------------------- 3. mixed batch


async def test_one_batch_of_mixed_commands_answers_each_on_its_own(
    db: Database, settings: Settings, clock: Clock, org_id: str
) -> None:
    # One writer and no Redis: no call reads anything before it queues, so the gather's order
    # is the arrival order and the six calls form one batch.
    one_writer = settings.model_copy(update={"write_connections": 1})
    service = InventoryService(db, one_writer, clock=clock, org_id=org_id)
    try:
        await service.restock("stock", [Line("TEE", 10)])
        r1 = (await service.reserve("res-1", [Line("TEE", 2)], ttl_seconds=600)).reservation
        r2 = (await service.reserve("res-2", [Line("TEE", 3)], ttl_seconds=600)).reservation
        r3 = (await service.reserve("res-3", [Line("TEE", 1)], ttl_seconds=600)).reservation
        await service.release("rel-3", reservation_id=r3.id)
        assert await balance(service, "TEE") == (10, 5, 5)
        unknown = r3.id + 10_000_000
        batches = Batches()

        results = await asyncio.gather(
            service.release("rel-1", reservation_id=r1.id),
            service.deduct("ded-2", reservation_id=r2.id),
            service.reserve("short", [Line("TEE", 8)], ttl_seconds=600),
            service.release("rel-unknown", reservation_id=unknown),
            service.deduct("ded-3", reservation_id=r3.id),
            service.restock("more", [Line("TEE", 5)]),
            return_exceptions=True,
        )
        released, deducted, short, missing, inactive, restocked = results

        assert (batches.count, batches.commands) == (1, 6)
        assert isinstance(released, ReleaseResult) and not released.replayed
        assert [(r.id, r.status) for r in released.reservations] == [(r1.id, "RELEASED")]
        assert [(b.on_hand, b.reserved) for b in released.balances] == [(10, 3)]
        assert not isinstance(deducted, BaseException) and not deducted.replayed
        assert [(r.id, r.status) for r in deducted.reservations] == [(r2.id, "COMMITTED")]
        assert [(b.on_hand, b.reserved) for b in deducted.balances] == [(7, 0)]
        assert [
            (e.event_type, e.on_hand_delta, e.reserved_delta, e.reservation_id)
            for e in deducted.ledger_entries
        ] == [("DEDUCT", -3, -3, r2.id)]
        assert [e.id is not None for e in deducted.ledger_entries] == [True]
        # The reserve saw the release and the deduct before it, not the restock after it.
        assert isinstance(short, InsufficientStockError)
        assert [(s.sku, s.requested, s.available) for s in short.shortages] == [("TEE", 8, 7)]
        assert isinstance(missing, NotFoundError)
        assert missing.entity == "Reservation"
        assert isinstance(inactive, ReservationNotActiveError)
        assert (inactive.reservation_id, inactive.status) == (r3.id, "RELEASED")
        assert not isinstance(restocked, BaseException) and not restocked.replayed
        assert [(b.on_hand, b.reserved) for b in restocked.balances] == [(12, 0)]

        # RESTOCK, 3 RESERVE, RELEASE (r3), then RELEASE, DEDUCT, RESTOCK of the batch.
        assert await balance(service, "TEE") == (12, 0, 8)
        for key, entries in {
            "rel-1": 1,
            "ded-2": 1,
            "more": 1,
            "short": 0,
            "rel-unknown": 0,
            "ded-3": 0,
        }.items():
            assert await ledger_entries(db, org_id, key) == entries, key
        # The refused keys were not consumed: each can still be used for another request.
        again = await service.reserve("short", [Line("TEE", 1)], ttl_seconds=600)
        assert not again.replayed
        assert await find_violations(db, org_id) == []
    finally:
        await service.close()


# ---------------------------------------------------------------------------- 4. deadlock


def test_injected_error_is_read_as_a_deadlock() -> None:
    """The error the next test injects is what the driver raises for a deadlock (1213)."""
    error = OperationalError("UPDATE ...", {}, _DriverError(1213, "Deadlock found"))
    assert retry_reason(error) == "deadlock"
    assert retry_reason(DataError("INSERT ...", {}, _DriverError(1406, "too long"))) is None


@pytest.mark.parametrize("where", ["write", "commit"])
async def test_a_batch_that_deadlocks_runs_again_and_every_write_succeeds(
    where: str,
    service: InventoryService,
    db: Database,
    org_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await service.restock("stock", [Line("CUP", 50)])
    original = getattr(store_module.SqlTransaction, where)
    raised: list[int] = []

    async def deadlock_once(self: Any, *args: Any) -> Any:
        if not raised:
            raised.append(1)
            raise OperationalError(
                "UPDATE inventory_balance ...",
                {},
                _DriverError(1213, "Deadlock found when trying to get lock"),
            )
        return await original(self, *args)

    monkeypatch.setattr(store_module.SqlTransaction, where, deadlock_once)
    before = retries("deadlock")

    results = await asyncio.gather(
        *(service.reserve(f"r-{i}", [Line("CUP", 2)], ttl_seconds=600) for i in range(10)),
        service.restock("more", [Line("CUP", 5)]),
        return_exceptions=True,
    )

    assert raised == [1]
    assert kinds(results) == {"ReserveResult": 10, "RestockResult": 1}
    assert not any(r.replayed for r in results)
    assert retries("deadlock") - before == 1
    # Nothing doubled by the rerun: each key wrote its one entry.
    for i in range(10):
        assert await ledger_entries(db, org_id, f"r-{i}") == 1
    assert await ledger_entries(db, org_id, "more") == 1
    assert await balance(service, "CUP") == (55, 20, 12)
    assert await find_violations(db, org_id) == []


# ---------------------------------------------------------------------------- 5. poison


async def test_a_command_that_crashes_in_the_rules_fails_alone(
    service: InventoryService, db: Database, org_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await service.restock("stock", [Line("PEN", 100)])
    original = uow_module.decide

    def decide(stock: Any, command: Any, now: Any, **kw: Any) -> Any:
        if command.idempotency_key == "poison":
            raise RuntimeError("injected bug")
        return original(stock, command, now, **kw)

    monkeypatch.setattr(uow_module, "decide", decide)
    keys = [f"r-{i}" for i in range(20)]
    keys[7] = "poison"
    batches = Batches()

    results = await asyncio.gather(
        *(service.reserve(k, [Line("PEN", 1)], ttl_seconds=600) for k in keys),
        return_exceptions=True,
    )

    crashed = results[7]
    assert isinstance(crashed, RuntimeError) and not isinstance(crashed, StockError)
    assert str(crashed) == "injected bug"
    others = results[:7] + results[8:]
    assert kinds(others) == {"ReserveResult": 19}
    assert batches.count == 1  # its neighbours committed in the same batch
    assert await balance(service, "PEN") == (100, 19, 20)
    assert await ledger_entries(db, org_id, "poison") == 0
    assert await find_violations(db, org_id) == []

    # It left no trace: its key was not consumed.
    monkeypatch.setattr(uow_module, "decide", original)
    result = await service.reserve("poison", [Line("PEN", 1)], ttl_seconds=600)
    assert not result.replayed
    assert await balance(service, "PEN") == (100, 20, 21)


async def test_a_command_the_database_refuses_is_split_off_and_fails_alone(
    service: InventoryService, db: Database, org_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await service.restock("stock", [Line("INK", 100)])
    original = store_module.SqlTransaction.write
    refused: list[int] = []

    async def write(self: Any, ws: Any) -> Any:
        if "poison" in {k.idempotency_key for k in ws.keys}:
            refused.append(len(ws.keys))
            raise DataError(
                "INSERT INTO inventory_ledger ...",
                {},
                _DriverError(1406, "Data too long for column"),
            )
        return await original(self, ws)

    monkeypatch.setattr(store_module.SqlTransaction, "write", write)
    keys = [f"w-{i}" for i in range(20)]
    keys[7] = "poison"
    batches = Batches()
    retried = {r: retries(r) for r in ("deadlock", "duplicate_key", "connection_lost")}

    results = await asyncio.gather(
        *(service.reserve(k, [Line("INK", 1)], ttl_seconds=600) for k in keys),
        return_exceptions=True,
    )

    bad = results[7]
    assert isinstance(bad, DataError) and not isinstance(bad, StockError)
    others = results[:7] + results[8:]
    assert kinds(others) == {"ReserveResult": 19}
    # Split until it stood alone: the database saw it in ever smaller batches, the last of
    # them itself only, and it was never retried as if the error were transient.
    assert refused[0] == 20 and refused[-1] == 1, refused
    assert refused == sorted(refused, reverse=True)
    assert {r: retries(r) for r in retried} == retried
    # Its neighbours committed in a few halves, not one by one.
    assert batches.commands == 19
    assert 2 <= batches.count < 19
    assert await balance(service, "INK") == (100, 19, 20)
    assert await ledger_entries(db, org_id, "poison") == 0
    assert await find_violations(db, org_id) == []

    monkeypatch.setattr(store_module.SqlTransaction, "write", original)
    result = await service.reserve("poison", [Line("INK", 1)], ttl_seconds=600)
    assert not result.replayed
    assert await balance(service, "INK") == (100, 20, 21)


# ---------------------------------------------------------------------------- 7. arrival order


async def test_inside_a_batch_the_earlier_arrival_wins_the_last_units(
    service: InventoryService, settings: Settings, db: Database, org_id: str
) -> None:
    await service.restock("stock", [Line("A", 5), Line("B", 5)])

    async def submit(sku: str, wants: list[int]) -> list[Any]:
        commands = [reserve_command(settings, f"{sku}-{i}", sku, q) for i, q in enumerate(wants)]
        batches = Batches()
        outcomes = await service.batcher.submit_many(
            org_id, [(c, c.balance_keys()) for c in commands]
        )
        assert (batches.count, batches.commands) == (1, len(commands))
        return outcomes

    # 3 then 3 of 5: the first gets them; 2 then fit, the last 1 finds none left.
    a = await submit("A", [3, 3, 2, 1])
    assert [type(o) for o in a] == [Applied, Refused, Applied, Refused]
    assert [s.available for s in a[1].refusal.error.shortages] == [2]
    assert [s.available for s in a[3].refusal.error.shortages] == [0]
    assert [b.reserved for b in a[0].changes.balances] == [3]
    assert [b.reserved for b in a[2].changes.balances] == [5]

    # The same demands in another order: the winners follow the order, not the sizes.
    b = await submit("B", [1, 2, 3, 3])
    assert [type(o) for o in b] == [Applied, Applied, Refused, Refused]
    assert [s.available for s in b[2].refusal.error.shortages] == [2]
    assert [s.available for s in b[3].refusal.error.shortages] == [2]

    assert await balance(service, "A") == (5, 5, 3)
    assert await balance(service, "B") == (5, 3, 3)
    for key, entries in {"A-0": 1, "A-1": 0, "A-2": 1, "A-3": 0, "B-0": 1, "B-2": 0}.items():
        assert await ledger_entries(db, org_id, key) == entries, key
    assert await find_violations(db, org_id) == []


# ---------------------------------------------------------------------------- 6. two servers

SERVED_STOCK = 300
SERVED_REQUESTS = 600
IN_FLIGHT = 32  # requests per server at once; httpcore's pool costs the client O(connections²)


async def _post(http: httpx.AsyncClient, name: str, input: dict[str, Any]) -> dict[str, Any]:
    response = await http.post(
        "/graphql", json={"query": mutation_document(name), "variables": {"input": input}}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    result: dict[str, Any] = body["data"][name]
    return result


@pytest.mark.slow
@pytest.mark.mysql
@pytest.mark.redis
async def test_two_server_processes_batch_on_one_hot_sku_without_overselling(
    tmp_path: Path, mysql_url: str, redis_url: str, tenant: str
) -> None:
    org_id = tenant
    env = base_env(
        tmp_path,
        database_url=mysql_url,
        redis_url=redis_url,
        org_id=org_id,
        lock_wait_seconds=str(LONG_WAIT),
    )
    servers = [Server(tmp_path, env), Server(tmp_path, env)]
    try:
        for server in servers:
            server.wait_ready()
        sku = f"HOT-{uuid.uuid4().hex[:6]}"
        limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
        clients = [
            httpx.AsyncClient(base_url=s.url, timeout=120, limits=limits, headers=s.headers)
            for s in servers
        ]
        # No more requests than connections, and few of both: httpcore's pool queue costs the
        # client CPU per queued request and connection, and a client that slow once left a
        # keep-alive connection idle past uvicorn's 5 s timeout, which closed it under the next
        # request (a reset, in CI on a loaded machine).
        gates = [asyncio.Semaphore(IN_FLIGHT) for _ in servers]
        try:
            restocked = await _post(
                clients[0],
                "restock",
                {"idempotencyKey": "stock", "lines": [line(sku, SERVED_STOCK)]},
            )
            assert restocked["__typename"] == "RestockSuccess"

            async def reserve(i: int) -> tuple[int, str]:
                server = i % 2
                async with gates[server]:
                    result = await _post(
                        clients[server],
                        "reserve",
                        {"idempotencyKey": f"r-{i}", "lines": [line(sku, 1)]},
                    )
                return server, str(result["__typename"])

            start = time.perf_counter()
            answers = await asyncio.wait_for(
                asyncio.gather(*(reserve(i) for i in range(SERVED_REQUESTS))), timeout=120
            )
            print(f"\n2 servers: {SERVED_REQUESTS} reserves in {time.perf_counter() - start:.2f} s")
        finally:
            for c in clients:
                await c.aclose()
    finally:
        for server in servers:
            server.stop()
            server.kill()

    assert Counter(kind for _, kind in answers) == {
        "ReserveSuccess": SERVED_STOCK,
        "InsufficientStockError": SERVED_REQUESTS - SERVED_STOCK,
    }
    per_server = Counter(server for server, kind in answers if kind == "ReserveSuccess")
    print(f"successes per server: {dict(per_server)}")
    assert len(per_server) == 2 and min(per_server.values()) > 0, per_server

    db = create_database(make_settings(), mysql_url)
    try:
        got = await InventoryQueries(db, org_id).balance(sku)
        assert got is not None
        assert (got.on_hand, got.reserved, got.version) == (
            SERVED_STOCK,
            SERVED_STOCK,
            1 + SERVED_STOCK,
        )
        assert await find_violations(db, org_id) == []
    finally:
        await db.dispose()
