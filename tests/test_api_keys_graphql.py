"""The GraphQL side of API keys (part ACCESS of schema-v2.graphql; ARCHITECTURE section 13;
issue 10, item 1): ``viewer``, ``apiKeys``, ``createApiKey`` and ``revokeApiKey``, in process
with ``STOCKLEDGER_AUTH=required`` on both backends.

A new key's secret works on the next request with exactly its scopes; creates and revokes are
idempotent per org; a revocation is refused at once on the instance that made it and within
the 5 s cache bound on the others; another org's keys are NOT_FOUND and only an ADMIN key of
org ``system`` makes keys of other orgs; a key without ADMIN is FORBIDDEN on the three ADMIN
fields, and nothing changes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from graphql import build_schema
from graphql_helpers import GraphQLClient, app_settings, line, serve
from test_graphql_contract import containment_problems, contract_text, v2_part

from stockledger.domain.access import ROLE_SCOPES, SYSTEM_ORG, Role, Scope
from stockledger.resolvers import print_sdl
from stockledger.services.api_keys import ApiKeys

S = Scope
KEY = "id name prefix org scopes createdAt expiresAt lastUsedAt revokedAt"
CREATE = f"""mutation($i: CreateApiKeyInput!) {{ createApiKey(input: $i) {{
  __typename
  ... on CreateApiKeySuccess {{ apiKey {{ {KEY} }} secret replayed }}
  ... on ValidationError {{ code message field }}
  ... on IdempotencyKeyReusedError {{ code idempotencyKey }}
}} }}"""
REVOKE = f"""mutation($i: RevokeApiKeyInput!) {{ revokeApiKey(input: $i) {{
  __typename
  ... on RevokeApiKeySuccess {{ apiKey {{ {KEY} }} replayed }}
  ... on NotFoundError {{ code entity key }}
  ... on ValidationError {{ code field }}
  ... on IdempotencyKeyReusedError {{ code idempotencyKey }}
}} }}"""
LIST = f"""query($first: Int!, $after: String) {{ apiKeys(first: $first, after: $after) {{
  edges {{ cursor node {{ {KEY} }} }}
  pageInfo {{ hasNextPage hasPreviousPage startCursor endCursor }}
}} }}"""
VIEWER = f"{{ viewer {{ org scopes apiKey {{ {KEY} }} }} }}"
EVERY_SCOPE = [s.value for s in Scope]  # the contract's order


class Ticks:
    """A monotonic clock the test moves (seconds): times an instance's key cache."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def keys_gql(database_url: str, org_id: str) -> AsyncIterator[GraphQLClient]:
    """An app with auth required, its key store with the real 5 s cache (no shortcut: the
    revoking instance forgets the key itself)."""
    async with serve(app_settings(database_url, org_id, auth="required")) as gql:
        gql.http.headers.pop("authorization", None)  # each request sends its own key
        yield gql


async def _key(gql: GraphQLClient, org: str, scopes: Any) -> str:
    _, secret = await gql.app.state.api_keys.create(org, "made by the test", scopes)
    return str(secret)


async def _call(gql: GraphQLClient, secret: str | None, query: str, variables: Any = None) -> Any:
    """The HTTP response to one request with ``secret`` (or no key)."""
    headers = {} if secret is None else {"authorization": f"Bearer {secret}"}
    return await gql.http.post(
        "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
    )


async def _body(gql: GraphQLClient, secret: str | None, query: str, variables: Any = None) -> Any:
    response = await _call(gql, secret, query, variables)
    assert response.status_code == 200, response.text
    return response.json()


async def _create(gql: GraphQLClient, secret: str | None, **input: Any) -> dict[str, Any]:
    input.setdefault("idempotencyKey", uuid.uuid4().hex)
    input.setdefault("name", "till 1")
    body = await _body(gql, secret, CREATE, {"i": input})
    assert "errors" not in body, body
    result: dict[str, Any] = body["data"]["createApiKey"]
    return result


