"""Events end to end with real ``stockledger serve`` processes (issue 12).

Two servers on one MariaDB and one Redis (each runs a relay and a delivery worker; one relay
per org holds the lease) deliver every committed outbox event to each of two webhook
endpoints, with few duplicates (counted and printed), also when one server is SIGKILLed
mid-run. And a low-stock alert reaches a webhook and a ``lowStockAlerts`` subscription within
2 s of the mutation's answer (SQLite and MariaDB, default relay settings).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from conftest import drop_org_keys, make_settings
from graphql_helpers import GraphQLClient, line
from server_process import Server, base_env, running
from sqlalchemy import select
from standardwebhooks import Webhook
from starlette.applications import Starlette
from test_subscriptions import LOW_STOCK_ALERTS, Live, authed, receive, subscribe
from test_webhooks import Receiver

from stockledger.db.engine import create_database
from stockledger.db.models import inventory_ledger, outbox_event, relay_state

TYPES = ["STOCK_CHANGED", "STOCK_LOW", "STOCK_OUT", "STOCK_REPLENISHED", "RESERVATION_EXPIRED"]
SKUS = [f"E2E-{i}" for i in range(5)]
WRITES = 100
OPS = ("reserve", "restock")
DELIVERY_WAIT = 30.0  # seconds for every event to reach every receiver
MAX_DUPLICATES = 0.05  # of the events, per receiver, without a crash
ALERT_BOUND = 2.0  # seconds, issue 12 item 6

CREATE_ENDPOINT = """mutation($i: CreateWebhookEndpointInput!) { createWebhookEndpoint(input: $i) {
  __typename ... on CreateWebhookEndpointSuccess { secret endpoint { id } } } }"""
SET_REORDER_POINT = """mutation($i: SetReorderPointInput!) { setReorderPoint(input: $i) {
  __typename } }"""


# ---------------------------------------------------------------------- helpers


def client(server: Server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30)


def gql(http: httpx.AsyncClient) -> GraphQLClient:
    return GraphQLClient(http, cast(Starlette, None))


async def create_endpoint(http: httpx.AsyncClient, url: str, types: list[str]) -> str:
    """A webhook endpoint for ``url`` and ``types``; its signing secret."""
    variables = {"i": {"idempotencyKey": uuid.uuid4().hex, "url": url, "eventTypes": types}}
    made = (await gql(http).data(CREATE_ENDPOINT, variables))["createWebhookEndpoint"]
    assert made["__typename"] == "CreateWebhookEndpointSuccess", made
    secret: str = made["secret"]
    return secret


async def committed_events(url: str, org: str) -> dict[int, str]:
    """The org's outbox events of :data:`TYPES` in the database: id -> payload."""
    db = create_database(make_settings(), url)
    try:
        async with db.read() as conn:
            rows = await conn.execute(
                select(outbox_event.c.id, outbox_event.c.payload).where(
                    outbox_event.c.org_id == org, outbox_event.c.event_type.in_(TYPES)
                )
            )
            return {int(r.id): str(r.payload) for r in rows}
    finally:
        await db.dispose()


async def ledger_ids(url: str, org: str) -> set[str]:
    db = create_database(make_settings(), url)
    try:
        async with db.read() as conn:
            rows = await conn.execute(
                select(inventory_ledger.c.id).where(inventory_ledger.c.org_id == org)
            )
            return {str(r.id) for r in rows}
    finally:
        await db.dispose()


async def lease_holder(url: str, org: str, servers: list[Server]) -> Server:
    """The server whose relay holds the org's lease (its owner is ``host:pid:random``)."""
    db = create_database(make_settings(), url)
    try:
        async with asyncio.timeout(10):
            while True:
                async with db.read() as conn:
                    owner = (
                        await conn.execute(
                            select(relay_state.c.owner).where(relay_state.c.org_id == org)
                        )
                    ).scalar()
                pids = {str(s.proc.pid): s for s in servers}
                if owner is not None and owner.split(":")[1] in pids:
                    return pids[owner.split(":")[1]]
                await asyncio.sleep(0.05)
    finally:
        await db.dispose()


