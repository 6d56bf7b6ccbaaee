"""The outbox relay (ARCHITECTURE section 15, ``services/relay.py``) on both backends.

Every committed event reaches Redis pub/sub in id order, byte for byte as stored; an id that
commits late (a gap) is published when it commits; a permanent gap (a rolled-back id) is
passed after ``relay_gap_seconds``; one relay per org holds the lease, a dead one's lapses, a
restart resumes from ``last_event_id``; a Redis outage loses nothing; retention prunes only
what every relay has passed. Redis is fakeredis here (the channel and the publish are the
same commands); late commits are made with ids inserted by hand (on MariaDB also with a
transaction held open).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import Clock, drop_org_keys, make_settings
from fakeredis import FakeAsyncRedis, FakeServer
from server_process import CLI, Server, base_env
from sqlalchemy import func, insert, select

from stockledger.config import Settings
from stockledger.db.engine import Database, create_database
from stockledger.db.models import (
    inventory_ledger,
    outbox_event,
    relay_state,
    webhook_delivery,
    webhook_endpoint,
)
from stockledger.domain.errors import InsufficientStockError
from stockledger.domain.model import Line
from stockledger.observability import metrics
from stockledger.services import InventoryService
from stockledger.services.relay import Relay, events_channel
from stockledger.services.rows import to_db_time

GAP_SECONDS = 0.6


@pytest.fixture
def settings() -> Settings:
    return make_settings(
        relay_gap_seconds=GAP_SECONDS, relay_interval_seconds=0.05, relay_lease_seconds=5.0
    )


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
async def redis(server: FakeServer) -> AsyncIterator[FakeAsyncRedis]:
    client = FakeAsyncRedis(server=server)
    yield client
    await client.aclose()


class Listener:
    """The messages of one org's channel, in arrival order (a real pub/sub subscriber)."""

    def __init__(self, redis: FakeAsyncRedis, org_id: str) -> None:
        self.pubsub = redis.pubsub()
        self.channel = events_channel(org_id)
        self.messages: list[str] = []

    async def start(self) -> None:
        await self.pubsub.subscribe(self.channel)
        await self.pubsub.get_message(timeout=1)  # the subscribe confirmation

    async def drain(self) -> list[str]:
        while True:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            if message is None:
                return self.messages
            self.messages.append(message["data"].decode())

    async def aclose(self) -> None:
        await self.pubsub.aclose()


@pytest.fixture
async def listener(redis: FakeAsyncRedis, org_id: str) -> AsyncIterator[Listener]:
    found = Listener(redis, org_id)
    await found.start()
    yield found
    await found.aclose()