async def _revoke(gql: GraphQLClient, secret: str, key_id: str, key: str | None = None) -> Any:
    variables = {"i": {"idempotencyKey": key or uuid.uuid4().hex, "id": key_id}}
    body = await _body(gql, secret, REVOKE, variables)
    assert "errors" not in body, body
    return body["data"]["revokeApiKey"]


async def _all_keys(gql: GraphQLClient, org: str) -> list[tuple[Any, ...]]:
    """Every key of ``org`` as stored (id, name, scopes, revoked at): what must not change."""
    store: ApiKeys = gql.app.state.api_keys
    return [(k.id, k.name, k.scopes, k.revoked_at) for k in await store.list(org)]


def test_the_export_contains_part_access_of_the_v2_contract() -> None:
    contract = build_schema(contract_text() + "\n" + v2_part("ACCESS"))
    assert containment_problems(contract, build_schema(print_sdl())) == []


async def test_a_key_made_with_a_role_works_at_once_with_its_scopes_only(
    keys_gql: GraphQLClient, org_id: str
) -> None:
    gql = keys_gql
    admin = await _key(gql, org_id, [S.ADMIN])
    made = await _create(gql, admin, role="STOREFRONT")
    assert made["__typename"] == "CreateApiKeySuccess" and made["replayed"] is False
    secret, key = made["secret"], made["apiKey"]
    assert secret.startswith("sl_") and len(secret) == 43 and key["prefix"] == secret[:11]
    assert (key["org"], key["name"], key["scopes"]) == (
        org_id,
        "till 1",
        ["STOCK_READ", "RESERVATIONS_WRITE"],
    )
    assert key["revokedAt"] is None and key["expiresAt"] is None
    # The very next request authenticates with it.
    viewer = (await _body(gql, secret, VIEWER))["data"]["viewer"]
    assert viewer["org"] == org_id and viewer["apiKey"]["id"] == key["id"]
    assert viewer["scopes"] == ["STOCK_READ", "RESERVATIONS_WRITE"]
    assert (await _body(gql, secret, '{ balance(sku: "A") { onHand } }')) == {
        "data": {"balance": None}
    }
    # ... and its scopes are enforced: no STOCK_WRITE, no ADMIN.
    restock = await _body(
        gql,
        secret,
        "mutation($i: RestockInput!) { restock(input: $i) { __typename } }",
        {"i": {"idempotencyKey": "r", "lines": [line("A", 1)]}},
    )
    assert [e["extensions"]["code"] for e in restock["errors"]] == ["FORBIDDEN"]
    listing = await _body(gql, secret, LIST, {"first": 5})
    assert listing["data"] is None and "ADMIN" in listing["errors"][0]["message"]


async def test_a_key_made_with_scopes_has_those_and_may_expire(
    keys_gql: GraphQLClient, org_id: str
) -> None:
    gql = keys_gql
    admin = await _key(gql, org_id, [S.ADMIN])
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    made = await _create(
        gql, admin, scopes=["LEDGER_READ", "LEDGER_READ"], expiresAt=expires.isoformat()
    )
    assert made["apiKey"]["scopes"] == ["LEDGER_READ"]
    assert made["apiKey"]["expiresAt"] == expires.isoformat()
    ledger = await _body(gql, made["secret"], "{ ledger(first: 1) { edges { cursor } } }")
    assert ledger == {"data": {"ledger": {"edges": []}}}
    balance = await _body(gql, made["secret"], '{ balance(sku: "A") { onHand } }')
    assert [e["extensions"]["code"] for e in balance["errors"]] == ["FORBIDDEN"]


