"""GraphQL subscriptions over graphql-transport-ws on ``/graphql`` (part EVENTS, ARCHITECTURE
section 15), with a real websocket client (``websockets``) against a real server.

The server runs in this test's event loop (uvicorn on a free loopback port, the app as
``stockledger serve`` builds it), on the embedded default (SQLite, fakeredis in process) and on
MariaDB + Redis: so the tests can publish payloads to the org's channel on the server's own
Redis client (``app.state.runtime.redis``, the fakeredis one included) and look at
``app.state.live``. The end-to-end tests need the relay (``services/relay.py``) to carry the
writes' outbox events to Redis: serve's own (``runtime.relay``), else one started by the test
(:func:`relaying`). One test runs the ``graphql-ws`` npm client under Node.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest
import uvicorn
from conftest import make_settings
from fakeredis import FakeAsyncRedis
from graphql_helpers import GraphQLClient, line
from server_process import base_env, free_port, running
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from stockledger.app.serving import create_served_app
from stockledger.config import Settings
from stockledger.domain import ids
from stockledger.domain.access import Scope
from stockledger.services.live import LiveEvent, LiveEvents, channel

PROTOCOL = Subprotocol("graphql-transport-ws")
WAIT = 10.0  # seconds any one expected message may take
RELAY_BUILT = importlib.util.find_spec("stockledger.services.relay") is not None
needs_relay = pytest.mark.skipif(not RELAY_BUILT, reason="the relay is not built yet")

BALANCE_FIELDS = "id sku location onHand reserved available version updatedAt committed incoming"
STOCK_CHANGED = (
    "subscription($skus: [String!]!, $location: String) { stockChanged(skus: $skus, "
    f"location: $location) {{ {BALANCE_FIELDS} }} }}"
)
LOW_STOCK_ALERTS = (
    "subscription($location: String) { lowStockAlerts(location: $location) "
    f"{{ eventType occurredAt balance {{ {BALANCE_FIELDS} }} }} }}"
)


# -------------------------------------------------------------------- the server


class _InLoopServer(uvicorn.Server):
    """uvicorn without its signal handlers: it runs inside the test's event loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Live:
    """A running server: its app (``app.state`` live), URLs, and an ADMIN key of ``org``."""

    app: Starlette
    url: str
    org: str
    admin: str

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/graphql"

    async def key(self, *scopes: Scope, org: str | None = None) -> str:
        """A new key's secret, of ``org`` (default: the server's)."""
        _, secret = await self.app.state.api_keys.create(
            org or self.org, f"k-{uuid.uuid4().hex[:6]}", list(scopes)
        )
        return str(secret)

    async def publish(self, org: str, body: dict[str, Any]) -> None:
        """Publish ``body`` as the relay does, on the server's own Redis client."""
        await self.app.state.runtime.redis.publish(channel(org), json.dumps(body))

    async def wait_subscribers(self, count: int) -> None:
        """Until the listener has ``count`` subscribers (a subscribe has no reply)."""
        live: LiveEvents = self.app.state.live
        async with asyncio.timeout(WAIT):
            # Polled: the listener has no event to wait on, and tests only.
            while live.subscribers != count:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    def client(self, secret: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"authorization": f"Bearer {secret or self.admin}"},
            timeout=30,
        )


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Starlette, str]]:
    """``stockledger serve``'s app for ``settings`` on a free port in this loop: (app, URL)."""
    app = create_served_app(settings)
    port = free_port()
    server = _InLoopServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_config=None)
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                if task.done():
                    task.result()
                    pytest.fail("the server stopped before it started")
                await asyncio.sleep(0.02)
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def live(
    backend: str, database_url: str, org_id: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Live]:
    """The served app on SQLite + fakeredis, or MariaDB + Redis; auth required; 2
    subscriptions per connection, 3 connections per key."""
    redis_url = request.getfixturevalue("redis_url") if backend == "mysql" else None
    settings = make_settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        redis_url=redis_url,
        org_id=org_id,
        auth="required",
        log_level="WARNING",
        max_subscriptions_per_connection=2,
        max_connections_per_key=3,
        rate_limit="",
    )
    async with serving(settings) as (app, url):
        _, admin = await app.state.api_keys.create(org_id, "tests", [Scope.ADMIN])
        yield Live(app, url, org_id, str(admin))


