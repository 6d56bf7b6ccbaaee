"""Metrics and write logs of the served app (``create_served_app``, in process, real Redis):
exact counter deltas on ``/metrics``, HELP text, no SKU/location/reference/key in any label,
and one JSON log line per write carrying the client's ``X-Request-ID``."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from graphql_helpers import GraphQLClient, app_settings, client_for, line, mutation_document
from log_helpers import json_logging, write_lines
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from stockledger.app.serving import create_served_app
from stockledger.config import Settings
from stockledger.locks.redis_locks import lock_key

pytestmark = pytest.mark.redis

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[GraphQLClient]:
    """``create_served_app(settings)`` with its lifespan (runtime, sweeper) and a client."""
    async with client_for(create_served_app(settings)) as gql:
        yield gql


@pytest.fixture
async def served_settings(
    backend: str,
    database_url: str,
    org_id: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Settings]:
    """The test's backend and tenant (on MySQL a database of its own: the served sweeper
    sweeps every org, and other tests' due carts would move the counts), real Redis, short
    lock waits, a fast sweeper; the tenant's Redis keys (locks, expiry index) are deleted
    afterwards."""
    # /metrics must read this process's registry, not some multiprocess directory.
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    url = request.getfixturevalue("own_mysql_url") if backend == "mysql" else database_url
    yield app_settings(
        url,
        org_id,
        redis_url=redis_url,
        lock_wait_seconds=0.2,
        sweep_interval_seconds=0.1,
    )
    redis = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=f"stockledger:{{{org_id}}}:*")]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


def _key(name: str, labels: dict[str, str]) -> SampleKey:
    return name, tuple(sorted(labels.items()))


async def scrape(gql: GraphQLClient) -> tuple[str, dict[SampleKey, float]]:
    """``GET /metrics``: the exposition text and every sample by (name, labels)."""
    response = await gql.http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    values = {
        _key(s.name, s.labels): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, values


# (sample name, labels) -> the exact amount the scripted sequence moves it by.
EXPECTED: dict[SampleKey, float] = {
    _key("inventory_reserve_total", {"status": "success"}): 2,
    _key("inventory_reserve_total", {"status": "insufficient_stock"}): 1,
    _key("inventory_reserve_total", {"status": "replayed"}): 1,
    _key("inventory_reserve_total", {"status": "lock_timeout"}): 1,
    _key("inventory_idempotent_hit_total", {}): 1,
    _key("inventory_lock_timeouts_total", {}): 1,
    _key("inventory_reservations_expired_total", {}): 1,
    _key("inventory_redis_degraded_total", {}): 0,
    _key("stock_movements_total", {"type": "restock", "result": "success", "reason": "none"}): 1,
    _key("stock_movements_total", {"type": "reserve", "result": "success", "reason": "none"}): 2,
    _key(
        "stock_movements_total",
        {"type": "reserve", "result": "insufficient_stock", "reason": "none"},
    ): 1,
    _key("stock_movements_total", {"type": "reserve", "result": "replayed", "reason": "none"}): 1,
    _key(
        "stock_movements_total", {"type": "reserve", "result": "lock_timeout", "reason": "none"}
    ): 1,
    _key("stock_movements_total", {"type": "expire", "result": "success", "reason": "none"}): 1,
    # restock; reserve, its replay, the ttl reserve / insufficient stock, lock timeout
    _key(
        "inventory_graphql_request_seconds_count",
        {"operation_type": "mutation", "field": "restock", "outcome": "ok"},
    ): 1,
    _key(
        "inventory_graphql_request_seconds_count",
        {"operation_type": "mutation", "field": "reserve", "outcome": "ok"},
    ): 3,
    _key(
        "inventory_graphql_request_seconds_count",
        {"operation_type": "mutation", "field": "reserve", "outcome": "domain_error"},
    ): 2,
    _key(
        "inventory_graphql_request_seconds_count",
        {"operation_type": "mutation", "field": "reserve", "outcome": "error"},
    ): 0,
}
# Families whose every moved series must be listed above (nothing else may move).
EXHAUSTIVE = ("inventory_reserve_total", "stock_movements_total")


def _registry_values() -> dict[SampleKey, float]:
    return {k: REGISTRY.get_sample_value(k[0], dict(k[1])) or 0.0 for k in EXPECTED}


async def _wait_for(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        await asyncio.sleep(0.05)


async def test_metrics_move_by_exact_amounts(
    served_settings: Settings, redis_url: str, org_id: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    sku, held_sku = f"SKU-zq7obs-{tag}", f"SKU-hq4held-{tag}"
    location = f"LOC-xv9wh-{tag}"
    ref = {"type": "CHECKOUT", "id": f"REF-kw3chk-{tag}"}
    keys = [f"KEY-jm5idem-{tag}-{i}" for i in range(6)]
    secrets = [sku, held_sku, location, ref["id"], *keys]

    async with served(served_settings) as gql:
        text_before, before = await scrape(gql)
        registry_before = _registry_values()

        await gql.restock(keys[0], line(sku, 5, location), line(held_sku, 5, location))
        ok = await gql.reserve(keys[1], line(sku, 2, location), reference=ref)
        assert ok["replayed"] is False
        short = await gql.mutate(
            "reserve", idempotencyKey=keys[2], lines=[line(sku, 10, location)], reference=ref
        )
        assert short["__typename"] == "InsufficientStockError"
        assert short["shortages"] == [
            {"sku": sku, "location": location, "requested": 10, "available": 3}
        ]
        replay = await gql.reserve(keys[1], line(sku, 2, location), reference=ref)
        assert replay["replayed"] is True
        assert replay["reservation"]["id"] == ok["reservation"]["id"]

        # Another owner holds the held SKU's balance lock: the reserve waits 0.2 s, then fails.
        redis = aioredis.Redis.from_url(redis_url)
        held_lock = lock_key(org_id, location, held_sku)
        try:
            assert await redis.set(held_lock, "another-owner", px=30_000, nx=True)
            busy = await gql.mutate(
                "reserve", idempotencyKey=keys[3], lines=[line(held_sku, 1, location)]
            )
            assert await redis.get(held_lock) == b"another-owner"  # not taken over
        finally:
            await redis.delete(held_lock)
            await redis.aclose()
        assert busy["__typename"] == "LockTimeoutError", busy
        assert busy["retryAfterMs"] > 0
        assert (await gql.balance(held_sku, location))["reserved"] == 0

        # ttlSeconds=1: the in-process sweeper (every 0.1 s) expires it.
        short_lived = await gql.reserve(keys[4], line(sku, 1, location), ttlSeconds=1)
        rid = short_lived["reservation"]["id"]
        # From the reserve's own transaction: a later read may already see it expired.
        assert [b["reserved"] for b in short_lived["balances"]] == [3]
        expired_key = _key("inventory_reservations_expired_total", {})

        async def swept() -> bool:
            moved = (REGISTRY.get_sample_value(expired_key[0]) or 0) - registry_before[expired_key]
            return moved >= 1

        await _wait_for(swept, 10, "the sweeper to expire the 1 s reservation")
        status = await gql.data(
            "query($id: ID!) { reservation(id: $id) { status lines { released remaining } } }",
            {"id": rid},
        )
        assert status["reservation"] == {
            "status": "EXPIRED",
            "lines": [{"released": 1, "remaining": 0}],
        }
        assert (await gql.balance(sku, location))["reserved"] == 2

        text_after, after = await scrape(gql)
        registry_after = _registry_values()

    moved = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in EXPECTED}
    assert moved == EXPECTED
    assert {k: registry_after[k] - registry_before[k] for k in EXPECTED} == EXPECTED
    for family in EXHAUSTIVE:
        unexpected = {
            k: after[k] - before.get(k, 0.0)
            for k in after
            if k[0] == family and after[k] != before.get(k, 0.0) and k not in EXPECTED
        }
        assert unexpected == {}, f"{family} moved in series the sequence does not explain"

    # Every family has HELP text, and no label value (nor anything else) names our strings.
    for text in (text_before, text_after):
        families = list(text_string_to_metric_families(text))
        assert families
        for family in families:
            assert family.documentation.strip(), f"{family.name} has no HELP text"
        typed = {ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")}
        helped = {
            ln.split()[2]
            for ln in text.splitlines()
            if ln.startswith("# HELP ") and len(ln.split(None, 3)) == 4
        }
        assert typed <= helped, f"no HELP for {sorted(typed - helped)}"
    label_values = [
        v
        for family in text_string_to_metric_families(text_after)
        for s in family.samples
        for v in s.labels.values()
    ]
    for secret in secrets:
        assert not [v for v in label_values if secret in v], secret
        assert secret not in text_after, f"{secret!r} appears in /metrics"
    assert tag not in text_after


async def post(
    gql: GraphQLClient, name: str, request_id: str | None, **input: Any
) -> tuple[dict[str, Any], str]:
    """Mutation ``name`` with an optional ``X-Request-ID``: its result and the echoed id."""
    headers = {"X-Request-ID": request_id} if request_id else {}
    response = await gql.http.post(
        "/graphql",
        json={"query": mutation_document(name), "variables": {"input": input}},
        headers=headers,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    return body["data"][name], response.headers["x-request-id"]


async def test_write_log_lines(
    served_settings: Settings, org_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = uuid.uuid4().hex[:8]
    sku, location = f"SKU-log-{tag}", f"LOC-log-{tag}"
    ref = {"type": "ORDER", "id": f"A-{tag}"}
    restock_key, reserve_key, short_key, deduct_key = (f"k-{tag}-{i}" for i in range(4))
    rids = [f"req-{uuid.uuid4().hex}" for _ in range(4)]

    with json_logging():
        async with served(served_settings) as gql:
            capsys.readouterr()  # startup lines are not ours
            _, echoed = await post(
                gql, "restock", rids[0], idempotencyKey=restock_key, lines=[line(sku, 10, location)]
            )
            assert echoed == rids[0]
            res, echoed = await post(
                gql,
                "reserve",
                rids[1],
                idempotencyKey=reserve_key,
                lines=[line(sku, 3, location)],
                reference=ref,
            )
            assert res["__typename"] == "ReserveSuccess" and echoed == rids[1]
            rid = res["reservation"]["id"]
            short, echoed = await post(
                gql, "reserve", rids[2], idempotencyKey=short_key, lines=[line(sku, 8, location)]
            )
            assert short["__typename"] == "InsufficientStockError" and echoed == rids[2]
            ded, generated = await post(
                gql, "deduct", None, idempotencyKey=deduct_key, reservationId=rid
            )
            assert ded["__typename"] == "DeductSuccess"
            assert generated and generated not in rids  # a fresh id when the client sends none
            err = capsys.readouterr().err

    lines = {entry["idempotency_key"]: entry for entry in write_lines(err)}
    assert set(lines) == {restock_key, reserve_key, short_key, deduct_key}, err
    for entry in lines.values():
        assert entry["level"] == "info"
        assert entry["org"] == org_id
        assert isinstance(entry["duration_s"], float) and 0 < entry["duration_s"] < 30

    def balance(qty: int, oh: tuple[int, int], rs: tuple[int, int], event: str) -> dict[str, Any]:
        return {
            "event_type": event,
            "sku": sku,
            "location": location,
            "quantity": qty,
            "on_hand_before": oh[0],
            "on_hand_after": oh[1],
            "reserved_before": rs[0],
            "reserved_after": rs[1],
        }

    def strip(entry: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in b.items() if k != "reservation_id"} for b in entry["balances"]]

    restock = lines[restock_key]
    assert (restock["operation"], restock["outcome"], restock["reference"]) == (
        "restock",
        "success",
        None,
    )
    assert restock["request_id"] == rids[0]
    assert strip(restock) == [balance(10, (0, 10), (0, 0), "RESTOCK")]

    reserve = lines[reserve_key]
    assert (reserve["operation"], reserve["outcome"]) == ("reserve", "success")
    assert reserve["reference"] == f"ORDER:A-{tag}"
    assert reserve["request_id"] == rids[1]
    assert strip(reserve) == [balance(3, (10, 10), (0, 3), "RESERVE")]
    assert str(reserve["balances"][0]["reservation_id"]) == rid

    failed = lines[short_key]
    assert (failed["operation"], failed["outcome"]) == ("reserve", "insufficient_stock")
    assert failed["request_id"] == rids[2]
    assert failed.get("balances") in (None, []), "a refused write changed no balance"

    deduct = lines[deduct_key]
    assert (deduct["operation"], deduct["outcome"]) == ("deduct", "success")
    assert deduct["request_id"] == generated
    assert strip(deduct) == [balance(3, (10, 7), (3, 0), "DEDUCT")]
