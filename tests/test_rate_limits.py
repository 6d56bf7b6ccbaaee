"""Rate limits per API key (ARCHITECTURE section 13; issue 10, item 5), in process with
``STOCKLEDGER_AUTH=required``: a burst past the limit answers 429 with ``Retry-After`` and
changes nothing, and the next window passes; two keys have budgets of their own; the budgets
live in memory on the embedded default and in Redis (shared by every instance) with a Redis
URL; a Redis that does not answer lets every request through, counted, logged once."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from graphql_helpers import GraphQLClient, app_settings, line, mutation_document, serve
from limits import parse_many
from limits.aio.storage import MemoryStorage
from prometheus_client import REGISTRY
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from server_process import free_port
from starlette.routing import Route

from stockledger.app.rate_limits import RateLimiter
from stockledger.app.serving import metrics_endpoint
from stockledger.config import Settings
from stockledger.domain.access import Scope
from stockledger.locks.redis_locks import RedisHealth
from stockledger.services.api_keys import ApiKeys


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@asynccontextmanager
async def _limited(
    database_url: str, org_id: str, rate_limit: str, **overrides: Any
) -> AsyncIterator[GraphQLClient]:
    """The app with auth required and ``rate_limit``; its client's own requests (snapshots)
    carry an ADMIN key of their own, so they spend none of the keys under test."""
    settings = app_settings(
        database_url, org_id, auth="required", rate_limit=rate_limit, **overrides
    )
    routes = [Route("/metrics", metrics_endpoint, methods=["GET"])]
    async with serve(settings, extra_routes=routes) as gql:
        gql.app.state.api_keys = ApiKeys(gql.app.state.database, cache_seconds=0.0)
        gql.http.headers["authorization"] = f"Bearer {await _key(gql, org_id)}"
        yield gql


async def _key(gql: GraphQLClient, org: str) -> str:
    return (await _key_and_id(gql, org))[1]


async def _key_and_id(gql: GraphQLClient, org: str) -> tuple[int, str]:
    key, secret = await gql.app.state.api_keys.create(org, "rate-limited", [Scope.ADMIN])
    return key.id, str(secret)


async def _restock(gql: GraphQLClient, secret: str, sku: str = "RL") -> httpx.Response:
    variables = {"input": {"idempotencyKey": uuid.uuid4().hex, "lines": [line(sku, 1)]}}
    return await gql.http.post(
        "/graphql",
        json={"query": mutation_document("restock"), "variables": variables},
        headers={"authorization": f"Bearer {secret}"},
    )


def _assert_limited(response: httpx.Response) -> int:
    """A 429 as section 13 gives it; returns its Retry-After (whole seconds)."""
    assert response.status_code == 429, response.text
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1, retry_after  # RFC 9110 10.2.3
    [error] = response.json()["errors"]
    assert error["extensions"] == {"code": "RATE_LIMITED"}
    assert "rate limit" in error["message"]
    return int(retry_after)


async def test_a_burst_past_the_limit_gets_429s_changes_nothing_and_the_next_window_passes(
    database_url: str, org_id: str
) -> None:
    async with _limited(database_url, org_id, "3/second") as gql:
        writer = await _key(gql, org_id)
        limited_before = _metric("inventory_rate_limited_total")
        for _ in range(3):
            assert (await _restock(gql, writer)).status_code == 200
        before = await gql.snapshot()
        refused = [await _restock(gql, writer) for _ in range(4)]
        retry_after = max(_assert_limited(r) for r in refused)
        assert retry_after == 1  # the oldest request leaves a 1 s window within 1 s
        assert await gql.snapshot() == before  # nothing of GraphQL ran
        assert _metric("inventory_rate_limited_total") == limited_before + 4
        # Refusals spent nothing: once the window has moved, the key passes again.
        await asyncio.sleep(retry_after)
        passed = await _restock(gql, writer)
        assert passed.status_code == 200 and "errors" not in passed.json(), passed.text
        assert (await gql.balance("RL") or {})["onHand"] == 4
        # Only /graphql is limited; the rest answers whatever the key did.
        for _ in range(3):
            await _restock(gql, writer)
        for path in ("/healthz", "/readyz", "/metrics"):
            response = await gql.http.get(path, headers={"authorization": f"Bearer {writer}"})
            assert response.status_code == 200, (path, response.text)
        assert "inventory_rate_limited_total" in (await gql.http.get("/metrics")).text


async def test_two_keys_have_budgets_of_their_own(database_url: str, org_id: str) -> None:
    async with _limited(database_url, org_id, "2/minute") as gql:
        first, second = await _key(gql, org_id), await _key(gql, org_id)
        for _ in range(2):
            assert (await _restock(gql, first)).status_code == 200
        retry_after = _assert_limited(await _restock(gql, first))
        assert 1 <= retry_after <= 60
        for _ in range(2):
            assert (await _restock(gql, second)).status_code == 200
        _assert_limited(await _restock(gql, second))
        assert (await gql.balance("RL") or {})["onHand"] == 4


async def test_each_limit_of_a_list_must_pass(database_url: str, org_id: str) -> None:
    async with _limited(database_url, org_id, "5/second;2/minute") as gql:
        writer = await _key(gql, org_id)
        assert [(await _restock(gql, writer)).status_code for _ in range(3)] == [200, 200, 429]


async def test_with_auth_off_or_an_empty_setting_nothing_is_limited(
    database_url: str, org_id: str
) -> None:
    for overrides in ({"auth": "off", "rate_limit": "1/minute"}, {"rate_limit": ""}):
        settings = app_settings(database_url, org_id, **{"auth": "required", **overrides})
        async with serve(settings) as gql:
            assert gql.app.state.rate_limiter is None
            if settings.auth == "required":
                gql.http.headers["authorization"] = f"Bearer {await _key(gql, org_id)}"
            for _ in range(3):
                await gql.data('{ balance(sku: "A") { onHand } }')


def test_the_setting_defaults_to_1000_a_second_and_a_bad_value_fails_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().rate_limit == "1000/second"
    for bad in ("lots", "10/fortnight", "0/second"):
        monkeypatch.setenv("STOCKLEDGER_RATE_LIMIT", bad)
        with pytest.raises(ValidationError, match="STOCKLEDGER_RATE_LIMIT"):
            Settings()
    monkeypatch.setenv("STOCKLEDGER_RATE_LIMIT", "")
    assert Settings().rate_limit == ""


@pytest.mark.redis
async def test_on_redis_the_budget_is_shared_by_every_instance_under_the_org_tag(
    database_url: str, tenant: str, redis_url: str
) -> None:
    overrides = {"redis_url": redis_url}
    async with (
        _limited(database_url, tenant, "3/second", **overrides) as one,
        _limited(database_url, tenant, "3/second", **overrides) as two,
    ):
        key_id, writer = await _key_and_id(one, tenant)
        codes = [(await _restock(one, writer)).status_code for _ in range(2)]
        codes.append((await _restock(two, writer)).status_code)
        assert codes == [200, 200, 200]
        before = await one.snapshot()
        retry_after = _assert_limited(await _restock(two, writer))
        _assert_limited(await _restock(one, writer))
        assert await one.snapshot() == before
        client = aioredis.Redis.from_url(redis_url)
        try:
            keys = {k.decode() async for k in client.scan_iter(match=f"stockledger:{{{tenant}}}:*")}
        finally:
            await client.aclose()
        assert f"stockledger:{{{tenant}}}:ratelimit/{key_id}/3/1/second" in keys, keys
        await asyncio.sleep(retry_after)
        assert (await _restock(two, writer)).status_code == 200


async def test_a_redis_that_does_not_answer_lets_requests_through_counted_and_logged_once(
    database_url: str, org_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="stockledger.app.rate_limits")
    closed = f"redis://127.0.0.1:{free_port()}/15"  # nothing listens there
    async with _limited(database_url, org_id, "2/minute", redis_url=closed) as gql:
        writer = await _key(gql, org_id)
        degraded, limited = (
            _metric("inventory_redis_degraded_total"),
            _metric("inventory_rate_limited_total"),
        )
        responses = [await _restock(gql, writer) for _ in range(5)]
        assert [r.status_code for r in responses] == [200] * 5, responses[-1].text
        assert all("errors" not in r.json() for r in responses)
        # Each check ran without Redis: the first failed, the rest skipped the known outage.
        assert _metric("inventory_redis_degraded_total") == degraded + 5
        assert _metric("inventory_rate_limited_total") == limited
        assert (await gql.balance("RL") or {})["onHand"] == 5
    said = [r.getMessage() for r in caplog.records if "not enforced" in r.getMessage()]
    assert len(said) == 1, said


@pytest.mark.parametrize(
    "error",
    [
        RedisConnectionError("Connection refused"),
        RedisTimeoutError("Timeout reading from socket"),
        ReadOnlyError("You can't write against a read only replica."),
        ResponseError("Error running script: -READONLY You can't write"),  # Redis 6
        ConnectionRefusedError(111, "refused"),
    ],
)
async def test_every_kind_of_redis_failure_fails_open(error: Exception) -> None:
    class Failing(MemoryStorage):
        async def acquire_entry(self, *args: Any, **kwargs: Any) -> bool:
            raise error

    health = RedisHealth(retry_interval=60.0)
    limiter = RateLimiter(parse_many("1/minute"), Failing(), health=health)
    degraded = _metric("inventory_redis_degraded_total")
    assert await limiter.check("org", "1") is None
    assert not health.usable()  # the outage is known: the next checks skip Redis
    assert await limiter.check("org", "1") is None
    assert _metric("inventory_redis_degraded_total") == degraded + 2
