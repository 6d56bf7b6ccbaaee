"""The scale-out proof (issue 13, part 6) at a small scale: the Superstore replay against four
``stockledger serve`` processes on one MariaDB and one Redis, each call sent to an instance
picked at random, and the same with one instance SIGKILLed mid-run and started again on its
port. The replay's checks must all pass, exactly once included: every call that was sent
again, and a sample of the others, answers ``replayed`` when sent once more with its keys, and
the ledger holds each effect the client was told of once, nothing lost, nothing doubled.

Also, without servers: what the replay's client sends again (transport errors, ``UNAVAILABLE``,
``LOCK_TIMEOUT``; bounded; on another instance) and what it never does (any other error), and
that the exactly-once check sees a doubled or a lost effect.

The database is a scratch one of this module's, named after the configured test database
(``<configured>_scaleout_<random>``), migrated once and dropped at the end; each test works in
an org of its own on the configured Redis, whose keys it deletes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import MYSQL_URL, _mysql_admin, require_server
from server_process import CLI, EXIT_TIMEOUT, Server, base_env
from sqlalchemy.engine import make_url

from stockledger.db.migrate import upgrade
from stockledger.replay import (
    RESERVE,
    RESERVE_MANY,
    Interruption,
    Order,
    Replay,
    interrupt,
    load_orders,
)

pytestmark = pytest.mark.slow
ORDERS = 300
INSTANCES = 4


class Instance(Server):
    """A :class:`Server` that can be SIGKILLed and started again on its port, same env."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path, self.env = tmp_path, env
        super().__init__(tmp_path, env)

    def sigkill(self) -> None:
        """SIGKILL the instance (its session) and reap it."""
        self.kill()
        self.proc.wait(EXIT_TIMEOUT)

    def restart(self) -> None:
        """Start it again on the same port with the same environment; return once ready."""
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--port", str(self.port)],
                env=self.env,
                cwd=self.tmp_path,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.wait_ready()


