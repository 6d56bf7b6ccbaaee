"""Helpers and fixtures for the GraphQL-over-HTTP tests (``tests/test_graphql_*.py``).

The app runs in process: ``httpx.AsyncClient`` over ``httpx.ASGITransport``, with the app's
lifespan driven here (ASGITransport does not run it), on the test's backend (``database_url``)
and tenant (``org_id``) from ``conftest.py``.

Test modules import the fixtures they use from here: ``gql_fixture`` (fixture ``gql``) and
``gql_clock_fixture`` (fixture ``gql_clock``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from stockledger.app import create_app
from stockledger.config import Settings
from stockledger.db.engine import create_database
from stockledger.domain.access import ApiKey, Scope
from stockledger.services import InventoryService

# -------------------------------------------------------------------- documents

BALANCE = "sku location onHand reserved available version updatedAt"
REFERENCE = "reference { type id }"
LEDGER = (
    "id eventType sku location onHandDelta reservedDelta onHandAfter reservedAfter "
    f"reservationId {REFERENCE} reason idempotencyKey createdAt"
)
RESERVATION = (
    f"id status {REFERENCE} expiresAt createdAt updatedAt "
    "lines { sku location quantity remaining deducted released }"
)
ERROR_FIELDS = {
    "InsufficientStockError": "shortages { sku location requested available }",
    "NotFoundError": "entity key",
    "ValidationError": "field",
    "IdempotencyKeyReusedError": "idempotencyKey",
    "ReservationNotActiveError": "reservationId status",
    "VersionConflictError": "expectedVersion actualVersion",
    "LockTimeoutError": "retryAfterMs",
}
# mutation -> (input type, success type, success selection, error members of its union)
MUTATIONS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "restock": (
        "RestockInput",
        "RestockSuccess",
        f"balances {{ {BALANCE} }} ledgerEntries {{ {LEDGER} }} replayed",
        ("ValidationError", "IdempotencyKeyReusedError", "LockTimeoutError"),
    ),
    "adjust": (
        "AdjustInput",
        "AdjustSuccess",
        f"balance {{ {BALANCE} }} ledgerEntry {{ {LEDGER} }} replayed",
        (
            "InsufficientStockError",
            "NotFoundError",
            "ValidationError",
            "VersionConflictError",
            "IdempotencyKeyReusedError",
            "LockTimeoutError",
        ),
    ),
    "reserve": (
        "ReserveInput",
        "ReserveSuccess",
        f"reservation {{ {RESERVATION} }} balances {{ {BALANCE} }} replayed",
        (
            "InsufficientStockError",
            "NotFoundError",
            "ValidationError",
            "IdempotencyKeyReusedError",
            "LockTimeoutError",
        ),
    ),
    "release": (
        "ReleaseInput",
        "ReleaseSuccess",
        f"reservations {{ {RESERVATION} }} balances {{ {BALANCE} }} replayed",
        (
            "NotFoundError",
            "ReservationNotActiveError",
            "ValidationError",
            "IdempotencyKeyReusedError",
            "LockTimeoutError",
        ),
    ),
    "deduct": (
        "DeductInput",
        "DeductSuccess",
        f"reservations {{ {RESERVATION} }} balances {{ {BALANCE} }} "
        f"ledgerEntries {{ {LEDGER} }} replayed",
        (
            "InsufficientStockError",
            "NotFoundError",
            "ReservationNotActiveError",
            "ValidationError",
            "IdempotencyKeyReusedError",
            "LockTimeoutError",
        ),
    ),
    "extendReservation": (
        "ExtendReservationInput",
        "ExtendReservationSuccess",
        f"reservation {{ {RESERVATION} }} replayed",
        (
            "NotFoundError",
            "ReservationNotActiveError",
            "ValidationError",
            "IdempotencyKeyReusedError",
            "LockTimeoutError",
        ),
    ),
}


def mutation_document(name: str) -> str:
    """``mutation($input: XInput!) { name(input: $input) { every member's fields } }``."""
    input_type, success, selection, errors = MUTATIONS[name]
    members = " ".join(f"... on {e} {{ {ERROR_FIELDS[e]} }}" for e in errors)
    return (
        f"mutation($input: {input_type}!) {{ {name}(input: $input) {{ __typename "
        f"... on {success} {{ {selection} }} ... on Error {{ code message }} {members} }} }}"
    )


def line(sku: str, quantity: int, location: str = "default") -> dict[str, Any]:
    return {"sku": sku, "quantity": quantity, "location": location}


# -------------------------------------------------------------------- client


class GraphQLClient:
    """A GraphQL client for an in-process app. ``app.state`` is live while it is open.

    ``api_key``/``secret``: the ADMIN key of the settings' org that :func:`serve` made and
    sends on every request (``http``'s default ``Authorization`` header), or None.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        app: Starlette,
        api_key: ApiKey | None = None,
        secret: str | None = None,
    ) -> None:
        self.http = http
        self.app = app
        self.api_key = api_key
        self.secret = secret

    async def post(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON response to a POST (asserts HTTP 200)."""
        response = await self.http.post(
            "/graphql", json={"query": query, "variables": variables or {}}
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def data(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """``data`` of a response that must have no errors."""
        body = await self.post(query, variables)
        assert "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data

    async def errors(self, query: str, variables: dict[str, Any] | None = None) -> list[str]:
        """The messages of a response's top-level errors (asserts there are some)."""
        body = await self.post(query, variables)
        assert body.get("errors"), body
        return [e["message"] for e in body["errors"]]

    async def mutate(self, name: str, **input: Any) -> dict[str, Any]:
        """Run mutation ``name`` with ``input``; its result object (with ``__typename``)."""
        data = await self.data(mutation_document(name), {"input": input})
        result: dict[str, Any] = data[name]
        return result

    async def ok(self, name: str, **input: Any) -> dict[str, Any]:
        """Like :meth:`mutate`, asserting the success member."""
        result = await self.mutate(name, **input)
        assert result["__typename"] == MUTATIONS[name][1], result
        return result

    async def restock(self, key: str, *lines: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return await self.ok("restock", idempotencyKey=key, lines=list(lines), **extra)

    async def reserve(self, key: str, *lines: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return await self.ok("reserve", idempotencyKey=key, lines=list(lines), **extra)

    async def balance(self, sku: str, location: str = "default") -> dict[str, Any] | None:
        data = await self.data(
            f"query($s: String!, $l: String!) {{ balance(sku: $s, location: $l) {{ {BALANCE} }} }}",
            {"s": sku, "l": location},
        )
        result: dict[str, Any] | None = data["balance"]
        return result

    async def snapshot(self) -> dict[str, Any]:
        """Everything a refused request must leave unchanged: every balance (on hand,
        reserved, version), the newest ledger entry, and every reservation's state."""
        data = await self.data(
            """{
              balances(first: 500) { edges { node { sku location onHand reserved version } } }
              ledger(first: 1) { edges { node { id } } }
              reservations(first: 500) {
                edges { node { id status expiresAt lines { sku quantity deducted released } } }
              }
            }"""
        )
        return data

    async def ledger_ids(self) -> list[str]:
        data = await self.data("{ ledger(first: 500) { edges { node { id } } } }")
        return [e["node"]["id"] for e in data["ledger"]["edges"]]


def app_settings(database_url: str | None, org_id: str, **overrides: Any) -> Settings:
    """Settings for an app on this test's database and tenant, without the environment."""
    base: dict[str, Any] = {
        "database_url": database_url,
        "org_id": org_id,
        "retry_max_attempts": 30,
        "retry_max_backoff_seconds": 0.05,
    }
    base.update(overrides)
    return Settings(**base)


@asynccontextmanager
async def serve(
    settings: Settings, *, admin_key: bool = True, **kwargs: Any
) -> AsyncIterator[GraphQLClient]:
    """Run ``create_app(settings, **kwargs)`` (lifespan included) and a client for it (see
    :func:`client_for`)."""
    async with client_for(create_app(settings, **kwargs), admin_key=admin_key) as client:
        yield client


async def admin_key_of(app: Starlette) -> tuple[ApiKey, str]:
    """A new ADMIN key (and its secret) for the org of a started ``app``'s service."""
    org = app.state.service.org_id
    key, secret = await app.state.api_keys.create(org, "tests", [Scope.ADMIN])
    return key, str(secret)


async def admin_headers(app: Starlette) -> dict[str, str]:
    """``Authorization`` with a new ADMIN key for the org of a started ``app``."""
    _, secret = await admin_key_of(app)
    return {"authorization": f"Bearer {secret}"}


@asynccontextmanager
async def client_for(
    app: Starlette, *, admin_key: bool = True, request_seconds: float = 5.0
) -> AsyncIterator[GraphQLClient]:
    """Run ``app``'s lifespan and a client for it (``request_seconds``: each request's timeout).

    ``admin_key``: make an ADMIN key for the app's org and send it on every request, as any
    client of a server with ``STOCKLEDGER_AUTH=required`` (the default) does; False for tests
    of what a request without a key gets.
    """
    async with app.router.lifespan_context(app):
        key, secret = await admin_key_of(app) if admin_key else (None, None)
        headers = {"authorization": f"Bearer {secret}"} if secret else {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://stockledger",
            headers=headers,
            timeout=request_seconds,
        ) as http:
            yield GraphQLClient(http, app, key, secret)


@asynccontextmanager
async def serve_service(
    database_url: str, org_id: str, *, clock: Any = None, **service_kwargs: Any
) -> AsyncIterator[GraphQLClient]:
    """Run the app around a service built here (own clock, locker, ...) on this database."""
    settings = app_settings(database_url, org_id)
    db = create_database(settings, database_url)
    try:
        kwargs = dict(service_kwargs)
        if clock is not None:
            kwargs["clock"] = clock
        service = InventoryService(db, settings, org_id=org_id, **kwargs)
        async with serve(settings, service=service) as client:
            yield client
    finally:
        await db.dispose()


@pytest.fixture(name="gql")
async def gql_fixture(database_url: str, org_id: str) -> AsyncIterator[GraphQLClient]:
    """A client for an app that opens this test's database itself (default settings)."""
    async with serve(app_settings(database_url, org_id)) as client:
        yield client


@pytest.fixture(name="gql_clock")
async def gql_clock_fixture(
    database_url: str, org_id: str, clock: Any
) -> AsyncIterator[GraphQLClient]:
    """A client for an app whose service runs on the test's controllable ``clock``."""
    async with serve_service(database_url, org_id, clock=clock) as client:
        yield client
