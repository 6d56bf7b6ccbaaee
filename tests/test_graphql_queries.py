"""Every query of the contract over HTTP, on SQLite and MariaDB: values, filters, keyset
pagination across pages, refused arguments, DateTime output, and lines batched per page."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from graphql_helpers import (
    BALANCE,
    LEDGER,
    RESERVATION,
    GraphQLClient,
    app_settings,
    gql_clock_fixture,  # noqa: F401
    gql_fixture,  # noqa: F401
    line,
    serve,
)
from sqlalchemy import event

UTC_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?\+00:00$")

BALANCES = f"""query($f: BalanceFilter, $first: Int!, $after: String) {{
  balances(filter: $f, first: $first, after: $after) {{
    edges {{ cursor node {{ {BALANCE} }} }}
    pageInfo {{ hasNextPage hasPreviousPage startCursor endCursor }}
  }}
}}"""
LEDGER_Q = f"""query($f: LedgerFilter, $first: Int!, $after: String, $d: SortDirection!) {{
  ledger(filter: $f, first: $first, after: $after, direction: $d) {{
    edges {{ cursor node {{ {LEDGER} }} }}
    pageInfo {{ hasNextPage hasPreviousPage startCursor endCursor }}
  }}
}}"""
RESERVATIONS = f"""query($f: ReservationFilter, $first: Int!, $after: String) {{
  reservations(filter: $f, first: $first, after: $after) {{
    edges {{ cursor node {{ {RESERVATION} }} }}
    pageInfo {{ hasNextPage hasPreviousPage startCursor endCursor }}
  }}
}}"""


async def walk(
    gql: GraphQLClient, query: str, field: str, first: int, **variables: Any
) -> list[dict[str, Any]]:
    """Every node of a list, page by page; checks each page's pageInfo on the way."""
    nodes: list[dict[str, Any]] = []
    after = None
    while True:
        data = await gql.data(query, {"first": first, "after": after, **variables})
        conn = data[field]
        info = conn["pageInfo"]
        edges = conn["edges"]
        assert info["hasPreviousPage"] is (after is not None)
        assert len(edges) <= first
        if edges:
            assert info["startCursor"] == edges[0]["cursor"]
            assert info["endCursor"] == edges[-1]["cursor"]
        else:
            assert info["startCursor"] is None and info["endCursor"] is None
        nodes += [x["node"] for x in edges]
        if not info["hasNextPage"]:
            return nodes
        assert len(edges) == first
        after = info["endCursor"]


# ------------------------------------------------------------------ balance(s)


async def test_balance(gql: GraphQLClient) -> None:
    assert await gql.balance("A") is None
    await gql.restock("r", line("A", 5), line("A", 2, "wh2"))
    await gql.reserve("h", line("A", 2))
    data = await gql.data(f'{{ balance(sku: "A") {{ {BALANCE} }} }}')  # location defaults
    b = data["balance"]
    assert (b["sku"], b["location"], b["onHand"], b["reserved"], b["available"]) == (
        "A",
        "default",
        5,
        2,
        3,
    )
    assert b["version"] == 2
    assert UTC_ISO.match(b["updatedAt"]), b["updatedAt"]
    assert (await gql.balance("A", "wh2"))["onHand"] == 2
    assert await gql.balance("a") is None  # compared exactly: no case folding
    assert await gql.balance("A ", "wh2") is None  # nor trailing-space padding
    messages = await gql.errors('{ balance(sku: "") { sku } }')
    assert messages == ["sku: must not be empty"]


async def test_balances_pages_and_filters(gql: GraphQLClient) -> None:
    skus = ["A", "B", "C", "D", "E", "F", "G"]
    await gql.restock("r1", *[line(s, 10) for s in skus])
    await gql.restock("r2", *[line(s, 5, "wh2") for s in skus[:4]])
    await gql.reserve("h", line("B", 8), line("C", 3, "wh2"))
    everything = sorted([("default", s) for s in skus] + [("wh2", s) for s in skus[:4]])

    for first in (1, 3, 11, 50):
        nodes = await walk(gql, BALANCES, "balances", first)
        assert [(n["location"], n["sku"]) for n in nodes] == everything

    by_location = await walk(gql, BALANCES, "balances", 2, f={"location": "wh2"})
    assert [n["sku"] for n in by_location] == ["A", "B", "C", "D"]
    by_sku = await walk(gql, BALANCES, "balances", 2, f={"skus": ["B", "C", "Z"]})
    assert [(n["location"], n["sku"]) for n in by_sku] == [
        ("default", "B"),
        ("default", "C"),
        ("wh2", "B"),
        ("wh2", "C"),
    ]
    low = await walk(gql, BALANCES, "balances", 50, f={"availableBelow": 5})
    assert [(n["location"], n["sku"], n["available"]) for n in low] == [
        ("default", "B", 2),
        ("wh2", "C", 2),
    ]
    combined = await walk(
        gql, BALANCES, "balances", 50, f={"availableBelow": 3, "location": "wh2", "skus": ["C"]}
    )
    assert [(n["location"], n["sku"]) for n in combined] == [("wh2", "C")]
    empty = await walk(gql, BALANCES, "balances", 50, f={"skus": []})
    assert empty == []


