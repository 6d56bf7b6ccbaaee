"""Part BATCH over HTTP, on SQLite and MariaDB: ``reserveMany``, ``deductMany`` and
``releaseMany``. Each item is its own call (own key, own all-or-nothing rule, own union member),
results come back in input order, and items apply in input order; the bounds (500 items, 5,000
lines in all) refuse a request whole, before any work; metrics and write logs count each item
like its single mutation."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
from graphql_helpers import (
    ERROR_FIELDS,
    MUTATIONS,
    GraphQLClient,
    gql_fixture,  # noqa: F401
    line,
)
from log_helpers import json_logging, write_lines
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from stockledger.db.models import idempotency_key as K
from stockledger.db.models import inventory_ledger as L
from stockledger.db.models import reservation as R
from stockledger.db.models import reservation_line as RL
from stockledger.domain.ids import reservation_global_id
from stockledger.services.reconcile import find_violations

# batch field -> (input type, list field, the single mutation each item is)
MANY: dict[str, tuple[str, str, str]] = {
    "reserveMany": ("ReserveManyInput", "carts", "reserve"),
    "deductMany": ("DeductManyInput", "items", "deduct"),
    "releaseMany": ("ReleaseManyInput", "items", "release"),
}
Key = tuple[str, str]  # (location, sku)


def many_document(name: str) -> str:
    """``mutation($input: XManyInput!) { name(input: $input) { results { every member } } }``."""
    input_type, _, single = MANY[name]
    _, success, selection, errors = MUTATIONS[single]
    members = " ".join(f"... on {e} {{ {ERROR_FIELDS[e]} }}" for e in errors)
    return (
        f"mutation($input: {input_type}!) {{ {name}(input: $input) {{ results {{ __typename "
        f"... on {success} {{ {selection} }} ... on Error {{ code message }} {members} }} }} }}"
    )


async def many_body(gql: GraphQLClient, name: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole JSON response of one batch call."""
    return await gql.post(many_document(name), {"input": {MANY[name][1]: items}})


