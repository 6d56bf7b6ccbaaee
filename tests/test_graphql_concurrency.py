"""No oversell through the GraphQL endpoint: 500 concurrent single-unit reserves on one SKU
with 100 on hand, on the served app (Redis locks on, default settings but for a long lock wait),
on MariaDB with real Redis and on the embedded default (SQLite, fakeredis)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import drop_org_keys
from graphql_helpers import client_for, line, mutation_document

from stockledger.app.serving import create_served_app
from stockledger.config import Settings
from stockledger.services.reconcile import find_violations

pytestmark = pytest.mark.slow

REQUESTS = 500
ON_HAND = 100


@pytest.fixture
def served_settings(
    backend: str, org_id: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Settings]:
    """Default settings but for where the data lives: MariaDB + Redis (the tenant's Redis keys
    deleted afterwards), or the embedded default. The lock wait is far above the run's length:
    every request queues at once, and on a slow machine the default 5 s could run out before
    the last unit sells (that outcome, LOCK_TIMEOUT, is tested in test_locks.py)."""
    wait = 60.0
    if backend == "sqlite":
        settings = Settings(data_dir=tmp_path / "data", org_id=org_id, lock_wait_seconds=wait)
        assert settings.embedded_database and settings.redis_url is None
        yield settings
        return
    redis_url = request.getfixturevalue("redis_url")
    yield Settings(
        database_url=request.getfixturevalue("mysql_url"),
        redis_url=redis_url,
        org_id=org_id,
        lock_wait_seconds=wait,
    )
    drop_org_keys(redis_url, org_id)


async def test_500_concurrent_reserves_sell_exactly_the_stock(
    backend: str, served_settings: Settings, org_id: str
) -> None:
    assert served_settings.locks_enabled
    sku = f"HOT-{uuid.uuid4().hex[:8]}"
    async with client_for(create_served_app(served_settings), request_seconds=120) as gql:
        http = gql.http
        await gql.restock(f"restock-{sku}", line(sku, ON_HAND))
        document = mutation_document("reserve")

        async def reserve(i: int) -> dict[str, object]:
            response = await http.post(
                "/graphql",
                json={
                    "query": document,
                    "variables": {
                        "input": {"idempotencyKey": f"r-{sku}-{i}", "lines": [line(sku, 1)]}
                    },
                },
            )
            assert response.status_code == 200, response.text
            body: dict[str, object] = response.json()
            return body

        start = time.perf_counter()
        bodies = await asyncio.gather(*(reserve(i) for i in range(REQUESTS)))
        wall = time.perf_counter() - start
        print(f"\n{backend}: {REQUESTS} concurrent reserves in {wall:.2f} s")

        top_level = [b["errors"] for b in bodies if "errors" in b]
        assert top_level == []
        kinds = Counter(b["data"]["reserve"]["__typename"] for b in bodies)  # type: ignore[index]
        assert dict(kinds) == {
            "ReserveSuccess": ON_HAND,
            "InsufficientStockError": REQUESTS - ON_HAND,
        }, f"{backend}: {dict(kinds)} after {wall:.2f} s"
        for b in bodies:
            result = b["data"]["reserve"]  # type: ignore[index]
            if result["__typename"] == "InsufficientStockError":
                assert result["shortages"] == [
                    {"sku": sku, "location": "default", "requested": 1, "available": 0}
                ]
        ids = {
            b["data"]["reserve"]["reservation"]["id"]  # type: ignore[index]
            for b in bodies
            if b["data"]["reserve"]["__typename"] == "ReserveSuccess"  # type: ignore[index]
        }
        assert len(ids) == ON_HAND

        balance = await gql.balance(sku)
        assert balance is not None
        assert (balance["onHand"], balance["reserved"], balance["available"]) == (
            ON_HAND,
            ON_HAND,
            0,
        )
        assert balance["version"] == 1 + ON_HAND  # one RESTOCK + one RESERVE per success
        assert await find_violations(gql.app.state.database, org_id) == []
