"""The Starlette app around the schema: lifespan (migrate the embedded default, refuse a
database behind head), /healthz, /readyz, GraphiQL, introspection, and speed extensions."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from graphql_helpers import (  # noqa: F401
    GraphQLClient,
    app_settings,
    client_for,
    gql_fixture,
    line,
    serve,
)
from server_process import free_port
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from stockledger.app import DatabaseNotMigratedError, create_app
from stockledger.app.serving import create_served_app
from stockledger.config import Settings

INTROSPECTION = "{ __schema { queryType { name } } }"


async def test_embedded_default_migrates_itself(tmp_path: Path, org_id: str) -> None:
    settings = Settings(data_dir=tmp_path / "data", org_id=org_id)
    assert settings.embedded_database
    async with serve(settings) as gql:
        await gql.restock("r", line("A", 3))
        assert (await gql.balance("A"))["onHand"] == 3
    assert (tmp_path / "data" / "stockledger.sqlite3").exists()
    async with serve(settings) as gql:  # a second start finds it at head
        assert (await gql.balance("A"))["onHand"] == 3


@pytest.fixture
async def unmigrated_url(backend: str, database_url: str, tmp_path: Path) -> Any:
    """A reachable database with no tables, on this backend (beside the test database)."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.sqlite3'}"
        return
    url = make_url(database_url)
    name = f"{url.database}_unmigrated_{uuid.uuid4().hex[:8]}"
    server = create_async_engine(url.set(database=""))
    async with server.connect() as conn:
        await conn.execute(text(f"CREATE DATABASE `{name}`"))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        async with server.connect() as conn:
            await conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        await server.dispose()


async def test_refuses_to_start_behind_head(unmigrated_url: str, org_id: str) -> None:
    app = create_app(app_settings(unmigrated_url, org_id))
    with pytest.raises(DatabaseNotMigratedError, match="run `stockledger migrate` first"):
        async with app.router.lifespan_context(app):
            pass  # pragma: no cover


class BrokenDatabase:
    """A database whose connections fail."""

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Any]:
        raise OSError("connection refused")
        yield  # pragma: no cover