def ids_of(receiver: Receiver) -> Counter[int]:
    """How many times each webhook-id arrived."""
    return Counter(int(r.headers["webhook-id"]) for r in receiver.requests)


def verify_all(receiver: Receiver, secret: str, events: dict[int, str]) -> None:
    """Every request is signed with the endpoint's secret, and carries the stored payload of
    the event named by its webhook-id."""
    verifier = Webhook(secret)
    for request in receiver.requests:
        body = verifier.verify(request.body, request.headers)  # raises when not signed right
        event_id = int(request.headers["webhook-id"])
        assert event_id in events, f"webhook-id {event_id} is no event of the org"
        assert body == json.loads(events[event_id]), f"webhook-id {event_id}: another payload"


async def wait_delivered(url: str, org: str, receivers: list[Receiver]) -> dict[int, str]:
    """Until every committed event reached every receiver (bounded); the events."""
    deadline = time.monotonic() + DELIVERY_WAIT
    while True:
        events = await committed_events(url, org)
        if all(set(ids_of(r)) >= set(events) for r in receivers):
            return events
        if time.monotonic() > deadline:
            return events  # the caller's assertions say what is missing
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def receivers(count: int) -> AsyncIterator[list[Receiver]]:
    started = [Receiver() for _ in range(count)]
    for r in started:
        await r.start()
    try:
        yield started
    finally:
        for r in started:
            await r.stop()


# ---------------------------------------------------------------------- two servers


