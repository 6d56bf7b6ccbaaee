"""The API's limits over HTTP, on SQLite and MariaDB: each oversized or malformed request is
refused with a clear error, and nothing changed (balances, ledger and reservations compared
before and after)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from graphql_helpers import (
    GraphQLClient,
    app_settings,
    gql_fixture,  # noqa: F401
    line,
    mutation_document,
    serve,
)

RESTOCK_TYPENAME = "mutation($i: RestockInput!) { restock(input: $i) { __typename } }"


async def seeded(gql: GraphQLClient) -> dict[str, Any]:
    """Some stock and a reservation, then the snapshot a refused request must leave as is."""
    await gql.restock("seed", line("A", 10), line("B", 5, "wh2"))
    await gql.reserve("hold", line("A", 2))
    return await gql.snapshot()


# ------------------------------------------------------------------ document limits


async def test_too_deep_query_is_refused(
    gql: GraphQLClient, database_url: str, org_id: str
) -> None:
    before = await seeded(gql)
    # Depth counts from 0 at the root field: deduct 0 > reservations 1 > lines 2 > sku 3.
    deep = (
        "mutation($i: DeductInput!) { deduct(input: $i) { ... on DeductSuccess { "
        "reservations { lines { sku } } } } }"
    )
    variables = {"i": {"idempotencyKey": "d", "lines": [line("A", 1)]}}
    async with serve(app_settings(database_url, org_id, max_query_depth=2)) as limited:
        messages = await limited.errors(deep, variables)
        assert messages == ["'anonymous' exceeds maximum operation depth of 2"]
        assert await limited.data("{ balances { edges { cursor } } }")  # depth 2 passes
    assert await gql.snapshot() == before
    # The same request under the default limit (12) goes through.
    result = await gql.data(deep, variables)
    assert result == {"deduct": {"reservations": []}}


async def test_default_depth_limit(gql: GraphQLClient) -> None:
    # The schema is not recursive, so only a nonsense document goes past 12 levels: refused for
    # its depth as well as its unknown fields.
    nested = "{ balances { edges { node { " + "x { " * 12 + "y" + " }" * 12 + " } } } }"
    messages = await gql.errors(nested)
    assert any("exceeds maximum operation depth of 12" in m for m in messages), messages


async def test_thousand_aliases_are_refused(database_url: str, org_id: str) -> None:
    # Tokens raised so that the alias limit is what refuses it.
    async with serve(app_settings(database_url, org_id, max_tokens=100_000)) as gql:
        before = await seeded(gql)
        aliases = " ".join(f"r{i}: restock(input: $i) {{ __typename }}" for i in range(1000))
        document = f"mutation($i: RestockInput!) {{ {aliases} }}"
        messages = await gql.errors(
            document, {"i": {"idempotencyKey": "many", "lines": [line("A", 1)]}}
        )
        assert messages == ["1000 aliases found. Allowed: 50"]
        assert await gql.snapshot() == before
        reads = " ".join(f"b{i}: __typename" for i in range(1000))
        assert (await gql.errors(f"{{ {reads} }}")) == ["1000 aliases found. Allowed: 50"]


async def test_too_many_tokens_are_refused(gql: GraphQLClient) -> None:
    before = await seeded(gql)
    aliases = " ".join(f"r{i}: restock(input: $i) {{ __typename }}" for i in range(1000))
    messages = await gql.errors(
        f"mutation($i: RestockInput!) {{ {aliases} }}",
        {"i": {"idempotencyKey": "many", "lines": [line("A", 1)]}},
    )
    assert messages == ["Syntax Error: Document contains more than 5000 tokens. Parsing aborted."]
    assert await gql.snapshot() == before


# ------------------------------------------------------------------ body size


async def test_two_mib_body_is_refused_with_413(gql: GraphQLClient) -> None:
    before = await seeded(gql)
    padding = "x" * (2 * 1024 * 1024)
    body = {
        "query": RESTOCK_TYPENAME,
        "variables": {"i": {"idempotencyKey": "big", "lines": [line("A", 1)], "reason": padding}},
    }
    response = await gql.http.post("/graphql", json=body)
    assert response.status_code == 413
    message = response.json()["errors"][0]["message"]
    assert message.startswith("request body too large")
    assert "1048576 bytes" in message
    assert await gql.snapshot() == before


async def test_streamed_body_without_length_is_counted(gql: GraphQLClient) -> None:
    before = await seeded(gql)
    chunk = b" " * 65536

    async def stream() -> AsyncIterator[bytes]:
        yield b'{"query": "mutation { restock(input: {idempotencyKey: \\"s\\", lines: [{sku: '
        yield b'\\"A\\", quantity: 1}]}) { __typename } }"'
        for _ in range(40):  # 2.5 MiB of whitespace: valid JSON, too large
            yield chunk
        yield b"}"

    response = await gql.http.post(
        "/graphql", content=stream(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert "more than 1048576 bytes sent" in response.json()["errors"][0]["message"]
    assert await gql.snapshot() == before


async def test_body_just_under_the_limit_is_served(gql: GraphQLClient) -> None:
    await seeded(gql)
    query = '{ balance(sku: "A") { onHand } }'
    body = b'{"query": "' + query.replace('"', '\\"').encode() + b'"}'
    body = body[:-1] + b" " * (1024 * 1024 - len(body)) + b"}"
    assert len(body) == 1024 * 1024
    response = await gql.http.post(
        "/graphql", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"data": {"balance": {"onHand": 10}}}


# ------------------------------------------------------------------ input values


async def test_501_lines_are_a_validation_error(gql: GraphQLClient) -> None:
    before = await seeded(gql)
    for name, extra in (("restock", {}), ("reserve", {}), ("deduct", {})):
        lines = [line(f"S{i}", 1) for i in range(501)]
        result = await gql.mutate(name, idempotencyKey=f"{name}-501", lines=lines, **extra)
        assert result["__typename"] == "ValidationError", result
        assert result["field"] == "lines"
        assert "at most 500 lines" in result["message"]
    rid = before["reservations"]["edges"][0]["node"]["id"]
    result = await gql.mutate(
        "release",
        idempotencyKey="release-501",
        reservationId=rid,
        lines=[line("A", 1) for _ in range(501)],
    )
    assert (result["__typename"], result["field"]) == ("ValidationError", "lines")
    assert await gql.snapshot() == before
    # 500 is allowed.
    ok = await gql.restock("restock-500", *[line(f"S{i}", 1) for i in range(500)])
    assert len(ok["ledgerEntries"]) == 500


async def test_negative_quantity_is_a_validation_error(gql: GraphQLClient) -> None:
    before = await seeded(gql)
    for name in ("restock", "reserve", "deduct"):
        result = await gql.mutate(
            name, idempotencyKey=f"neg-{name}", lines=[line("A", 1), line("B", -5, "wh2")]
        )
        assert result["__typename"] == "ValidationError", result
        assert result["field"] == "lines.1.quantity"
        assert "must be positive" in result["message"]
    above = await gql.mutate("restock", idempotencyKey="huge", lines=[line("A", 1_000_000_001)])
    assert (above["__typename"], above["field"]) == ("ValidationError", "lines.0.quantity")
    # Beyond a 32-bit Int, GraphQL itself refuses the value (a top-level error).
    messages = await gql.errors(
        mutation_document("restock"),
        {"input": {"idempotencyKey": "int", "lines": [line("A", 2**31)]}},
    )
    assert "Int cannot represent non 32-bit signed integer value" in messages[0]
    assert await gql.snapshot() == before


async def test_ten_kb_sku_is_a_validation_error(gql: GraphQLClient) -> None:
    before = await seeded(gql)
    sku = "S" * 10_240
    for name in ("restock", "reserve", "deduct"):
        result = await gql.mutate(name, idempotencyKey=f"long-{name}", lines=[line(sku, 1)])
        assert result["__typename"] == "ValidationError", result
        assert result["field"] == "lines.0.sku"
        assert "at most 255 characters" in result["message"]
    adjust = await gql.mutate("adjust", idempotencyKey="long-adjust", sku=sku, delta=1, reason="x")
    assert (adjust["__typename"], adjust["field"]) == ("ValidationError", "sku")
    long_key = await gql.mutate("restock", idempotencyKey="k" * 10_240, lines=[line("A", 1)])
    assert (long_key["__typename"], long_key["field"]) == ("ValidationError", "idempotencyKey")
    messages = await gql.errors("query($s: String!) { balance(sku: $s) { onHand } }", {"s": sku})
    assert messages == ["sku: must be at most 255 characters"]
    assert await gql.snapshot() == before


async def test_unknown_input_fields_are_rejected_by_graphql(gql: GraphQLClient) -> None:
    before = await seeded(gql)
    messages = await gql.errors(
        mutation_document("restock"),
        {"input": {"idempotencyKey": "u", "lines": [line("A", 1)], "priority": 1}},
    )
    assert "priority" in messages[0]
    assert await gql.snapshot() == before


async def test_malformed_json_is_a_400(gql: GraphQLClient) -> None:
    response = await gql.http.post(
        "/graphql", content=b'{"query": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "JSON" in response.text