# -------------------------------------------------------------------- the client


@dataclass
class Closed:
    code: int | None
    reason: str


async def open_ws(live: Live, payload: dict[str, Any] | None) -> ClientConnection | Closed:
    """A connection after connection_init with ``payload`` (None: no payload at all): the
    socket once acknowledged, else how the server closed it."""
    ws = await connect(live.ws_url, subprotocols=[PROTOCOL], open_timeout=WAIT)
    init: dict[str, Any] = {"type": "connection_init"}
    if payload is not None:
        init["payload"] = payload
    await ws.send(json.dumps(init))
    try:
        async with asyncio.timeout(WAIT):
            reply = json.loads(await ws.recv())
    except ConnectionClosed as closed:
        rcvd = closed.rcvd
        return Closed(None if rcvd is None else rcvd.code, "" if rcvd is None else rcvd.reason)
    assert reply["type"] == "connection_ack", reply
    return ws


async def authed(live: Live, secret: str) -> ClientConnection:
    ws = await open_ws(live, {"authorization": f"Bearer {secret}"})
    assert isinstance(ws, ClientConnection), ws
    return ws


async def subscribe(
    ws: ClientConnection, query: str, variables: dict[str, Any] | None = None
) -> str:
    op = uuid.uuid4().hex[:8]
    message = {"id": op, "type": "subscribe", "payload": {"query": query, "variables": variables}}
    await ws.send(json.dumps(message))
    return op