async def test_a_failing_readiness_check_is_logged_once_per_change(
    database_url: str, org_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Probes come every few seconds: a check that fails logs once when it starts failing and
    once when it passes again, not per probe (issue 13)."""
    failing = True

    async def redis_check() -> None:
        if failing:
            raise ConnectionError("redis does not answer")

    caplog.set_level(logging.INFO, logger="stockledger.app.factory")
    async with serve(
        app_settings(database_url, org_id), degradable_checks={"redis": redis_check}
    ) as gql:
        for _ in range(5):
            assert (await gql.http.get("/readyz")).json()["status"] == "degraded"
        failing = False
        for _ in range(3):
            assert (await gql.http.get("/readyz")).json()["status"] == "ready"
    said = [r.getMessage() for r in caplog.records if "readiness" in r.getMessage()]
    assert said == [
        "readiness: redis check failed: ConnectionError: redis does not answer",
        "readiness: redis check passes again",
    ]
    assert all(r.exc_info is None for r in caplog.records if "readiness" in r.getMessage())


async def test_health_and_readiness(database_url: str, org_id: str) -> None:
    failing: set[str] = set()

    def check(name: str) -> Any:
        async def run() -> None:
            if name in failing:
                raise ConnectionError(f"{name} does not answer")

        return run

    async with serve(
        app_settings(database_url, org_id),
        readiness_checks={"queue": check("queue")},
        degradable_checks={"redis": check("redis")},
    ) as gql:
        health = await gql.http.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        ready = await gql.http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ready",
            "checks": {"database": "ok", "queue": "ok", "redis": "ok"},
        }
        # What the app can run without: still ready, but says it is degraded.
        failing.add("redis")
        degraded = await gql.http.get("/readyz")
        assert degraded.status_code == 200
        assert degraded.json() == {
            "status": "degraded",
            "checks": {
                "database": "ok",
                "queue": "ok",
                "redis": "failed",  # the message is for the log, not for anyone who asks
            },
        }
        # A required check that fails makes the app unready, degraded or not.
        failing.add("queue")
        down = await gql.http.get("/readyz")
        assert down.status_code == 503
        assert down.json()["status"] == "unavailable"
        assert down.json()["checks"]["queue"] == "failed"
        assert down.json()["checks"]["database"] == "ok"
        failing.clear()
        # A database that does not answer makes the app unready (and says so).
        real = gql.app.state.database
        gql.app.state.database = BrokenDatabase()
        try:
            no_db = await gql.http.get("/readyz")
        finally:
            gql.app.state.database = real
        assert no_db.status_code == 503
        assert no_db.json()["checks"] == {
            "database": "failed",
            "queue": "ok",
            "redis": "ok",
        }
        assert (await gql.http.get("/readyz")).status_code == 200
        assert (await gql.http.get("/healthz")).status_code == 200


async def test_served_app_without_redis_is_ready_degraded_and_sells(
    backend: str, database_url: str, org_id: str, tmp_path: Path
) -> None:
    """ARCHITECTURE section 4: a Redis outage degrades to database-only locking rather than
    failing requests, so a load balancer must keep sending traffic: /readyz stays 200."""
    closed = f"redis://127.0.0.1:{free_port()}/15"  # nothing listens there
    if backend == "sqlite":
        settings = Settings(data_dir=tmp_path / "data", org_id=org_id, redis_url=closed)
    else:
        settings = app_settings(database_url, org_id, redis_url=closed)
    async with client_for(create_served_app(settings)) as gql:
        ready = await gql.http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["database"] == "ok"
        assert ready.json()["checks"]["redis"] == "failed"  # the details are in the log
        await gql.restock("r", line("A", 3))
        res = await gql.reserve("c", line("A", 2))
        assert res["replayed"] is False
        assert (await gql.balance("A"))["available"] == 1


async def test_graphiql_and_introspection_switches(database_url: str, org_id: str) -> None:
    async with serve(app_settings(database_url, org_id)) as gql:
        page = await gql.http.get("/graphql", headers={"accept": "text/html"})
        assert page.status_code == 200
        assert "graphiql" in page.text.lower()
        assert (await gql.data(INTROSPECTION)) == {"__schema": {"queryType": {"name": "Query"}}}
        # GET runs queries (GraphQL over HTTP), never a mutation.
        get_query = await gql.http.get("/graphql", params={"query": "{ __typename }"})
        assert get_query.json() == {"data": {"__typename": "Query"}}
        get_mutation = await gql.http.get("/graphql", params={"query": "mutation { __typename }"})
        assert get_mutation.status_code == 400
        assert "mutations are not allowed when using GET" in get_mutation.text
    closed = app_settings(database_url, org_id, graphiql_enabled=False, introspection_enabled=False)
    async with serve(closed) as gql:
        page = await gql.http.get("/graphql", headers={"accept": "text/html"})
        assert page.status_code == 404
        messages = await gql.errors(INTROSPECTION)
        assert "introspection" in messages[0].lower()
        assert (await gql.data('{ balance(sku: "A") { onHand } }')) == {"balance": None}


async def test_context_and_state(gql: GraphQLClient, org_id: str) -> None:
    state = gql.app.state
    assert state.service.org_id == org_id
    assert state.queries.org_id == org_id
    assert state.service.db is state.database


async def test_json_is_encoded_by_orjson(gql: GraphQLClient) -> None:
    await gql.restock("r", line("Ünïcødé ✓", 1))
    response = await gql.http.post(
        "/graphql", json={"query": '{ balance(sku: "Ünïcødé ✓") { sku } }'}
    )
    assert response.headers["content-type"] == "application/json"
    # orjson writes compact UTF-8, not \\u escapes.
    assert response.content == '{"data":{"balance":{"sku":"Ünïcødé ✓"}}}'.encode()


async def test_parse_and_validation_are_cached(gql: GraphQLClient) -> None:
    from strawberry.extensions.parser_cache import _get_parse_cache
    from strawberry.extensions.validation_cache import _get_validate_cache

    from stockledger.resolvers.root import PARSE_CACHE_SIZE, VALIDATION_CACHE_SIZE

    parse, validate = _get_parse_cache(PARSE_CACHE_SIZE), _get_validate_cache(VALIDATION_CACHE_SIZE)
    query = '{ balance(sku: "cache-probe") { onHand } }'
    await gql.data(query)
    p0, v0 = parse.cache_info().hits, validate.cache_info().hits
    for _ in range(3):
        await gql.data(query)
    assert parse.cache_info().hits - p0 == 3
    assert validate.cache_info().hits - v0 == 3


async def test_unknown_routes_and_methods(gql: GraphQLClient) -> None:
    assert (await gql.http.get("/nope")).status_code == 404
    put = await gql.http.put("/graphql", json={"query": "{ __typename }"})
    assert put.status_code == 405


async def test_runtime_factory_supplies_database_and_service(
    database_url: str, org_id: str
) -> None:
    from stockledger.locks import NoLocks
    from stockledger.runtime import open_runtime

    async with serve(app_settings(database_url, org_id), runtime=open_runtime) as gql:
        runtime = gql.app.state.runtime
        assert gql.app.state.service is runtime.service
        assert gql.app.state.database is runtime.db
        assert not isinstance(runtime.service.locker, NoLocks)  # its (fake)redis locker
        await gql.restock("r", line("A", 2))
        assert (await gql.balance("A"))["onHand"] == 2
