"""Webhooks (ARCHITECTURE section 15, ``services/webhooks.py``) against a real HTTP receiver
this test starts on loopback (so ``webhook_allow_private`` is on, except in the SSRF tests).

The receiver verifies every request with the ``standardwebhooks`` library; the tests cover a
receiver failing its first calls, one that is down for a while (the breaker opens, and once it
is back every event arrives, deduplicated by webhook-id), a timeout, SSRF refusals, and the
GraphQL fields (ADMIN) with their idempotency.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import make_settings
from fakeredis import FakeAsyncRedis
from graphql_helpers import app_settings, serve
from sqlalchemy import select, update
from standardwebhooks import Webhook

from stockledger.config import Settings
from stockledger.db.engine import Database
from stockledger.db.models import outbox_event, webhook_delivery, webhook_endpoint
from stockledger.domain.errors import ValidationError
from stockledger.domain.model import Line
from stockledger.observability import metrics
from stockledger.services import InventoryService
from stockledger.services.relay import Relay
from stockledger.services.webhooks import (
    Breakers,
    Delivery,
    DeliveryWorker,
    Webhooks,
    check_url,
    delivery_of,
)

# ---------------------------------------------------------------------- the receiver


@dataclass
class Received:
    headers: dict[str, str]
    body: str


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server on 127.0.0.1: each request is recorded, then answered by
    ``answer(n)`` (n: its number from 1): a status code, or (seconds to wait, status)."""

    answer: Callable[[int], Any] = lambda n: 200
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(Received(headers, body.decode()))
            answer = self.answer(len(self.requests))
            wait, status = answer if isinstance(answer, tuple) else (0, answer)
            if wait:
                await asyncio.sleep(wait)
            writer.write(
                f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    await found.start()
    yield found
    await found.stop()


# ---------------------------------------------------------------------- the parts


@pytest.fixture
def settings() -> Settings:
    return make_settings(
        webhook_allow_private=True,
        webhook_timeout_seconds=0.5,
        relay_interval_seconds=0.05,
        relay_gap_seconds=1.0,
    )


@dataclass
class Parts:
    db: Database
    service: InventoryService
    relay: Relay
    worker: DeliveryWorker
    webhooks: Webhooks
    org_id: str
    redis: FakeAsyncRedis | None = None

    async def pump(self, done: Callable[[], Any], seconds: float = 15.0) -> None:
        """Relay and deliver until ``done()`` (awaited when a coroutine) is true."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await self.relay.run_once()
            await self.worker.run_once()
            result = done()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("not done in time")

    async def deliveries(self) -> list[Delivery]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(webhook_delivery)
                .where(webhook_delivery.c.org_id == self.org_id)
                .order_by(webhook_delivery.c.id)
            )
            return [delivery_of(r) for r in rows]

    async def event_ids(self) -> list[int]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(outbox_event.c.id).where(outbox_event.c.org_id == self.org_id)
            )
            return sorted(int(r.id) for r in rows)


@pytest.fixture
async def parts(
    db: Database, settings: Settings, service: InventoryService, org_id: str
) -> AsyncIterator[Parts]:
    redis = FakeAsyncRedis()
    breakers = Breakers(fail_max=3, reset_timeout=0.5, redis=redis)
    relay = Relay(db, redis, settings, orgs=[org_id])
    worker = DeliveryWorker(
        db, settings, breakers=breakers, backoff_base=0.02, backoff_max=0.1, orgs=[org_id]
    )
    await relay.run_once()  # the org's lease: its events start now
    parts = Parts(db, service, relay, worker, Webhooks(db, settings, breakers=breakers), org_id)
    parts.redis = redis
    yield parts
    await deactivate(db, org_id)
    await worker.aclose()
    await relay.release()
    await redis.aclose()


async def deactivate(db: Database, org_id: str) -> None:
    """Leave no active endpoint behind: servers of later tests on the shared MariaDB database
    relay every org, and would call these receivers (long gone) in vain."""
    async with db.engine.begin() as conn:
        await conn.execute(
            update(webhook_endpoint).where(webhook_endpoint.c.org_id == org_id).values(active=False)
        )


def _count(result: str) -> float:
    return metrics.WEBHOOK_DELIVERIES_TOTAL.labels(result=result)._value.get()


# ---------------------------------------------------------------------- delivery


async def test_a_delivery_is_signed_and_verifies_on_the_receiving_side(
    parts: Parts, receiver: Receiver
) -> None:
    made = await parts.webhooks.create_once(
        parts.org_id, "w1", receiver.url, ["STOCK_CHANGED", "STOCK_OUT"]
    )
    assert made.secret is not None and made.secret.startswith("whsec_")
    delivered = _count("delivered")
    await parts.service.restock("r1", [Line("MUG", 1)])
    await parts.service.adjust("a1", "MUG", delta=-1, reason="breakage")  # STOCK_OUT too
    events = await parts.event_ids()
    await parts.pump(lambda: len(receiver.requests) >= len(events))
    verifier = Webhook(made.secret)
    got = {}
    for request in receiver.requests:
        body = verifier.verify(request.body, request.headers)  # raises when not signed right
        got[request.headers["webhook-id"]] = body
    assert sorted(int(i) for i in got) == events
    async with parts.db.read() as conn:
        stored = dict((await conn.execute(select(outbox_event.c.id, outbox_event.c.payload))).all())
    for event_id, body in got.items():
        assert body == json.loads(stored[int(event_id)])  # the payload as stored
    assert {b["type"] for b in got.values()} >= {"STOCK_CHANGED", "STOCK_OUT"}
    rows = await parts.deliveries()
    assert {r.status for r in rows} == {"DELIVERED"}
    assert all(r.attempts == 1 and r.last_status_code == 200 for r in rows)
    assert _count("delivered") - delivered == len(events)


async def test_a_receiver_failing_three_times_gets_the_event_on_the_fourth(
    parts: Parts, receiver: Receiver
) -> None:
    receiver.answer = lambda n: 500 if n <= 3 else 204
    await parts.webhooks.create_once(parts.org_id, "w1", receiver.url, ["STOCK_CHANGED"])
    failed = _count("failed")
    await parts.service.restock("r1", [Line("MUG", 1)])

    async def delivered() -> bool:
        return [d.status for d in await parts.deliveries()] == ["DELIVERED"]

    await parts.pump(delivered)
    [row] = await parts.deliveries()
    assert row.attempts == 4 and row.last_status_code == 204 and row.last_error is None
    assert len(receiver.requests) == 4
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1  # the same event
    assert _count("failed") - failed == 3


async def test_a_receiver_down_for_a_while_trips_the_breaker_and_gets_everything_back(
    parts: Parts, receiver: Receiver
) -> None:
    made = await parts.webhooks.create_once(parts.org_id, "w1", receiver.url, ["STOCK_CHANGED"])
    await receiver.stop()  # down: connections refused
    skipped = _count("circuit_open")
    for i in range(8):
        await parts.service.restock(f"r{i}", [Line(f"SKU-{i}", 1)])
    events = await parts.event_ids()

    async def tripped() -> bool:
        [endpoint] = (await parts.webhooks.page(parts.org_id)).edges
        return endpoint[1].circuit_state == "OPEN"

    await parts.pump(tripped)
    # Another process (no breaker of its own) shows the state the worker shared in Redis.
    elsewhere = Webhooks(parts.db, parts.webhooks.settings, breakers=Breakers(redis=parts.redis))
    assert [e.circuit_state for _, e in (await elsewhere.page(parts.org_id)).edges] == ["OPEN"]
    rows = await parts.deliveries()
    assert sum(r.attempts for r in rows) == 3  # fail_max: then the breaker stops the calls
    assert {r.status for r in rows} <= {"FAILED", "PENDING"}
    await parts.pump(lambda: _count("circuit_open") > skipped)  # due ones wait, unattempted
    await receiver.start()  # back, on the same port

    async def all_delivered() -> bool:
        return {d.status for d in await parts.deliveries()} == {"DELIVERED"}

    await parts.pump(all_delivered)
    ids = [int(r.headers["webhook-id"]) for r in receiver.requests]
    assert sorted(set(ids)) == events  # everything, deduplicated by webhook-id
    [endpoint] = (await parts.webhooks.page(parts.org_id)).edges
    assert endpoint[1].circuit_state == "CLOSED" and endpoint[1].id == made.endpoint.id
    assert [e.circuit_state for _, e in (await elsewhere.page(parts.org_id)).edges] == ["CLOSED"]


async def test_a_timeout_counts_as_a_failure(parts: Parts, receiver: Receiver) -> None:
    receiver.answer = lambda n: (2.0, 200) if n == 1 else 200  # slower than the 0.5 s timeout
    await parts.webhooks.create_once(parts.org_id, "w1", receiver.url, ["STOCK_CHANGED"])
    failed = _count("failed")
    await parts.service.restock("r1", [Line("MUG", 1)])
    await parts.pump(lambda: _count("failed") > failed)
    [row] = await parts.deliveries()
    assert row.status == "FAILED" and row.attempts == 1
    assert row.last_error is not None and "timed out" in row.last_error
    assert row.last_status_code is None

    async def delivered() -> bool:
        return [d.status for d in await parts.deliveries()] == ["DELIVERED"]

    await parts.pump(delivered)  # the retry gets through


async def test_give_up_makes_a_delivery_dead(
    db: Database, service: InventoryService, org_id: str, receiver: Receiver
) -> None:
    settings = make_settings(webhook_allow_private=True, webhook_give_up_seconds=0.3)
    receiver.answer = lambda n: 503
    redis = FakeAsyncRedis()
    relay = Relay(db, redis, settings, orgs=[org_id])
    worker = DeliveryWorker(db, settings, backoff_base=0.1, backoff_max=0.2, orgs=[org_id])
    hooks = Webhooks(db, settings)
    try:
        await relay.run_once()
        made = await hooks.create_once(org_id, "w1", receiver.url, ["STOCK_CHANGED"])
        await service.restock("r1", [Line("MUG", 1)])
        parts = Parts(db, service, relay, worker, hooks, org_id)

        async def dead() -> bool:
            return [d.status for d in await parts.deliveries()] == ["DEAD"]

        await parts.pump(dead)
        page = await hooks.deliveries(org_id, str(made.endpoint.id))
        [(_, row)] = page.edges
        assert row.last_status_code == 503 and row.attempts >= 1 and row.next_attempt_at is None
    finally:
        await deactivate(db, org_id)
        await worker.aclose()
        await redis.aclose()


# ---------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://192.168.0.10:8080/hook",
        "http://localhost/hook",
    ],
)
@pytest.mark.parametrize("backend", ["sqlite"])
async def test_private_addresses_are_refused_unless_allowed(url: str, db: Database) -> None:
    with pytest.raises(ValidationError, match="private, loopback or link-local"):
        await check_url(url, allow_private=False)
    assert await check_url(url, allow_private=True) == url
    refusing = Webhooks(db, make_settings())
    with pytest.raises(ValidationError):
        await refusing.create_once("org", "w1", url, ["STOCK_CHANGED"])
    assert (await refusing.page("org")).edges == []


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "file:///etc/passwd", "http:///nohost", "http://u:p@x.io/"]
)
async def test_only_http_urls_with_a_host_are_endpoints(url: str) -> None:
    with pytest.raises(ValidationError):
        await check_url(url, allow_private=True)


async def test_create_and_delete_are_idempotent(parts: Parts, receiver: Receiver) -> None:
    hooks = parts.webhooks
    made = await hooks.create_once(parts.org_id, "w1", receiver.url, ["STOCK_OUT"])
    again = await hooks.create_once(parts.org_id, "w1", receiver.url, ["STOCK_OUT"])
    assert again.replayed and again.secret is None and again.endpoint.id == made.endpoint.id
    from stockledger.domain.errors import IdempotencyKeyReusedError, NotFoundError

    with pytest.raises(IdempotencyKeyReusedError):
        await hooks.create_once(parts.org_id, "w1", receiver.url, ["STOCK_LOW"])
    with pytest.raises(NotFoundError):
        await hooks.delete_once(f"{parts.org_id}-other", "d1", str(made.endpoint.id))
    deleted = await hooks.delete_once(parts.org_id, "d1", str(made.endpoint.id))
    assert not deleted.replayed and not deleted.endpoint.active
    assert deleted.endpoint.deleted_at is not None
    replay = await hooks.delete_once(parts.org_id, "d1", str(made.endpoint.id))
    assert replay.replayed and replay.endpoint.deleted_at == deleted.endpoint.deleted_at
    # A deleted endpoint gets nothing more.
    await parts.service.restock("r1", [Line("MUG", 1)])
    await parts.service.adjust("a1", "MUG", delta=-1, reason="breakage")
    await parts.relay.run_once()
    await parts.worker.run_once()
    assert await parts.deliveries() == [] and receiver.requests == []


async def test_the_graphql_fields(database_url: str, org_id: str, receiver: Receiver) -> None:
    settings = app_settings(database_url, org_id, webhook_allow_private=True)
    async with serve(settings) as gql:
        create = """mutation($i: CreateWebhookEndpointInput!) {
          createWebhookEndpoint(input: $i) {
            __typename
            ... on CreateWebhookEndpointSuccess {
              secret replayed endpoint { id url eventTypes active circuitState createdAt }
            }
            ... on ValidationError { field message }
          }
        }"""
        variables = {
            "i": {"idempotencyKey": "w1", "url": receiver.url, "eventTypes": ["STOCK_LOW"]}
        }
        made = (await gql.post(create, variables))["data"]["createWebhookEndpoint"]
        assert made["__typename"] == "CreateWebhookEndpointSuccess", made
        assert made["secret"].startswith("whsec_") and made["replayed"] is False
        endpoint = made["endpoint"]
        assert endpoint["eventTypes"] == ["STOCK_LOW"] and endpoint["circuitState"] == "CLOSED"
        replay = (await gql.post(create, variables))["data"]["createWebhookEndpoint"]
        assert replay["secret"] is None and replay["replayed"] is True
        listing = await gql.post(
            "{ webhookEndpoints { edges { node { id active } } pageInfo { hasNextPage } } }"
        )
        assert listing["data"]["webhookEndpoints"]["edges"] == [
            {"node": {"id": endpoint["id"], "active": True}}
        ]
        deliveries = await gql.post(
            "query($id: ID!) { webhookDeliveries(endpointId: $id) { edges { node { id } } } }",
            {"id": endpoint["id"]},
        )
        assert deliveries["data"]["webhookDeliveries"]["edges"] == []
        delete = """mutation($i: DeleteWebhookEndpointInput!) {
          deleteWebhookEndpoint(input: $i) {
            __typename
            ... on DeleteWebhookEndpointSuccess { replayed endpoint { id active } }
          }
        }"""
        gone = await gql.post(delete, {"i": {"idempotencyKey": "d1", "id": endpoint["id"]}})
        assert gone["data"]["deleteWebhookEndpoint"]["endpoint"] == {
            "id": endpoint["id"],
            "active": False,
        }
        missing = await gql.post(delete, {"i": {"idempotencyKey": "d2", "id": "999999999"}})
        assert missing["data"]["deleteWebhookEndpoint"]["__typename"] == "NotFoundError"
    refusing = app_settings(database_url, org_id)
    async with serve(refusing) as gql:
        variables["i"]["idempotencyKey"] = "w2"
        refused = (await gql.post(create, variables))["data"]["createWebhookEndpoint"]
        assert refused["__typename"] == "ValidationError" and refused["field"] == "url"


@pytest.mark.parametrize("backend", ["mysql"])
async def test_two_processes_deliver_each_event_to_each_endpoint(
    db: Database, settings: Settings, service: InventoryService, org_id: str
) -> None:
    """Two relays and two workers (two servers' worth) at once: one relay holds the org, the
    workers share the deliveries (SKIP LOCKED); each event reaches each endpoint, and the
    duplicates (at least once allows some) are counted."""
    receivers = [Receiver(), Receiver()]
    for r in receivers:
        await r.start()
    redis = FakeAsyncRedis()
    relays = [Relay(db, redis, settings, orgs=[org_id], owner=f"p{i}") for i in (1, 2)]
    workers = [DeliveryWorker(db, settings, interval=0.02, orgs=[org_id]) for _ in (1, 2)]
    hooks = Webhooks(db, settings)
    tasks: list[asyncio.Task[None]] = []
    try:
        for relay in relays:
            await relay.run_once()
        for i, r in enumerate(receivers):
            await hooks.create_once(org_id, f"w{i}", r.url, ["STOCK_CHANGED"])
        tasks = [asyncio.create_task(x.run_forever()) for x in [*relays, *workers]]
        await asyncio.gather(
            *(service.restock(f"r{i}", [Line(f"SKU-{i % 7}", 1)]) for i in range(40))
        )
        parts = Parts(db, service, relays[0], workers[0], hooks, org_id)
        events = await parts.event_ids()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = await parts.deliveries()
            if len(rows) == 2 * len(events) and {d.status for d in rows} == {"DELIVERED"}:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("not delivered in time")
        assert sum(bool(r.held_orgs) for r in relays) == 1  # the lease: one relay at a time
        for r in receivers:
            ids = [int(q.headers["webhook-id"]) for q in r.requests]
            assert sorted(set(ids)) == events
            duplicates = len(ids) - len(set(ids))
            print(f"{r.url}: {len(ids)} requests, {duplicates} duplicate(s)")
            assert duplicates == 0  # claims are atomic: none expected without a crash
    finally:
        await deactivate(db, org_id)
        for x in [*relays, *workers]:
            x.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in workers:
            await w.aclose()
        for r in receivers:
            await r.stop()
        await redis.aclose()