async def receive(ws: ClientConnection, within: float = WAIT) -> dict[str, Any]:
    """The next message that is not a ping (answered), within ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            frame = await ws.recv()
            assert isinstance(frame, str), "graphql-transport-ws sends text frames only"
            message: dict[str, Any] = json.loads(frame)
            if message["type"] == "ping":
                await ws.send(json.dumps({"type": "pong"}))
                continue
            return message


async def next_data(ws: ClientConnection, op: str) -> dict[str, Any]:
    message = await receive(ws)
    assert message["type"] == "next" and message["id"] == op, message
    assert "errors" not in message["payload"], message
    data: dict[str, Any] = message["payload"]["data"]
    return data


def stock_body(
    org: str,
    sku: str,
    *,
    type: str = "STOCK_CHANGED",
    location: str = "default",
    on_hand: int = 10,
    reserved: int = 0,
    version: int = 1,
) -> dict[str, Any]:
    """A payload as ``services/outbox.py`` renders one."""
    return {
        "type": type,
        "timestamp": datetime.now(UTC).isoformat(),
        "data": {
            "org": org,
            "balance": {
                "id": ids.balance_global_id(location, sku),
                "sku": sku,
                "location": location,
                "onHand": on_hand,
                "reserved": reserved,
                "committed": 0,
                "available": on_hand - reserved,
                "incoming": 0,
                "version": version,
            },
            "ledgerEntryIds": ["1"],
        },
    }


# -------------------------------------------------------------------- connection_init


async def test_connection_init_authenticates_the_key(live: Live) -> None:
    good = await live.key(Scope.STOCK_READ)
    writer = await live.key(Scope.RESERVATIONS_WRITE)  # no STOCK_READ
    revoked = await live.key(Scope.STOCK_READ)
    revoked_key = await live.app.state.api_keys.authenticate(revoked)
    await live.app.state.api_keys.revoke(revoked_key.id)
    for payload, code in [
        (None, 4401),
        ({}, 4401),
        ({"authorization": "Bearer"}, 4401),
        ({"authorization": f"Basic {good}"}, 4401),
        ({"authorization": "Bearer sl_garbage"}, 4403),
        ({"authorization": f"Bearer {revoked}"}, 4403),
        ({"authorization": f"Bearer {writer}"}, 4403),
    ]:
        closed = await open_ws(live, payload)
        assert isinstance(closed, Closed) and closed.code == code, (payload, closed)
    # The key's name in any case, as graphql-ws clients send connectionParams.
    for name in ("authorization", "Authorization"):
        ws = await open_ws(live, {name: f"Bearer {good}"})
        assert isinstance(ws, ClientConnection)
        await ws.close()
    # Nothing runs before connection_init: a subscribe first closes with 4401.
    async with connect(live.ws_url, subprotocols=[PROTOCOL]) as ws:
        await subscribe(ws, STOCK_CHANGED, {"skus": ["A"]})
        with pytest.raises(ConnectionClosed) as raised:
            await receive(ws)
        assert raised.value.rcvd is not None and raised.value.rcvd.code == 4401


async def test_subscriptions_and_connections_are_bounded(live: Live) -> None:
    secret = await live.key(Scope.STOCK_READ)
    before = live.app.state.live.subscribers
    first = await authed(live, secret)
    await subscribe(first, STOCK_CHANGED, {"skus": ["A"]})
    await subscribe(first, LOW_STOCK_ALERTS)
    await live.wait_subscribers(before + 2)
    assert await _gauge(live) >= 2
    # A third on the same connection (max 2): an error for that subscribe only.
    third = await subscribe(first, STOCK_CHANGED, {"skus": ["B"]})
    refused = await receive(first)
    assert refused["type"] == "error" and refused["id"] == third, refused
    assert "limit" in refused["payload"][0]["message"]
    # Queries and mutations go over HTTP.
    query = await subscribe(first, '{ balance(sku: "A") { onHand } }')
    answer = await receive(first)
    assert answer["type"] == "error" and answer["id"] == query, answer
    assert answer["payload"][0]["extensions"]["code"] == "BAD_REQUEST"
    # Three connections per key (max 3): the fourth closes with 4429.
    others = [await authed(live, secret), await authed(live, secret)]
    closed = await open_ws(live, {"authorization": f"Bearer {secret}"})
    assert isinstance(closed, Closed) and closed.code == 4429, closed
    # Another key has its own budget.
    other = await authed(live, await live.key(Scope.STOCK_READ))
    # Closing one makes room again; the gauge falls with the subscriptions.
    await first.close()
    await live.wait_subscribers(before)
    again = await authed(live, secret)
    for ws in (*others, other, again):
        await ws.close()


async def _gauge(live: Live) -> float:
    async with live.client() as http:
        text = (await http.get("/metrics")).text
    [sample] = [ln for ln in text.splitlines() if ln.startswith("inventory_subscriptions_active ")]
    return float(sample.split()[1])


async def test_with_auth_off_no_key_is_needed(tmp_path: Path) -> None:
    settings = make_settings(data_dir=tmp_path / "data", auth="off", log_level="WARNING")
    async with serving(settings) as (app, url):
        live = Live(app, url, settings.org_id, admin="")
        ws = await open_ws(live, None)
        assert isinstance(ws, ClientConnection), ws
        op = await subscribe(ws, STOCK_CHANGED, {"skus": ["A"]})
        await live.wait_subscribers(1)
        await live.publish(settings.org_id, stock_body(settings.org_id, "A", version=4))
        assert (await next_data(ws, op))["stockChanged"]["version"] == 4
        await ws.close()


async def test_stockledger_serve_takes_subscriptions(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The real ``stockledger serve`` (uvloop, httptools, its websockets): connection_init
    auth; on Redis an event published to the org's channel reaches the subscriber; and a
    restock reaches it through serve's relay."""
    if backend == "mysql":
        redis_url = request.getfixturevalue("redis_url")
        env = base_env(
            tmp_path,
            database_url=request.getfixturevalue("own_mysql_url"),
            redis_url=redis_url,
            log_level="WARNING",
        )
    else:
        env = base_env(tmp_path, log_level="WARNING")
    with running(tmp_path, env) as server:
        server.wait_ready()
        live = Live(cast(Starlette, None), server.url, "default", server.secret)
        closed = await open_ws(live, None)
        assert isinstance(closed, Closed) and closed.code == 4401, closed
        closed = await open_ws(live, {"authorization": "Bearer sl_garbage"})
        assert isinstance(closed, Closed) and closed.code == 4403, closed
        ws = await authed(live, server.secret)
        op = await subscribe(ws, STOCK_CHANGED, {"skus": ["S"]})
        if backend == "mysql":
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(redis_url)
            try:
                # A subscribe has no reply: publish until the subscription takes one.
                body = json.dumps(stock_body("default", "S", version=5))
                async with asyncio.timeout(WAIT):
                    while True:
                        await client.publish(channel("default"), body)
                        with contextlib.suppress(TimeoutError):
                            message = await receive(ws, within=0.2)
                            break
                assert message["id"] == op and message["type"] == "next", message
                assert message["payload"]["data"]["stockChanged"]["version"] == 5
            finally:
                await client.aclose()
        if RELAY_BUILT:  # end to end: a write, its outbox event, serve's relay, the socket
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
                await GraphQLClient(http, cast(Starlette, None)).restock(
                    uuid.uuid4().hex, line("S", 3)
                )
            message = await receive(ws, within=5.0)
            assert message["id"] == op and message["type"] == "next", message
            balance = message["payload"]["data"]["stockChanged"]
            assert balance["sku"] == "S" and balance["onHand"] == 3
        await ws.close()