async def stored(db: Database, org_id: str) -> list[tuple[int, str]]:
    """(id, payload) of the org's outbox events, by id."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(outbox_event.c.id, outbox_event.c.payload)
            .where(outbox_event.c.org_id == org_id)
            .order_by(outbox_event.c.id)
        )
        return [(int(r.id), str(r.payload)) for r in rows]


async def last_event_id(db: Database, org_id: str) -> int | None:
    async with db.read() as conn:
        value = (
            await conn.execute(
                select(relay_state.c.last_event_id).where(relay_state.c.org_id == org_id)
            )
        ).scalar()
    return None if value is None else int(value)


async def max_id(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.max(outbox_event.c.id)))).scalar() or 0)


async def insert_event(db: Database, org_id: str, event_id: int, label: str) -> str:
    """A hand-made event with an explicit id (a late commit or a gap); its payload."""
    payload = json.dumps({"type": "STOCK_CHANGED", "data": {"org": org_id, "label": label}})
    async with db.engine.begin() as conn:
        await conn.execute(
            insert(outbox_event).values(
                id=event_id,
                org_id=org_id,
                event_type="STOCK_CHANGED",
                payload=payload,
                created_at=to_db_time(datetime.now(UTC)),
            )
        )
    return payload


def _lag_count() -> float:
    samples = metrics.OUTBOX_LAG_SECONDS.collect()[0].samples
    return next(s.value for s in samples if s.name.endswith("_count"))


async def settle(relay: Relay, passes: int = 3) -> None:
    for _ in range(passes):
        await relay.run_once()


async def test_every_committed_event_is_published_in_id_order_exactly_as_stored(
    db: Database,
    redis: FakeAsyncRedis,
    settings: Settings,
    service: InventoryService,
    listener: Listener,
    org_id: str,
) -> None:
    relay = Relay(db, redis, settings, orgs=[org_id])
    await relay.run_once()  # takes the lease: the org's events start now
    assert relay.held_orgs == {org_id}
    before = _lag_count()
    await service.restock("r1", [Line("MUG", 5), Line("CUP", 2)])
    await service.reserve("c1", [Line("MUG", 5)])
    await service.adjust("a1", "CUP", delta=-2, reason="breakage")
    await settle(relay)
    events = await stored(db, org_id)
    assert len(events) >= 4
    assert await listener.drain() == [payload for _, payload in events]
    assert await last_event_id(db, org_id) == events[-1][0]
    # Commit to publish, observed per event.
    assert _lag_count() - before == len(events)
    assert json.loads(events[0][1])["data"]["balance"]["sku"] in {"MUG", "CUP"}


async def test_a_write_that_is_refused_or_rolls_back_leaves_no_event(
    db: Database, service: InventoryService, org_id: str
) -> None:
    await service.restock("r1", [Line("MUG", 1)])
    count = len(await stored(db, org_id))
    with pytest.raises(InsufficientStockError):
        await service.reserve("c1", [Line("MUG", 2)])
    with pytest.raises(InsufficientStockError):
        await service.deduct("d1", lines=[Line("MUG", 1), Line("NONE", 1)])
    assert len(await stored(db, org_id)) == count


async def test_a_late_commit_is_published_and_a_permanent_gap_is_passed(
    db: Database,
    redis: FakeAsyncRedis,
    settings: Settings,
    listener: Listener,
    org_id: str,
) -> None:
    relay = Relay(db, redis, settings, orgs=[org_id])
    await relay.run_once()
    base = await max_id(db)
    first = await insert_event(db, org_id, base + 1, "first")
    third = await insert_event(db, org_id, base + 3, "third")  # base + 2 commits late
    await settle(relay)
    assert await listener.drain() == [first, third]
    assert await last_event_id(db, org_id) == base + 1  # never past the gap
    second = await insert_event(db, org_id, base + 2, "second")
    await settle(relay)
    assert await listener.drain() == [first, third, second]
    assert await last_event_id(db, org_id) == base + 3
    # base + 4 never commits (a rolled-back transaction): passed after the gap time.
    fifth = await insert_event(db, org_id, base + 5, "fifth")
    await settle(relay)
    assert (await listener.drain())[-1] == fifth
    assert await last_event_id(db, org_id) == base + 3
    await asyncio.sleep(GAP_SECONDS + 0.1)
    report = await relay.run_once()
    assert report.passed == 1
    assert await last_event_id(db, org_id) == base + 5
    assert await listener.drain() == [first, third, second, fifth]  # nothing twice


@pytest.mark.parametrize("backend", ["mysql"])
async def test_a_transaction_held_open_is_waited_for(
    db: Database,
    redis: FakeAsyncRedis,
    settings: Settings,
    service: InventoryService,
    listener: Listener,
    org_id: str,
) -> None:
    """MariaDB: an id taken by a transaction still open, higher ids committed meanwhile."""
    relay = Relay(db, redis, settings, orgs=[org_id])
    await relay.run_once()
    late = json.dumps({"type": "STOCK_CHANGED", "data": {"org": org_id, "late": True}})
    async with db.engine.connect() as held:
        tx = await held.begin()
        result = await held.execute(
            insert(outbox_event).values(
                org_id=org_id,
                event_type="STOCK_CHANGED",
                payload=late,
                created_at=to_db_time(datetime.now(UTC)),
            )
        )
        assert result.inserted_primary_key is not None
        late_id = int(result.inserted_primary_key[0])
        await service.restock("r1", [Line("MUG", 3)])
        await settle(relay)
        published = await listener.drain()
        assert published and late not in published
        assert await last_event_id(db, org_id) == late_id - 1
        await tx.commit()
    await settle(relay)
    assert (await listener.drain())[-1] == late
    events = await stored(db, org_id)
    assert sorted(listener.messages) == sorted(p for _, p in events)
    assert await last_event_id(db, org_id) == events[-1][0]


async def test_the_lease_keeps_a_second_relay_out_until_the_first_dies(
    db: Database,
    redis: FakeAsyncRedis,
    settings: Settings,
    service: InventoryService,
    listener: Listener,
    org_id: str,
) -> None:
    clock = Clock()
    first = Relay(db, redis, settings, orgs=[org_id], owner="first", clock=clock)
    second = Relay(db, redis, settings, orgs=[org_id], owner="second", clock=clock)
    await first.run_once()
    await second.run_once()
    assert first.held_orgs == {org_id} and second.held_orgs == set()
    await service.restock("r1", [Line("MUG", 1)])
    assert (await second.run_once()).published == 0
    assert (await first.run_once()).published == 1
    # The first dies (no release); its lease lapses and the second takes over where it was.
    await service.restock("r2", [Line("MUG", 1)])
    assert (await second.run_once()).published == 0
    clock.advance(settings.relay_lease_seconds + 1)
    report = await second.run_once()
    assert second.held_orgs == {org_id} and report.published == 1
    events = await stored(db, org_id)
    assert await listener.drain() == [p for _, p in events]
    # The first, back from its pause, has lost the org and publishes nothing more.
    await service.restock("r3", [Line("MUG", 1)])
    assert (await first.run_once()).published == 0
    assert first.held_orgs == set()


async def test_a_restart_resumes_from_last_event_id(
    db: Database,
    redis: FakeAsyncRedis,
    settings: Settings,
    service: InventoryService,
    listener: Listener,
    org_id: str,
) -> None:
    relay = Relay(db, redis, settings, orgs=[org_id])
    await relay.run_once()
    await service.restock("r1", [Line("MUG", 2)])
    await settle(relay)
    await relay.release()  # a clean stop gives the lease back
    before = list(await listener.drain())
    assert before
    await service.restock("r2", [Line("MUG", 2)])  # while no relay runs
    await service.restock("r3", [Line("CUP", 2)])
    restarted = Relay(db, redis, settings, orgs=[org_id])
    await settle(restarted)
    events = await stored(db, org_id)
    assert await listener.drain() == [p for _, p in events]  # the old ones not again
    assert len(listener.messages) == len(events) > len(before)


async def test_a_redis_outage_loses_no_event(
    db: Database,
    redis: FakeAsyncRedis,
    server: FakeServer,
    settings: Settings,
    service: InventoryService,
    listener: Listener,
    org_id: str,
) -> None:
    relay = Relay(db, redis, settings, orgs=[org_id])
    await relay.run_once()
    start = await last_event_id(db, org_id)
    server.connected = False
    await service.restock("r1", [Line("MUG", 2)])
    await service.restock("r2", [Line("CUP", 2)])
    for _ in range(3):
        assert (await relay.run_once()).published == 0
    assert await last_event_id(db, org_id) == start  # nothing passed unpublished
    server.connected = True
    await settle(relay)
    events = await stored(db, org_id)
    assert await listener.drain() == [p for _, p in events]
    assert await last_event_id(db, org_id) == events[-1][0]


async def test_the_relay_makes_one_delivery_per_matching_active_endpoint(
    db: Database,
    redis: FakeAsyncRedis,
    settings: Settings,
    service: InventoryService,
    org_id: str,
) -> None:
    now = to_db_time(datetime.now(UTC))
    endpoints: dict[str, int] = {}
    async with db.engine.begin() as conn:
        for name, types, active in (
            ("all", "STOCK_CHANGED STOCK_OUT", True),
            ("out", "STOCK_OUT", True),
            ("gone", "STOCK_CHANGED", False),
        ):
            result = await conn.execute(
                insert(webhook_endpoint).values(
                    org_id=org_id,
                    url=f"http://127.0.0.1/{name}",
                    event_types=types,
                    secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                    active=active,
                    created_at=now,
                )
            )
            assert result.inserted_primary_key is not None
            endpoints[name] = int(result.inserted_primary_key[0])
    relay = Relay(db, redis, settings, orgs=[org_id])
    await relay.run_once()
    await service.restock("r1", [Line("MUG", 1)])
    await service.adjust("a1", "MUG", delta=-1, reason="breakage")  # STOCK_OUT
    await settle(relay)
    await relay.release()
    await settle(Relay(db, redis, settings, orgs=[org_id]))  # a republish adds nothing
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(webhook_delivery.c.endpoint_id, webhook_delivery.c.event_type).where(
                    webhook_delivery.c.org_id == org_id
                )
            )
        ).all()
    async with db.engine.begin() as conn:  # later servers on the shared database: no calls
        await conn.execute(
            webhook_endpoint.update()
            .where(webhook_endpoint.c.org_id == org_id)
            .values(active=False)
        )
    got: dict[int, list[str]] = {}
    for r in rows:
        got.setdefault(int(r.endpoint_id), []).append(str(r.event_type))
    assert sorted(got[endpoints["all"]]) == ["STOCK_CHANGED", "STOCK_CHANGED", "STOCK_OUT"]
    assert got[endpoints["out"]] == ["STOCK_OUT"]
    assert endpoints["gone"] not in got


@pytest.mark.parametrize("backend", ["sqlite"])  # a database of its own: every org's floor
async def test_retention_prunes_only_what_every_relay_passed(
    db: Database, redis: FakeAsyncRedis, service: InventoryService, org_id: str
) -> None:
    clock = Clock()
    settings = make_settings(outbox_retention_seconds=60)
    relay = Relay(db, redis, settings, clock=clock)  # every org
    await service.restock("r1", [Line("MUG", 1)])
    await settle(relay)
    assert await relay.prune() == 0  # not old enough
    # Another org's events the relay has not passed yet (its lease is someone else's).
    async with db.engine.begin() as conn:
        await conn.execute(
            insert(relay_state).values(
                org_id="other",
                owner="elsewhere",
                lease_expires_at=to_db_time(clock() + timedelta(days=1)),
                last_event_id=0,
                updated_at=to_db_time(clock()),
            )
        )
    clock.advance(120)
    assert await relay.prune() == 0  # "other" has passed nothing
    count = len(await stored(db, org_id))
    async with db.engine.begin() as conn:
        await conn.execute(relay_state.update().values(last_event_id=10**9))
    assert await relay.prune() == count > 0
    assert await stored(db, org_id) == []


# ---------------------------------------------------------------------- a killed server


@pytest.fixture(params=["sqlite", "mysql"])
def killed_env(
    request: pytest.FixtureRequest, tmp_path: Path, org_id: str
) -> Iterator[tuple[dict[str, str], str, str]]:
    """(server env, database URL, org) of a real server for the SIGKILL test."""
    events = {
        "webhook_allow_private": "true",
        "relay_interval_seconds": "0.05",
        "relay_lease_seconds": "2",
        # A delivery the killed server had claimed is due again after its claim (2 x this
        # + 5 s): it was perhaps received already (at least once: a duplicate, counted).
        "webhook_timeout_seconds": "0.5",
        "log_level": "WARNING",
    }
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'stockledger.sqlite3'}"
        yield base_env(tmp_path, **events), url, "default"
        return
    url = str(request.getfixturevalue("own_mysql_url"))
    redis_url = str(request.getfixturevalue("redis_url"))
    env = base_env(tmp_path, database_url=url, redis_url=redis_url, org_id=org_id, **events)
    yield env, url, org_id
    drop_org_keys(redis_url, org_id)


async def test_a_sigkilled_server_loses_no_committed_event(
    killed_env: tuple[dict[str, str], str, str], tmp_path: Path
) -> None:
    """Writes in flight when the server is SIGKILLed: after a restart, every event whose
    transaction committed reaches the webhook receiver, and every ledger entry is named by a
    STOCK_CHANGED event (the outbox is written in the write's own transaction)."""
    from test_webhooks import Receiver

    env, url, org = killed_env
    receiver = Receiver()
    await receiver.start()
    server = Server(tmp_path, env)
    try:
        await asyncio.to_thread(server.wait_ready)
        headers = server.headers
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as http:
            made = await http.post(
                "/graphql",
                json={
                    "query": "mutation($i: CreateWebhookEndpointInput!) "
                    "{ createWebhookEndpoint(input: $i) { __typename } }",
                    "variables": {
                        "i": {
                            "idempotencyKey": "w1",
                            "url": receiver.url,
                            "eventTypes": ["STOCK_CHANGED"],
                        }
                    },
                },
            )
            assert "CreateWebhookEndpointSuccess" in made.text, made.text
            restock = "mutation($i: RestockInput!) { restock(input: $i) { __typename } }"

            async def one(i: int) -> None:
                await http.post(
                    "/graphql",
                    json={
                        "query": restock,
                        "variables": {
                            "i": {
                                "idempotencyKey": f"r{i}",
                                "lines": [{"sku": f"SKU-{i % 5}", "quantity": 1}],
                            }
                        },
                    },
                )

            calls = [asyncio.create_task(one(i)) for i in range(300)]
            enough = asyncio.Event()
            for call in calls:
                call.add_done_callback(
                    lambda _: enough.set() if sum(c.done() for c in calls) >= 60 else None
                )
            await enough.wait()
            await asyncio.to_thread(server.kill)  # SIGKILL, writes in flight
            await asyncio.gather(*calls, return_exceptions=True)
        server.proc.wait(10)
        server = Server(tmp_path, env)
        await asyncio.to_thread(server.wait_ready)
        db = create_database(make_settings(), url)
        try:
            deadline = time.monotonic() + 30
            while True:
                events = await stored(db, org)
                got = {int(r.headers["webhook-id"]) for r in receiver.requests}
                if got >= {i for i, _ in events} or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert got == {i for i, _ in events}, "a committed event never arrived"
            async with db.read() as conn:
                ledger = {
                    str(r.id)
                    for r in await conn.execute(
                        select(inventory_ledger.c.id).where(inventory_ledger.c.org_id == org)
                    )
                }
        finally:
            await db.dispose()
        named = {
            entry
            for _, payload in events
            for entry in json.loads(payload)["data"]["ledgerEntryIds"]
        }
        assert named == ledger and len(ledger) >= 60
        duplicates = len(receiver.requests) - len(got)
        print(f"\n{len(events)} events, {len(receiver.requests)} requests ({duplicates} dup)")
    finally:
        server.stop()
        server.kill()
        await receiver.stop()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_stockledger_relay_runs_alone(
    database_url: str, service: InventoryService, tmp_path: Path
) -> None:
    """``stockledger relay --once``: one pass over every org, from the start of the outbox."""
    await service.restock("r1", [Line("MUG", 1), Line("CUP", 1)])
    env = base_env(tmp_path, database_url=database_url)
    done = await asyncio.to_thread(
        subprocess.run, [*CLI, "relay", "--once"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == "published 2 event(s), attempted 0"