async def test_refused_paging_arguments(gql: GraphQLClient) -> None:
    await gql.restock("r", line("A", 1), line("B", 1))
    for first in (0, -1, 501):
        for field in ("balances", "ledger", "reservations"):
            messages = await gql.errors(f"{{ {field}(first: {first}) {{ edges {{ cursor }} }} }}")
            assert messages == [f"first: must be between 1 and 500, got {first}"]
    page = await gql.data(BALANCES, {"first": 1})
    balance_cursor = page["balances"]["pageInfo"]["endCursor"]
    forged = base64.urlsafe_b64encode(json.dumps({"k": "l", "v": "x"}).encode()).decode()
    for bad in ("not-a-cursor", "%%%", balance_cursor + "x", forged, ""):
        messages = await gql.errors(
            "query($a: String) { ledger(after: $a) { edges { cursor } } }", {"a": bad}
        )
        assert len(messages) == 1 and messages[0].startswith("after: is not a valid cursor")
    # A cursor of one list is no cursor of another.
    messages = await gql.errors(
        "query($a: String) { reservations(after: $a) { edges { cursor } } }",
        {"a": balance_cursor},
    )
    assert messages == ["after: is not a valid cursor for this list"]
    # GraphQL itself refuses an argument of the wrong type.
    messages = await gql.errors('{ balances(first: "ten") { edges { cursor } } }')
    assert "Int" in messages[0]


# ------------------------------------------------------------------ ledger


async def test_ledger_pages_both_directions(gql: GraphQLClient) -> None:
    for i in range(6):
        await gql.restock(f"r{i}", line(f"S{i}", i + 1))
    ids = [int(i) for i in await gql.ledger_ids()]
    assert ids == sorted(ids, reverse=True) and len(ids) == 6  # DESC by default

    desc = await walk(gql, LEDGER_Q, "ledger", 4, d="DESC")
    assert [int(n["id"]) for n in desc] == ids
    asc = await walk(gql, LEDGER_Q, "ledger", 4, d="ASC")
    assert [int(n["id"]) for n in asc] == sorted(ids)
    for n in asc:
        assert UTC_ISO.match(n["createdAt"])

    # Cursors stay valid while rows are appended.
    page = await gql.data(LEDGER_Q, {"first": 3, "d": "ASC"})
    cursor = page["ledger"]["pageInfo"]["endCursor"]
    await gql.restock("r-late", line("LATE", 1))
    rest = await gql.data(LEDGER_Q, {"first": 50, "after": cursor, "d": "ASC"})
    assert [n["node"]["sku"] for n in rest["ledger"]["edges"]] == ["S3", "S4", "S5", "LATE"]
    older = await gql.data(
        LEDGER_Q,
        {"first": 50, "after": page["ledger"]["edges"][1]["cursor"], "d": "DESC"},
    )
    assert [n["node"]["sku"] for n in older["ledger"]["edges"]] == ["S0"]


async def test_ledger_filters(gql_clock: GraphQLClient, clock: Any) -> None:
    gql = gql_clock
    ref = {"type": "ORDER", "id": "o-1"}
    await gql.restock("r1", line("A", 10), line("A", 10, "wh2"), line("B", 10))
    clock.advance(60)
    rid = (await gql.reserve("h1", line("A", 2), reference=ref))["reservation"]["id"]
    await gql.ok("deduct", idempotencyKey="d1", reservationId=rid, lines=[line("A", 1)])
    clock.advance(60)
    await gql.ok("adjust", idempotencyKey="a1", sku="B", delta=-1, reason="count")
    entries = await walk(gql, LEDGER_Q, "ledger", 50, d="ASC")
    created = [e["createdAt"] for e in entries]

    async def match(f: dict[str, Any]) -> list[tuple[str, str, str]]:
        nodes = await walk(gql, LEDGER_Q, "ledger", 2, d="ASC", f=f)
        return [(n["eventType"], n["location"], n["sku"]) for n in nodes]

    assert await match({"sku": "A"}) == [
        ("RESTOCK", "default", "A"),
        ("RESTOCK", "wh2", "A"),
        ("RESERVE", "default", "A"),
        ("DEDUCT", "default", "A"),
    ]
    assert await match({"sku": "A", "location": "wh2"}) == [("RESTOCK", "wh2", "A")]
    assert await match({"eventTypes": ["DEDUCT", "ADJUST"]}) == [
        ("DEDUCT", "default", "A"),
        ("ADJUST", "default", "B"),
    ]
    assert await match({"reservationId": rid}) == [
        ("RESERVE", "default", "A"),
        ("DEDUCT", "default", "A"),
    ]
    assert await match({"reservationId": "no-such"}) == []
    assert await match({"reference": ref}) == [
        ("RESERVE", "default", "A"),
        ("DEDUCT", "default", "A"),
    ]
    assert await match({"idempotencyKey": "a1"}) == [("ADJUST", "default", "B")]
    # since is inclusive, until exclusive.
    assert await match({"since": created[3]}) == [
        ("RESERVE", "default", "A"),
        ("DEDUCT", "default", "A"),
        ("ADJUST", "default", "B"),
    ]
    assert await match({"until": created[3]}) == [  # one restock: entries in key order
        ("RESTOCK", "default", "A"),
        ("RESTOCK", "default", "B"),
        ("RESTOCK", "wh2", "A"),
    ]
    assert await match({"since": created[3], "until": created[5]}) == [
        ("RESERVE", "default", "A"),
        ("DEDUCT", "default", "A"),
    ]
    # Another offset for the same instant selects the same entries.
    shifted = (
        datetime.fromisoformat(created[5]).astimezone(timezone(timedelta(hours=5))).isoformat()
    )
    assert await match({"since": shifted}) == [("ADJUST", "default", "B")]
    messages = await gql.errors(
        "query($f: LedgerFilter) { ledger(filter: $f) { edges { cursor } } }",
        {"f": {"since": "2026-01-01T10:00:00"}},
    )
    assert "no UTC offset" in messages[0]