# -------------------------------------------------------------------- the listener


async def test_published_events_reach_the_matching_subscriptions_of_their_org_only(
    live: Live,
) -> None:
    ws = await authed(live, await live.key(Scope.STOCK_READ))
    before = live.app.state.live.subscribers
    changed = await subscribe(ws, STOCK_CHANGED, {"skus": ["A", "B"], "location": "default"})
    alerts = await subscribe(ws, LOW_STOCK_ALERTS)
    await live.wait_subscribers(before + 2)
    org = live.org
    not_for_us = [
        stock_body(f"{org}-other", "A", version=99),  # another org, same SKU
        stock_body(f"{org}-other", "A", type="STOCK_OUT", version=99),
        stock_body(org, "C", version=98),  # a SKU not watched
        stock_body(org, "A", location="elsewhere", version=97),  # another location
        {"type": "RESERVATION_EXPIRED", "timestamp": "x", "data": {"org": org}},
    ]
    for body in not_for_us:
        await live.publish(body["data"]["org"], body)
    await live.app.state.runtime.redis.publish(channel(org), b"not json")
    await live.publish(org, stock_body(org, "A", on_hand=5, reserved=2, version=7))
    await live.publish(org, stock_body(org, "B", type="STOCK_OUT", on_hand=0, version=3))
    # Pub/sub keeps the order: had any earlier event passed a filter, it would come first.
    first = await next_data(ws, changed)
    assert first["stockChanged"] == {
        "id": ids.balance_global_id("default", "A"),
        "sku": "A",
        "location": "default",
        "onHand": 5,
        "reserved": 2,
        "available": 3,
        "version": 7,
        "updatedAt": first["stockChanged"]["updatedAt"],
        "committed": 0,
        "incoming": 0,
    }
    alert = (await next_data(ws, alerts))["lowStockAlerts"]
    assert alert["eventType"] == "STOCK_OUT" and alert["balance"]["sku"] == "B"
    assert alert["balance"]["version"] == 3 and alert["occurredAt"]
    with pytest.raises(TimeoutError):
        await receive(ws, within=0.3)
    # A subscription the client completes is gone from the listener.
    await ws.send(json.dumps({"id": changed, "type": "complete"}))
    await live.wait_subscribers(before + 1)
    await ws.close()
    await live.wait_subscribers(before)


async def test_bad_arguments_are_an_error_of_that_subscription(live: Live) -> None:
    ws = await authed(live, await live.key(Scope.STOCK_READ))
    for variables in ({"skus": []}, {"skus": ["A", " "]}, {"skus": ["A"], "location": ""}):
        op = await subscribe(ws, STOCK_CHANGED, variables)
        message = await receive(ws)
        assert message["id"] == op and message["type"] in ("error", "next"), message
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == "BAD_USER_INPUT", message
        if message["type"] == "next":  # an execution error: the operation then completes
            assert await receive(ws) == {"id": op, "type": "complete"}
    await ws.close()


async def test_a_slow_subscriber_loses_its_oldest_events_and_blocks_no_one() -> None:
    redis = FakeAsyncRedis()
    live = LiveEvents(redis, queue_size=4)
    try:
        async with (
            live.subscribe("o", lambda e: True) as slow,
            live.subscribe("o", lambda e: True) as fast,
        ):
            got: list[int] = []

            async def read_fast() -> None:
                async for event in fast.events():
                    assert event.balance is not None
                    got.append(event.balance["version"])
                    if len(got) == 10:
                        return

            reader = asyncio.create_task(read_fast())
            for version in range(1, 11):
                await redis.publish(channel("o"), json.dumps(stock_body("o", "A", version=version)))
            await asyncio.wait_for(reader, WAIT)
            assert got == list(range(1, 11))
            # The slow one never read: it keeps the newest 4, and counts the 6 dropped.
            kept: list[LiveEvent] = [slow.queue.get_nowait() for _ in range(4)]  # type: ignore[misc]
            assert [e.balance["version"] for e in kept if e and e.balance] == [7, 8, 9, 10]
            assert slow.dropped == 6
    finally:
        await live.aclose()
        await redis.aclose()


