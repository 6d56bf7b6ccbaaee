"""Authentication and scopes with ``STOCKLEDGER_AUTH=required`` (ARCHITECTURE section 13;
issue 10), in process over both backends: 401 for every kind of missing or bad key, each root
field against each scope (table-driven over the schema, so a field added without a scope
fails here), null propagation of a forbidden field, and a refused mutation changing nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from graphql_helpers import GraphQLClient, app_settings, line, serve

from stockledger.domain.access import ROLE_SCOPES, Role, Scope
from stockledger.resolvers.root import schema as exported
from stockledger.services.api_keys import ApiKeys

S = Scope
# What each root field needs (section 13), written out here: the oracle, not the code. None:
# no scope at all, only an authenticated key (``viewer`` describes the caller and nothing else).
FIELD_SCOPES: dict[str, Scope | None] = {
    "balance": S.STOCK_READ,
    "balances": S.STOCK_READ,
    "reservation": S.STOCK_READ,
    "reservations": S.STOCK_READ,
    "node": S.STOCK_READ,
    "ledger": S.LEDGER_READ,
    "restock": S.STOCK_WRITE,
    "adjust": S.STOCK_WRITE,
    "reserve": S.RESERVATIONS_WRITE,
    "release": S.RESERVATIONS_WRITE,
    "deduct": S.RESERVATIONS_WRITE,
    "extendReservation": S.RESERVATIONS_WRITE,
    "confirmReservation": S.RESERVATIONS_WRITE,
    "reserveMany": S.RESERVATIONS_WRITE,
    "deductMany": S.RESERVATIONS_WRITE,
    "releaseMany": S.RESERVATIONS_WRITE,
    "viewer": None,
    "apiKeys": S.ADMIN,
    "createApiKey": S.ADMIN,
    "revokeApiKey": S.ADMIN,
    "location": S.STOCK_READ,
    "locations": S.STOCK_READ,
    "stockLevels": S.STOCK_READ,
    "transfer": S.STOCK_READ,
    "transfers": S.STOCK_READ,
    "createLocation": S.ADMIN,
    "updateLocation": S.ADMIN,
    "receiveTransfer": S.STOCK_WRITE,
    "cancelTransfer": S.STOCK_WRITE,
    "lowStock": S.STOCK_READ,
    "reorderSuggestions": S.STOCK_READ,
    "setReorderPoint": S.STOCK_WRITE,
    "clearReorderPoint": S.STOCK_WRITE,
    "webhookEndpoints": S.ADMIN,
    "webhookDeliveries": S.ADMIN,
    "createWebhookEndpoint": S.ADMIN,
    "deleteWebhookEndpoint": S.ADMIN,
}
# `transfer` is a query (STOCK_READ) and a mutation (STOCK_WRITE) of the same name.
MUTATION_SCOPES = {"transfer": S.STOCK_WRITE}
SCOPED = sorted(f for f, scope in FIELD_SCOPES.items() if scope is not None)
UNSCOPED = sorted(f for f, scope in FIELD_SCOPES.items() if scope is None)


def _operation(field: str) -> tuple[str, dict[str, Any]]:
    """A small valid operation of ``field`` (its result's ``__typename`` only)."""
    k = uuid.uuid4().hex
    reads = {
        "balance": '{ balance(sku: "A") { onHand } }',
        "balances": "{ balances(first: 1) { edges { cursor } } }",
        "reservation": '{ reservation(id: "1") { id } }',
        "reservations": "{ reservations(first: 1) { edges { cursor } } }",
        "node": '{ node(id: "UmVzZXJ2YXRpb246MQ") { id } }',  # Reservation 1's global id
        "ledger": "{ ledger(first: 1) { edges { cursor } } }",
        "viewer": "{ viewer { org scopes apiKey { id } } }",
        "apiKeys": "{ apiKeys(first: 1) { edges { cursor } } }",
        "location": '{ location(code: "default") { code } }',
        "locations": "{ locations(first: 1) { edges { cursor } } }",
        "stockLevels": '{ stockLevels(sku: "A") { onHand } }',
        "transfer": '{ transfer(id: "VHJhbnNmZXI6MQ") { id } }',  # Transfer 1's global id
        "transfers": "{ transfers(first: 1) { edges { cursor } } }",
        "lowStock": "{ lowStock(first: 1) { edges { cursor } } }",
        "reorderSuggestions": '{ reorderSuggestions(location: "default") { quantity } }',
        "webhookEndpoints": "{ webhookEndpoints(first: 1) { edges { cursor } } }",
        "webhookDeliveries": '{ webhookDeliveries(endpointId: "1") { edges { cursor } } }',
    }
    if field in reads:
        return reads[field], {}
    inputs: dict[str, tuple[str, dict[str, Any]]] = {
        "restock": ("RestockInput", {"idempotencyKey": k, "lines": [line("A", 1)]}),
        "adjust": (
            "AdjustInput",
            {"idempotencyKey": k, "sku": "A", "delta": 1, "reason": "count"},
        ),
        "reserve": ("ReserveInput", {"idempotencyKey": k, "lines": [line("A", 1)]}),
        "release": ("ReleaseInput", {"idempotencyKey": k, "reservationId": "1"}),
        "deduct": ("DeductInput", {"idempotencyKey": k, "reservationId": "1"}),
        "extendReservation": (
            "ExtendReservationInput",
            {"idempotencyKey": k, "reservationId": "1", "ttlSeconds": 60},
        ),
        "confirmReservation": (
            "ConfirmReservationInput",
            {"idempotencyKey": k, "reservationId": "1"},
        ),
        "reserveMany": (
            "ReserveManyInput",
            {"carts": [{"idempotencyKey": k, "lines": [line("A", 1)]}]},
        ),
        "deductMany": ("DeductManyInput", {"items": [{"idempotencyKey": k, "reservationId": "1"}]}),
        "releaseMany": (
            "ReleaseManyInput",
            {"items": [{"idempotencyKey": k, "reservationId": "1"}]},
        ),
        "createApiKey": (
            "CreateApiKeyInput",
            {"idempotencyKey": k, "name": "probe", "role": "STOREFRONT"},
        ),
        # An id no key has: the allowed call answers NotFoundError and revokes nothing.
        "revokeApiKey": ("RevokeApiKeyInput", {"idempotencyKey": k, "id": "999999999999"}),
        "createLocation": (
            "CreateLocationInput",
            {"idempotencyKey": k, "code": f"probe-{k}", "name": "probe"},
        ),
        "updateLocation": (
            "UpdateLocationInput",
            {"idempotencyKey": k, "code": "no-such-location", "name": "probe"},
        ),
        "receiveTransfer": (
            "ReceiveTransferInput",
            {"idempotencyKey": k, "transferId": "VHJhbnNmZXI6MQ"},
        ),
        "setReorderPoint": (
            "SetReorderPointInput",
            {"idempotencyKey": k, "sku": "A", "minimumLevel": 1, "reorderQuantity": 5},
        ),
        "clearReorderPoint": ("ClearReorderPointInput", {"idempotencyKey": k, "sku": "A"}),
        # A loopback URL: the allowed call answers ValidationError (SSRF) and makes nothing.
        "createWebhookEndpoint": (
            "CreateWebhookEndpointInput",
            {"idempotencyKey": k, "url": "http://127.0.0.1/hook", "eventTypes": ["STOCK_OUT"]},
        ),
        "deleteWebhookEndpoint": (
            "DeleteWebhookEndpointInput",
            {"idempotencyKey": k, "id": "999999999999"},
        ),
        "cancelTransfer": (
            "CancelTransferInput",
            {"idempotencyKey": k, "transferId": "VHJhbnNmZXI6MQ", "reason": "probe"},
        ),
    }
    input_type, value = inputs[field]
    return (
        f"mutation($i: {input_type}!) {{ {field}(input: $i) {{ __typename }} }}",
        {"i": value},
    )


@pytest.fixture
async def auth_gql(database_url: str, org_id: str) -> AsyncIterator[GraphQLClient]:
    async with serve(app_settings(database_url, org_id, auth="required")) as gql:
        # Each request sends its own key, or none: no default header from the helper.
        gql.http.headers.pop("authorization", None)
        # No lookup cache here: the tests revoke and expect it at once.
        gql.app.state.api_keys = ApiKeys(gql.app.state.database, cache_seconds=0.0)
        yield gql


async def _key(gql: GraphQLClient, org: str, scopes: Any, **kw: Any) -> str:
    _, secret = await gql.app.state.api_keys.create(org, "test", scopes, **kw)
    return str(secret)


async def _post(gql: GraphQLClient, secret: str | None, query: str, variables: Any = None) -> Any:
    headers = {} if secret is None else {"authorization": f"Bearer {secret}"}
    return await gql.http.post(
        "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
    )


def test_every_root_field_of_the_schema_has_its_scope_in_this_table() -> None:
    fields = set(exported._schema.query_type.fields) | set(exported._schema.mutation_type.fields)
    assert fields == set(FIELD_SCOPES), "give every new root field its scope (section 13)"


async def test_missing_or_bad_keys_answer_401(auth_gql: GraphQLClient, org_id: str) -> None:
    gql = auth_gql
    good = await _key(gql, org_id, [S.ADMIN])
    expired = await _key(
        gql, org_id, [S.ADMIN], expires_at=datetime.now(UTC) + timedelta(seconds=1)
    )
    revoked = await _key(gql, org_id, [S.ADMIN])
    [revoked_id] = [k.id for k in await gql.app.state.api_keys.list(org_id)][-1:]
    await gql.app.state.api_keys.revoke(revoked_id)
    import asyncio

    await asyncio.sleep(1.1)  # the expiring key is past its time
    for headers in (
        {},
        {"authorization": "Bearer"},
        {"authorization": "Bearer sl_garbage"},
        {"authorization": f"Basic {good}"},
        {"authorization": f"Bearer {good[:-1]}x" if good[-1] != "x" else f"Bearer {good[:-1]}y"},
        {"authorization": f"Bearer {expired}"},
        {"authorization": f"Bearer {revoked}"},
    ):
        response = await gql.http.post(
            "/graphql", json={"query": "{ __schema { queryType { name } } }"}, headers=headers
        )
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    ok = await _post(gql, good, "{ __schema { queryType { name } } }")
    assert ok.status_code == 200 and "errors" not in ok.json()
    # The probes and the metrics stay open.
    for path in ("/healthz", "/readyz"):
        assert (await gql.http.get(path)).status_code == 200


async def test_a_key_acts_for_its_own_org(auth_gql: GraphQLClient, org_id: str) -> None:
    """Tenancy (section 13): the served org's stock is not another org's key's to see."""
    served = await _key(auth_gql, org_id, [S.ADMIN])
    other = await _key(auth_gql, f"{org_id}-other", [S.ADMIN])
    query, variables = _operation("restock")
    assert (await _post(auth_gql, served, query, variables)).status_code == 200
    look = '{ balance(sku: "A") { onHand } viewer { org } }'
    assert (await _post(auth_gql, served, look)).json()["data"] == {
        "balance": {"onHand": 1},
        "viewer": {"org": org_id},
    }
    assert (await _post(auth_gql, other, look)).json()["data"] == {
        "balance": None,
        "viewer": {"org": f"{org_id}-other"},
    }


@pytest.mark.parametrize("field", SCOPED)
async def test_each_root_field_needs_its_scope(
    auth_gql: GraphQLClient, org_id: str, field: str
) -> None:
    needed = FIELD_SCOPES[field]
    assert needed is not None
    without = await _key(auth_gql, org_id, [s for s in Scope if s not in (needed, S.ADMIN)])
    with_it = await _key(auth_gql, org_id, [needed])
    query, variables = _operation(field)
    refused = (await _post(auth_gql, without, query, variables)).json()
    assert [e["extensions"]["code"] for e in refused["errors"]] == ["FORBIDDEN"], refused
    assert needed.value in refused["errors"][0]["message"]
    assert refused["errors"][0]["path"] == [field]
    allowed = (await _post(auth_gql, with_it, query, variables)).json()
    assert "FORBIDDEN" not in str(allowed.get("errors")), allowed


async def test_the_transfer_mutation_needs_stock_write(
    auth_gql: GraphQLClient, org_id: str
) -> None:
    """`transfer` names a query (STOCK_READ, in the table above) and a mutation."""
    needed = MUTATION_SCOPES["transfer"]
    without = await _key(auth_gql, org_id, [s for s in Scope if s not in (needed, S.ADMIN)])
    with_it = await _key(auth_gql, org_id, [needed])
    query = "mutation($i: TransferInput!) { transfer(input: $i) { __typename } }"
    variables = {
        "i": {
            "idempotencyKey": uuid.uuid4().hex,
            "fromLocation": "default",
            "toLocation": "elsewhere",
            "lines": [{"sku": "A", "quantity": 1}],
        }
    }
    refused = (await _post(auth_gql, without, query, variables)).json()
    assert [e["extensions"]["code"] for e in refused["errors"]] == ["FORBIDDEN"], refused
    allowed = (await _post(auth_gql, with_it, query, variables)).json()
    assert allowed["data"]["transfer"]["__typename"] == "InsufficientStockError", allowed


def test_only_the_viewer_needs_no_scope() -> None:
    """A field left out of the scoped table must be a deliberate choice, named here."""
    assert UNSCOPED == ["viewer"]


@pytest.mark.parametrize("field", UNSCOPED)
async def test_a_field_needing_no_scope_answers_a_key_with_one_unrelated_scope(
    auth_gql: GraphQLClient, org_id: str, field: str
) -> None:
    # APPROVE_SUPERVISOR opens no root field of today's schema: the least a key can hold.
    least = await _key(auth_gql, org_id, [S.APPROVE_SUPERVISOR])
    query, variables = _operation(field)
    answer = (await _post(auth_gql, least, query, variables)).json()
    assert "errors" not in answer, answer
    # Without any key it is still a 401, like every other field.
    assert (await _post(auth_gql, None, query, variables)).status_code == 401


async def test_a_storefront_asking_for_the_ledger_gets_data_null(
    auth_gql: GraphQLClient, org_id: str
) -> None:
    storefront = await _key(auth_gql, org_id, ROLE_SCOPES[Role.STOREFRONT])
    body = (
        await _post(
            auth_gql,
            storefront,
            '{ balance(sku: "A") { onHand } ledger(first: 1) { edges { cursor } } }',
        )
    ).json()
    assert body["data"] is None  # ledger is non-null: null propagates to data (GraphQL spec)
    assert [(e["path"], e["extensions"]["code"]) for e in body["errors"]] == [
        (["ledger"], "FORBIDDEN")
    ]


async def test_a_refused_mutation_changes_nothing(auth_gql: GraphQLClient, org_id: str) -> None:
    storefront = await _key(auth_gql, org_id, ROLE_SCOPES[Role.STOREFRONT])
    query, variables = _operation("restock")
    refused = (await _post(auth_gql, storefront, query, variables)).json()
    assert refused["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    look = (await _post(auth_gql, storefront, '{ balance(sku: "A") { onHand } }')).json()
    assert look == {"data": {"balance": None}}