# ------------------------------------------------------------------ reservation(s)


async def test_reservation_by_id(gql: GraphQLClient) -> None:
    await gql.restock("r", line("A", 5), line("B", 5))
    ref = {"type": "CHECKOUT", "id": "c-9"}
    made = (await gql.reserve("h", line("B", 1), line("A", 2), reference=ref))["reservation"]
    data = await gql.data(
        f"query($id: ID!) {{ reservation(id: $id) {{ {RESERVATION} }} }}", {"id": made["id"]}
    )
    assert data["reservation"] == made
    for missing in ("987654321", "x1", "-1"):
        data = await gql.data("query($id: ID!) { reservation(id: $id) { id } }", {"id": missing})
        assert data["reservation"] is None


async def test_reservations_pages_filters_and_batched_lines(
    gql_clock: GraphQLClient, clock: Any
) -> None:
    gql = gql_clock
    await gql.restock("r", line("A", 100), line("B", 100))
    ids = []
    for i in range(7):
        ref = {"type": "ORDER", "id": "even" if i % 2 == 0 else "odd"}
        res = await gql.reserve(
            f"h{i}", line("A", i + 1), line("B", 1), reference=ref, ttlSeconds=60 * (i + 1)
        )
        ids.append(res["reservation"]["id"])
    await gql.ok("release", idempotencyKey="rel", reservationId=ids[1])
    await gql.ok("deduct", idempotencyKey="ded", reservationId=ids[2])

    database = gql.app.state.database
    engines = {database.engine.sync_engine, database.read_engine.sync_engine}
    line_queries: list[str] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "reservation_line" in statement:
            line_queries.append(statement)

    for engine in engines:
        event.listen(engine, "before_cursor_execute", on_execute)
    try:
        nodes = await walk(gql, RESERVATIONS, "reservations", 3)
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", on_execute)
    assert [n["id"] for n in nodes] == ids  # by id, ascending
    assert len(line_queries) == 3  # one per page (3 pages of 3, 3, 1), not one per reservation
    assert [len(n["lines"]) for n in nodes] == [2] * 7
    assert [n["lines"][0]["quantity"] for n in nodes] == [1, 2, 3, 4, 5, 6, 7]
    assert nodes[1]["status"] == "RELEASED" and nodes[1]["lines"][0]["released"] == 2
    assert nodes[2]["status"] == "COMMITTED" and nodes[2]["lines"][0]["deducted"] == 3

    async def match(f: dict[str, Any]) -> list[str]:
        return [n["id"] for n in await walk(gql, RESERVATIONS, "reservations", 2, f=f)]

    assert await match({"status": "ACTIVE"}) == [ids[0], *ids[3:]]
    assert await match({"status": "RELEASED"}) == [ids[1]]
    assert await match({"reference": {"type": "ORDER", "id": "odd"}}) == ids[1::2]
    assert await match({"reference": {"type": "ORDER", "id": "even"}, "status": "ACTIVE"}) == [
        ids[0],
        ids[4],
        ids[6],
    ]
    cutoff = nodes[3]["expiresAt"]  # strictly before the 4th reservation's expiry
    assert await match({"expiresBefore": cutoff}) == ids[:3]
    assert await match({"reference": {"type": "ORDER", "id": "none"}}) == []


async def test_tenants_do_not_see_each_other(database_url: str, org_id: str) -> None:
    async with serve(app_settings(database_url, org_id)) as mine:
        await mine.restock("r", line("A", 5))
        rid = (await mine.reserve("h", line("A", 1)))["reservation"]["id"]
    async with serve(app_settings(database_url, org_id + "-other")) as other:
        assert await other.balance("A") is None
        data = await other.data(
            "query($id: ID!) { reservation(id: $id) { id } "
            "balances { edges { cursor } } ledger { edges { cursor } } "
            "reservations { edges { cursor } } }",
            {"id": rid},
        )
        assert data == {
            "reservation": None,
            "balances": {"edges": []},
            "ledger": {"edges": []},
            "reservations": {"edges": []},
        }
        # The same key in another org is another key.
        assert (await other.restock("r", line("A", 5)))["replayed"] is False