# -------------------------------------------------------------------- end to end (the relay)


@contextlib.asynccontextmanager
async def relaying(live: Live, *orgs: str) -> AsyncIterator[None]:
    """The relay carrying ``orgs``' outbox events to Redis: ``serve``'s own when it runs one
    (``app.state.relay`` or ``runtime.relay``), else one started here on the server's
    database and Redis client."""
    state: Any = live.app.state
    if getattr(state, "relay", None) is not None or getattr(state.runtime, "relay", None):
        yield
        return
    from stockledger.services.relay import Relay

    runtime = state.runtime
    relay = Relay(runtime.db, runtime.redis, state.settings, orgs=orgs)
    task = asyncio.create_task(relay.run_forever())
    try:
        yield
    finally:
        relay.stop()
        await asyncio.wait_for(task, 30)


@needs_relay
@pytest.mark.slow
async def test_concurrent_reserves_deliver_increasing_versions_ending_at_the_committed_balance(
    live: Live,
) -> None:
    sku, other_org = "HOT", f"{live.org}-b"
    other_admin = await live.key(Scope.ADMIN, org=other_org)
    async with (
        relaying(live, live.org, other_org),
        live.client() as http,
        live.client(other_admin) as other_http,
    ):
        gql, other = GraphQLClient(http, live.app), GraphQLClient(other_http, live.app)
        await gql.restock(uuid.uuid4().hex, line(sku, 1000))
        ws = await authed(live, await live.key(Scope.STOCK_READ))
        # Another org's writes on the same SKU, and its subscriber, must not cross.
        other_ws = await authed(live, other_admin)
        before = live.app.state.live.subscribers
        op = await subscribe(ws, STOCK_CHANGED, {"skus": [sku]})
        other_op = await subscribe(other_ws, STOCK_CHANGED, {"skus": [sku]})
        await live.wait_subscribers(before + 2)
        await other.restock(uuid.uuid4().hex, line(sku, 7))
        results = await asyncio.gather(
            *(gql.reserve(uuid.uuid4().hex, line(sku, 1)) for _ in range(100))
        )
        assert len(results) == 100
        committed = await gql.balance(sku)
        assert committed is not None and committed["reserved"] == 100
        top = committed["version"]
        versions: list[int] = []
        last: dict[str, Any] = {}
        async with asyncio.timeout(30):
            while not versions or versions[-1] < top:
                last = (await next_data(ws, op))["stockChanged"]
                assert last["sku"] == sku and last["location"] == "default"
                versions.append(last["version"])
        assert versions == sorted(set(versions)), f"versions must strictly increase: {versions}"
        # One STOCK_CHANGED per reserve, none lost (the restock's may come first, or may have
        # been published before the subscription).
        assert set(range(top - 99, top + 1)) <= set(versions) <= set(range(top - 100, top + 1))
        assert {k: last[k] for k in ("onHand", "reserved", "available", "version")} == {
            k: committed[k] for k in ("onHand", "reserved", "available", "version")
        }
        # The other org's subscriber saw its own restock only.
        mine = (await next_data(other_ws, other_op))["stockChanged"]
        assert mine["onHand"] == 7 and mine["reserved"] == 0
        with pytest.raises(TimeoutError):
            await receive(other_ws, within=0.5)
        with pytest.raises(TimeoutError):
            await receive(ws, within=0.5)
        await ws.close()
        await other_ws.close()