async def test_a_replay_has_no_secret_and_another_payload_is_refused(
    keys_gql: GraphQLClient, org_id: str
) -> None:
    gql = keys_gql
    admin = await _key(gql, org_id, [S.ADMIN])
    first = await _create(gql, admin, idempotencyKey="make-till-2", name="till 2", role="AUDITOR")
    again = await _create(gql, admin, idempotencyKey="make-till-2", name="till 2", role="AUDITOR")
    assert again["__typename"] == "CreateApiKeySuccess"
    assert (again["replayed"], again["secret"]) == (True, None)
    assert again["apiKey"] == first["apiKey"]
    before = await _all_keys(gql, org_id)
    for other in ({"name": "till 3", "role": "AUDITOR"}, {"name": "till 2", "role": "ADMIN"}):
        reused = await _create(gql, admin, idempotencyKey="make-till-2", **other)
        assert reused == {
            "__typename": "IdempotencyKeyReusedError",
            "code": "IDEMPOTENCY_KEY_REUSED",
            "idempotencyKey": "make-till-2",
        }
    # A key a stock write used is reused for a key write too (one key space per org).
    restock = await _body(
        gql,
        admin,
        "mutation($i: RestockInput!) { restock(input: $i) { __typename } }",
        {"i": {"idempotencyKey": "stock-1", "lines": [line("A", 1)]}},
    )
    assert restock["data"]["restock"]["__typename"] == "RestockSuccess"
    reused = await _create(gql, admin, idempotencyKey="stock-1", role="AUDITOR")
    assert reused["__typename"] == "IdempotencyKeyReusedError"
    assert await _all_keys(gql, org_id) == before  # only the first call made a key


async def test_bad_input_is_a_validation_error_naming_the_field(
    keys_gql: GraphQLClient, org_id: str
) -> None:
    gql = keys_gql
    admin = await _key(gql, org_id, [S.ADMIN])
    before = await _all_keys(gql, org_id)
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    for input, field in (
        ({"role": "STOREFRONT", "scopes": ["STOCK_READ"]}, "role"),  # both
        ({}, "role"),  # neither
        ({"scopes": []}, "scopes"),
        ({"role": "STOREFRONT", "expiresAt": past}, "expiresAt"),
        ({"role": "STOREFRONT", "name": "  "}, "name"),
        ({"role": "STOREFRONT", "org": ""}, "org"),
        ({"role": "STOREFRONT", "idempotencyKey": ""}, "idempotencyKey"),
    ):
        refused = await _create(gql, admin, **input)
        assert refused["__typename"] == "ValidationError", (input, refused)
        assert refused["field"] == field, (input, refused)
    assert await _all_keys(gql, org_id) == before


async def test_a_revoked_key_gets_401_here_at_once_and_elsewhere_within_5_s(
    keys_gql: GraphQLClient, database_url: str, org_id: str
) -> None:
    gql = keys_gql
    admin = await _key(gql, org_id, [S.ADMIN])
    made = await _create(gql, admin, role="STOREFRONT")
    secret, key_id = made["secret"], made["apiKey"]["id"]
    # Another instance on the same database, its own 5 s cache on a clock the test moves.
    ticks = Ticks()
    settings = app_settings(database_url, org_id, auth="required")
    async with serve(settings, database=gql.app.state.database) as other:
        other.http.headers.pop("authorization", None)
        other.app.state.api_keys = ApiKeys(gql.app.state.database, monotonic=ticks)
        query = '{ balance(sku: "A") { onHand } }'
        assert (await _call(gql, secret, query)).status_code == 200  # cached here
        assert (await _call(other, secret, query)).status_code == 200  # and there
        revoked = await _revoke(gql, admin, key_id, key="revoke-1")
        assert revoked["__typename"] == "RevokeApiKeySuccess" and revoked["replayed"] is False
        assert revoked["apiKey"]["revokedAt"] is not None
        # This instance forgot the key: refused on the next request.
        refused = await _call(gql, secret, query)
        assert refused.status_code == 401
        assert refused.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        # The other one may answer from its cache for less than 5 s, never longer.
        ticks.now = 4.9
        assert (await _call(other, secret, query)).status_code == 200
        ticks.now = 5.0
        assert (await _call(other, secret, query)).status_code == 401
    # A replay answers the same key, first revocation time kept; another id under the same
    # idempotency key is refused.
    replay = await _revoke(gql, admin, key_id, key="revoke-1")
    assert replay["replayed"] is True and replay["apiKey"] == revoked["apiKey"]
    admin_id = (await _body(gql, admin, VIEWER))["data"]["viewer"]["apiKey"]["id"]
    reused = await _revoke(gql, admin, admin_id, key="revoke-1")
    assert reused["__typename"] == "IdempotencyKeyReusedError"
    assert (await _call(gql, admin, query)).status_code == 200  # the admin key still works