async def many(gql: GraphQLClient, name: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results of one batch call (no top-level errors; one result per item)."""
    data = await gql.data(many_document(name), {"input": {MANY[name][1]: items}})
    results: list[dict[str, Any]] = data[name]["results"]
    assert len(results) == len(items), results
    return results


def cart(key: str, *lines: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"idempotencyKey": key, "lines": list(lines), **extra}


def kinds(results: list[dict[str, Any]]) -> list[str]:
    return [r["__typename"] for r in results]


async def row_counts(gql: GraphQLClient, org_id: str) -> dict[str, int]:
    """Rows of the tenant in the ledger, reservations, reservation lines and idempotency keys."""
    out = {}
    async with gql.app.state.database.read() as conn:
        for table in (L, R, RL, K):
            query = select(func.count()).select_from(table).where(table.c.org_id == org_id)
            out[table.name] = int((await conn.execute(query)).scalar_one())
    return out


async def balances(gql: GraphQLClient) -> dict[Key, tuple[int, int, int]]:
    """(location, sku) -> (onHand, reserved, version) of every balance."""
    data = await gql.data(
        "{ balances(first: 500) { edges { node { sku location onHand reserved version } } } }"
    )
    return {
        (n["location"], n["sku"]): (n["onHand"], n["reserved"], n["version"])
        for n in (e["node"] for e in data["balances"]["edges"])
    }


async def invariants(gql: GraphQLClient, org_id: str) -> list[str]:
    return await find_violations(gql.app.state.database, org_id)


def key_of(ln: dict[str, Any]) -> Key:
    return ln["location"], ln["sku"]


def simulate(
    carts: list[dict[str, Any]], available: dict[Key, int]
) -> list[list[dict[str, Any]] | None]:
    """Reserve ``carts`` one after another on ``available`` (changed in place): per cart None
    (reserved) or its shortages, sorted by (location, sku)."""
    out: list[list[dict[str, Any]] | None] = []
    for c in carts:
        short = [
            {
                "sku": ln["sku"],
                "location": ln["location"],
                "requested": ln["quantity"],
                "available": max(available.get(key_of(ln), 0), 0),
            }
            for ln in c["lines"]
            if available.get(key_of(ln), 0) < ln["quantity"]
        ]
        if short:
            out.append(sorted(short, key=lambda s: (s["location"], s["sku"])))
            continue
        for ln in c["lines"]:
            available[key_of(ln)] -= ln["quantity"]
        out.append(None)
    return out


def shortages(result: dict[str, Any]) -> list[dict[str, Any]]:
    assert result["__typename"] == "InsufficientStockError", result
    assert result["code"] == "INSUFFICIENT_STOCK"
    return sorted(result["shortages"], key=lambda s: (s["location"], s["sku"]))


def held_lines(reservation: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    """(location, sku, quantity, remaining) per line of a reservation, sorted."""
    return sorted(
        (x["location"], x["sku"], x["quantity"], x["remaining"]) for x in reservation["lines"]
    )


# ------------------------------------------------------------------ 300 carts, 40 short

SKUS = 30
SHORT = frozenset(list(range(5, 300, 7))[:40])


def sku_of(k: int) -> str:
    return f"S{k:02d}"


def loc_of(k: int) -> str:
    return "wh2" if k % 3 == 0 else "default"


def stock_of(k: int) -> int:
    return 100 + k


def three_hundred_carts() -> list[dict[str, Any]]:
    """300 two-line carts over 30 SKUs in two locations; the 40 in SHORT ask for more than
    is on hand of one line's SKU (every other one of them of both lines' SKUs)."""
    carts = []
    for i in range(300):
        a = i % SKUS
        b = (i * 7 + 3) % SKUS
        if b == a:
            b = (a + 1) % SKUS
        first = line(sku_of(a), 1 + i % 3, loc_of(a))
        second = line(sku_of(b), 1 + i % 2, loc_of(b))
        if i in SHORT:
            second = line(sku_of(b), stock_of(b) + 1 + i, loc_of(b))
            if i % 2 == 0:
                first = line(sku_of(a), stock_of(a) + i, loc_of(a))
        carts.append(cart(f"cart-{i}", first, second))
    return carts


async def reserve_three_hundred(
    gql: GraphQLClient,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[Key, int]]:
    """Restock the 30 SKUs, send the 300 carts, check every result; returns the carts, the
    results and the units each balance holds now."""
    await gql.restock("stock-300", *(line(sku_of(k), stock_of(k), loc_of(k)) for k in range(SKUS)))
    stock = {(loc_of(k), sku_of(k)): stock_of(k) for k in range(SKUS)}
    carts = three_hundred_carts()
    available = dict(stock)
    expected = simulate(carts, available)
    assert [i for i, x in enumerate(expected) if x is not None] == sorted(SHORT)

    results = await many(gql, "reserveMany", carts)
    assert Counter(kinds(results)) == {"ReserveSuccess": 260, "InsufficientStockError": 40}
    running = dict(stock)  # available after each cart, in input order
    ids = set()
    for i, (c, result, want) in enumerate(zip(carts, results, expected, strict=True)):
        if want is not None:
            assert shortages(result) == want, (i, result)
            continue
        assert result["__typename"] == "ReserveSuccess", (i, result)
        assert result["replayed"] is False
        reservation = result["reservation"]
        assert reservation["status"] == "ACTIVE"
        ids.add(reservation["id"])
        asked = sorted((ln["location"], ln["sku"], ln["quantity"]) for ln in c["lines"])
        assert held_lines(reservation) == [(lo, s, q, q) for lo, s, q in asked], i
        for ln in c["lines"]:
            running[key_of(ln)] -= ln["quantity"]
        # The cart's balances as its own command left them: the earlier carts' effects only.
        assert sorted((b["location"], b["sku"], b["available"]) for b in result["balances"]) == (
            sorted((lo, s, running[(lo, s)]) for lo, s, _ in asked)
        ), i
    assert len(ids) == 260
    assert running == available
    held = {k: stock[k] - available[k] for k in stock}
    return carts, results, held


async def test_300_carts_40_short_fail_alone(gql: GraphQLClient, org_id: str) -> None:
    carts, _, held = await reserve_three_hundred(gql)
    ok = [c for i, c in enumerate(carts) if i not in SHORT]
    touches = Counter(key_of(ln) for c in ok for ln in c["lines"])
    assert await balances(gql) == {
        (loc_of(k), sku_of(k)): (
            stock_of(k),
            held[(loc_of(k), sku_of(k))],
            1 + touches[(loc_of(k), sku_of(k))],  # the restock, then one per reserve
        )
        for k in range(SKUS)
    }
    assert sum(held.values()) == sum(ln["quantity"] for c in ok for ln in c["lines"])
    assert await row_counts(gql, org_id) == {
        "inventory_ledger": SKUS + 2 * 260,  # the restock's lines, then two per reserve
        "reservation": 260,
        "reservation_line": 2 * 260,
        "idempotency_key": 1 + 260,  # the failed carts consumed no key
    }
    assert await invariants(gql, org_id) == []


async def test_300_carts_sent_again_replay_and_change_nothing(
    gql: GraphQLClient, org_id: str
) -> None:
    carts, first, held = await reserve_three_hundred(gql)
    before = await gql.snapshot()
    counts = await row_counts(gql, org_id)
    stock = {(loc_of(k), sku_of(k)): stock_of(k) for k in range(SKUS)}
    now_available = {k: stock[k] - held[k] for k in stock}

    again = await many(gql, "reserveMany", carts)
    for i, (c, old, new) in enumerate(zip(carts, first, again, strict=True)):
        if i in SHORT:
            # Not replayed (a failure consumes no key): it runs again and fails on the stock
            # of now, which every successful cart holds.
            [want] = simulate([c], dict(now_available))
            assert want is not None
            assert shortages(new) == want, (i, new)
            assert [s["requested"] for s in shortages(new)] == [
                s["requested"] for s in shortages(old)
            ]
            continue
        assert new["__typename"] == "ReserveSuccess", (i, new)
        assert new["replayed"] is True, i
        assert new["reservation"]["id"] == old["reservation"]["id"], i
        assert held_lines(new["reservation"]) == held_lines(old["reservation"]), i
        # A replay answers the current state of what the call changed.
        assert sorted((b["location"], b["sku"], b["available"]) for b in new["balances"]) == (
            sorted((ln["location"], ln["sku"], now_available[key_of(ln)]) for ln in c["lines"])
        ), i
    assert await gql.snapshot() == before
    assert await row_counts(gql, org_id) == counts
    assert await invariants(gql, org_id) == []


# ------------------------------------------------------------------ input order


# Quantities of single-line carts on one SKU with 5 on hand, in several orders.
ORDERINGS = [(3, 3, 2), (2, 3, 3), (3, 2, 3), (5, 1, 1), (1, 5, 1), (1, 1, 5), (6, 5, 1), (4, 2, 1)]


async def test_earlier_item_wins_the_last_units(gql: GraphQLClient, org_id: str) -> None:
    skus = [f"LAST-{n}" for n in range(len(ORDERINGS))]

    def filler(n: int, i: int) -> list[dict[str, Any]]:
        """A second line on a SKU of its own whose key sorts before or after the contested
        one (so the carts' first balance keys, which route commands, differ)."""
        return [[], [line(f"AA-{n}-{i}", 1)], [line(f"ZZ-{n}-{i}", 1, "a-loc")]][i % 3]

    fillers = [ln for n in range(len(ORDERINGS)) for i in range(3) for ln in filler(n, i)]
    await gql.restock("stock", *(line(s, 5) for s in skus), *(f | {"quantity": 9} for f in fillers))
    for n, (sku, quantities) in enumerate(zip(skus, ORDERINGS, strict=True)):
        carts = [cart(f"o{n}-{i}", *filler(n, i), line(sku, q)) for i, q in enumerate(quantities)]
        available = {("default", sku): 5} | {key_of(f): 9 for f in fillers}
        expected = simulate(carts, available)
        results = await many(gql, "reserveMany", carts)
        for want, result in zip(expected, results, strict=True):
            if want is None:
                assert result["__typename"] == "ReserveSuccess", (quantities, results)
            else:
                assert shortages(result) == want, (quantities, results)
        balance = await gql.balance(sku)
        assert balance is not None
        assert balance["reserved"] == 5 - available[("default", sku)], quantities

    # Multi-line carts: the one that comes first gets both lines; the later one, short on one
    # line, holds nothing on the other, so a third cart still gets the unit it left.
    for n, order in enumerate(((0, 1), (1, 0))):
        x, y = f"X{n}", f"Y{n}"
        await gql.restock(f"xy-{n}", line(x, 3), line(y, 3))
        pair = [
            cart(f"xy{n}-a", line(x, 2), line(y, 2)),
            cart(f"xy{n}-b", line(x, 1), line(y, 3)),
        ]
        carts = [pair[order[0]], pair[order[1]], cart(f"xy{n}-c", line(x, 1))]
        results = await many(gql, "reserveMany", carts)
        assert kinds(results) == ["ReserveSuccess", "InsufficientStockError", "ReserveSuccess"]
        left_y = 3 - carts[0]["lines"][1]["quantity"]
        assert shortages(results[1]) == [
            {
                "sku": y,
                "location": "default",
                "requested": carts[1]["lines"][1]["quantity"],
                "available": left_y,
            }
        ]
        held_x = carts[0]["lines"][0]["quantity"] + 1
        assert (await gql.balance(x))["reserved"] == held_x  # type: ignore[index]
        assert (await gql.balance(y))["reserved"] == 3 - left_y  # type: ignore[index]
    assert await invariants(gql, org_id) == []


# ------------------------------------------------------------------ concurrency

HOT_STOCK = 25
ROUNDS = 3


def random_carts(
    prefix: str, skus: list[str], count: int, rng: random.Random
) -> list[dict[str, Any]]:
    """``count`` carts of 1 or 2 lines of 1 or 2 units over ``skus``."""
    carts = []
    for i in range(count):
        chosen = rng.sample(skus, rng.choice((1, 2)))
        carts.append(cart(f"{prefix}-{i}", *(line(s, rng.choice((1, 2))) for s in chosen)))
    return carts


@pytest.mark.slow
async def test_concurrent_batches_and_single_reserves_never_oversell(
    gql: GraphQLClient, org_id: str
) -> None:
    rng = random.Random(14)

    async def single(c: dict[str, Any]) -> dict[str, Any]:
        return await gql.mutate("reserve", **c)

    ids: list[str] = []
    for n in range(ROUNDS):
        hot = [f"H{n}-{k}" for k in range(4)]
        await gql.restock(f"hot-{n}", *(line(s, HOT_STOCK) for s in hot))
        batch_a = random_carts(f"a{n}", hot, 80, rng)
        batch_b = random_carts(f"b{n}", hot, 80, rng)
        singles = random_carts(f"s{n}", hot, 40, rng)
        carts = batch_a + batch_b + singles
        # A single-line cart on each SKU, so none can end with 2 units unsold (below).
        assert {c["lines"][0]["sku"] for c in carts if len(c["lines"]) == 1} == set(hot)

        outcome = await asyncio.gather(
            many(gql, "reserveMany", batch_a),
            *(single(c) for c in singles[:20]),
            many(gql, "reserveMany", batch_b),
            *(single(c) for c in singles[20:]),
        )
        results = [*outcome[0], *outcome[21], *outcome[1:21], *outcome[22:]]
        every = list(zip(carts, results, strict=True))
        assert set(kinds(results)) <= {"ReserveSuccess", "InsufficientStockError"}, Counter(
            kinds(results)
        )

        sold: Counter[str] = Counter()
        for c, result in every:
            if result["__typename"] == "ReserveSuccess":
                asked = sorted(("default", ln["sku"], ln["quantity"]) for ln in c["lines"])
                assert held_lines(result["reservation"]) == [(lo, s, q, q) for lo, s, q in asked]
                ids.append(result["reservation"]["id"])
                for ln in c["lines"]:
                    sold[ln["sku"]] += ln["quantity"]
                continue
            short = shortages(result)
            assert short, result
            wanted = {ln["sku"]: ln["quantity"] for ln in c["lines"]}
            for s in short:
                assert s["sku"] in wanted and s["requested"] == wanted[s["sku"]], (c, result)
                assert 0 <= s["available"] < s["requested"], (c, result)
        for sku in hot:
            assert sold[sku] <= HOT_STOCK, (sku, sold)
        # Demand is about four times the stock, and a single-line cart of 1 or 2 units
        # succeeds whenever its SKU has that many left: every SKU sells out but for at most
        # one unit.
        assert all(sold[s] >= HOT_STOCK - 1 for s in hot), sold
        final = await balances(gql)
        assert {s: final[("default", s)][:2] for s in hot} == {s: (HOT_STOCK, sold[s]) for s in hot}
    assert len(set(ids)) == len(ids)
    assert (await row_counts(gql, org_id))["reservation"] == len(ids)
    assert await invariants(gql, org_id) == []


# ------------------------------------------------------------------ validation and bounds


async def test_invalid_item_fails_alone(gql: GraphQLClient, org_id: str) -> None:
    await gql.restock("stock", line("A", 10), line("B", 10))
    carts = [
        cart("v-0", line("A", 1)),
        cart("v-1", line("A", 1), line("B", 0)),
        cart("v-2", line("B", 2)),
        cart("v-3", line("A", 1), ttlSeconds=0),
        cart("v-4"),
        cart("", line("A", 1)),
        cart("v-6", line("A", 2), line("B", 1)),
    ]
    results = await many(gql, "reserveMany", carts)
    assert kinds(results) == [
        "ReserveSuccess",
        "ValidationError",
        "ReserveSuccess",
        "ValidationError",
        "ValidationError",
        "ValidationError",
        "ReserveSuccess",
    ]
    fields = [r["field"] for r in results if r["__typename"] == "ValidationError"]
    assert fields == ["lines.1.quantity", "ttlSeconds", "lines", "idempotencyKey"]
    assert {r["code"] for r in results if "field" in r} == {"VALIDATION_ERROR"}
    assert (await gql.balance("A"))["reserved"] == 3  # type: ignore[index]
    assert (await gql.balance("B"))["reserved"] == 3  # type: ignore[index]
    # An invalid item touched no key: the same keys, now valid, reserve.
    fixed = await many(
        gql, "reserveMany", [cart("v-1", line("A", 1), line("B", 1)), cart("v-4", line("B", 1))]
    )
    assert [(r["__typename"], r["replayed"]) for r in fixed] == [("ReserveSuccess", False)] * 2
    assert await many(gql, "reserveMany", []) == []
    assert await invariants(gql, org_id) == []


def reserve_counts() -> dict[str, float]:
    return {
        s: REGISTRY.get_sample_value("inventory_reserve_total", {"status": s}) or 0.0
        for s in ("success", "insufficient_stock", "validation_error", "replayed")
    }


async def assert_refused(
    gql: GraphQLClient, org_id: str, name: str, items: list[dict[str, Any]], needle: str
) -> None:
    """The request answers one top-level BAD_USER_INPUT with data null, and nothing changed."""
    before, counts, metered = await gql.snapshot(), await row_counts(gql, org_id), reserve_counts()
    body = await many_body(gql, name, items)
    assert body["data"] is None, body
    [error] = body["errors"]
    assert error["extensions"]["code"] == "BAD_USER_INPUT", error
    assert needle in error["message"], error
    assert error["path"] == [name]
    assert await gql.snapshot() == before
    assert await row_counts(gql, org_id) == counts
    assert reserve_counts() == metered  # refused before any item was looked at


async def test_over_the_bounds_is_refused_whole(gql: GraphQLClient, org_id: str) -> None:
    skus = [f"P{n:03d}" for n in range(500)]
    await gql.restock("stock", *(line(s, 20) for s in skus))
    await gql.reserve("hold", line("P000", 1))

    too_many = [cart(f"c-{i}", line(skus[i % 500], 1)) for i in range(501)]
    await assert_refused(gql, org_id, "reserveMany", too_many, "500")
    # 5,001 lines over 11 carts (each within the 500 lines of one input).
    too_long = [cart(f"l-{i}", *(line(s, 1) for s in skus)) for i in range(10)]
    too_long.append(cart("l-10", line("P000", 1)))
    assert sum(len(c["lines"]) for c in too_long) == 5001
    await assert_refused(gql, org_id, "reserveMany", too_long, "5000")
    # Each item is valid and the keys are fresh: the bound alone refuses, for every batch field.
    releases = [{"idempotencyKey": f"r-{i}", "reservationId": "1"} for i in range(501)]
    await assert_refused(gql, org_id, "releaseMany", releases, "500")
    deducts = [{"idempotencyKey": f"d-{i}", "lines": [line(skus[i], 1)]} for i in range(500)]
    deducts.append({"idempotencyKey": "d-500", "lines": [line("P001", 1)]})
    await assert_refused(gql, org_id, "deductMany", deducts, "500")
    deduct_lines = [
        {"idempotencyKey": f"dl-{i}", "lines": [line(s, 1) for s in skus]} for i in range(10)
    ]
    deduct_lines.append({"idempotencyKey": "dl-10", "lines": [line("P000", 1)]})
    await assert_refused(gql, org_id, "deductMany", deduct_lines, "5000")
    assert await invariants(gql, org_id) == []


@pytest.mark.slow
async def test_exactly_500_items_and_5000_lines_are_accepted(
    gql: GraphQLClient, org_id: str
) -> None:
    skus = [f"Q{n}" for n in range(10)]
    await gql.restock("stock", *(line(s, 500) for s in skus))
    carts = [cart(f"c-{i}", *(line(s, 1) for s in skus)) for i in range(500)]
    results = await many(gql, "reserveMany", carts)
    assert Counter(kinds(results)) == {"ReserveSuccess": 500}
    assert all(r["replayed"] is False for r in results)
    assert len({r["reservation"]["id"] for r in results}) == 500
    assert {s: v[:2] for (_, s), v in (await balances(gql)).items()} == {
        s: (500, 500) for s in skus
    }
    counts = await row_counts(gql, org_id)
    assert (counts["reservation"], counts["reservation_line"]) == (500, 5000)
    # The same 500 again: each a replay; then one more unit of any SKU is short.
    again = await many(gql, "reserveMany", carts)
    assert all(r["replayed"] is True for r in again)
    assert await row_counts(gql, org_id) == counts
    [short] = await many(gql, "reserveMany", [cart("one-more", line("Q3", 1))])
    assert shortages(short) == [
        {"sku": "Q3", "location": "default", "requested": 1, "available": 0}
    ]
    assert await invariants(gql, org_id) == []


# ------------------------------------------------------------------ deductMany, releaseMany


def reservation_state(result: dict[str, Any]) -> list[tuple[str, str, list[tuple[Any, ...]]]]:
    """(id, status, [(sku, quantity, deducted, released, remaining)]) per reservation."""
    return [
        (
            r["id"],
            r["status"],
            sorted(
                (x["sku"], x["quantity"], x["deducted"], x["released"], x["remaining"])
                for x in r["lines"]
            ),
        )
        for r in result["reservations"]
    ]


def bal(result: dict[str, Any]) -> list[tuple[str, int, int]]:
    return sorted((b["sku"], b["onHand"], b["reserved"]) for b in result["balances"])


async def test_release_many_and_deduct_many_answer_each_item(
    gql: GraphQLClient, org_id: str
) -> None:
    await gql.restock("stock", line("A", 20), line("B", 20, "wh2"))
    o1, o2 = {"type": "ORDER", "id": "o1"}, {"type": "ORDER", "id": "o2"}
    b = line("B", 1, "wh2")

    async def rid(key: str, *lines: dict[str, Any], **extra: Any) -> str:
        reservation_id: str = (await gql.reserve(key, *lines, **extra))["reservation"]["id"]
        return reservation_id

    r1 = await rid("h1", line("A", 3))
    r2 = await rid("h2", line("A", 2), line("B", 2, "wh2"), reference=o1)
    r3 = await rid("h3", line("B", 4, "wh2"))
    r4 = await rid("h4", line("A", 1))
    r5 = await rid("h5", line("A", 2), reference=o2)
    r6 = await rid("h6", b)
    await gql.ok("release", idempotencyKey="pre-rel", reservationId=r4)
    await gql.ok("deduct", idempotencyKey="pre-ded", reservationId=r6)

    released = await many(
        gql,
        "releaseMany",
        [
            {"idempotencyKey": "rel-0", "reservationId": r1, "lines": [line("A", 1)]},
            {"idempotencyKey": "rel-1", "reservationId": r4},
            {"idempotencyKey": "rel-2", "reservationId": r6},
            {"idempotencyKey": "rel-3", "reservationId": "999999999"},
            {"idempotencyKey": "rel-4", "reference": {"type": "ORDER", "id": "nope"}},
            {"idempotencyKey": "rel-5", "reservationId": r1},
            {"idempotencyKey": "rel-6", "reference": o2},
        ],
    )
    assert kinds(released) == [
        "ReleaseSuccess",
        "ReservationNotActiveError",
        "ReservationNotActiveError",
        "NotFoundError",
        "NotFoundError",
        "ReleaseSuccess",
        "ReleaseSuccess",
    ]
    assert reservation_state(released[0]) == [(r1, "ACTIVE", [("A", 3, 0, 1, 2)])]
    assert bal(released[0]) == [("A", 20, 6)]
    assert (released[1]["reservationId"], released[1]["status"]) == (r4, "RELEASED")
    assert (released[2]["reservationId"], released[2]["status"]) == (r6, "COMMITTED")
    assert released[1]["code"] == "RESERVATION_NOT_ACTIVE"
    # a v1 numeric id that names nothing: the key is its opaque id, as Reservation.id
    assert (released[3]["entity"], released[3]["key"], released[3]["code"]) == (
        "Reservation",
        reservation_global_id(999999999),
        "NOT_FOUND",
    )
    assert released[4]["key"] == "ORDER:nope"
    # rel-5 sees rel-0's release: the rest of r1 is the 2 units left.
    assert reservation_state(released[5]) == [(r1, "RELEASED", [("A", 3, 0, 3, 0)])]
    assert bal(released[5]) == [("A", 20, 4)]
    assert reservation_state(released[6]) == [(r5, "RELEASED", [("A", 2, 0, 2, 0)])]
    assert bal(released[6]) == [("A", 20, 2)]
    assert all(r["replayed"] is False for r in released if "replayed" in r)

    deduct_items = [
        {"idempotencyKey": "ded-0", "reference": o1},
        {"idempotencyKey": "ded-1", "reservationId": r1},
        {"idempotencyKey": "ded-2", "reservationId": r3, "lines": [b]},
        {"idempotencyKey": "ded-3", "lines": [line("A", 5)]},
        {"idempotencyKey": "ded-4", "lines": [line("B", 100, "wh2")]},
        {"idempotencyKey": "ded-5", "reservationId": "888888888"},
        {"idempotencyKey": "ded-6", "reference": o1},
        {"idempotencyKey": "ded-7", "reservationId": r3},
        {"idempotencyKey": "ded-8", "reservationId": r3},
        {"idempotencyKey": "ded-9", "reservationId": r6},
    ]
    deducted = await many(gql, "deductMany", deduct_items)
    assert kinds(deducted) == [
        "DeductSuccess",
        "ReservationNotActiveError",
        "DeductSuccess",
        "DeductSuccess",
        "InsufficientStockError",
        "NotFoundError",
        "NotFoundError",
        "DeductSuccess",
        "ReservationNotActiveError",
        "ReservationNotActiveError",
    ]
    by_ref = deducted[0]
    assert reservation_state(by_ref) == [(r2, "COMMITTED", [("A", 2, 2, 0, 0), ("B", 2, 2, 0, 0)])]
    assert sorted(
        (x["eventType"], x["sku"], x["onHandDelta"], x["reservedDelta"], x["reservationId"])
        for x in by_ref["ledgerEntries"]
    ) == [("DEDUCT", "A", -2, -2, r2), ("DEDUCT", "B", -2, -2, r2)]
    assert bal(by_ref) == [("A", 18, 0), ("B", 17, 4)]
    assert (deducted[1]["reservationId"], deducted[1]["status"]) == (r1, "RELEASED")
    assert reservation_state(deducted[2]) == [(r3, "ACTIVE", [("B", 4, 1, 0, 3)])]
    assert bal(deducted[2]) == [("B", 16, 3)]
    direct = deducted[3]
    assert direct["reservations"] == []
    assert [(x["sku"], x["onHandDelta"], x["reservationId"]) for x in direct["ledgerEntries"]] == [
        ("A", -5, None)
    ]
    assert bal(direct) == [("A", 13, 0)]
    assert shortages(deducted[4]) == [
        {"sku": "B", "location": "wh2", "requested": 100, "available": 13}
    ]
    assert deducted[5]["key"] == reservation_global_id(888888888)
    assert deducted[6]["key"] == "ORDER:o1"  # committed by ded-0: none ACTIVE is left
    assert reservation_state(deducted[7]) == [(r3, "COMMITTED", [("B", 4, 4, 0, 0)])]
    assert bal(deducted[7]) == [("B", 13, 0)]
    assert (deducted[8]["reservationId"], deducted[8]["status"]) == (r3, "COMMITTED")
    assert (deducted[9]["reservationId"], deducted[9]["status"]) == (r6, "COMMITTED")

    final = {("default", "A"): (13, 0), ("wh2", "B"): (13, 0)}
    assert {k: v[:2] for k, v in (await balances(gql)).items()} == final

    # The same deductMany again: each success replays, each failure (no key consumed) runs
    # again and fails the same way; nothing changes.
    before, counts = await gql.snapshot(), await row_counts(gql, org_id)
    again = await many(gql, "deductMany", deduct_items)
    assert kinds(again) == kinds(deducted)
    for old, new in zip(deducted, again, strict=True):
        if old["__typename"] == "DeductSuccess":
            assert new["replayed"] is True
            assert [r["id"] for r in new["reservations"]] == [r["id"] for r in old["reservations"]]
            assert new["ledgerEntries"] == old["ledgerEntries"]
        else:
            assert new == old
    assert await gql.snapshot() == before
    assert await row_counts(gql, org_id) == counts
    assert await invariants(gql, org_id) == []


# ------------------------------------------------------------------ keys within one request


async def test_same_key_twice_in_one_request(gql: GraphQLClient, org_id: str) -> None:
    await gql.restock("stock", line("A", 10), line("D", 10))
    results = await many(
        gql,
        "reserveMany",
        [
            cart("k1", line("A", 2)),
            cart("k1", line("A", 2)),  # same payload: a replay of the first
            cart("k2", line("A", 1)),
            cart("k2", line("A", 3)),  # another payload
            cart("k3", line("A", 100)),
            cart("k3", line("A", 100)),  # the first failed and consumed nothing: fails again
            cart("k4", line("A", 100)),
            cart("k4", line("A", 1)),  # the first failed: the key is still free
        ],
    )
    assert kinds(results) == [
        "ReserveSuccess",
        "ReserveSuccess",
        "ReserveSuccess",
        "IdempotencyKeyReusedError",
        "InsufficientStockError",
        "InsufficientStockError",
        "InsufficientStockError",
        "ReserveSuccess",
    ]
    assert (results[0]["replayed"], results[1]["replayed"]) == (False, True)
    assert results[1]["reservation"]["id"] == results[0]["reservation"]["id"]
    assert held_lines(results[1]["reservation"]) == [("default", "A", 2, 2)]
    assert results[2]["replayed"] is False
    assert results[3]["idempotencyKey"] == "k2"
    assert results[3]["code"] == "IDEMPOTENCY_KEY_REUSED"
    for short in results[4:7]:
        assert shortages(short) == [
            {"sku": "A", "location": "default", "requested": 100, "available": 7}
        ]
    assert results[7]["replayed"] is False
    assert len({r["reservation"]["id"] for r in results if "reservation" in r}) == 3
    assert (await gql.balance("A"))["reserved"] == 4  # type: ignore[index]

    direct = {"idempotencyKey": "kd", "lines": [line("D", 3)]}
    deducted = await many(gql, "deductMany", [direct, direct, {**direct, "lines": [line("D", 1)]}])
    assert kinds(deducted) == ["DeductSuccess", "DeductSuccess", "IdempotencyKeyReusedError"]
    assert (deducted[0]["replayed"], deducted[1]["replayed"]) == (False, True)
    assert deducted[1]["ledgerEntries"] == deducted[0]["ledgerEntries"]
    assert (await gql.balance("D"))["onHand"] == 7  # type: ignore[index]
    counts = await row_counts(gql, org_id)
    assert counts["idempotency_key"] == 1 + 3 + 1  # stock; k1, k2, k4; kd
    assert await invariants(gql, org_id) == []


# ------------------------------------------------------------------ metrics and logs


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def metric_values() -> dict[str, float]:
    out = {}
    for status in ("success", "insufficient_stock", "replayed", "validation_error"):
        out[f"reserve_total/{status}"] = sample("inventory_reserve_total", {"status": status})
        out[f"movements/{status}"] = sample(
            "stock_movements_total", {"type": "reserve", "result": status, "reason": "none"}
        )
    for outcome in ("ok", "domain_error", "error"):
        out[f"request/{outcome}"] = sample(
            "inventory_graphql_request_seconds_count",
            {"operation_type": "mutation", "field": "reserveMany", "outcome": outcome},
        )
    return out


async def test_metrics_and_log_lines_per_item(
    gql: GraphQLClient, capsys: pytest.CaptureFixture[str]
) -> None:
    await gql.restock("stock", line("A", 5))
    carts = [
        cart("m0", line("A", 2)),
        cart("m1", line("A", 10)),
        cart("m2", line("A", 2)),
        cart("m3", line("A", 5)),
        cart("m4", line("A", 1)),
    ]
    with json_logging():
        capsys.readouterr()
        before = metric_values()
        results = await many(gql, "reserveMany", carts)
        after = metric_values()
        err = capsys.readouterr().err
    assert kinds(results) == [
        "ReserveSuccess",
        "InsufficientStockError",
        "ReserveSuccess",
        "InsufficientStockError",
        "ReserveSuccess",
    ]
    moved = {k: after[k] - before[k] for k in before}
    assert moved == {
        "reserve_total/success": 3,
        "reserve_total/insufficient_stock": 2,
        "reserve_total/replayed": 0,
        "reserve_total/validation_error": 0,
        "movements/success": 3,
        "movements/insufficient_stock": 2,
        "movements/replayed": 0,
        "movements/validation_error": 0,
        # One request, whatever its items: a union error member was returned.
        "request/ok": 0,
        "request/domain_error": 1,
        "request/error": 0,
    }

    entries = write_lines(err)
    assert [e["idempotency_key"] for e in entries] == ["m0", "m1", "m2", "m3", "m4"], err
    assert [(e["operation"], e["outcome"]) for e in entries] == [
        ("reserve", "success"),
        ("reserve", "insufficient_stock"),
        ("reserve", "success"),
        ("reserve", "insufficient_stock"),
        ("reserve", "success"),
    ]
    # Each success logs its own ledger entry, in input order.
    assert [
        [(x["quantity"], x["reserved_before"], x["reserved_after"]) for x in e["balances"]]
        for e in entries
        if e["outcome"] == "success"
    ] == [[(2, 0, 2)], [(2, 2, 4)], [(1, 4, 5)]]
    assert all(e.get("balances") in (None, []) for e in entries if e["outcome"] != "success")
