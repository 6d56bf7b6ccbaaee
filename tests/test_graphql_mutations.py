"""Every mutation of the contract over HTTP, on SQLite and MariaDB: success, each reachable
error member of its result union, replays of an idempotency key, and (with a stub service) the
mapping of every domain failure to its union member and of unexpected errors to a masked one."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import pytest
from graphql_helpers import (
    MUTATIONS,
    GraphQLClient,
    gql_clock_fixture,  # noqa: F401
    gql_fixture,  # noqa: F401
    line,
    serve,
    serve_service,
)
from prometheus_client import REGISTRY
from sqlalchemy import event

from stockledger.db.engine import Database
from stockledger.domain.ids import reservation_global_id
from stockledger.locks import Claim
from stockledger.services import errors as e

UTC_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?\+00:00$")


def parse_time(value: str) -> datetime:
    assert UTC_ISO.match(value), value
    return datetime.fromisoformat(value)


# ------------------------------------------------------------------ restock


async def test_restock_success_and_replay(gql: GraphQLClient) -> None:
    ref = {"type": "PO", "id": "PO-1"}
    first = await gql.restock(
        "r-1", line("A", 5), line("B", 3, "wh2"), line("A", 2), reference=ref, reason="delivery"
    )
    assert first["replayed"] is False
    balances = {(b["location"], b["sku"]): b for b in first["balances"]}
    assert balances[("default", "A")]["onHand"] == 7  # lines for the same key are summed
    assert balances[("default", "A")]["available"] == 7
    assert balances[("default", "A")]["version"] == 1
    assert balances[("wh2", "B")]["onHand"] == 3
    entries = first["ledgerEntries"]
    assert sorted((x["location"], x["sku"], x["onHandDelta"]) for x in entries) == [
        ("default", "A", 7),
        ("wh2", "B", 3),
    ]
    for x in entries:
        assert x["eventType"] == "RESTOCK"
        assert x["reference"] == ref
        assert x["reason"] == "delivery"
        assert x["idempotencyKey"] == "r-1"
        assert x["reservedDelta"] == 0
        assert x["reservationId"] is None
        parse_time(x["createdAt"])
    parse_time(balances[("default", "A")]["updatedAt"])

    again = await gql.restock(
        "r-1", line("A", 5), line("B", 3, "wh2"), line("A", 2), reference=ref, reason="delivery"
    )
    assert again["replayed"] is True
    assert {x["id"] for x in again["ledgerEntries"]} == {x["id"] for x in entries}
    assert (await gql.balance("A"))["onHand"] == 7  # not 14
    assert len(await gql.ledger_ids()) == 2


async def test_restock_key_reused_with_another_payload(gql: GraphQLClient) -> None:
    await gql.restock("r-1", line("A", 5))
    before = await gql.snapshot()
    result = await gql.mutate("restock", idempotencyKey="r-1", lines=[line("A", 6)])
    assert result["__typename"] == "IdempotencyKeyReusedError"
    assert result["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert result["idempotencyKey"] == "r-1"
    assert "r-1" in result["message"]
    assert await gql.snapshot() == before


async def test_restock_validation_errors_change_nothing(gql: GraphQLClient) -> None:
    await gql.restock("seed", line("A", 1))
    before = await gql.snapshot()
    cases = [
        ([], "lines"),
        ([line("A", 0)], "lines.0.quantity"),
        ([line("A", 1), line("", 1)], "lines.1.sku"),
        ([line("A", 1, "   ")], "lines.0.location"),
        ([line("A\x00", 1)], "lines.0.sku"),
    ]
    for i, (lines, field) in enumerate(cases):
        result = await gql.mutate("restock", idempotencyKey=f"bad-{i}", lines=lines)
        assert result["__typename"] == "ValidationError", result
        assert result["code"] == "VALIDATION_ERROR"
        assert result["field"] == field
        assert field in result["message"]
    reserved_key = await gql.mutate("restock", idempotencyKey="expire:1", lines=[line("A", 1)])
    assert reserved_key["__typename"] == "ValidationError"
    assert reserved_key["field"] == "idempotencyKey"
    assert await gql.snapshot() == before
    # A refused request did not consume its key.
    assert (await gql.restock("bad-0", line("A", 1)))["replayed"] is False


# ------------------------------------------------------------------ adjust


async def test_adjust_delta_set_and_compare_and_set(gql: GraphQLClient) -> None:
    await gql.restock("r", line("A", 10))
    down = await gql.ok("adjust", idempotencyKey="a-1", sku="A", delta=-3, reason="damaged")
    assert down["balance"]["onHand"] == 7
    assert down["balance"]["version"] == 2
    entry = down["ledgerEntry"]
    assert (entry["eventType"], entry["onHandDelta"], entry["onHandAfter"]) == ("ADJUST", -3, 7)
    assert entry["reason"] == "damaged"
    assert down["replayed"] is False

    counted = await gql.ok(
        "adjust", idempotencyKey="a-2", sku="A", setOnHand=12, expectedVersion=2, reason="count"
    )
    assert counted["balance"]["onHand"] == 12
    assert counted["ledgerEntry"]["onHandDelta"] == 5

    conflict = await gql.mutate(
        "adjust", idempotencyKey="a-3", sku="A", delta=1, expectedVersion=2, reason="stale"
    )
    assert conflict["__typename"] == "VersionConflictError"
    assert (conflict["expectedVersion"], conflict["actualVersion"]) == (2, 3)
    assert conflict["code"] == "VERSION_CONFLICT"

    replay = await gql.ok("adjust", idempotencyKey="a-1", sku="A", delta=-3, reason="damaged")
    assert replay["replayed"] is True
    assert replay["ledgerEntry"]["id"] == entry["id"]
    assert (await gql.balance("A"))["onHand"] == 12

    new = await gql.ok(
        "adjust", idempotencyKey="a-4", sku="NEW", location="wh9", setOnHand=4, reason="count"
    )
    assert (new["balance"]["sku"], new["balance"]["location"], new["balance"]["onHand"]) == (
        "NEW",
        "wh9",
        4,
    )


async def test_adjust_below_reserved_and_validation(gql: GraphQLClient) -> None:
    await gql.restock("r", line("A", 10))
    await gql.reserve("h", line("A", 6))
    before = await gql.snapshot()
    short = await gql.mutate("adjust", idempotencyKey="a-1", sku="A", delta=-5, reason="loss")
    assert short["__typename"] == "InsufficientStockError"
    assert short["code"] == "INSUFFICIENT_STOCK"
    assert short["shortages"] == [
        {"sku": "A", "location": "default", "requested": 5, "available": 4}
    ]
    both = await gql.mutate(
        "adjust", idempotencyKey="a-2", sku="A", delta=1, setOnHand=3, reason="x"
    )
    assert both["__typename"] == "ValidationError"
    assert both["field"] == "delta"
    neither = await gql.mutate("adjust", idempotencyKey="a-3", sku="A", reason="x")
    assert neither["__typename"] == "ValidationError"
    no_reason = await gql.mutate("adjust", idempotencyKey="a-4", sku="A", delta=1, reason="")
    assert (no_reason["__typename"], no_reason["field"]) == ("ValidationError", "reason")
    assert await gql.snapshot() == before


# ------------------------------------------------------------------ reserve


async def test_reserve_success_replay_and_errors(gql: GraphQLClient) -> None:
    await gql.restock("r", line("A", 5), line("B", 2, "wh2"))
    ref = {"type": "CHECKOUT", "id": "c-1"}
    res = await gql.reserve("h-1", line("A", 2), line("B", 2, "wh2"), reference=ref, ttlSeconds=60)
    reservation = res["reservation"]
    assert reservation["status"] == "ACTIVE"
    assert reservation["reference"] == ref
    assert sorted(
        (x["location"], x["sku"], x["quantity"], x["remaining"]) for x in reservation["lines"]
    ) == [
        ("default", "A", 2, 2),
        ("wh2", "B", 2, 2),
    ]
    created = parse_time(reservation["createdAt"])
    assert (parse_time(reservation["expiresAt"]) - created).total_seconds() == pytest.approx(60)
    assert {(b["sku"], b["reserved"], b["available"]) for b in res["balances"]} == {
        ("A", 2, 3),
        ("B", 2, 0),
    }

    again = await gql.reserve(
        "h-1", line("A", 2), line("B", 2, "wh2"), reference=ref, ttlSeconds=60
    )
    assert again["replayed"] is True
    assert again["reservation"]["id"] == reservation["id"]
    assert len(again["reservation"]["lines"]) == 2
    assert (await gql.balance("A"))["reserved"] == 2

    before = await gql.snapshot()
    short = await gql.mutate(
        "reserve", idempotencyKey="h-2", lines=[line("A", 4), line("B", 1, "wh2"), line("Z", 1)]
    )
    assert short["__typename"] == "InsufficientStockError"
    assert sorted((s["sku"], s["requested"], s["available"]) for s in short["shortages"]) == [
        ("A", 4, 3),
        ("B", 1, 0),
        ("Z", 1, 0),  # never stocked: available 0
    ]
    too_long = await gql.mutate(
        "reserve", idempotencyKey="h-3", lines=[line("A", 1)], ttlSeconds=7 * 24 * 3600 + 1
    )
    assert (too_long["__typename"], too_long["field"]) == ("ValidationError", "ttlSeconds")
    reused = await gql.mutate("reserve", idempotencyKey="h-1", lines=[line("A", 1)])
    assert reused["__typename"] == "IdempotencyKeyReusedError"
    assert await gql.snapshot() == before


# ------------------------------------------------------------------ release


async def test_release_by_id_partial_then_rest(gql: GraphQLClient) -> None:
    await gql.restock("r", line("A", 5), line("B", 5))
    rid = (await gql.reserve("h", line("A", 3), line("B", 2)))["reservation"]["id"]

    part = await gql.ok("release", idempotencyKey="rel-1", reservationId=rid, lines=[line("A", 1)])
    [res] = part["reservations"]
    assert res["status"] == "ACTIVE"
    assert {x["sku"]: (x["remaining"], x["released"]) for x in res["lines"]} == {
        "A": (2, 1),
        "B": (2, 0),
    }
    assert [(b["sku"], b["reserved"]) for b in part["balances"]] == [("A", 2)]

    rest = await gql.ok("release", idempotencyKey="rel-2", reservationId=rid)
    assert rest["reservations"][0]["status"] == "RELEASED"
    assert (await gql.balance("A"))["reserved"] == 0
    assert (await gql.balance("B"))["reserved"] == 0

    replay = await gql.ok("release", idempotencyKey="rel-2", reservationId=rid)
    assert replay["replayed"] is True
    assert replay["reservations"][0]["status"] == "RELEASED"

    before = await gql.snapshot()
    not_active = await gql.mutate("release", idempotencyKey="rel-3", reservationId=rid)
    assert not_active["__typename"] == "ReservationNotActiveError"
    assert not_active["code"] == "RESERVATION_NOT_ACTIVE"
    assert (not_active["reservationId"], not_active["status"]) == (rid, "RELEASED")
    assert await gql.snapshot() == before


async def test_release_by_reference_and_errors(gql: GraphQLClient) -> None:
    await gql.restock("r", line("A", 10))
    ref = {"type": "ORDER", "id": "o-1"}
    first = (await gql.reserve("h1", line("A", 2), reference=ref))["reservation"]["id"]
    second = (await gql.reserve("h2", line("A", 3), reference=ref))["reservation"]["id"]
    before = await gql.snapshot()

    missing = await gql.mutate("release", idempotencyKey="x1", reservationId="999999999")
    assert missing["__typename"] == "NotFoundError"
    # a v1 numeric id that names nothing: the key is its opaque id, as Reservation.id
    assert (missing["entity"], missing["key"], missing["code"]) == (
        "Reservation",
        reservation_global_id(999999999),
        "NOT_FOUND",
    )
    no_ref = await gql.mutate(
        "release", idempotencyKey="x2", reference={"type": "ORDER", "id": "nope"}
    )
    assert (no_ref["__typename"], no_ref["key"]) == ("NotFoundError", "ORDER:nope")
    too_much = await gql.mutate("release", idempotencyKey="x3", reference=ref, lines=[line("A", 6)])
    assert (too_much["__typename"], too_much["field"]) == ("ValidationError", "lines.0.quantity")
    not_held = await gql.mutate(
        "release", idempotencyKey="x4", reservationId=first, lines=[line("B", 1)]
    )
    assert (not_held["__typename"], not_held["field"]) == ("ValidationError", "lines.0.sku")
    both = await gql.mutate("release", idempotencyKey="x5", reservationId=first, reference=ref)
    assert both["__typename"] == "ValidationError"
    assert await gql.snapshot() == before

    # Oldest first: 4 units take all 2 of the first and 2 of the second reservation.
    done = await gql.ok("release", idempotencyKey="x6", reference=ref, lines=[line("A", 4)])
    by_id = {r["id"]: r for r in done["reservations"]}
    assert by_id[first]["status"] == "RELEASED"
    assert by_id[second]["status"] == "ACTIVE"
    assert by_id[second]["lines"][0]["remaining"] == 1
    assert (await gql.balance("A"))["reserved"] == 1


async def test_release_of_an_expired_reservation(gql_clock: GraphQLClient, clock: Any) -> None:
    gql = gql_clock
    await gql.restock("r", line("A", 5))
    rid = (await gql.reserve("h", line("A", 2), ttlSeconds=30))["reservation"]["id"]
    clock.advance(31)
    result = await gql.mutate("release", idempotencyKey="late", reservationId=rid)
    assert result["__typename"] == "ReservationNotActiveError"
    assert (result["reservationId"], result["status"]) == (rid, "EXPIRED")
    # The expiry itself committed (section 11), the caller's key was not consumed.
    assert (await gql.balance("A"))["reserved"] == 0
    data = await gql.data(
        "query($id: ID!) { reservation(id: $id) { status lines { remaining released } } }",
        {"id": rid},
    )
    assert data["reservation"] == {"status": "EXPIRED", "lines": [{"remaining": 0, "released": 2}]}
    fresh = await gql.ok("restock", idempotencyKey="late", lines=[line("A", 1)])
    assert fresh["replayed"] is False


# ------------------------------------------------------------------ deduct


async def test_deduct_reserved_and_direct(gql: GraphQLClient) -> None:
    await gql.restock("r", line("A", 10), line("B", 4))
    rid = (await gql.reserve("h", line("A", 3)))["reservation"]["id"]

    committed = await gql.ok("deduct", idempotencyKey="d-1", reservationId=rid)
    assert committed["reservations"][0]["status"] == "COMMITTED"
    assert committed["reservations"][0]["lines"][0]["deducted"] == 3
    [entry] = committed["ledgerEntries"]
    assert (entry["eventType"], entry["onHandDelta"], entry["reservedDelta"]) == (
        "DEDUCT",
        -3,
        -3,
    )
    assert entry["reservationId"] == rid
    assert [(b["sku"], b["onHand"], b["reserved"]) for b in committed["balances"]] == [("A", 7, 0)]

    direct = await gql.ok("deduct", idempotencyKey="d-2", lines=[line("B", 4)])
    assert direct["reservations"] == []
    assert direct["ledgerEntries"][0]["reservationId"] is None
    assert (await gql.balance("B"))["onHand"] == 0

    replay = await gql.ok("deduct", idempotencyKey="d-2", lines=[line("B", 4)])
    assert replay["replayed"] is True
    assert (await gql.balance("B"))["onHand"] == 0

    before = await gql.snapshot()
    short = await gql.mutate("deduct", idempotencyKey="d-3", lines=[line("B", 1)])
    assert short["__typename"] == "InsufficientStockError"
    assert short["shortages"] == [
        {"sku": "B", "location": "default", "requested": 1, "available": 0}
    ]
    no_lines = await gql.mutate("deduct", idempotencyKey="d-4")
    assert (no_lines["__typename"], no_lines["field"]) == ("ValidationError", "lines")
    gone = await gql.mutate("deduct", idempotencyKey="d-5", reservationId=rid)
    assert (gone["__typename"], gone["status"]) == ("ReservationNotActiveError", "COMMITTED")
    missing = await gql.mutate("deduct", idempotencyKey="d-6", reservationId="abc")
    assert (missing["__typename"], missing["key"]) == ("NotFoundError", "abc")
    reused = await gql.mutate("deduct", idempotencyKey="d-1", lines=[line("A", 1)])
    assert reused["__typename"] == "IdempotencyKeyReusedError"
    assert await gql.snapshot() == before


# ------------------------------------------------------------------ extendReservation


async def test_extend_reservation(gql_clock: GraphQLClient, clock: Any) -> None:
    gql = gql_clock
    await gql.restock("r", line("A", 5))
    res = (await gql.reserve("h", line("A", 1), ttlSeconds=60))["reservation"]
    rid = res["id"]
    clock.advance(30)
    ext = await gql.ok("extendReservation", idempotencyKey="e-1", reservationId=rid, ttlSeconds=600)
    new_expiry = parse_time(ext["reservation"]["expiresAt"])
    assert (new_expiry - parse_time(res["expiresAt"])).total_seconds() == pytest.approx(570, abs=2)
    assert ext["reservation"]["lines"][0]["remaining"] == 1
    assert ext["replayed"] is False
    replay = await gql.ok(
        "extendReservation", idempotencyKey="e-1", reservationId=rid, ttlSeconds=600
    )
    assert replay["replayed"] is True
    assert replay["reservation"]["expiresAt"] == ext["reservation"]["expiresAt"]

    before = await gql.snapshot()
    bad_ttl = await gql.mutate(
        "extendReservation", idempotencyKey="e-2", reservationId=rid, ttlSeconds=0
    )
    assert (bad_ttl["__typename"], bad_ttl["field"]) == ("ValidationError", "ttlSeconds")
    missing = await gql.mutate(
        "extendReservation", idempotencyKey="e-3", reservationId="424242424", ttlSeconds=60
    )
    assert missing["__typename"] == "NotFoundError"
    reused = await gql.mutate(
        "extendReservation", idempotencyKey="e-1", reservationId=rid, ttlSeconds=60
    )
    assert reused["__typename"] == "IdempotencyKeyReusedError"
    assert await gql.snapshot() == before

    await gql.ok("release", idempotencyKey="rel", reservationId=rid)
    done = await gql.mutate(
        "extendReservation", idempotencyKey="e-4", reservationId=rid, ttlSeconds=60
    )
    assert (done["__typename"], done["status"]) == ("ReservationNotActiveError", "RELEASED")


# ------------------------------------------------------------------ confirmReservation

CONFIRM = """
mutation($input: ConfirmReservationInput!) {
  confirmReservation(input: $input) {
    __typename
    ... on ConfirmReservationSuccess {
      reservations { id status expiresAt lines { sku remaining } }
      balances { sku reserved available version committed }
      replayed
    }
    ... on ReservationNotActiveError { reservationId status }
    ... on ValidationError { field }
    ... on NotFoundError { entity key }
  }
}
"""
COMMITTED = """
query {
  balances(first: 10) { edges { node { sku reserved committed version } } }
  balance(sku: "A") { committed }
}
"""


async def test_confirm_reservation(gql_clock: GraphQLClient, clock: Any) -> None:
    gql = gql_clock
    await gql.restock("r", line("A", 5), line("B", 5))
    rid = (await gql.reserve("h", line("A", 2), ttlSeconds=60))["reservation"]["id"]
    await gql.reserve("h2", line("B", 1), ttlSeconds=60)

    async def confirm(**input: Any) -> dict[str, Any]:
        result: dict[str, Any] = (await gql.data(CONFIRM, {"input": input}))["confirmReservation"]
        return result

    done = await confirm(idempotencyKey="c-1", reservationId=rid)
    assert done == {
        "__typename": "ConfirmReservationSuccess",
        "reservations": [
            {
                "id": rid,
                "status": "CONFIRMED",
                "expiresAt": None,
                "lines": [{"sku": "A", "remaining": 2}],
            }
        ],
        "balances": [{"sku": "A", "reserved": 2, "available": 3, "version": 2, "committed": 2}],
        "replayed": False,
    }
    replay = await confirm(idempotencyKey="c-1", reservationId=rid)
    assert replay["replayed"] is True and replay["reservations"] == done["reservations"]
    again = await confirm(idempotencyKey="c-2", reservationId=rid)
    assert again == {
        "__typename": "ReservationNotActiveError",
        "reservationId": rid,
        "status": "CONFIRMED",
    }
    both = await confirm(
        idempotencyKey="c-3", reservationId=rid, reference={"type": "O", "id": "1"}
    )
    assert both == {"__typename": "ValidationError", "field": "reservationId"}

    clock.advance(3600)  # past its old expiry: still held (B's is due, counted until swept)
    data = await gql.data(COMMITTED)
    assert [e["node"] for e in data["balances"]["edges"]] == [
        {"sku": "A", "reserved": 2, "committed": 2, "version": 2},
        {"sku": "B", "reserved": 1, "committed": 0, "version": 2},
    ]
    assert data["balance"] == {"committed": 2}
    extend = await gql.mutate(
        "extendReservation", idempotencyKey="e-1", reservationId=rid, ttlSeconds=60
    )
    assert (extend["__typename"], extend["status"]) == ("ReservationNotActiveError", "CONFIRMED")
    await gql.ok("deduct", idempotencyKey="d-1", reservationId=rid, lines=[line("A", 1)])
    assert (await gql.data(COMMITTED))["balance"] == {"committed": 1}
    last = await gql.ok("deduct", idempotencyKey="d-2", reservationId=rid)
    assert last["reservations"][0]["status"] == "COMMITTED"
    assert (await gql.data(COMMITTED))["balance"] == {"committed": 0}


# ------------------------------------------------------------------ LockTimeoutError


class BusyLocker:
    """A locker whose keys are always held by another process (every claim is refused)."""

    wait = 0.05
    ttl = 3.0

    async def claim(self, org_id: str, groups: Any) -> Claim:
        return Claim("", [not group for group in groups])

    @asynccontextmanager
    async def keep(self, claim: Claim) -> AsyncIterator[None]:
        yield

    async def release_with(self, claim: Claim, index: Any, changes: Any) -> None:
        await index.apply(changes)

    def retry_after_ms(self) -> int:
        return 250

    def held_here(self, org_id: str, keys: Any) -> bool:
        return False  # no sold-out fast path: every call must wait for its keys

    @asynccontextmanager
    async def hold(self, org_id: str, keys: Any) -> AsyncIterator[None]:
        raise AssertionError("the services never hold keys")
        yield  # pragma: no cover


async def test_every_mutation_reports_lock_timeout(database_url: str, org_id: str) -> None:
    async with serve_service(database_url, org_id) as gql:
        await gql.restock("r", line("A", 5))
        rid = (await gql.reserve("h", line("A", 1)))["reservation"]["id"]
    async with serve_service(database_url, org_id, locker=BusyLocker()) as gql:
        before = await gql.snapshot()
        inputs = {
            "restock": {"lines": [line("A", 1)]},
            "adjust": {"sku": "A", "delta": 1, "reason": "count"},
            "reserve": {"lines": [line("A", 1)]},
            "release": {"reservationId": rid},
            "deduct": {"reservationId": rid},
            "extendReservation": {"reservationId": rid, "ttlSeconds": 60},
        }
        for name, input in inputs.items():
            result = await gql.mutate(name, idempotencyKey=f"busy-{name}", **input)
            assert result["__typename"] == "LockTimeoutError", (name, result)
            assert result["code"] == "LOCK_TIMEOUT"
            assert result["retryAfterMs"] == 250
        assert await gql.snapshot() == before


# ------------------------------------------------------------------ mapping, masking


class RaisingService:
    """A stand-in for InventoryService whose every write raises ``error``."""

    def __init__(self, db: Database, org_id: str, error: Exception) -> None:
        self.db = db
        self.org_id = org_id
        self.error = error

    def for_org(self, org_id: str) -> RaisingService:
        return self  # the same errors for every org

    async def _raise(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error

    restock = adjust = reserve = release = deduct = extend_reservation = _raise


DOMAIN_ERRORS: dict[str, tuple[Exception, dict[str, Any]]] = {
    "InsufficientStockError": (
        e.InsufficientStockError([e.Shortage("A", "wh", 5, 2)]),
        {"shortages": [{"sku": "A", "location": "wh", "requested": 5, "available": 2}]},
    ),
    "NotFoundError": (
        e.NotFoundError("Reservation", "ORDER:1"),
        {"entity": "Reservation", "key": "ORDER:1"},
    ),
    "ValidationError": (
        e.ValidationError("must be positive", "lines.3.quantity"),
        {"field": "lines.3.quantity"},
    ),
    "IdempotencyKeyReusedError": (
        e.IdempotencyKeyReusedError("k-9", "reserve"),
        {"idempotencyKey": "k-9"},
    ),
    "ReservationNotActiveError": (
        e.ReservationNotActiveError(77, "EXPIRED"),
        {"reservationId": reservation_global_id(77), "status": "EXPIRED"},
    ),
    "VersionConflictError": (
        e.VersionConflictError(3, 5),
        {"expectedVersion": 3, "actualVersion": 5},
    ),
    "LockTimeoutError": (e.LockTimeoutError(1200), {"retryAfterMs": 1200}),
}
CODES = {
    "InsufficientStockError": "INSUFFICIENT_STOCK",
    "NotFoundError": "NOT_FOUND",
    "ValidationError": "VALIDATION_ERROR",
    "IdempotencyKeyReusedError": "IDEMPOTENCY_KEY_REUSED",
    "ReservationNotActiveError": "RESERVATION_NOT_ACTIVE",
    "VersionConflictError": "VERSION_CONFLICT",
    "LockTimeoutError": "LOCK_TIMEOUT",
}
MINIMAL_INPUT = {
    "restock": {"lines": [line("A", 1)]},
    "adjust": {"sku": "A", "delta": 1, "reason": "x"},
    "reserve": {"lines": [line("A", 1)]},
    "release": {"reservationId": "1"},
    "deduct": {"reservationId": "1"},
    "extendReservation": {"reservationId": "1", "ttlSeconds": 5},
}


@pytest.mark.parametrize("member", sorted(DOMAIN_ERRORS))
async def test_each_domain_error_becomes_its_union_member(
    db: Database, org_id: str, settings: Any, member: str
) -> None:
    error, fields = DOMAIN_ERRORS[member]
    async with serve(settings, service=RaisingService(db, org_id, error)) as gql:
        for name, (_, _, _, members) in MUTATIONS.items():
            if member not in members:
                continue
            result = await gql.mutate(name, idempotencyKey="k", **MINIMAL_INPUT[name])
            assert result["__typename"] == member, (name, result)
            assert result["code"] == CODES[member]
            assert result["message"] == error.message  # type: ignore[attr-defined]
            for key, value in fields.items():
                assert result[key] == value, (name, key)


async def test_unexpected_errors_are_masked_and_logged(
    db: Database, org_id: str, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = RuntimeError("password=hunter2 at db-primary-7")
    # A domain failure the union cannot carry is unexpected too (restock has no NotFoundError).
    for error in (secret, e.NotFoundError("Reservation", "hunter2")):
        counted = REGISTRY.get_sample_value("inventory_unexpected_errors_total") or 0.0
        async with serve(settings, service=RaisingService(db, org_id, error)) as gql:
            with caplog.at_level(logging.ERROR, logger="stockledger.resolvers.errors"):
                query = "mutation($i: RestockInput!) { restock(input: $i) { __typename } }"
                variables = {"i": {"idempotencyKey": "k", "lines": [line("A", 1)]}}
                response = await gql.http.post(
                    "/graphql", json={"query": query, "variables": variables}
                )
        assert response.status_code == 200
        assert "hunter2" not in response.text
        body = response.json()
        assert body["data"] is None
        assert [x["message"] for x in body["errors"]] == ["Unexpected error."]
        assert body["errors"][0]["extensions"] == {"code": "INTERNAL_SERVER_ERROR"}
        assert body["errors"][0]["path"] == ["restock"]
        assert "hunter2" in caplog.text  # the log keeps the details
        caplog.clear()
        assert REGISTRY.get_sample_value("inventory_unexpected_errors_total") == counted + 1


async def test_mutation_reads_nothing_after_its_transaction(gql: GraphQLClient) -> None:
    """The result (reservation lines included) comes from the service's own transaction."""
    await gql.restock("r", line("A", 5))
    database = gql.app.state.database
    engine = database.engine.sync_engine  # writes; reads may have a pool of their own
    engines = {engine, database.read_engine.sync_engine}
    statements: list[tuple[str, str]] = []  # (phase, sql)
    phase = ["before"]

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append((phase[0], statement))

    def on_commit(conn: Any) -> None:
        phase[0] = "after"

    for each in engines:
        event.listen(each, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)
    try:
        res = await gql.reserve("h", line("A", 2))
    finally:
        for each in engines:
            event.remove(each, "before_cursor_execute", on_execute)
        event.remove(engine, "commit", on_commit)
    assert res["reservation"]["lines"][0]["quantity"] == 2
    assert any(p == "before" for p, _ in statements)
    assert [s for p, s in statements if p == "after"] == []