async def test_a_key_may_revoke_itself(keys_gql: GraphQLClient, org_id: str) -> None:
    gql = keys_gql
    admin = await _key(gql, org_id, [S.ADMIN])
    me = (await _body(gql, admin, VIEWER))["data"]["viewer"]["apiKey"]["id"]
    revoked = await _revoke(gql, admin, me)
    assert revoked["__typename"] == "RevokeApiKeySuccess"  # the request itself completes
    assert (await _call(gql, admin, VIEWER)).status_code == 401  # the next one does not


async def test_another_orgs_keys_are_not_found_and_not_listed(
    keys_gql: GraphQLClient, org_id: str
) -> None:
    gql = keys_gql
    admin = await _key(gql, org_id, [S.ADMIN])
    other_org = f"{org_id}-other"
    theirs, _ = await gql.app.state.api_keys.create(other_org, "theirs", [S.ADMIN])
    for key_id in (str(theirs.id), "999999999999", "abc"):
        missing = await _revoke(gql, admin, key_id)
        assert missing == {
            "__typename": "NotFoundError",
            "code": "NOT_FOUND",
            "entity": "ApiKey",
            "key": key_id,
        }
    [still] = await gql.app.state.api_keys.list(other_org)
    assert still.revoked_at is None
    listed = (await _body(gql, admin, LIST, {"first": 500}))["data"]["apiKeys"]["edges"]
    assert {e["node"]["org"] for e in listed} == {org_id}
    assert str(theirs.id) not in {e["node"]["id"] for e in listed}


async def test_api_keys_pages_by_id_oldest_first(keys_gql: GraphQLClient, org_id: str) -> None:
    gql = keys_gql
    admin = await _key(gql, org_id, [S.ADMIN])
    for n in range(3):
        await _create(gql, admin, name=f"k{n}", role="AUDITOR")
    pages, after = [], None
    while True:
        page = (await _body(gql, admin, LIST, {"first": 2, "after": after}))["data"]["apiKeys"]
        pages.append(page)
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    listed = [e["node"] for p in pages for e in p["edges"]]
    assert all(len(p["edges"]) == 2 for p in pages[:-1])
    assert [p["pageInfo"]["hasPreviousPage"] for p in pages] == [False] + [True] * (len(pages) - 1)
    stored = await gql.app.state.api_keys.list(org_id)  # oldest first, by id
    assert [int(k["id"]) for k in listed] == [k.id for k in stored]
    assert [k["name"] for k in listed][-3:] == ["k0", "k1", "k2"]
    # A cursor of another list, a forged one and a bad first are the caller's error.
    reservations = "{ reservations(first: 1) { pageInfo { endCursor } } }"
    assert (await _body(gql, admin, reservations))["data"]
    for variables, says in (
        ({"first": 2, "after": "not-a-cursor"}, "not a valid cursor"),
        ({"first": 2, "after": "eyJrIjoiciIsInYiOjF9"}, "not a valid cursor for this list"),
        ({"first": 0}, "between 1 and 500"),
    ):
        body = await _body(gql, admin, LIST, variables)
        assert body["data"] is None
        assert says in body["errors"][0]["message"], body
        assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_a_key_without_admin_is_forbidden_on_every_key_field_and_nothing_changes(
    keys_gql: GraphQLClient, org_id: str
) -> None:
    gql = keys_gql
    admin = await _key(gql, org_id, [S.ADMIN])
    everything_else = await _key(gql, org_id, [s for s in Scope if s is not S.ADMIN])
    target = await _create(gql, admin, role="STOREFRONT")
    before = await _all_keys(gql, org_id)
    calls = {
        "apiKeys": (LIST, {"first": 5}),
        "createApiKey": (CREATE, {"i": {"idempotencyKey": "f1", "name": "x", "role": "ADMIN"}}),
        "revokeApiKey": (REVOKE, {"i": {"idempotencyKey": "f2", "id": target["apiKey"]["id"]}}),
    }
    for field, (query, variables) in calls.items():
        body = await _body(gql, everything_else, query, variables)
        assert body["data"] is None, (field, body)
        [error] = body["errors"]
        assert (error["path"], error["extensions"]["code"]) == ([field], "FORBIDDEN")
        assert "ADMIN" in error["message"]
    assert await _all_keys(gql, org_id) == before
    # The refused calls consumed no idempotency key: an ADMIN may use them now.
    made = await _create(gql, admin, idempotencyKey="f1", name="x", role="ADMIN")
    assert made["replayed"] is False and made["secret"]
    revoked = await _revoke(gql, admin, target["apiKey"]["id"], key="f2")
    assert revoked["replayed"] is False


