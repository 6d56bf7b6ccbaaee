"""Part LOCATIONS of schema-v2 over HTTP, on SQLite and MariaDB (ARCHITECTURE section 14):
locations (create, update, read, page), transfers (immediate, in transit, partial and whole
receipts, cancels) with every error member of their unions, ``incoming`` and ``stockLevels``,
``transfer``/``transfers``, ``node(id)`` for Location and Transfer across two orgs, and a
replay of every mutation."""

from __future__ import annotations

from typing import Any

from graphql_helpers import (
    GraphQLClient,
    app_settings,
    gql_fixture,  # noqa: F401
    line,
    serve,
)

from stockledger.domain.access import Scope
from stockledger.domain.ids import TRANSFER as TRANSFER_TYPE
from stockledger.domain.ids import (
    balance_global_id,
    location_global_id,
    transfer_global_id,
    typed_number_of,
)
from stockledger.services.reconcile import find_violations

WH, STORE = "wh", "store"

# -------------------------------------------------------------------- documents

LOCATION = "id code name type active createdAt updatedAt"
TRANSFER = (
    "id status fromLocation toLocation reason reference { type id } createdAt updatedAt "
    "lines { sku quantity received remaining returned }"
)
BALANCE = "id sku location onHand reserved available incoming committed version"
ENTRY = "id eventType transferId sku location onHandDelta onHandAfter reason idempotencyKey"
ERRORS = {
    "InsufficientStockError": "shortages { sku location requested available }",
    "LocationUnavailableError": "location exists",
    "NotFoundError": "entity key",
    "TransferNotOpenError": "transferId status",
    "ValidationError": "field",
    "IdempotencyKeyReusedError": "idempotencyKey",
    "LockTimeoutError": "retryAfterMs",
}
TRANSFER_ERRORS = tuple(ERRORS)
LOCATION_ERRORS = ("NotFoundError", "ValidationError", "IdempotencyKeyReusedError")
# mutation -> (input type, success member, its selection, error members)
DOCS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "createLocation": (
        "CreateLocationInput",
        "LocationSuccess",
        f"location {{ {LOCATION} }} replayed",
        LOCATION_ERRORS,
    ),
    "updateLocation": (
        "UpdateLocationInput",
        "LocationSuccess",
        f"location {{ {LOCATION} }} replayed",
        LOCATION_ERRORS,
    ),
    "restock": (
        "RestockInput",
        "RestockSuccess",
        "balances { sku location onHand } replayed",
        ("LocationUnavailableError", "ValidationError", "IdempotencyKeyReusedError"),
    ),
    "reserve": (
        "ReserveInput",
        "ReserveSuccess",
        "reservation { id } replayed",
        ("InsufficientStockError", "LocationUnavailableError", "ValidationError"),
    ),
}
for _name in ("transfer", "receiveTransfer", "cancelTransfer"):
    DOCS[_name] = (
        f"{_name[0].upper()}{_name[1:]}Input",
        "TransferSuccess",
        f"transfer {{ {TRANSFER} }} balances {{ {BALANCE} }} ledgerEntries {{ {ENTRY} }} replayed",
        TRANSFER_ERRORS,
    )


def document(name: str) -> str:
    input_type, success, selection, errors = DOCS[name]
    members = " ".join(f"... on {m} {{ {ERRORS[m]} }}" for m in errors)
    return (
        f"mutation($input: {input_type}!) {{ {name}(input: $input) {{ __typename "
        f"... on {success} {{ {selection} }} ... on Error {{ code message }} {members} }} }}"
    )


async def call(gql: GraphQLClient, mutation: str, /, **input: Any) -> dict[str, Any]:
    """Mutation ``mutation``'s result object (``__typename`` included)."""
    data = await gql.data(document(mutation), {"input": input})
    result: dict[str, Any] = data[mutation]
    return result


async def ok(gql: GraphQLClient, mutation: str, /, **input: Any) -> dict[str, Any]:
    """Like :func:`call`, asserting the success member."""
    result = await call(gql, mutation, **input)
    assert result["__typename"] == DOCS[mutation][1], result
    return result


