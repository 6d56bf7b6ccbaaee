"""Hostile requests of the red team (issue 10, item 7) over HTTP, on SQLite and MariaDB: each is
refused with a clear error, nothing changed, and the server answers ``/healthz`` right after.

- fragments spreading the next one twice, 20 and 30 levels (exponential for a guard that
  re-walks every spread): refused for their cost, as fast as a normal request;
- a chain of 300 fragments: refused for its nesting, no RecursionError;
- with introspection off, no "Did you mean ...?" suggestion names the schema;
- a forged cursor holding a lone surrogate: "not a valid cursor";
- 30,000 lines in the variables: a top-level BAD_USER_INPUT before GraphQL coerces them.

Absolute timings are in ``bench/hostile_requests.py``; here a refusal is only compared with a
normal request (a guard gone exponential is thousands of times slower), and the pytest-timeout
mark makes a document that would hold the event loop for minutes fail instead of hang.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from graphql import parse
from graphql_helpers import (
    GraphQLClient,
    app_settings,
    gql_fixture,  # noqa: F401
    line,
    mutation_document,
    serve,
)
from strawberry.extensions.max_aliases import count_fields_with_alias
from strawberry.extensions.query_depth_limiter import QueryDepthLimiter

from stockledger.resolvers.guards import MAX_FRAGMENT_NESTING, measure_document
from stockledger.resolvers.root import (
    MAX_VARIABLE_CONTAINERS,
    MAX_VARIABLE_LIST,
    MAX_VARIABLE_VALUES,
    oversized_variables,
)
from stockledger.resolvers.root import schema as exported_schema

RESTOCK_INTO = (
    "mutation($i: RestockInput!) { restock(input: $i) { __typename "
    "... on RestockSuccess { balances { ...F0 } } } }"
)
BALANCE_QUERY = '{ balance(sku: "A") { onHand reserved available version } }'


async def seeded(gql: GraphQLClient) -> dict[str, Any]:
    """Some stock and a reservation, then the snapshot a refused request must leave as is."""
    await gql.restock("seed", line("A", 10), line("B", 5, "wh2"))
    await gql.reserve("hold", line("A", 2))
    return await gql.snapshot()


async def assert_healthy(gql: GraphQLClient) -> None:
    response = await gql.http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert await gql.data(BALANCE_QUERY)  # and GraphQL still serves


def doubling_fragments(head: str, levels: int) -> str:
    """``head`` spreading F0; each fragment spreads the next one twice; the last selects sku."""
    parts = [head]
    parts += [f"fragment F{i} on Balance {{ ...F{i + 1} ...F{i + 1} }}" for i in range(levels - 1)]
    parts.append(f"fragment F{levels - 1} on Balance {{ sku }}")
    return "\n".join(parts)


def fragment_chain(head: str, length: int) -> str:
    """``head`` spreading F0; each fragment selects sku and spreads the next one."""
    parts = [head]
    parts += [f"fragment F{i} on Balance {{ sku ...F{i + 1} }}" for i in range(length - 1)]
    parts.append(f"fragment F{length - 1} on Balance {{ onHand }}")
    return "\n".join(parts)


async def timed(gql: GraphQLClient, query: str, variables: dict[str, Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    body = await gql.post(query, variables)
    return time.perf_counter() - start, body


# ------------------------------------------------------------------ fragment expansion


@pytest.mark.timeout(60)  # without the memoized guard, 30 levels hold the loop for minutes
async def test_fragments_spreading_twice_are_refused_fast(gql: GraphQLClient) -> None:
    before = await seeded(gql)
    variables = {"i": {"idempotencyKey": "boom", "lines": [line("A", 1)]}}
    baseline = min([(await timed(gql, BALANCE_QUERY, {}))[0] for _ in range(5)])
    for levels in (20, 30):
        document = doubling_fragments(RESTOCK_INTO, levels)
        assert len(document) < 1600  # about 1 KB
        elapsed, body = await timed(gql, document, variables)
        assert body["data"] is None, body
        [error] = body["errors"]
        assert error["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED", error
        message = error["message"]
        assert message.startswith("'anonymous' has a query cost of "), message
        assert "more than the maximum of 50000" in message
        # A refusal costs about as much as a small query (an exponential walk: 10^3-10^5 x).
        assert elapsed < 100 * baseline, (levels, elapsed, baseline)
        await assert_healthy(gql)
    assert await gql.snapshot() == before


async def test_cost_counts_pages_and_fragment_expansion(
    database_url: str, org_id: str, gql: GraphQLClient
) -> None:
    # A full page of 500 ledger entries with every field costs 11,501: well under the default.
    page = (
        "query($first: Int!) { ledger(first: $first) { edges { cursor node { id eventType sku "
        "location onHandDelta reservedDelta onHandAfter reservedAfter reservationId "
        "reference { type id } reason idempotencyKey createdAt } } "
        "pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }"
    )
    await gql.restock("one", line("A", 1))
    assert len((await gql.data(page, {"first": 500}))["ledger"]["edges"]) == 1
    async with serve(app_settings(database_url, org_id, max_query_cost=11_500)) as tight:
        [message] = await tight.errors(page, {"first": 1})  # a variable counts as 500
        assert message.startswith("'anonymous' has a query cost of 11501, more than the maximum")
        # A literal first counts as given; the same page of 10 costs 231.
        literal = page.replace("($first: Int!)", "").replace("$first", "10")
        assert (await tight.data(literal))["ledger"]["edges"]
        # 50 aliases of a default page (50) of ids: 50 x (1 + 50 x 3) = 7,550 passes.
        aliases = " ".join(f"p{i}: ledger {{ edges {{ node {{ id }} }} }}" for i in range(50))
        assert len(await tight.data(f"{{ {aliases} }}")) == 50
        await assert_healthy(tight)


# ------------------------------------------------------------------ fragment chains


async def test_chain_of_300_fragments_is_refused_cleanly(gql: GraphQLClient) -> None:
    before = await seeded(gql)
    variables = {"i": {"idempotencyKey": "chain", "lines": [line("A", 1)]}}
    body = await gql.post(fragment_chain(RESTOCK_INTO, 300), variables)
    assert body["data"] is None, body
    assert [e["message"] for e in body["errors"]] == [
        f"fragments spread each other 300 deep, from fragment 'F0'; "
        f"at most {MAX_FRAGMENT_NESTING} allowed"
    ]
    assert body["errors"][0]["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    assert "recursion" not in str(body).lower()
    # A cycle of 300 fragments (each spreading the next, the last the first) likewise.
    cycle = fragment_chain(RESTOCK_INTO, 300).replace("{ onHand }", "{ onHand ...F0 }")
    [message] = await gql.errors(cycle, variables)
    assert "within itself" in message and "recursion" not in message.lower()
    assert await gql.snapshot() == before
    await assert_healthy(gql)
    # A chain at the bound is served (graphql-core validates and executes it).
    query = "{ balances(first: 5) { edges { node { ...F0 } } } }"
    data = await gql.data(fragment_chain(query, MAX_FRAGMENT_NESTING))
    nodes = [e["node"] for e in data["balances"]["edges"]]
    assert nodes == [{"sku": "A", "onHand": 10}, {"sku": "B", "onHand": 5}]
    [message] = await gql.errors(fragment_chain(query, MAX_FRAGMENT_NESTING + 1))
    assert message.startswith(f"fragments spread each other {MAX_FRAGMENT_NESTING + 1} deep")


# ------------------------------------------------------------------ suggestions


SUGGESTING = [
    # (document, variables, what graphql-core would suggest)
    ('{ balance(sku: "A") { onHnd } }', None, "onHand"),
    ("{ balances(frist: 2) { edges { cursor } } }", None, "first"),
    ("query($f: LedgerFiltr) { ledger(filter: $f) { edges { cursor } } }", None, "LedgerFilter"),
    (
        "query($d: SortDirection!) { ledger(direction: $d) { edges { cursor } } }",
        {"d": "ASCC"},
        "ASC",
    ),
    ("{ ledger(direction: ASCC) { edges { cursor } } }", None, "ASC"),
    (
        mutation_document("restock"),
        {"input": {"idempotencyKey": "typo", "lines": [line("A", 1)], "reasn": "x"}},
        "reason",
    ),
    (
        mutation_document("restock"),
        {
            "input": {
                "idempotencyKey": "typo",
                "lines": [{"sku": "A", "quantity": 1, "locaton": "x"}],
            }
        },
        "location",
    ),
]


async def test_no_suggestions_when_introspection_is_off(
    database_url: str, org_id: str, gql: GraphQLClient
) -> None:
    before = await seeded(gql)
    closed = app_settings(database_url, org_id, introspection_enabled=False)
    async with serve(closed) as hidden:
        for document, variables, hint in SUGGESTING:
            messages = await hidden.errors(document, variables)
            assert not any("Did you mean" in m or f"'{hint}'" in m for m in messages), messages
        assert await hidden.errors('{ balance(sku: "A") { onHnd } }') == [
            "Cannot query field 'onHnd' on type 'Balance'."
        ]
        assert await hidden.errors("{ __schema { types { name } } }")
        await assert_healthy(hidden)
    # With introspection on the schema is public anyway, and the suggestions stay.
    for document, variables, hint in SUGGESTING:
        messages = await gql.errors(document, variables)
        assert any("Did you mean" in m and f"'{hint}'" in m for m in messages), messages
    assert await gql.snapshot() == before


# ------------------------------------------------------------------ forged cursors


def forged(json_text: bytes) -> str:
    return base64.urlsafe_b64encode(json_text).rstrip(b"=").decode("ascii")


async def test_cursor_with_a_lone_surrogate_is_not_a_valid_cursor(gql: GraphQLClient) -> None:
    before = await seeded(gql)
    page = "query($a: String) { balances(after: $a) { edges { node { sku location } } } }"
    for text in (
        rb'{"k":"b","v":["\ud800","A"]}',
        rb'{"k":"b","v":["default","\udfff"]}',
        rb'{"k":"b","v":["\ud83d","\ude00x"]}',  # halves of a pair in two strings
    ):
        messages = await gql.errors(page, {"a": forged(text)})
        assert messages == ["after: is not a valid cursor"], (text, messages)
    for field in ("ledger", "reservations"):
        messages = await gql.errors(
            f"query($a: String) {{ {field}(after: $a) {{ edges {{ cursor }} }} }}",
            {"a": forged(rb'{"k":"\udc00","v":1}')},
        )
        assert messages == ["after: is not a valid cursor"], messages
    # A whole pair is a character like any other: a cursor past every balance.
    emoji = forged(rb'{"k":"b","v":["\ud83d\ude00","A"]}')
    assert (await gql.data(page, {"a": emoji}))["balances"]["edges"] == []
    assert await gql.snapshot() == before
    await assert_healthy(gql)


# ------------------------------------------------------------------ oversized variables


async def test_thirty_thousand_lines_are_refused_before_coercion(gql: GraphQLClient) -> None:
    before = await seeded(gql)
    lines = [{"sku": f"S{i}", "quantity": 1} for i in range(30_000)]
    variables = {"input": {"idempotencyKey": "x", "lines": lines}}
    payload = json.dumps(
        {"query": mutation_document("restock"), "variables": variables}, separators=(",", ":")
    )
    assert 800_000 < len(payload) < 1_000_000  # the red team's 870 KB, under the body limit
    response = await gql.http.post(
        "/graphql", content=payload, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"] is None, body
    [error] = body["errors"]
    assert error["extensions"] == {"code": "BAD_USER_INPUT"}, error
    assert error["message"] == (
        f"variables: $input.lines has 30000 values; a list may have at most {MAX_VARIABLE_LIST} "
        "(an input takes at most 500 lines or items)"
    )
    # Many lists each under the bound: refused for their total (a batch call's bound + slack).
    carts = [
        {"idempotencyKey": f"c{i}", "lines": [line(f"S{j}", 1) for j in range(500)]}
        for i in range(13)
    ]
    document = (
        "mutation($i: ReserveManyInput!) { reserveMany(input: $i) { results { __typename } } }"
    )
    body = await gql.post(document, {"i": {"carts": carts}})
    assert body["data"] is None, body
    [error] = body["errors"]
    assert error["extensions"] == {"code": "BAD_USER_INPUT"}, error
    assert error["message"].startswith(f"variables: more than {MAX_VARIABLE_VALUES} list values")
    assert await gql.snapshot() == before
    await assert_healthy(gql)


def test_variable_bounds_leave_the_largest_inputs_to_the_domain() -> None:
    # A batch call at its bounds (500 carts, 5,000 lines) and 501 lines (the domain's
    # ValidationError names the field) pass; gross excess is refused, each bound by its own.
    cart = {"idempotencyKey": "k", "reference": {"type": "T", "id": "1"}}
    carts = [{**cart, "lines": [line(f"S{j}", 1) for j in range(10)]} for _ in range(500)]
    assert oversized_variables({"i": {"carts": carts}}) is None
    assert oversized_variables({"i": {"lines": [line("A", 1)] * 501}}) is None
    too_long = oversized_variables({"i": {"lines": [line("A", 1)] * (MAX_VARIABLE_LIST + 1)}})
    assert too_long is not None and too_long.startswith("variables: $i.lines has 1001 values")
    wide = oversized_variables(
        {"i": {"carts": [{f"f{n}": 1 for n in range(MAX_VARIABLE_LIST + 1)}]}}
    )
    assert wide is not None and wide.startswith("variables: $i.carts.0 has 1001 fields")
    many = oversized_variables({"i": [[1] * 1000] * 7})
    assert many is not None and f"more than {MAX_VARIABLE_VALUES} list values" in many
    nested = [{f"a{n}": {} for n in range(999)} for _ in range(13)]
    containers = oversized_variables({"x": nested})
    assert containers is not None and f"more than {MAX_VARIABLE_CONTAINERS} lists" in containers


# ------------------------------------------------------------------ the guard keeps the limits


STRAWBERRY_COMPARED = [
    "{ balances { edges { cursor node { sku } } } }",
    "{ a: balances { edges { b: cursor } } c: ledger { pageInfo { d: endCursor } } }",
    '{ __schema { types { fields { type { ofType { name } } } } } balance(sku: "A") { sku } }',
    "query Q { balances { ...C } } fragment C on BalanceConnection { x: edges { ...E ...E } } "
    "fragment E on BalanceEdge { node { y: sku ... on Balance { z: onHand } } }",
    'mutation M { deduct(input: {idempotencyKey: "k"}) { ... on DeductSuccess { '
    'reservations { lines { sku } } } } } query N { balance(sku: "A") { sku } }',
    doubling_fragments("{ balances { edges { node { ...F0 } } } }", 8),
]


@pytest.mark.parametrize("document", STRAWBERRY_COMPARED)
def test_depth_and_aliases_count_as_strawberrys_limiters(document: str) -> None:
    """The guard's depth and alias counts are those of Strawberry's QueryDepthLimiter and
    MaxAliasesLimiter, which it replaces (their messages are kept too)."""
    graphql_schema = exported_schema._schema
    ast = parse(document)
    depths: dict[str, int] = {}
    [rule] = QueryDepthLimiter(max_depth=100, callback=depths.update).validation_rules
    from graphql import validate

    validate(graphql_schema, ast, [rule])
    fragments = {d.name.value: d for d in ast.definitions if d.kind == "fragment_definition"}
    aliases = sum(
        count_fields_with_alias(d, fragments)
        for d in ast.definitions
        if d.kind == "operation_definition"
    )
    measure = measure_document(graphql_schema, ast)
    assert {name: m.depth for name, _node, m in measure.operations} == depths
    assert measure.aliases == aliases