@needs_relay
async def test_reserving_the_last_unit_raises_stock_out(live: Live) -> None:
    async with relaying(live, live.org), live.client() as http:
        gql = GraphQLClient(http, live.app)
        ws = await authed(live, await live.key(Scope.STOCK_READ))
        before = live.app.state.live.subscribers
        op = await subscribe(ws, LOW_STOCK_ALERTS, {"location": "shop"})
        await live.wait_subscribers(before + 1)
        await gql.restock(uuid.uuid4().hex, line("LAST", 2, "shop"))
        await gql.restock(uuid.uuid4().hex, line("LAST", 2, "elsewhere"))
        await gql.reserve(uuid.uuid4().hex, line("LAST", 2, "elsewhere"))  # not at "shop"
        await gql.reserve(uuid.uuid4().hex, line("LAST", 1, "shop"))
        await gql.reserve(uuid.uuid4().hex, line("LAST", 1, "shop"))  # the last unit
        alert = (await next_data(ws, op))["lowStockAlerts"]
        assert alert["eventType"] == "STOCK_OUT"
        assert alert["balance"]["sku"] == "LAST" and alert["balance"]["location"] == "shop"
        assert alert["balance"]["available"] == 0 and alert["balance"]["reserved"] == 2
        with pytest.raises(TimeoutError):
            await receive(ws, within=0.5)
        await ws.close()


# -------------------------------------------------------------------- the graphql-ws npm client

NODE_CLIENT = r"""
const { createClient } = require("graphql-ws");
const WebSocket = require("ws");
const [url, secret, query] = process.argv.slice(2);
const client = createClient({
  url, webSocketImpl: WebSocket, retryAttempts: 0, lazy: false,
  connectionParams: { authorization: `Bearer ${secret}` },
  on: { connected: () => console.log(JSON.stringify({ connected: true })) },
});
let seen = 0;
client.subscribe({ query, variables: { skus: ["NODE"] } }, {
  next: (value) => {
    console.log(JSON.stringify(value));
    if (++seen === 2) client.dispose().then(() => process.exit(0));
  },
  error: (err) => { console.error(JSON.stringify(err)); process.exit(2); },
  complete: () => {},
});
setTimeout(() => { console.error("timed out"); process.exit(3); }, 20000);
"""


def _graphql_ws_package(cache: Path) -> Path:
    """A folder with graphql-ws and ws installed (npm, into the pytest cache), or a skip."""
    folder = cache / "graphql-ws-client"
    if (folder / "node_modules" / "graphql-ws").is_dir():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_text('{"private": true}')
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the graphql-ws client cannot be installed")
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "graphql-ws@6", "graphql@16", "ws@8"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if done.returncode != 0:
        pytest.skip(f"npm could not install graphql-ws: {done.stderr[-500:]}")
    return folder


@pytest.mark.skipif(shutil.which("node") is None, reason="Node is not installed")
async def test_the_graphql_ws_npm_client_subscribes(
    live: Live, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # pytest's cache keeps the npm packages between runs; without it (-p no:cacheprovider)
    # this session's temporary directory does.
    config_cache = getattr(request.config, "cache", None)
    if config_cache is not None:
        cache = Path(str(config_cache.mkdir("stockledger-node")))
    else:
        cache = tmp_path_factory.mktemp("stockledger-node")
    folder = _graphql_ws_package(cache)
    script = folder / "subscribe.js"
    script.write_text(NODE_CLIENT)
    secret = await live.key(Scope.STOCK_READ)
    before = live.app.state.live.subscribers
    proc = await asyncio.create_subprocess_exec(
        str(shutil.which("node")),
        str(script),
        live.ws_url,
        secret,
        STOCK_CHANGED,
        cwd=folder,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(folder / "node_modules")},
    )
    try:
        try:
            await live.wait_subscribers(before + 1)
        except TimeoutError:
            if proc.returncode is None:
                proc.kill()
            out, err = await proc.communicate()
            pytest.fail(f"the node client did not subscribe:\n{out.decode()}\n{err.decode()}")
        for version in (1, 2):
            await live.publish(live.org, stock_body(live.org, "NODE", version=version))
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    lines = [orjson.loads(x) for x in out.decode().splitlines() if x.strip()]
    assert lines[0] == {"connected": True}
    assert [x["data"]["stockChanged"]["version"] for x in lines[1:]] == [1, 2]
    # And a bad key, as graphql-ws reports the close.
    bad = await asyncio.create_subprocess_exec(
        str(shutil.which("node")),
        str(script),
        live.ws_url,
        "sl_garbage",
        STOCK_CHANGED,
        cwd=folder,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(bad.communicate(), 30)
    assert bad.returncode == 2 and "4403" in err.decode(), err.decode()