@pytest.fixture(scope="module")
def scaleout_url() -> Iterator[str]:
    """A scratch database named after the configured one, migrated once, dropped at the end."""
    require_server("MariaDB/MySQL", MYSQL_URL, 3306)
    url = make_url(MYSQL_URL)
    name = f"{url.database}_scaleout_{uuid.uuid4().hex[:8]}"
    _mysql_admin([f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"])
    try:
        scratch = url.set(database=name).render_as_string(hide_password=False)
        upgrade(scratch)
        yield scratch
    finally:
        _mysql_admin([f"DROP DATABASE IF EXISTS `{name}`"])


@pytest.fixture
async def instances(
    scaleout_url: str, redis_url: str, org_id: str, tmp_path: Path
) -> AsyncIterator[list[Instance]]:
    """Four ready instances on the scratch database, this test's org and the test Redis
    (the org's keys deleted afterwards)."""
    env = base_env(
        tmp_path,
        database_url=scaleout_url,
        redis_url=redis_url,
        org_id=org_id,
        log_level="WARNING",
    )
    started: list[Instance] = []
    try:
        for _ in range(INSTANCES):
            started.append(Instance(tmp_path, env))
        for instance in started:
            await asyncio.to_thread(instance.wait_ready)
        yield started
    finally:
        for instance in started:
            instance.stop()
            instance.kill()
        client = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=f"stockledger:{{{org_id}}}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def _assert_counts(replay: Replay) -> None:
    c = replay.out.counts
    assert c["reserved"] + c["failed_insufficient_stock"] == ORDERS
    assert c["failed_insufficient_stock"] > 0, "opening stock below demand must fail some carts"
    assert c["abandoned"] > 0 and c["expired"] == c["abandoned"]
    assert c["deducted"] == c["reserved"] - c["abandoned"]


async def test_the_replay_on_four_instances_passes_every_check(
    instances: list[Instance],
) -> None:
    urls = [f"{i.url}/graphql" for i in instances]
    replay = Replay(
        urls, load_orders(limit=ORDERS), clients=8, abandon_ttl=1, api_key=instances[0].secret
    )
    elapsed = await replay.run()
    problems = await replay.check(expire_wait=15)
    print("\n" + replay.report(elapsed))
    assert problems == []
    _assert_counts(replay)
    assert set(replay.out.sent) == set(urls), "every instance must have served calls"
    assert min(replay.out.sent.values()) > 0.1 * sum(replay.out.sent.values())
    assert replay.out.retries == Counter(), "nothing was down: nothing to send again"
    assert replay.out.counts["probed"] > 0


async def test_a_sigkilled_instance_loses_and_doubles_nothing(instances: list[Instance]) -> None:
    """SIGKILL one instance while a request is in flight on it, start it again on its port:
    the in-flight calls are sent again, same keys, on another instance; every check passes,
    the calls sent again replay when sent once more, and each effect is in the ledger once."""
    urls = [f"{i.url}/graphql" for i in instances]
    victim = instances[-1]
    replay = Replay(
        urls, load_orders(limit=ORDERS), clients=8, abandon_ttl=1, api_key=instances[0].secret
    )
    sent_at_restart: list[int] = []

    def restart() -> None:
        victim.restart()
        sent_at_restart.append(replay.out.sent[urls[-1]])

    killer = asyncio.create_task(interrupt(replay, urls[-1], victim.sigkill, restart, at=0.3))
    elapsed = await replay.run()
    done: Interruption = await asyncio.wait_for(killer, 60)
    problems = await replay.check(expire_wait=15)
    print(f"\n{done}\n{replay.report(elapsed)}")
    assert problems == []
    _assert_counts(replay)
    assert done.in_flight > 0, "the kill must hit a request in flight"
    transport = {k: v for k, v in replay.out.retries.items() if k != "LOCK_TIMEOUT"}
    assert sum(transport.values()) >= done.in_flight, replay.out.retries
    # Every call sent again that succeeded was sent once more by the idempotency check.
    succeeded = {f"{replay.run_id}:reserve:{o}" for o in replay.out.reserved}
    succeeded |= {f"{replay.run_id}:deduct:{o}" for o in replay.out.deducted}
    succeeded |= set(replay.out.restocks)
    assert replay.out.retried_keys
    assert replay.out.counts["probed_retried"] == len(replay.out.retried_keys & succeeded)
    # The restarted instance served the rest of the run, and serves still.
    assert sent_at_restart and replay.out.sent[urls[-1]] > sent_at_restart[0]
    assert victim.proc.poll() is None
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(
            urls[-1], json={"query": "{ __typename }"}, headers=victim.headers
        )
    assert answer.status_code == 200, answer.text


# ------------------------------------------------------------------ the client, without servers


def _replay(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> Replay:
    replay = Replay(["http://a/graphql", "http://b/graphql", "http://c/graphql"], [], **options)
    replay._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return replay


def _body(request: httpx.Request) -> Any:
    return json.loads(request.content)


RESERVE_INPUT = {"idempotencyKey": "k1", "lines": [], "reference": {"type": "ORDER", "id": "r"}}
SUCCESS = {"data": {"reserve": {"__typename": "ReserveSuccess", "replayed": False}}}


async def test_a_reset_connection_is_sent_again_with_the_same_body_on_another_instance() -> None:
    seen: list[tuple[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, _body(request)))
        if len(seen) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        if len(seen) == 2:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return httpx.Response(200, json=SUCCESS)

    replay = _replay(handler)
    result = await replay.mutate("reserve", RESERVE, "reserve", RESERVE_INPUT)
    assert result["__typename"] == "ReserveSuccess"
    assert len(seen) == 3
    assert seen[0][0] != seen[1][0] != seen[2][0], "each resend goes to another instance"
    assert all(body == seen[0][1] for _, body in seen), "same body, same idempotency key"
    assert replay.out.retries == Counter({"RemoteProtocolError": 1, "ConnectError": 1})
    assert replay.out.retried_keys == {"k1"}
    assert len(replay.out.latencies["reserve"]) == 1, "one call, one latency"


async def test_unavailable_and_lock_timeout_are_sent_again_other_errors_never() -> None:
    answers = [
        httpx.Response(
            503,
            json={
                "data": None,
                "errors": [
                    {"message": "x", "extensions": {"code": "UNAVAILABLE", "retryAfterMs": 1}}
                ],
            },
        ),
        httpx.Response(
            200,
            json={
                "data": {
                    "reserve": {
                        "__typename": "LockTimeoutError",
                        "code": "LOCK_TIMEOUT",
                        "retryAfterMs": 1,
                    }
                }
            },
        ),
        httpx.Response(
            200,
            json={
                "data": {
                    "reserve": {
                        "__typename": "ValidationError",
                        "code": "VALIDATION",
                        "message": "no",
                    }
                }
            },
        ),
    ]
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return answers.pop(0)

    replay = _replay(handler)
    result = await replay.mutate("reserve", RESERVE, "reserve", RESERVE_INPUT)
    assert result["__typename"] == "ValidationError", "a typed error is the answer, not resent"
    assert calls == 3
    assert replay.out.retries == Counter({"UNAVAILABLE": 1, "LOCK_TIMEOUT": 1})

    def other_error(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(
            200, json={"data": None, "errors": [{"message": "Unexpected error."}]}
        )

    calls = 0
    with pytest.raises(RuntimeError, match="Unexpected error"):
        await _replay(other_error).call("reserve", RESERVE, {"input": RESERVE_INPUT})
    assert calls == 1, "a top-level error other than UNAVAILABLE is never sent again"


async def test_resends_are_bounded() -> None:
    calls = 0

    def down(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("[Errno 111] Connection refused")

    replay = _replay(down, retries=3)
    with pytest.raises(httpx.ConnectError):
        await replay.call("reserve", RESERVE, {"input": RESERVE_INPUT})
    assert calls == 3


async def test_a_batch_sends_again_only_its_lock_timed_out_items() -> None:
    sent: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys = [c["idempotencyKey"] for c in _body(request)["variables"]["input"]["carts"]]
        sent.append(keys)
        results = [
            {"__typename": "LockTimeoutError", "code": "LOCK_TIMEOUT", "retryAfterMs": 1}
            if k == "b" and len(sent) == 1
            else {"__typename": "ReserveSuccess", "replayed": False, "key": k}
            for k in keys
        ]
        return httpx.Response(200, json={"data": {"reserveMany": {"results": results}}})

    replay = _replay(handler)
    items = [{"idempotencyKey": k} for k in "abc"]
    results = await replay.mutate_many("reserveMany", RESERVE_MANY, "reserveMany", "carts", items)
    assert sent == [["a", "b", "c"], ["b"]]
    assert [r["key"] for r in results] == ["a", "b", "c"]


# ------------------------------------------------------------------ the exactly-once check


def _done_replay() -> tuple[Replay, list[dict[str, Any]], list[dict[str, Any]]]:
    """A replay of two carts as if run (one deducted, one refused), its ledger and
    reservations as the server would hold them."""
    from datetime import date

    day = date(2020, 1, 1)
    orders = [
        Order("A", day, day, {("East", "S1"): 2}),
        Order("B", day, day, {("East", "S1"): 5}),
    ]
    replay = Replay("http://a/graphql", orders, abandon_share=0.0, run_id="run")
    replay.out.restocks["run:opening-0"] = [{"location": "East", "sku": "S1", "quantity": 3}]
    replay.out.reserved["A"] = "7"
    replay.out.deducted.add("A")

    def entry(kind: str, key: str, on_hand: int, reserved: int) -> dict[str, Any]:
        return {
            "eventType": kind,
            "idempotencyKey": key,
            "reservationId": None if kind == "RESTOCK" else "7",
            "location": "East",
            "sku": "S1",
            "onHandDelta": on_hand,
            "reservedDelta": reserved,
        }

    ledger = [
        entry("RESTOCK", "run:opening-0", 3, 0),
        entry("RESERVE", "run:reserve:A", 0, 2),
        entry("DEDUCT", "run:deduct:A", -2, -2),
    ]
    reservations = [{"id": "7", "status": "COMMITTED", "reference": {"id": "run:A"}}]
    return replay, ledger, reservations


def test_the_exactly_once_check_passes_a_ledger_of_each_effect_once() -> None:
    replay, ledger, reservations = _done_replay()
    assert replay._exactly_once(ledger, reservations) == []


def test_the_exactly_once_check_sees_a_doubled_or_lost_effect() -> None:
    replay, ledger, reservations = _done_replay()
    doubled = replay._exactly_once([*ledger, ledger[0]], reservations)
    assert len(doubled) == 1 and "doubled" in doubled[0], doubled
    lost = replay._exactly_once(ledger[:2], reservations)
    assert len(lost) == 1 and "lost" in lost[0], lost
    second = {"id": "8", "status": "ACTIVE", "reference": {"id": "run:A"}}
    twice = replay._exactly_once(ledger, [*reservations, second])
    assert twice == ["order A: reserved as 7, its reservations ['7', '8']"]
    refused = {"id": "9", "status": "ACTIVE", "reference": {"id": "run:B"}}
    ghost = replay._exactly_once(ledger, [*reservations, refused])
    assert ghost == ["order B was not reserved, yet has reservations ['9']"]
