"""The org-scope red-team test (issue 10; ARCHITECTURE section 13): two orgs served by one app,
with identical SKUs, locations, references and idempotency keys, driven concurrently over HTTP,
each with its own key. Then, through each org's key: its balances, ledger, reservations and
keys hold its own work exactly, nothing of the other org is visible, and the other org's ids
are NOT_FOUND. On the embedded default (SQLite, fakeredis) and on MariaDB + Redis (the locks
and the expiry index of each org apart), with the served app's own sweeper expiring each
org's carts.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from graphql_helpers import (
    BALANCE,
    RESERVATION,
    GraphQLClient,
    app_settings,
    client_for,
    line,
)

from stockledger.app.serving import create_served_app
from stockledger.config import Settings
from stockledger.domain.access import Scope
from stockledger.services.reconcile import find_violations

SKUS = [f"SKU-{i}" for i in range(5)]
CARTS = 20  # per org: 4 per SKU, 1 unit each
STOCK = {"a": 100, "b": 7}  # per SKU: each org's own opening stock


@pytest.fixture
async def served(
    backend: str, database_url: str, org_id: str, request: pytest.FixtureRequest
) -> AsyncIterator[GraphQLClient]:
    """The served app (runtime, sweeper) on this test's backend: real Redis with MariaDB,
    in-process fakeredis on the embedded default. The orgs' Redis keys go afterwards."""
    redis_url = request.getfixturevalue("redis_url") if backend == "mysql" else None
    settings: Settings = app_settings(
        database_url, org_id, redis_url=redis_url, sweep_interval_seconds=0.1
    )
    async with client_for(create_served_app(settings), admin_key=False) as gql:
        yield gql
    if redis_url is not None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            for org in _orgs(org_id).values():
                keys = [k async for k in client.scan_iter(match=f"stockledger:{{{org}}}:*")]
                if keys:
                    await client.delete(*keys)
        finally:
            await client.aclose()


def _orgs(org_id: str) -> dict[str, str]:
    return {"a": f"{org_id}-a", "b": f"{org_id}-b"}