async def send(
    gql: GraphQLClient, key: str, src: str, dst: str, *lines: tuple[str, int], **extra: Any
) -> dict[str, Any]:
    return await call(
        gql,
        "transfer",
        idempotencyKey=key,
        fromLocation=src,
        toLocation=dst,
        lines=[{"sku": s, "quantity": q} for s, q in lines],
        **extra,
    )


def tlines(*lines: tuple[str, int]) -> list[dict[str, int | str]]:
    return [{"sku": s, "quantity": q} for s, q in lines]


async def figures(gql: GraphQLClient, sku: str, location: str) -> tuple[int, int, int] | None:
    """(onHand, reserved, incoming) of ``balance``, None when there is none."""
    data = await gql.data(
        "query($s: String!, $l: String!) { balance(sku: $s, location: $l) "
        "{ onHand reserved incoming } }",
        {"s": sku, "l": location},
    )
    b = data["balance"]
    return None if b is None else (b["onHand"], b["reserved"], b["incoming"])


async def stock_levels(gql: GraphQLClient, sku: str) -> dict[str, Any] | None:
    data = await gql.data(
        "query($s: String!) { stockLevels(sku: $s) { sku onHand reserved available incoming "
        f"locations {{ {BALANCE} }} }} }}",
        {"s": sku},
    )
    levels: dict[str, Any] | None = data["stockLevels"]
    return levels


async def no_violations(gql: GraphQLClient) -> None:
    service = gql.app.state.service
    assert await find_violations(service.db, service.org_id) == []


def brief(transfer: dict[str, Any]) -> tuple[Any, ...]:
    """(status, [(sku, quantity, received, remaining, returned)])."""
    return (
        transfer["status"],
        [
            (ln["sku"], ln["quantity"], ln["received"], ln["remaining"], ln["returned"])
            for ln in transfer["lines"]
        ],
    )


NODE = """
query($id: ID!) {
  node(id: $id) {
    __typename id
    ... on Location { code name active }
    ... on Transfer { status fromLocation toLocation }
  }
}
"""