@pytest.fixture
def two_server_env(
    own_mysql_url: str, redis_url: str, org_id: str, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """Server settings on this test's own MariaDB database, the test Redis and a fresh org."""
    yield base_env(
        tmp_path,
        database_url=own_mysql_url,
        redis_url=redis_url,
        org_id=org_id,
        webhook_allow_private="true",
        relay_interval_seconds="0.05",
        relay_lease_seconds="2",
        relay_gap_seconds="1",
        webhook_timeout_seconds="1",
        rate_limit="",
        log_level="WARNING",
    )
    drop_org_keys(redis_url, org_id)


@contextlib.contextmanager
def two_servers(tmp_path: Path, env: dict[str, str]) -> Iterator[list[Server]]:
    """Two ready servers on ``env`` (one after the other: one bootstrap key at most)."""
    with running(tmp_path, env) as a:
        a.wait_ready()
        with running(tmp_path, env) as b:
            b.wait_ready()
            yield [a, b]


async def spread_writes(
    servers: list[Server],
    count: int,
    *,
    after: Callable[[int], Any] | None = None,
    opening: bool = True,
) -> Counter[str]:
    """Opening stock (``opening``), then ``count`` reserves and restocks of one unit,
    alternating over the servers (8 at a time); a write to a server that is gone goes to
    another, same key. ``after(n)`` is called when n writes have answered. The outcomes."""
    clients = [client(s) for s in servers]
    outcomes: Counter[str] = Counter()
    gate = asyncio.Semaphore(8)
    try:
        for i, sku in enumerate(SKUS if opening else ()):
            await gql(clients[i % 2]).restock(uuid.uuid4().hex, line(sku, 1000))

        async def one(i: int) -> None:
            op = OPS[(i // 2) % 2]
            key = uuid.uuid4().hex
            async with gate:
                for attempt in range(len(servers)):
                    s = (i + attempt) % len(servers)
                    if servers[s].proc.poll() is not None:
                        continue
                    try:
                        await getattr(gql(clients[s]), op)(key, line(SKUS[i % len(SKUS)], 1))
                        outcomes[f"{op} on {s}"] += 1
                        break
                    except httpx.TransportError:
                        outcomes["transport error"] += 1  # committed or not: the db says
            if after is not None:
                after(sum(outcomes.values()))

        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for c in clients:
            await c.aclose()
    return outcomes


def report(label: str, events: dict[int, str], found: list[Receiver]) -> list[int]:
    """Print and return the duplicates per receiver."""
    duplicates = [len(r.requests) - len(ids_of(r)) for r in found]
    print(
        f"\n{label}: {len(events)} events; requests per receiver "
        f"{[len(r.requests) for r in found]}; duplicates {duplicates}"
    )
    return duplicates


async def test_two_servers_deliver_every_event_to_each_endpoint(
    two_server_env: dict[str, str], own_mysql_url: str, org_id: str, tmp_path: Path
) -> None:
    """100 writes spread over two servers: each endpoint gets every committed event, signed,
    its webhook-id the event id, with at most 5 % duplicates (printed)."""
    async with receivers(2) as found:
        with two_servers(tmp_path, two_server_env) as servers:
            async with client(servers[0]) as http:
                secrets = [await create_endpoint(http, r.url, TYPES) for r in found]
            outcomes = await spread_writes(servers, WRITES)
            assert outcomes["transport error"] == 0, outcomes
            assert sum(outcomes.values()) == WRITES, outcomes
            assert all(outcomes[f"{op} on {s}"] > 0 for op in OPS for s in (0, 1)), outcomes
            events = await wait_delivered(own_mysql_url, org_id, found)
            holder = await lease_holder(own_mysql_url, org_id, servers)
            await asyncio.sleep(1)  # late duplicates, if any, are counted too
        assert len(events) >= WRITES + len(SKUS)
        for r, secret in zip(found, secrets, strict=True):
            missing = sorted(set(events) - set(ids_of(r)))
            assert not missing, f"{r.url}: {len(missing)} events never arrived: {missing[:10]}"
            verify_all(r, secret, events)
        duplicates = report("two servers", events, found)
        print(f"lease held by server {servers.index(holder)}; writes {dict(outcomes)}")
        assert max(duplicates) <= MAX_DUPLICATES * len(events), duplicates


async def test_a_sigkilled_server_loses_no_event_for_either_endpoint(
    two_server_env: dict[str, str], own_mysql_url: str, org_id: str, tmp_path: Path
) -> None:
    """SIGKILL the lease holder with writes in flight: the other takes the org over, and every
    event whose transaction committed reaches both receivers; every ledger entry is named by
    an event."""
    async with receivers(2) as found:
        with two_servers(tmp_path, two_server_env) as servers:
            async with client(servers[0]) as http:
                secrets = [await create_endpoint(http, r.url, TYPES) for r in found]
            first = await spread_writes(servers, WRITES // 2)
            holder = await lease_holder(own_mysql_url, org_id, servers)

            def kill_soon(done: int) -> None:
                if done >= 10 and holder.proc.poll() is None:
                    holder.kill()  # SIGKILL, writes and deliveries in flight

            outcomes = first + await spread_writes(
                servers, WRITES // 2, after=kill_soon, opening=False
            )
            assert holder.proc.wait(10) is not None
            survivor = next(s for s in servers if s is not holder)
            assert survivor.proc.poll() is None
            events = await wait_delivered(own_mysql_url, org_id, found)
            ledger = await ledger_ids(own_mysql_url, org_id)
            assert await lease_holder(own_mysql_url, org_id, servers) is survivor
        for r, secret in zip(found, secrets, strict=True):
            missing = sorted(set(events) - set(ids_of(r)))
            assert not missing, f"{r.url}: {len(missing)} events never arrived: {missing[:10]}"
            verify_all(r, secret, events)
        named = {e for p in events.values() for e in json.loads(p)["data"]["ledgerEntryIds"]}
        assert named == ledger, "a committed ledger entry has no event"
        assert len(ledger) >= WRITES // 2
        report("one server SIGKILLed", events, found)
        print(f"writes {dict(outcomes)}")


# ---------------------------------------------------------------------- alert latency


@pytest.fixture(params=["sqlite", "mysql"])
def alert_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """One server, default relay and delivery settings: SQLite, or its own MariaDB + Redis."""
    if request.param == "sqlite":
        yield base_env(tmp_path, webhook_allow_private="true", log_level="WARNING")
        return
    url = str(request.getfixturevalue("own_mysql_url"))
    redis_url = str(request.getfixturevalue("redis_url"))
    org = f"t-{uuid.uuid4().hex[:12]}"
    yield base_env(
        tmp_path,
        database_url=url,
        redis_url=redis_url,
        org_id=org,
        webhook_allow_private="true",
        log_level="WARNING",
    )
    drop_org_keys(redis_url, org)


async def subscriptions_active(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    [sample] = [x for x in text.splitlines() if x.startswith("inventory_subscriptions_active ")]
    return float(sample.split()[1])


async def test_low_stock_alerts_reach_a_webhook_and_a_subscription_within_2_s(
    alert_env: dict[str, str], tmp_path: Path
) -> None:
    arrivals: list[float] = []

    def record(n: int) -> int:
        arrivals.append(time.monotonic())
        return 200

    receiver = Receiver(answer=record)
    await receiver.start()
    try:
        with running(tmp_path, alert_env) as server:
            await asyncio.to_thread(server.wait_ready)
            org = alert_env.get("STOCKLEDGER_ORG_ID", "default")
            async with client(server) as http:
                g = gql(http)
                secret = await create_endpoint(http, receiver.url, ["STOCK_LOW", "STOCK_OUT"])
                await g.restock(uuid.uuid4().hex, line("ALERT", 10))
                point = {"sku": "ALERT", "minimumLevel": 3, "reorderQuantity": 10}
                made = await g.data(
                    SET_REORDER_POINT, {"i": {"idempotencyKey": uuid.uuid4().hex, **point}}
                )
                assert made["setReorderPoint"]["__typename"] == "ReorderPointSuccess", made
                live = Live(cast(Starlette, None), server.url, org, server.secret)
                ws = await authed(live, server.secret)
                op = await subscribe(ws, LOW_STOCK_ALERTS, {"location": "default"})
                async with asyncio.timeout(10):
                    while await subscriptions_active(http) < 1:  # noqa: ASYNC110 (another process)
                        await asyncio.sleep(0.02)
                timings: list[tuple[str, float, float]] = []
                # 10 -> 3 available: LOW; 3 -> 0: OUT.
                for quantity, expected in ((7, "STOCK_LOW"), (3, "STOCK_OUT")):
                    before = len(receiver.requests)
                    await g.reserve(uuid.uuid4().hex, line("ALERT", quantity))
                    answered = time.monotonic()
                    message = await receive(ws, within=10)
                    subscribed = time.monotonic() - answered
                    assert message["id"] == op and message["type"] == "next", message
                    alert = message["payload"]["data"]["lowStockAlerts"]
                    assert alert["eventType"] == expected, alert
                    async with asyncio.timeout(10):
                        while len(receiver.requests) == before:  # noqa: ASYNC110 (polled)
                            await asyncio.sleep(0.005)
                    hooked = arrivals[before] - answered
                    request = receiver.requests[before]
                    body = Webhook(secret).verify(request.body, request.headers)
                    assert body["type"] == expected, body
                    assert body["data"]["balance"]["available"] == alert["balance"]["available"]
                    timings.append((expected, hooked, subscribed))
                await ws.close()
        print(
            "\n"
            + "; ".join(f"{t}: webhook {h:.3f} s, subscription {s:.3f} s" for t, h, s in timings)
        )
        for event_type, hooked, subscribed in timings:
            assert hooked < ALERT_BOUND, f"{event_type}: the webhook took {hooked:.3f} s"
            assert subscribed < ALERT_BOUND, (
                f"{event_type}: the subscription took {subscribed:.3f} s"
            )
    finally:
        await receiver.stop()