class Org:
    """One org's client: its ADMIN key on every request."""

    def __init__(self, gql: GraphQLClient, name: str, secret: str) -> None:
        self.http, self.name = gql.http, name
        self.headers = {"authorization": f"Bearer {secret}"}

    async def data(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = await self.http.post(
            "/graphql",
            json={"query": query, "variables": variables or {}},
            headers=self.headers,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert "errors" not in body, (self.name, body)
        data: dict[str, Any] = body["data"]
        return data

    async def mutate(self, name: str, input_type: str, selection: str, **input: Any) -> Any:
        query = (
            f"mutation($i: {input_type}!) {{ {name}(input: $i) {{ __typename "
            f"... on Error {{ code }} {selection} }} }}"
        )
        return (await self.data(query, {"i": input}))[name]


RESERVE_SELECTION = f"... on ReserveSuccess {{ reservation {{ {RESERVATION} }} replayed }}"


async def _drive(org: Org) -> list[str]:
    """The same calls in each org (same keys, references, SKUs); the reservation ids."""
    stocked = await org.mutate(
        "restock",
        "RestockInput",
        "... on RestockSuccess { replayed }",
        idempotencyKey="stock",
        lines=[line(s, STOCK[org.name]) for s in SKUS],
    )
    assert (stocked["__typename"], stocked["replayed"]) == ("RestockSuccess", False)

    async def cart(i: int) -> str:
        result = await org.mutate(
            "reserve",
            "ReserveInput",
            RESERVE_SELECTION,
            idempotencyKey=f"cart-{i}",
            lines=[line(SKUS[i % len(SKUS)], 1)],
            reference={"type": "ORDER", "id": str(i)},
        )
        assert (result["__typename"], result["replayed"]) == ("ReserveSuccess", False), result
        return str(result["reservation"]["id"])

    ids = list(await asyncio.gather(*(cart(i) for i in range(CARTS))))

    async def settle(i: int) -> None:
        if i % 2 == 0:  # ship by reference
            result = await org.mutate(
                "deduct",
                "DeductInput",
                "",
                idempotencyKey=f"ship-{i}",
                reference={"type": "ORDER", "id": str(i)},
            )
            assert result["__typename"] == "DeductSuccess", result
        else:  # give back by id
            result = await org.mutate(
                "release", "ReleaseInput", "", idempotencyKey=f"back-{i}", reservationId=ids[i]
            )
            assert result["__typename"] == "ReleaseSuccess", result

    await asyncio.gather(*(settle(i) for i in range(CARTS)))
    return ids


async def test_two_orgs_with_identical_names_never_see_each_other(
    served: GraphQLClient, org_id: str
) -> None:
    gql = served
    keys = gql.app.state.api_keys
    orgs: dict[str, Org] = {}
    key_ids: dict[str, int] = {}
    for name, org in _orgs(org_id).items():
        key, secret = await keys.create(org, "red team", [Scope.ADMIN])
        orgs[name], key_ids[name] = Org(gql, name, secret), key.id
    a, b = orgs["a"], orgs["b"]

    started = time.perf_counter()
    ids = dict(zip(orgs, await asyncio.gather(_drive(a), _drive(b)), strict=True))
    # One org-only reference and a short-lived cart in each, with the same key.
    only_b = await b.mutate(
        "reserve",
        "ReserveInput",
        RESERVE_SELECTION,
        idempotencyKey="only-b",
        lines=[line(SKUS[0], 1)],
        reference={"type": "ORDER", "id": "only-b"},
    )
    assert only_b["__typename"] == "ReserveSuccess"
    for org in (a, b):
        short = await org.mutate(
            "reserve",
            "ReserveInput",
            RESERVE_SELECTION,
            idempotencyKey="short",
            lines=[line(SKUS[1], 1)],
            ttlSeconds=1,
        )
        assert short["__typename"] == "ReserveSuccess"
    driven = time.perf_counter() - started
    writes = 2 * (1 + 2 * CARTS + 1) + 1  # per org: restock, carts, their ends, short; only-b
    print(f"\n{writes} writes of two orgs with the same names, concurrently, in {driven:.2f} s")

    # Identical reservation ids never appear in both: ids are unique across orgs.
    assert not set(ids["a"]) & set(ids["b"])

    # Each org's balances are its own work exactly (4 carts per SKU: 2 shipped, 2 given back;
    # b also holds "only-b" on SKU-0).
    for name, org in orgs.items():
        balances = await org.data(
            f"{{ balances(first: 50) {{ edges {{ node {{ {BALANCE} }} }} }} }}"
        )
        got = {
            e["node"]["sku"]: (e["node"]["onHand"], e["node"]["reserved"])
            for e in balances["balances"]["edges"]
        }
        held = {SKUS[0]: 1 if name == "b" else 0}
        assert set(got) == set(SKUS), got
        for sku in SKUS:
            assert got[sku][0] == STOCK[name] - 2, (name, sku, got)
            # the short cart may already have expired; every other hold is the org's own
            assert got[sku][1] - held.get(sku, 0) in ((0, 1) if sku == SKUS[1] else (0,)), got

    # Each org's ledger: its own entries only, every one of its own keys.
    for name, org in orgs.items():
        ledger = await org.data(
            "{ ledger(first: 500) { edges { node { eventType idempotencyKey sku } } } }"
        )
        entries = [e["node"] for e in ledger["ledger"]["edges"]]
        kinds = Counter(e["eventType"] for e in entries if e["idempotencyKey"] != "short")
        expected = {"RESTOCK": 5, "RESERVE": CARTS, "DEDUCT": CARTS // 2, "RELEASE": CARTS // 2}
        if name == "b":
            expected["RESERVE"] += 1  # only-b
        assert {k: v for k, v in kinds.items() if k != "EXPIRE"} == expected, (name, kinds)

    # Each org's reservations: its own, by id and by listing; the other's ids are NOT_FOUND.
    for name, org in orgs.items():
        other = "b" if name == "a" else "a"
        listed = await org.data("{ reservations(first: 100) { edges { node { id status } } } }")
        mine = {e["node"]["id"] for e in listed["reservations"]["edges"]}
        assert set(ids[name]) <= mine and not mine & set(ids[other]), (name, mine)
        assert len(mine) == CARTS + 1 + (name == "b")  # + short (+ only-b)
        for rid in ids[other][:3]:
            look = await org.data(f'{{ reservation(id: "{rid}") {{ id }} }}')
            assert look == {"reservation": None}
            released = await org.mutate(
                "release",
                "ReleaseInput",
                "... on NotFoundError { entity key }",
                idempotencyKey=f"steal-{rid}",
                reservationId=rid,
            )
            assert released["__typename"] == "NotFoundError", released
    stolen = await a.mutate(
        "deduct",
        "DeductInput",
        "",
        idempotencyKey="steal-ref",
        reference={"type": "ORDER", "id": "only-b"},
    )
    assert stolen["__typename"] == "NotFoundError", stolen

    # Keys: each org lists its own; the other's key id is NOT_FOUND to revoke.
    for name, org in orgs.items():
        other = "b" if name == "a" else "a"
        viewer = await org.data(
            "{ viewer { org } apiKeys(first: 50) { edges { node { id org } } } }"
        )
        assert viewer["viewer"]["org"] == _orgs(org_id)[name]
        assert {e["node"]["org"] for e in viewer["apiKeys"]["edges"]} == {_orgs(org_id)[name]}
        revoked = await org.mutate(
            "revokeApiKey",
            "RevokeApiKeyInput",
            "",
            idempotencyKey=f"steal-key-{name}",
            id=str(key_ids[other]),
        )
        assert revoked["__typename"] == "NotFoundError", revoked

    # The served app's sweeper expires each org's short cart (each org's own expiry index).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if await _short_statuses(orgs) == {"a": "EXPIRED", "b": "EXPIRED"}:
            break
        await asyncio.sleep(0.2)
    assert await _short_statuses(orgs) == {"a": "EXPIRED", "b": "EXPIRED"}

    db = gql.app.state.database
    for org in _orgs(org_id).values():
        assert await find_violations(db, org) == [], org


async def _short_statuses(orgs: dict[str, Org]) -> dict[str, str]:
    """The status of each org's ``short`` cart, found through its own ledger entry."""
    out = {}
    for name, org in orgs.items():
        ledger = await org.data(
            '{ ledger(first: 100, filter: {sku: "SKU-1"}) { edges { node { '
            "idempotencyKey reservationId } } } }"
        )
        [rid] = {
            e["node"]["reservationId"]
            for e in ledger["ledger"]["edges"]
            if e["node"]["idempotencyKey"] == "short"
        } or {None}
        if rid is None:
            out[name] = "missing"
            continue
        look = await org.data(f'{{ reservation(id: "{rid}") {{ status }} }}')
        out[name] = look["reservation"]["status"]
    return out