async def node(gql: GraphQLClient, node_id: str, secret: str | None = None) -> Any:
    headers = {} if secret is None else {"authorization": f"Bearer {secret}"}
    response = await gql.http.post(
        "/graphql", json={"query": NODE, "variables": {"id": node_id}}, headers=headers
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    return body["data"]["node"]


# -------------------------------------------------------------------- locations


async def test_create_and_update_location_replays_and_errors(gql: GraphQLClient) -> None:
    made = await call(
        gql, "createLocation", idempotencyKey="c1", code=STORE, name="Main", type="STORE"
    )
    assert made["__typename"] == "LocationSuccess" and made["replayed"] is False
    loc = made["location"]
    assert loc["id"] == location_global_id(STORE)
    assert (loc["code"], loc["name"], loc["type"], loc["active"]) == (STORE, "Main", "STORE", True)
    assert loc["createdAt"] and loc["updatedAt"]

    again = await ok(
        gql, "createLocation", idempotencyKey="c1", code=STORE, name="Main", type="STORE"
    )
    assert again == {**made, "replayed": True}
    reused = await call(
        gql, "createLocation", idempotencyKey="c1", code=STORE, name="Other", type="STORE"
    )
    assert (reused["__typename"], reused["code"], reused["idempotencyKey"]) == (
        "IdempotencyKeyReusedError",
        "IDEMPOTENCY_KEY_REUSED",
        "c1",
    )
    exists = await call(gql, "createLocation", idempotencyKey="c2", code=STORE, name="Dup")
    assert (exists["__typename"], exists["code"], exists["field"]) == (
        "ValidationError",
        "VALIDATION_ERROR",
        "code",
    )
    plain = await ok(gql, "createLocation", idempotencyKey="c3", code="wh-9", name="Nine")
    assert plain["location"]["type"] == "WAREHOUSE"  # the input's default

    missing = await call(gql, "updateLocation", idempotencyKey="u0", code="nowhere", name="N")
    assert (missing["__typename"], missing["code"], missing["entity"], missing["key"]) == (
        "NotFoundError",
        "NOT_FOUND",
        "Location",
        "nowhere",
    )
    closed = await ok(
        gql, "updateLocation", idempotencyKey="u1", code=STORE, name="Old", active=False
    )
    assert closed["replayed"] is False
    assert (closed["location"]["name"], closed["location"]["active"]) == ("Old", False)
    assert closed["location"]["createdAt"] == loc["createdAt"]
    closed_again = await ok(
        gql, "updateLocation", idempotencyKey="u1", code=STORE, name="Old", active=False
    )
    assert closed_again == {**closed, "replayed": True}
    reused = await call(gql, "updateLocation", idempotencyKey="u1", code=STORE, active=True)
    assert reused["__typename"] == "IdempotencyKeyReusedError"
    reused = await call(gql, "updateLocation", idempotencyKey="c1", code=STORE, active=True)
    assert reused["__typename"] == "IdempotencyKeyReusedError"  # a create's key

    await gql.restock("s", line("a", 1))  # names `default`: registered if it was not
    data = await gql.data(
        f'{{ store: location(code: "{STORE}") {{ {LOCATION} }} '
        f'default: location(code: "default") {{ code active }} '
        'none: location(code: "nowhere") { code } }'
    )
    assert data["store"] == closed["location"]
    assert data["default"] == {"code": "default", "active": True}
    assert data["none"] is None


async def test_locations_page_forward_and_filter_active(gql: GraphQLClient) -> None:
    codes = [f"loc-{i}" for i in range(5)]
    await gql.restock("s", line("a", 1))  # `default`, registered by its first use
    for code in codes:
        await ok(gql, "createLocation", idempotencyKey=f"c-{code}", code=code, name=code)
    for code in codes[1::2]:
        await ok(gql, "updateLocation", idempotencyKey=f"u-{code}", code=code, active=False)

    async def page(active_only: bool, after: str | None) -> dict[str, Any]:
        data = await gql.data(
            "query($a: Boolean!, $after: String) { locations(activeOnly: $a, first: 2, "
            "after: $after) { edges { cursor node { code active } } "
            "pageInfo { hasNextPage hasPreviousPage endCursor } } }",
            {"a": active_only, "after": after},
        )
        result: dict[str, Any] = data["locations"]
        return result

    async def walk(active_only: bool) -> list[tuple[str, bool]]:
        seen: list[tuple[str, bool]] = []
        after = None
        for _ in range(10):
            got = await page(active_only, after)
            assert len(got["edges"]) <= 2
            assert got["pageInfo"]["hasPreviousPage"] is (after is not None)
            seen += [(e["node"]["code"], e["node"]["active"]) for e in got["edges"]]
            if not got["pageInfo"]["hasNextPage"]:
                return seen
            assert got["pageInfo"]["endCursor"] == got["edges"][-1]["cursor"]
            after = got["pageInfo"]["endCursor"]
        raise AssertionError(f"no last page: {seen}")

    everything = await walk(False)
    assert everything == sorted(everything)  # by code
    assert everything == [
        ("default", True),
        ("loc-0", True),
        ("loc-1", False),
        ("loc-2", True),
        ("loc-3", False),
        ("loc-4", True),
    ]
    assert await walk(True) == [(c, a) for c, a in everything if a]
    default = await gql.data("{ locations { edges { node { code } } } }")
    assert len(default["locations"]["edges"]) == 6  # first defaults to 50


# -------------------------------------------------------------------- transfers


async def test_an_immediate_transfer_and_its_replay(gql: GraphQLClient) -> None:
    await gql.restock("s", line("a", 10, WH), line("b", 4, WH))
    ref = {"type": "REBALANCE", "id": "R-1"}
    moved = await send(
        gql, "t", WH, STORE, ("b", 1), ("a", 3), ("a", 2), reason="rebalance", reference=ref
    )
    assert moved["__typename"] == "TransferSuccess" and moved["replayed"] is False
    t = moved["transfer"]
    assert brief(t) == ("RECEIVED", [("a", 5, 5, 0, 0), ("b", 1, 1, 0, 0)])
    assert (t["fromLocation"], t["toLocation"], t["reason"], t["reference"]) == (
        WH,
        STORE,
        "rebalance",
        ref,
    )
    number = typed_number_of(TRANSFER_TYPE, t["id"])
    assert number is not None and t["id"] == transfer_global_id(number)
    entries = moved["ledgerEntries"]
    assert sorted((e["eventType"], e["location"], e["sku"], e["onHandDelta"]) for e in entries) == [
        ("TRANSFER_IN", STORE, "a", 5),
        ("TRANSFER_IN", STORE, "b", 1),
        ("TRANSFER_OUT", WH, "a", -5),
        ("TRANSFER_OUT", WH, "b", -1),
    ]
    assert {e["transferId"] for e in entries} == {t["id"]}
    assert {(e["reason"], e["idempotencyKey"]) for e in entries} == {("rebalance", "t")}
    balances = {(b["location"], b["sku"]): b for b in moved["balances"]}
    assert {k: (b["onHand"], b["incoming"], b["version"]) for k, b in balances.items()} == {
        (WH, "a"): (5, 0, 2),
        (WH, "b"): (3, 0, 2),
        (STORE, "a"): (5, 0, 1),
        (STORE, "b"): (1, 0, 1),
    }
    for (location, sku), b in balances.items():
        assert b["id"] == balance_global_id(location, sku)
        assert (b["reserved"], b["committed"], b["available"]) == (0, 0, b["onHand"])
    # the store was created as a WAREHOUSE named after its code
    data = await gql.data(f'{{ location(code: "{STORE}") {{ name type active }} }}')
    assert data["location"] == {"name": STORE, "type": "WAREHOUSE", "active": True}

    again = await send(
        gql, "t", WH, STORE, ("b", 1), ("a", 3), ("a", 2), reason="rebalance", reference=ref
    )
    assert again == {**moved, "replayed": True}
    assert await figures(gql, "a", WH) == (5, 0, 0)
    assert await figures(gql, "a", STORE) == (5, 0, 0)
    reused = await send(gql, "t", WH, STORE, ("a", 1))
    assert (reused["__typename"], reused["idempotencyKey"]) == ("IdempotencyKeyReusedError", "t")
    await no_violations(gql)


async def test_in_transit_units_are_incoming_until_received_in_parts(gql: GraphQLClient) -> None:
    await gql.restock("s", line("a", 10, WH), line("a", 1, "other"))
    assert await figures(gql, "a", STORE) is None
    sent = await send(gql, "t", WH, STORE, ("a", 6), inTransit=True)
    assert sent["__typename"] == "TransferSuccess"
    tid = sent["transfer"]["id"]
    assert brief(sent["transfer"]) == ("IN_TRANSIT", [("a", 6, 0, 6, 0)])
    assert [
        (e["eventType"], e["location"], e["onHandDelta"], e["transferId"])
        for e in sent["ledgerEntries"]
    ] == [("TRANSFER_OUT", WH, -6, tid)]
    by_key = {(b["location"], b["sku"]): b for b in sent["balances"]}
    assert (by_key[(STORE, "a")]["onHand"], by_key[(STORE, "a")]["incoming"]) == (0, 6)
    assert by_key[(STORE, "a")]["version"] == 0  # no ledger entry at the destination
    assert (by_key[(WH, "a")]["onHand"], by_key[(WH, "a")]["incoming"]) == (4, 0)
    assert await figures(gql, "a", STORE) == (0, 0, 6)
    assert await figures(gql, "a", WH) == (4, 0, 0)

    levels = await stock_levels(gql, "a")
    assert levels is not None
    assert [b["location"] for b in levels["locations"]] == ["other", STORE, WH]
    for total in ("onHand", "reserved", "available", "incoming"):
        assert levels[total] == sum(b[total] for b in levels["locations"]), total
    assert (levels["sku"], levels["onHand"], levels["incoming"]) == ("a", 5, 6)
    assert await stock_levels(gql, "never") is None
    await no_violations(gql)

    part = await ok(
        gql, "receiveTransfer", idempotencyKey="r1", transferId=tid, lines=tlines(("a", 2))
    )
    assert part["transfer"]["id"] == tid
    assert brief(part["transfer"]) == ("PARTIALLY_RECEIVED", [("a", 6, 2, 4, 0)])
    assert [
        (e["eventType"], e["location"], e["onHandDelta"], e["transferId"])
        for e in part["ledgerEntries"]
    ] == [("TRANSFER_IN", STORE, 2, tid)]
    assert await figures(gql, "a", STORE) == (2, 0, 4)
    part_again = await ok(
        gql, "receiveTransfer", idempotencyKey="r1", transferId=tid, lines=tlines(("a", 2))
    )
    assert part_again["replayed"] is True
    assert part_again["transfer"]["id"] == tid
    assert [e["id"] for e in part_again["ledgerEntries"]] == [
        e["id"] for e in part["ledgerEntries"]
    ]
    assert await figures(gql, "a", STORE) == (2, 0, 4)

    rest = await ok(gql, "receiveTransfer", idempotencyKey="r2", transferId=tid)
    assert brief(rest["transfer"]) == ("RECEIVED", [("a", 6, 6, 0, 0)])
    assert [(e["location"], e["onHandDelta"]) for e in rest["ledgerEntries"]] == [(STORE, 4)]
    assert await figures(gql, "a", STORE) == (6, 0, 0)
    rest_again = await ok(gql, "receiveTransfer", idempotencyKey="r2", transferId=tid)
    assert rest_again == {**rest, "replayed": True}
    levels = await stock_levels(gql, "a")
    assert levels is not None and (levels["onHand"], levels["incoming"]) == (11, 0)

    for name, extra in (("receiveTransfer", {}), ("cancelTransfer", {"reason": "late"})):
        closed = await call(gql, name, idempotencyKey=f"{name}-late", transferId=tid, **extra)
        assert (closed["__typename"], closed["code"], closed["transferId"], closed["status"]) == (
            "TransferNotOpenError",
            "TRANSFER_NOT_OPEN",
            tid,
            "RECEIVED",
        )
    await no_violations(gql)


async def test_cancel_returns_what_is_still_in_transit(gql: GraphQLClient) -> None:
    await gql.restock("s", line("a", 10, WH), line("b", 3, WH))
    sent = await send(gql, "t", WH, STORE, ("a", 6), ("b", 3), inTransit=True)
    tid = sent["transfer"]["id"]
    await ok(gql, "receiveTransfer", idempotencyKey="r1", transferId=tid, lines=tlines(("a", 2)))
    cancelled = await ok(
        gql, "cancelTransfer", idempotencyKey="c", transferId=tid, reason="truck broke down"
    )
    assert brief(cancelled["transfer"]) == ("CANCELLED", [("a", 6, 2, 0, 4), ("b", 3, 0, 0, 3)])
    assert sorted(
        (e["eventType"], e["location"], e["sku"], e["onHandDelta"], e["reason"], e["transferId"])
        for e in cancelled["ledgerEntries"]
    ) == [
        ("TRANSFER_IN", WH, "a", 4, "truck broke down", tid),
        ("TRANSFER_IN", WH, "b", 3, "truck broke down", tid),
    ]
    assert await figures(gql, "a", WH) == (8, 0, 0)
    assert await figures(gql, "b", WH) == (3, 0, 0)
    assert await figures(gql, "a", STORE) == (2, 0, 0)
    assert await figures(gql, "b", STORE) == (0, 0, 0)
    again = await ok(
        gql, "cancelTransfer", idempotencyKey="c", transferId=tid, reason="truck broke down"
    )
    assert again == {**cancelled, "replayed": True}
    assert await figures(gql, "a", WH) == (8, 0, 0)

    for name, extra in (("receiveTransfer", {}), ("cancelTransfer", {"reason": "again"})):
        closed = await call(gql, name, idempotencyKey=f"{name}-2", transferId=tid, **extra)
        assert (closed["__typename"], closed["transferId"], closed["status"]) == (
            "TransferNotOpenError",
            tid,
            "CANCELLED",
        )
    await no_violations(gql)


async def test_refused_transfers_answer_their_union_members_and_change_nothing(
    gql: GraphQLClient,
) -> None:
    await gql.restock("s", line("a", 5, WH))
    await gql.reserve("hold", line("a", 3, WH))
    sent = await send(gql, "t0", WH, STORE, ("a", 1), inTransit=True)
    tid = sent["transfer"]["id"]
    before = await gql.snapshot()

    short = await send(gql, "t1", WH, STORE, ("a", 2), ("zz", 1))  # reserved units stay
    assert (short["__typename"], short["code"]) == ("InsufficientStockError", "INSUFFICIENT_STOCK")
    assert sorted(
        (s["sku"], s["location"], s["requested"], s["available"]) for s in short["shortages"]
    ) == [
        ("a", WH, 2, 1),
        ("zz", WH, 1, 0),
    ]
    same = await send(gql, "t2", WH, WH, ("a", 1))
    assert (same["__typename"], same["code"], same["field"]) == (
        "ValidationError",
        "VALIDATION_ERROR",
        "toLocation",
    )
    over = await call(
        gql, "receiveTransfer", idempotencyKey="r1", transferId=tid, lines=tlines(("a", 2))
    )
    assert (over["__typename"], over["field"]) == ("ValidationError", "lines.0.quantity")
    for unknown in (transfer_global_id(999_999_999), "not-an-id", location_global_id(WH)):
        for name, extra in (("receiveTransfer", {}), ("cancelTransfer", {"reason": "why"})):
            gone = await call(
                gql, name, idempotencyKey=f"{name}-{unknown}", transferId=unknown, **extra
            )
            assert (gone["__typename"], gone["code"], gone["entity"], gone["key"]) == (
                "NotFoundError",
                "NOT_FOUND",
                "Transfer",
                unknown,
            ), gone
    reused = await send(gql, "hold", WH, STORE, ("a", 1))  # a reserve's key
    assert (reused["__typename"], reused["idempotencyKey"]) == ("IdempotencyKeyReusedError", "hold")
    assert await gql.snapshot() == before
    # a refusal consumed no key
    short_again = await send(gql, "t1", WH, STORE, ("a", 1))
    assert short_again["__typename"] == "TransferSuccess" and short_again["replayed"] is False
    await no_violations(gql)


async def test_an_inactive_location_takes_nothing_new_but_can_be_emptied(
    gql: GraphQLClient,
) -> None:
    await ok(gql, "createLocation", idempotencyKey="l", code=STORE, name="Main", type="STORE")
    await gql.restock("s", line("a", 10, STORE), line("a", 10, WH))
    inbound = await send(gql, "in", WH, STORE, ("a", 2), inTransit=True)
    outbound = await send(gql, "out", STORE, WH, ("a", 1), inTransit=True)
    await ok(gql, "updateLocation", idempotencyKey="close", code=STORE, active=False)
    before = await gql.snapshot()

    refusals = [
        await call(gql, "restock", idempotencyKey="s2", lines=[line("a", 1, STORE)]),
        await call(gql, "reserve", idempotencyKey="r2", lines=[line("a", 1, STORE)]),
        await send(gql, "t-in", WH, STORE, ("a", 1)),
        await send(gql, "t-in2", WH, STORE, ("a", 1), inTransit=True),
        await call(
            gql, "receiveTransfer", idempotencyKey="rcv", transferId=inbound["transfer"]["id"]
        ),
    ]
    for refused in refusals:
        assert (refused["__typename"], refused["code"], refused["location"], refused["exists"]) == (
            "LocationUnavailableError",
            "LOCATION_UNAVAILABLE",
            STORE,
            True,
        ), refused
    assert await gql.snapshot() == before

    # what it holds can still leave, and a cancel back to it still lands
    moved = await send(gql, "t-out", STORE, WH, ("a", 3))
    assert moved["__typename"] == "TransferSuccess"
    back = await ok(
        gql,
        "cancelTransfer",
        idempotencyKey="cb",
        transferId=outbound["transfer"]["id"],
        reason="no",
    )
    assert brief(back["transfer"]) == ("CANCELLED", [("a", 1, 0, 0, 1)])
    assert await figures(gql, "a", STORE) == (7, 0, 2)
    await ok(gql, "updateLocation", idempotencyKey="open", code=STORE, active=True)
    received = await ok(
        gql, "receiveTransfer", idempotencyKey="rcv", transferId=inbound["transfer"]["id"]
    )
    assert received["transfer"]["status"] == "RECEIVED"
    assert await figures(gql, "a", STORE) == (9, 0, 0)
    await no_violations(gql)


async def test_transfer_and_transfers_read_back_newest_first(gql: GraphQLClient) -> None:
    await gql.restock("s", line("a", 50, WH), line("b", 50, WH), line("a", 50, STORE))
    made = [
        await send(gql, "t1", WH, STORE, ("a", 1)),
        await send(gql, "t2", WH, "east", ("b", 2), inTransit=True),
        await send(gql, "t3", STORE, WH, ("a", 3), inTransit=True),
        await send(gql, "t4", WH, "east", ("a", 4), ("b", 1), inTransit=True),
        await send(gql, "t5", WH, STORE, ("b", 5), inTransit=True),
    ]
    tids = [m["transfer"]["id"] for m in made]
    await ok(
        gql, "receiveTransfer", idempotencyKey="r4", transferId=tids[3], lines=tlines(("a", 1))
    )
    await ok(gql, "cancelTransfer", idempotencyKey="c5", transferId=tids[4], reason="no")

    got = await gql.data(
        f"query($id: ID!) {{ transfer(id: $id) {{ {TRANSFER} }} }}", {"id": tids[1]}
    )
    assert got["transfer"] == made[1]["transfer"]
    for nothing in (transfer_global_id(999_999_999), "not-an-id", location_global_id(WH)):
        none = await gql.data("query($id: ID!) { transfer(id: $id) { id } }", {"id": nothing})
        assert none == {"transfer": None}

    async def listed(filter: dict[str, Any] | None = None, first: int = 50) -> list[str]:
        ids: list[str] = []
        after = None
        while True:
            data = await gql.data(
                "query($f: TransferFilter, $n: Int!, $after: String) { transfers(filter: $f, "
                "first: $n, after: $after) { edges { cursor node { id } } "
                "pageInfo { hasNextPage hasPreviousPage endCursor } } }",
                {"f": filter, "n": first, "after": after},
            )
            conn = data["transfers"]
            assert conn["pageInfo"]["hasPreviousPage"] is (after is not None)
            ids += [e["node"]["id"] for e in conn["edges"]]
            if not conn["pageInfo"]["hasNextPage"]:
                return ids
            after = conn["pageInfo"]["endCursor"]
            assert len(ids) < 20

    newest_first = tids[::-1]
    assert await listed() == newest_first
    assert await listed(first=2) == newest_first
    assert await listed({"status": "IN_TRANSIT"}) == [tids[2], tids[1]]
    assert await listed({"status": "PARTIALLY_RECEIVED"}) == [tids[3]]
    assert await listed({"status": "CANCELLED"}) == [tids[4]]
    assert await listed({"status": "RECEIVED"}) == [tids[0]]
    assert await listed({"fromLocation": STORE}) == [tids[2]]
    assert await listed({"toLocation": "east"}, first=1) == [tids[3], tids[1]]
    assert await listed({"sku": "b"}) == [tids[4], tids[3], tids[1]]
    assert await listed({"fromLocation": WH, "sku": "a", "status": "RECEIVED"}) == [tids[0]]
    assert await listed({"sku": "never"}) == []
    # east's incoming: 2 b (t2) + 3 a and 1 b still on the way (t4)
    assert await figures(gql, "a", "east") == (1, 0, 3)
    assert await figures(gql, "b", "east") == (0, 0, 3)
    await no_violations(gql)


async def test_ledger_entries_name_their_transfer(gql: GraphQLClient) -> None:
    await gql.restock("s", line("a", 10, WH))
    sent = await send(gql, "t", WH, STORE, ("a", 4), inTransit=True)
    tid = sent["transfer"]["id"]
    await ok(gql, "receiveTransfer", idempotencyKey="r", transferId=tid)
    data = await gql.data(
        '{ ledger(first: 10, filter: {sku: "a"}) { edges { node { eventType location '
        "onHandDelta transferId } } } }"
    )
    assert [tuple(e["node"].values()) for e in data["ledger"]["edges"]] == [
        ("TRANSFER_IN", STORE, 4, tid),
        ("TRANSFER_OUT", WH, -4, tid),
        ("RESTOCK", WH, 10, None),
    ]


# -------------------------------------------------------------------- node(id), two orgs


async def test_node_finds_locations_and_transfers_of_its_own_org_only(
    gql: GraphQLClient, org_id: str
) -> None:
    await ok(gql, "createLocation", idempotencyKey="l", code=STORE, name="Main", type="STORE")
    await gql.restock("s", line("a", 10, WH))
    sent = await send(gql, "t", WH, STORE, ("a", 4), inTransit=True)
    tid = sent["transfer"]["id"]

    assert await node(gql, location_global_id(STORE)) == {
        "__typename": "Location",
        "id": location_global_id(STORE),
        "code": STORE,
        "name": "Main",
        "active": True,
    }
    assert await node(gql, tid) == {
        "__typename": "Transfer",
        "id": tid,
        "status": "IN_TRANSIT",
        "fromLocation": WH,
        "toLocation": STORE,
    }
    assert await node(gql, location_global_id("nowhere")) is None
    assert await node(gql, transfer_global_id(999_999_999)) is None

    _, other = await gql.app.state.api_keys.create(f"{org_id}-other", "other", [Scope.ADMIN])
    assert await node(gql, tid, str(other)) is None
    assert await node(gql, location_global_id(STORE), str(other)) is None
    theirs = await gql.http.post(
        "/graphql",
        json={
            "query": 'query($id: ID!) { transfer(id: $id) { id } location(code: "store") '
            "{ code } transfers { edges { node { id } } } }",
            "variables": {"id": tid},
        },
        headers={"authorization": f"Bearer {other}"},
    )
    assert theirs.json() == {
        "data": {"transfer": None, "location": None, "transfers": {"edges": []}}
    }
    # their receive of my transfer: not found, and mine stays in transit
    gone = await gql.http.post(
        "/graphql",
        json={
            "query": document("receiveTransfer"),
            "variables": {"input": {"idempotencyKey": "x", "transferId": tid}},
        },
        headers={"authorization": f"Bearer {other}"},
    )
    assert gone.json()["data"]["receiveTransfer"]["__typename"] == "NotFoundError"
    assert (await node(gql, tid))["status"] == "IN_TRANSIT"
    assert await figures(gql, "a", STORE) == (0, 0, 4)


async def test_unknown_locations_by_default_and_when_registration_is_required(
    gql: GraphQLClient, database_url: str, org_id: str
) -> None:
    await gql.restock("s", line("a", 5, WH))
    short = await send(gql, "t1", "nowhere", WH, ("a", 1))  # an unknown source holds nothing
    assert short["__typename"] == "InsufficientStockError"
    assert [(s["location"], s["requested"], s["available"]) for s in short["shortages"]] == [
        ("nowhere", 1, 0)
    ]
    assert (await gql.data('{ location(code: "nowhere") { code } }'))["location"] is None

    strict = app_settings(database_url, org_id, require_registered_locations=True)
    async with serve(strict) as only_registered:
        refusals = [
            ("elsewhere", await send(only_registered, "t2", WH, "elsewhere", ("a", 1))),
            ("elsewhere", await send(only_registered, "t3", "elsewhere", WH, ("a", 1))),
            (
                "x",
                await call(
                    only_registered, "restock", idempotencyKey="s2", lines=[line("a", 1, "x")]
                ),
            ),
        ]
        for location, refused in refusals:
            assert (refused["__typename"], refused["location"], refused["exists"]) == (
                "LocationUnavailableError",
                location,
                False,
            ), refused
        refused = await send(only_registered, "t4", WH, STORE, ("a", 1))  # not registered yet
        assert (refused["__typename"], refused["exists"]) == ("LocationUnavailableError", False)
        await ok(only_registered, "createLocation", idempotencyKey="l", code=STORE, name="S")
        moved = await send(only_registered, "t4", WH, STORE, ("a", 1))
        assert moved["__typename"] == "TransferSuccess"
        assert await figures(only_registered, "a", STORE) == (1, 0, 0)
