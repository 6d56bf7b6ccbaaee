"""Global object identification (issue 11 item 5; schema-v2, part LOCATIONS, ``Node``).

Unit tests of ``domain/ids.py`` (the id format: unpadded base64url of ``<Type>:<key>``), then,
over GraphQL on both backends: ``node(id)`` finds a Balance or a Reservation of the caller's
org and answers null for anything else; every rendered reservation id is the opaque one;
inputs take the opaque id and the v1 numeric id alike, and the idempotency hash does not
depend on which of the two a retry uses.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from graphql_helpers import (
    GraphQLClient,
    gql_fixture,  # noqa: F401
    line,
)

from stockledger.domain import ids
from stockledger.domain.access import Scope
from stockledger.domain.validation import canonical_reservation_id, parse_reservation_id


def b64(text: str) -> str:
    """Unpadded base64url of ``text`` (an id spelled by hand, valid or not)."""
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


# ------------------------------------------------------------------ domain/ids.py


def test_the_format_is_unpadded_base64url_of_type_and_key() -> None:
    assert ids.global_id("Reservation", "7") == b64("Reservation:7") == "UmVzZXJ2YXRpb246Nw"
    assert ids.reservation_global_id(7) == "UmVzZXJ2YXRpb246Nw"
    assert ids.balance_global_id("east", "MUG") == b64("Balance:east\x1fMUG")
    assert ids.location_global_id("east") == b64("Location:east")
    assert ids.transfer_global_id(12) == b64("Transfer:12")
    for made in (ids.balance_global_id("é" * 255, "€" * 255), ids.reservation_global_id(1)):
        assert "=" not in made and "+" not in made and "/" not in made
        assert len(made) <= ids.MAX_GLOBAL_ID_LENGTH


@pytest.mark.parametrize(
    ("type_name", "key"),
    [
        ("Reservation", "1"),
        ("Reservation", "999999999999999999"),
        ("Transfer", "42"),
        ("Location", "default"),
        ("Location", "a:b:c"),  # the key may hold the type separator
        ("Balance", "default\x1fSKU-1"),
        ("Balance", "Lager Süd 🏬\x1fT-Shirt (M) / blau"),
        ("Balance", "x" * 255 + "\x1f" + "😀" * 255),
    ],
)
def test_global_ids_round_trip(type_name: str, key: str) -> None:
    made = ids.global_id(type_name, key)
    assert ids.parse_global_id(made) == (type_name, key)


def test_the_typed_helpers_round_trip() -> None:
    assert ids.typed_number_of(ids.RESERVATION, ids.reservation_global_id(123)) == 123
    assert ids.typed_number_of(ids.TRANSFER, ids.transfer_global_id(5)) == 5
    parsed = ids.parse_global_id(ids.balance_global_id("wh-2", "A:B"))
    assert parsed is not None and parsed[0] == ids.BALANCE
    assert ids.balance_key_of(parsed[1]) == ("wh-2", "A:B")
    assert ids.parse_global_id(ids.location_global_id("east")) == (ids.LOCATION, "east")


def test_the_same_key_of_different_types_gives_different_ids() -> None:
    made = {
        ids.reservation_global_id(7),
        ids.transfer_global_id(7),
        ids.location_global_id("7"),
        ids.global_id(ids.BALANCE, "7"),
    }
    assert len(made) == 4
    # and a reservation's id is no transfer's
    assert ids.typed_number_of(ids.TRANSFER, ids.reservation_global_id(7)) is None
    assert ids.typed_number_of(ids.RESERVATION, ids.transfer_global_id(7)) is None
    # different balances never share an id (the separator is no part of a valid string)
    assert ids.balance_global_id("a", "b:c") != ids.balance_global_id("a:b", "c")


MALFORMED: list[Any] = [
    None,
    7,
    b"UmVzZXJ2YXRpb246Nw",
    "",
    "7",  # a v1 numeric id is no global id
    "not base64!",
    "UmVzZXJ2YXRpb246Nw==",  # padded
    "UmVzZXJ2YXRpb246Nw\n",
    " UmVzZXJ2YXRpb246Nw",
    "UmVzZXJ2YXRpb246N",  # a length no base64 text has
    "UmVzZXJ2YXRpb246Nx",  # stray trailing bits: not the canonical spelling
    "UmVz+XJ2YXRpb246Nw",
    "ÜmVzZXJ2YXRpb246Nw",
    b64("Reservation"),  # no separator
    b64(":7"),  # no type
    b64("Reservation:"),  # no key
    base64.urlsafe_b64encode(b"Reservation:\xff").rstrip(b"=").decode(),  # not UTF-8
    "A" * (ids.MAX_GLOBAL_ID_LENGTH + 4),
]


@pytest.mark.parametrize("text", MALFORMED)
def test_anything_malformed_parses_to_none(text: Any) -> None:
    assert ids.parse_global_id(text) is None
    assert ids.typed_number_of(ids.RESERVATION, text) is None


@pytest.mark.parametrize("key", ["", "0", "07", "-1", "+1", "1.0", "1e3", "٣", "1" * 19, "x"])
def test_a_bad_number_key_is_none(key: str) -> None:
    assert ids.number_of(key) is None
    assert ids.typed_number_of(ids.RESERVATION, b64(f"Reservation:{key}")) is None


@pytest.mark.parametrize("key", ["", "default", "\x1fSKU", "default\x1f", "a\x1fb\x1fc"])
def test_a_bad_balance_key_is_none(key: str) -> None:
    assert ids.balance_key_of(key) is None


def test_making_an_id_refuses_what_could_not_round_trip() -> None:
    for bad in [("", "1"), ("Re:servation", "1"), ("Reservation", ""), ("Location", "\ud800")]:
        with pytest.raises(ValueError):
            ids.global_id(*bad)
    for number in (0, -1, True, 10**18):
        with pytest.raises(ValueError):
            ids.reservation_global_id(number)
    for location, sku in [("", "A"), ("x", ""), ("a\x1fb", "c"), ("a", "b\x1fc")]:
        with pytest.raises(ValueError):
            ids.balance_global_id(location, sku)


def test_a_reservation_id_input_takes_both_spellings() -> None:
    opaque = ids.reservation_global_id(42)
    assert parse_reservation_id(opaque) == parse_reservation_id("42") == 42
    assert parse_reservation_id("042") == 42  # v1 took any digits; so does its deprecated form
    assert parse_reservation_id(ids.transfer_global_id(42)) is None
    assert parse_reservation_id(ids.location_global_id("42")) is None
    assert parse_reservation_id("abc") is None
    # what the idempotency hash covers: one spelling per reservation
    assert canonical_reservation_id(opaque) == canonical_reservation_id("42") == "42"
    assert canonical_reservation_id("abc") == "abc"


def test_the_request_hash_does_not_depend_on_the_spelling() -> None:
    from stockledger.domain.commands import Confirm, Deduct, Extend, Release

    opaque = ids.reservation_global_id(42)
    for spelling in (opaque, "42", 42):
        assert (
            Release.validated("k", reservation_id=spelling).request_hash
            == Release.validated("k", reservation_id="42").request_hash
        )
        deduct = Deduct.validated("k", reservation_id=spelling)
        assert deduct.request_hash == Deduct.validated("k", reservation_id="42").request_hash
        assert deduct.reservation_id == 42  # type: ignore[union-attr]
        extend = Extend.validated("k", spelling, 60, max_ttl_seconds=3600)
        assert (
            extend.request_hash
            == Extend.validated("k", "42", 60, max_ttl_seconds=3600).request_hash
        )
        confirm = Confirm.validated("k", reservation_id=spelling)
        assert confirm.request_hash == Confirm.validated("k", reservation_id="42").request_hash
    # another reservation is another request
    assert (
        Release.validated("k", reservation_id=ids.reservation_global_id(43)).request_hash
        != Release.validated("k", reservation_id=opaque).request_hash
    )


# ------------------------------------------------------------------ over GraphQL

NODE = """
query($id: ID!) {
  node(id: $id) {
    __typename
    id
    ... on Balance { sku location onHand reserved committed }
    ... on Reservation { status lines { sku remaining } }
  }
}
"""


async def node(gql: GraphQLClient, node_id: str, secret: str | None = None) -> Any:
    """``data.node`` for ``node_id`` (with another key's ``secret`` when given)."""
    headers = {} if secret is None else {"authorization": f"Bearer {secret}"}
    response = await gql.http.post(
        "/graphql", json={"query": NODE, "variables": {"id": node_id}}, headers=headers
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    return body["data"]["node"]


def number_of(rid: str) -> str:
    """The v1 numeric spelling of an opaque reservation id from a response."""
    number = ids.typed_number_of(ids.RESERVATION, rid)
    assert number is not None, rid
    return str(number)


async def test_node_finds_balances_and_reservations_again(gql: GraphQLClient) -> None:
    await gql.restock("s", line("A", 10), line("B", 4, "east"))
    made = await gql.reserve("r", line("A", 3))
    rid = made["reservation"]["id"]
    assert ids.parse_global_id(rid) is not None  # rendered opaque, not as a number

    found = await node(gql, rid)
    assert found == {
        "__typename": "Reservation",
        "id": rid,
        "status": "ACTIVE",
        "lines": [{"sku": "A", "remaining": 3}],
    }
    data = await gql.data("query($id: ID!) { reservation(id: $id) { id } }", {"id": number_of(rid)})
    assert data == {"reservation": {"id": rid}}

    balances = await gql.data(
        "{ balances(first: 10) { edges { node { id sku location onHand } } } }"
    )
    by_key = {
        (e["node"]["location"], e["node"]["sku"]): e["node"] for e in balances["balances"]["edges"]
    }
    assert by_key[("default", "A")]["id"] == ids.balance_global_id("default", "A")
    assert by_key[("east", "B")]["id"] == ids.balance_global_id("east", "B")
    one = await gql.data('{ balance(sku: "A") { id } }')
    assert one["balance"]["id"] == by_key[("default", "A")]["id"]

    found = await node(gql, by_key[("default", "A")]["id"])
    assert found == {
        "__typename": "Balance",
        "id": ids.balance_global_id("default", "A"),
        "sku": "A",
        "location": "default",
        "onHand": 10,
        "reserved": 3,
        "committed": 0,
    }
    east = await node(gql, by_key[("east", "B")]["id"])
    assert (east["__typename"], east["location"], east["sku"], east["onHand"]) == (
        "Balance",
        "east",
        "B",
        4,
    )


async def test_node_is_null_for_another_orgs_ids(gql: GraphQLClient, org_id: str) -> None:
    await gql.restock("s", line("A", 10))
    rid = (await gql.reserve("r", line("A", 1)))["reservation"]["id"]
    balance_id = ids.balance_global_id("default", "A")
    _, other = await gql.app.state.api_keys.create(f"{org_id}-other", "other", [Scope.ADMIN])
    assert await node(gql, rid, str(other)) is None
    assert await node(gql, balance_id, str(other)) is None
    # the same names in the other org: its own balance, another id-space for reservations
    stocked = await gql.http.post(
        "/graphql",
        json={
            "query": 'mutation { restock(input: {idempotencyKey: "s", lines: [{sku: "A", '
            "quantity: 2}]}) { __typename } }"
        },
        headers={"authorization": f"Bearer {other}"},
    )
    assert stocked.json() == {"data": {"restock": {"__typename": "RestockSuccess"}}}
    theirs = await node(gql, balance_id, str(other))
    assert (theirs["onHand"], theirs["reserved"]) == (2, 0)
    assert await node(gql, rid, str(other)) is None
    mine = await node(gql, balance_id)
    assert (mine["onHand"], mine["reserved"]) == (10, 1)


async def test_node_is_null_for_malformed_or_unknown_ids(gql: GraphQLClient) -> None:
    await gql.restock("s", line("A", 10))
    rid = (await gql.reserve("r", line("A", 1)))["reservation"]["id"]
    texts = [t for t in MALFORMED if isinstance(t, str)] + [
        number_of(rid),  # the v1 numeric id names nothing here: node takes global ids only
        ids.reservation_global_id(999_999_999),  # none such
        ids.transfer_global_id(1),  # no transfer yet
        ids.location_global_id("nowhere"),  # no such location
        ids.global_id("ApiKey", "1"),  # not a Node
        ids.global_id("LedgerEntry", "1"),  # not a Node
        ids.global_id("balance", "default\x1fA"),  # type names are exact
        ids.global_id(ids.RESERVATION, "0" + number_of(rid)),  # not the canonical key
        ids.global_id(ids.BALANCE, "default"),  # no separator
        ids.global_id(ids.BALANCE, "default\x1fB"),  # never stocked
        ids.global_id(ids.BALANCE, "default\x1f" + "A" * 300),  # breaks the string rules
        ids.global_id(ids.BALANCE, "default\x1fA\x1fA"),
        ids.global_id(ids.BALANCE, " \x1fA"),  # a blank location
    ]
    for text in texts:
        assert await node(gql, text) is None, text


async def test_node_needs_stock_read(gql: GraphQLClient, org_id: str) -> None:
    await gql.restock("s", line("A", 10))
    _, ledger_only = await gql.app.state.api_keys.create(org_id, "ledger", [Scope.LEDGER_READ])
    response = await gql.http.post(
        "/graphql",
        json={"query": NODE, "variables": {"id": ids.balance_global_id("default", "A")}},
        headers={"authorization": f"Bearer {ledger_only}"},
    )
    body = response.json()
    assert body["data"] == {"node": None}
    assert [e["extensions"]["code"] for e in body["errors"]] == ["FORBIDDEN"]


async def test_every_rendered_reservation_id_is_the_opaque_one(gql: GraphQLClient) -> None:
    await gql.restock("s", line("A", 10))
    rid = (await gql.reserve("r", line("A", 2)))["reservation"]["id"]
    released = await gql.ok("release", idempotencyKey="rel", reservationId=rid)
    assert [r["id"] for r in released["reservations"]] == [rid]

    ledger = await gql.data(
        "query($r: ID!) { ledger(first: 10, filter: {reservationId: $r}) "
        "{ edges { node { eventType reservationId } } } }",
        {"r": rid},
    )
    entries = [e["node"] for e in ledger["ledger"]["edges"]]
    assert entries == [
        {"eventType": "RELEASE", "reservationId": rid},
        {"eventType": "RESERVE", "reservationId": rid},
    ]
    by_number = await gql.data(
        "query($r: ID!) { ledger(first: 10, filter: {reservationId: $r}) "
        "{ edges { node { eventType } } } }",
        {"r": number_of(rid)},
    )
    assert len(by_number["ledger"]["edges"]) == 2

    again = await gql.mutate("release", idempotencyKey="rel-2", reservationId=rid)
    assert (again["__typename"], again["reservationId"], again["status"]) == (
        "ReservationNotActiveError",
        rid,
        "RELEASED",
    )
    missing = ids.reservation_global_id(999_999_999)
    gone = await gql.mutate("release", idempotencyKey="rel-3", reservationId=missing)
    assert (gone["__typename"], gone["entity"], gone["key"]) == (
        "NotFoundError",
        "Reservation",
        missing,
    )
    # another type's id names no reservation: not found, under the id as sent
    other = ids.transfer_global_id(int(number_of(rid)))
    wrong = await gql.mutate("deduct", idempotencyKey="ded", reservationId=other)
    assert (wrong["__typename"], wrong["key"]) == ("NotFoundError", other)


async def test_the_v1_numeric_id_still_works(gql: GraphQLClient) -> None:
    await gql.restock("s", line("A", 10))
    rid = (await gql.reserve("r", line("A", 4)))["reservation"]["id"]
    numeric = number_of(rid)
    looked = await gql.data(f'{{ reservation(id: "{numeric}") {{ id status }} }}')
    assert looked == {"reservation": {"id": rid, "status": "ACTIVE"}}
    extended = await gql.ok(
        "extendReservation", idempotencyKey="x", reservationId=numeric, ttlSeconds=60
    )
    assert extended["reservation"]["id"] == rid
    part = await gql.ok("release", idempotencyKey="p", reservationId=numeric, lines=[line("A", 1)])
    assert [(r["id"], r["lines"][0]["remaining"]) for r in part["reservations"]] == [(rid, 3)]
    done = await gql.ok("deduct", idempotencyKey="d", reservationId=numeric)
    assert [(r["id"], r["status"]) for r in done["reservations"]] == [(rid, "COMMITTED")]


CONFIRM = """
mutation($input: ConfirmReservationInput!) {
  confirmReservation(input: $input) {
    __typename
    ... on ConfirmReservationSuccess { reservations { id status } replayed }
    ... on Error { code }
  }
}
"""


async def test_a_retry_in_the_other_spelling_replays(gql: GraphQLClient) -> None:
    await gql.restock("s", line("A", 10))
    first = (await gql.reserve("r1", line("A", 4)))["reservation"]["id"]
    second = (await gql.reserve("r2", line("A", 4)))["reservation"]["id"]

    # numeric first, then opaque, with the same key: one release, replayed
    sent = await gql.ok(
        "release", idempotencyKey="rel", reservationId=number_of(first), lines=[line("A", 1)]
    )
    retry = await gql.ok("release", idempotencyKey="rel", reservationId=first, lines=[line("A", 1)])
    assert (sent["replayed"], retry["replayed"]) == (False, True)
    assert retry["reservations"] == sent["reservations"]
    # opaque first, then numeric
    ext = await gql.ok(
        "extendReservation", idempotencyKey="ext", reservationId=first, ttlSeconds=90
    )
    ext_again = await gql.ok(
        "extendReservation", idempotencyKey="ext", reservationId=number_of(first), ttlSeconds=90
    )
    assert (ext["replayed"], ext_again["replayed"]) == (False, True)

    confirmed = await gql.data(CONFIRM, {"input": {"idempotencyKey": "c", "reservationId": second}})
    confirmed_again = await gql.data(
        CONFIRM, {"input": {"idempotencyKey": "c", "reservationId": number_of(second)}}
    )
    assert confirmed["confirmReservation"]["replayed"] is False
    assert confirmed_again["confirmReservation"] == {
        **confirmed["confirmReservation"],
        "replayed": True,
    }

    ded = await gql.ok("deduct", idempotencyKey="ded", reservationId=number_of(first))
    ded_again = await gql.ok("deduct", idempotencyKey="ded", reservationId=first)
    assert (ded["replayed"], ded_again["replayed"]) == (False, True)
    assert (await gql.balance("A"))["onHand"] == 7  # deducted once: 4 - 1 released

    # the same key for another reservation is still a reused key
    reused = await gql.mutate("deduct", idempotencyKey="ded", reservationId=second)
    assert reused["__typename"] == "IdempotencyKeyReusedError"