async def test_a_key_of_another_org_needs_the_admin_of_org_system(
    keys_gql: GraphQLClient, database_url: str, org_id: str
) -> None:
    gql = keys_gql
    admin = await _key(gql, org_id, [S.ADMIN])
    elsewhere = f"{org_id}-elsewhere"
    refused = await _body(
        gql,
        admin,
        CREATE,
        {"i": {"idempotencyKey": "x1", "name": "n", "org": elsewhere, "role": "ADMIN"}},
    )
    assert refused["data"] is None
    assert [(e["path"], e["extensions"]["code"]) for e in refused["errors"]] == [
        (["createApiKey"], "FORBIDDEN")
    ]
    assert SYSTEM_ORG in refused["errors"][0]["message"]
    assert await gql.app.state.api_keys.list(elsewhere) == []
    # The operator's key (org system, made with the CLI in real life) may.
    settings = app_settings(database_url, SYSTEM_ORG, auth="required")
    async with serve(settings, database=gql.app.state.database) as system:
        system.http.headers.pop("authorization", None)
        operator = await _key(system, SYSTEM_ORG, ROLE_SCOPES[Role.ADMIN])
        made = await _create(system, operator, org=elsewhere, name="n", role="STOREFRONT")
    assert made["__typename"] == "CreateApiKeySuccess", made
    assert made["apiKey"]["org"] == elsewhere
    [stored] = await gql.app.state.api_keys.list(elsewhere)
    assert stored.id == int(made["apiKey"]["id"])


async def test_the_viewer_shows_the_effective_scopes_and_the_granted_ones(
    keys_gql: GraphQLClient, org_id: str
) -> None:
    gql = keys_gql
    admin = await _key(gql, org_id, [S.ADMIN])
    viewer = (await _body(gql, admin, VIEWER))["data"]["viewer"]
    assert viewer["scopes"] == EVERY_SCOPE  # ADMIN expanded (section 13)
    assert viewer["apiKey"]["scopes"] == ["ADMIN"]  # as granted
    assert viewer["apiKey"]["lastUsedAt"] is not None  # this very request used it


async def test_with_auth_off_the_viewer_is_unauthenticated(database_url: str, org_id: str) -> None:
    async with serve(app_settings(database_url, org_id, auth="off")) as gql:
        gql.http.headers.pop("authorization", None)
        body = await _body(gql, None, VIEWER)
        assert body["data"] is None
        assert [(e["path"], e["extensions"]["code"]) for e in body["errors"]] == [
            (["viewer"], "UNAUTHENTICATED")
        ]
        # The ADMIN fields work there, as ADMIN of the served org.
        made = await _create(gql, None, role="AUDITOR")
        assert made["apiKey"]["org"] == org_id
