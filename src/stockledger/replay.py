"""Replay the Superstore orders through a running server's GraphQL API (``stockledger replay``).

Data: ``bench/data/superstore/superstore.csv.gz`` (MIT, copyright 2020 Andrew Stein; license
beside the file). Locations are the four regions, SKUs are Product IDs, each Order ID is one
cart reserved at its Order Date with reference ``{type: "ORDER", id}`` and deducted at its Ship
Date, in date order.

Stock: opening stock per (location, SKU) is ``ceil(fraction * total demand)`` (most balances
see only a few units of demand, so rounding down would open many of them short of their one
order); every
``restock_days`` days each balance is restocked with ``ceil((1 - fraction) * demand of the
period just ended)``, so supply roughly meets demand but lags it and some carts meet
insufficient stock. A deterministic ``abandon_share`` of carts is reserved with a short TTL and
never deducted: the server's sweeper expires them.

Concurrency: the days are replayed in order; within a day, restocks, then reserves, then
deducts run on ``clients`` concurrent connections (so each order keeps reserve -> deduct).
With ``batch`` N, a day's carts go in ``reserveMany`` calls of up to N carts and its
shipments in ``deductMany`` calls (part BATCH), on the same connections.

At the end it checks through the API alone: no negative balance, no reserved above on hand,
the ledger's deltas sum to every balance, and the cart counts add up; it prints carts per
second, p50/p95/p99 latency per mutation and the outcome counts, and exits non-zero when a
check fails. HTTP client: httpx (HTTP/1.1 keep-alive pool).
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import math
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx

DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "bench" / "data" / "superstore" / "superstore.csv.gz"
)

RESERVE = """mutation($input: ReserveInput!) { reserve(input: $input) {
  __typename
  ... on ReserveSuccess { reservation { id } replayed }
  ... on Error { code message } } }"""
DEDUCT = """mutation($input: DeductInput!) { deduct(input: $input) {
  __typename
  ... on DeductSuccess { replayed }
  ... on Error { code message } } }"""
RESERVE_MANY = """mutation($input: ReserveManyInput!) { reserveMany(input: $input) { results {
  __typename
  ... on ReserveSuccess { reservation { id } replayed }
  ... on Error { code message } } } }"""
DEDUCT_MANY = """mutation($input: DeductManyInput!) { deductMany(input: $input) { results {
  __typename
  ... on DeductSuccess { replayed }
  ... on Error { code message } } } }"""
RESTOCK = """mutation($input: RestockInput!) { restock(input: $input) {
  __typename
  ... on RestockSuccess { replayed }
  ... on Error { code message } } }"""
BALANCES = """query($after: String) { balances(first: 500, after: $after) {
  edges { node { sku location onHand reserved available } }
  pageInfo { hasNextPage endCursor } } }"""
LEDGER = """query($after: String) { ledger(first: 500, after: $after, direction: ASC) {
  edges { node { sku location onHandDelta reservedDelta eventType } }
  pageInfo { hasNextPage endCursor } } }"""
RESERVATIONS = """query($after: String, $status: ReservationStatus) {
  reservations(first: 500, after: $after, filter: {status: $status}) {
  edges { node { id status reference { type id } } }
  pageInfo { hasNextPage endCursor } } }"""


@dataclass
class Order:
    """One cart: ``lines`` maps (location, sku) to units."""

    order_id: str
    order_date: date
    ship_date: date
    lines: dict[tuple[str, str], int]


@dataclass
class Outcome:
    """What the replay saw, and the per-mutation latencies in seconds."""

    counts: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    reservation_ids: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def load_orders(path: Path = DEFAULT_DATA, limit: int | None = None) -> list[Order]:
    """Orders from the Superstore CSV (gzip), in (order date, order id) order; first ``limit``."""
    orders: dict[str, Order] = {}
    with gzip.open(path, "rt", newline="") as fh:
        for row in csv.DictReader(fh):
            oid = row["Order ID"]
            order = orders.get(oid)
            if order is None:
                order = orders[oid] = Order(
                    oid,
                    date.fromisoformat(row["Order Date"]),
                    date.fromisoformat(row["Ship Date"]),
                    {},
                )
            key = (row["Region"], row["Product ID"])
            order.lines[key] = order.lines.get(key, 0) + int(row["Quantity"])
    ordered = sorted(orders.values(), key=lambda o: (o.order_date, o.order_id))
    return ordered[:limit] if limit else ordered


def abandoned(order_id: str, share: float) -> bool:
    """Deterministically pick ``share`` of the orders as abandoned carts."""
    digest = int.from_bytes(hashlib.sha256(order_id.encode()).digest()[:8], "big")
    return digest / 2**64 < share


class Replay:
    """One replay run against ``url`` (the server's ``/graphql``)."""

    def __init__(
        self,
        url: str,
        orders: list[Order],
        *,
        clients: int = 8,
        fraction: float = 0.8,
        restock_days: int = 30,
        abandon_share: float = 0.2,
        abandon_ttl: int = 2,
        run_id: str | None = None,
        batch: int | None = None,
    ) -> None:
        self.url = url
        self.batch = batch
        self.orders = orders
        self.clients = clients
        self.fraction = fraction
        self.restock_days = restock_days
        self.abandon_share = abandon_share
        self.abandon_ttl = abandon_ttl
        self.run_id = run_id or hashlib.sha256(str(time.time()).encode()).hexdigest()[:8]
        self.out = Outcome()
        self._client: httpx.AsyncClient | None = None

    async def call(self, name: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        """POST one GraphQL operation; returns ``data``. Top-level errors raise RuntimeError."""
        assert self._client is not None
        start = time.perf_counter()
        resp = await self._client.post(self.url, json={"query": query, "variables": variables})
        self.out.latencies[name].append(time.perf_counter() - start)
        resp.raise_for_status()
        body = resp.json()
        if body.get("errors"):
            raise RuntimeError(f"{name}: GraphQL errors {body['errors']}")
        return body["data"]  # type: ignore[no-any-return]

    async def _pool(self, jobs: list[Any]) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)

        async def worker() -> None:
            while not queue.empty():
                job = queue.get_nowait()
                await job()

        await asyncio.gather(*(worker() for _ in range(min(self.clients, len(jobs)) or 1)))

    def _demand(self) -> tuple[dict[tuple[str, str], int], dict[tuple[int, tuple[str, str]], int]]:
        total: dict[tuple[str, str], int] = defaultdict(int)
        per_period: dict[tuple[int, tuple[str, str]], int] = defaultdict(int)
        start = self.orders[0].order_date
        for o in self.orders:
            period = (o.order_date - start).days // self.restock_days
            for k, q in o.lines.items():
                total[k] += q
                per_period[(period, k)] += q
        return total, per_period

    async def restock(self, lines: dict[tuple[str, str], int], key: str) -> None:
        items = [
            {"location": loc, "sku": sku, "quantity": q} for (loc, sku), q in lines.items() if q > 0
        ]
        for i in range(0, len(items), 500):
            data = await self.call(
                "restock",
                RESTOCK,
                {
                    "input": {
                        "idempotencyKey": f"{key}-{i}",
                        "lines": items[i : i + 500],
                        "reason": "replay",
                    }
                },
            )
            if data["restock"]["__typename"] != "RestockSuccess":
                raise RuntimeError(f"restock failed: {data['restock']}")
            self.out.counts["restocks"] += 1

    def _reserve_input(self, order: Order) -> dict[str, Any]:
        cart: dict[str, Any] = {
            "idempotencyKey": f"{self.run_id}:reserve:{order.order_id}",
            "lines": [
                {"location": loc, "sku": sku, "quantity": q}
                for (loc, sku), q in order.lines.items()
            ],
            "reference": {"type": "ORDER", "id": f"{self.run_id}:{order.order_id}"},
        }
        if abandoned(order.order_id, self.abandon_share):
            cart["ttlSeconds"] = self.abandon_ttl
        return cart

    def _reserved(self, order: Order, result: dict[str, Any]) -> None:
        kind = result["__typename"]
        if kind == "ReserveSuccess":
            self.out.counts["reserved"] += 1
            if abandoned(order.order_id, self.abandon_share):
                self.out.counts["abandoned"] += 1
            else:
                self.out.reservation_ids[order.order_id] = result["reservation"]["id"]
        elif kind == "InsufficientStockError":
            self.out.counts["failed_insufficient_stock"] += 1
        else:
            self.out.counts[f"failed_{kind}"] += 1
            self.out.failures.append(f"reserve {order.order_id}: {result}")

    def _deduct_input(self, order: Order, rid: str) -> dict[str, Any]:
        return {"idempotencyKey": f"{self.run_id}:deduct:{order.order_id}", "reservationId": rid}

    def _deducted(self, order: Order, result: dict[str, Any]) -> None:
        if result["__typename"] == "DeductSuccess":
            self.out.counts["deducted"] += 1
        else:
            self.out.counts[f"deduct_{result['__typename']}"] += 1
            self.out.failures.append(f"deduct {order.order_id}: {result}")

    async def reserve(self, order: Order) -> None:
        data = await self.call("reserve", RESERVE, {"input": self._reserve_input(order)})
        self._reserved(order, data["reserve"])

    async def deduct(self, order: Order) -> None:
        rid = self.out.reservation_ids.get(order.order_id)
        if rid is None:
            return
        data = await self.call("deduct", DEDUCT, {"input": self._deduct_input(order, rid)})
        self._deducted(order, data["deduct"])

    async def reserve_many(self, orders: list[Order]) -> None:
        carts = [self._reserve_input(o) for o in orders]
        data = await self.call("reserveMany", RESERVE_MANY, {"input": {"carts": carts}})
        for order, result in zip(orders, data["reserveMany"]["results"], strict=True):
            self._reserved(order, result)

    async def deduct_many(self, orders: list[Order]) -> None:
        shipped = [(o, rid) for o in orders if (rid := self.out.reservation_ids.get(o.order_id))]
        if not shipped:
            return
        items = [self._deduct_input(o, rid) for o, rid in shipped]
        data = await self.call("deductMany", DEDUCT_MANY, {"input": {"items": items}})
        for (order, _), result in zip(shipped, data["deductMany"]["results"], strict=True):
            self._deducted(order, result)

    def _jobs(self, orders: list[Order], one: Any, many: Any) -> list[Any]:
        """A day's calls: one per order, or (with ``batch``) one per ``batch`` orders."""
        if not self.batch:
            return [lambda o=o: one(o) for o in orders]
        chunks = [orders[i : i + self.batch] for i in range(0, len(orders), self.batch)]
        return [lambda c=c: many(c) for c in chunks]

    async def run(self) -> float:
        """Replay every order; returns the elapsed wall time in seconds."""
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            self._client = client
            total, per_period = self._demand()
            start_day = self.orders[0].order_date
            t0 = time.perf_counter()
            await self.restock(
                {k: math.ceil(self.fraction * q) for k, q in total.items()},
                f"{self.run_id}:opening",
            )
            by_order_day: dict[date, list[Order]] = defaultdict(list)
            by_ship_day: dict[date, list[Order]] = defaultdict(list)
            for o in self.orders:
                by_order_day[o.order_date].append(o)
                by_ship_day[o.ship_date].append(o)
            days = sorted(set(by_order_day) | set(by_ship_day))
            day = days[0]
            last_period = 0
            while day <= days[-1]:
                period = (day - start_day).days // self.restock_days
                if period > last_period:
                    ended = {
                        k: math.ceil((1 - self.fraction) * q)
                        for (p, k), q in per_period.items()
                        if p == last_period
                    }
                    await self.restock(ended, f"{self.run_id}:restock:{period}")
                    last_period = period
                today = by_order_day.get(day, [])
                await self._pool(self._jobs(today, self.reserve, self.reserve_many))
                shipped = by_ship_day.get(day, [])
                await self._pool(self._jobs(shipped, self.deduct, self.deduct_many))
                day += timedelta(days=1)
            elapsed = time.perf_counter() - t0
        return elapsed

    async def _pages(self, query: str, field_name: str, **variables: Any) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = []
        after = None
        while True:
            data = (await self.call(f"query_{field_name}", query, {"after": after, **variables}))[
                field_name
            ]
            nodes.extend(e["node"] for e in data["edges"])
            if not data["pageInfo"]["hasNextPage"]:
                return nodes
            after = data["pageInfo"]["endCursor"]

    async def check(self, expire_wait: float = 10.0) -> list[str]:
        """The end-of-run checks through the API; returns the failures (empty: all passed)."""
        problems = list(self.out.failures)
        async with httpx.AsyncClient(timeout=60) as client:
            self._client = client
            # Abandoned carts expire on the server's sweeper; wait for them (bounded).
            deadline = time.monotonic() + expire_wait
            mine = []
            while True:
                active = await self._pages(RESERVATIONS, "reservations", status="ACTIVE")
                mine = [r for r in active if r["reference"]["id"].startswith(f"{self.run_id}:")]
                if not mine or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            if mine:
                problems.append(f"{len(mine)} reservations still ACTIVE after {expire_wait} s")
            expired = [
                r
                for r in await self._pages(RESERVATIONS, "reservations", status="EXPIRED")
                if r["reference"]["id"].startswith(f"{self.run_id}:")
            ]
            committed = [
                r
                for r in await self._pages(RESERVATIONS, "reservations", status="COMMITTED")
                if r["reference"]["id"].startswith(f"{self.run_id}:")
            ]
            self.out.counts["expired"] = len(expired)
            balances = await self._pages(BALANCES, "balances")
            ledger = await self._pages(LEDGER, "ledger")
        sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for e in ledger:
            s = sums[(e["location"], e["sku"])]
            s[0] += e["onHandDelta"]
            s[1] += e["reservedDelta"]
        for b in balances:
            k = (b["location"], b["sku"])
            if b["onHand"] < 0 or b["reserved"] < 0 or b["available"] < 0:
                problems.append(f"negative balance {k}: {b}")
            if b["reserved"] > b["onHand"]:
                problems.append(f"reserved above on hand {k}: {b}")
            if sums.get(k, [0, 0]) != [b["onHand"], b["reserved"]]:
                problems.append(f"ledger sums {sums.get(k)} != balance {k}: {b}")
        c = self.out.counts
        carts = len(self.orders)
        failed = sum(v for k, v in c.items() if k.startswith("failed_"))
        if c["reserved"] + failed != carts:
            problems.append(f"reserved {c['reserved']} + failed {failed} != carts {carts}")
        if c["deducted"] != len(committed):
            problems.append(f"deducted {c['deducted']} != COMMITTED reservations {len(committed)}")
        if c["abandoned"] != len(expired):
            problems.append(f"abandoned {c['abandoned']} != EXPIRED reservations {len(expired)}")
        if c["reserved"] != c["deducted"] + c["abandoned"]:
            problems.append(
                f"reserved {c['reserved']} != deducted {c['deducted']} + abandoned {c['abandoned']}"
            )
        return problems

    def report(self, elapsed: float) -> str:
        """Carts per second, p50/p95/p99 per mutation (ms) and the outcome counts."""
        lines = [
            f"orders: {len(self.orders)}  clients: {self.clients}  "
            + (f"batch: {self.batch}  " if self.batch else "")
            + f"elapsed: {elapsed:.2f} s  carts/s: {len(self.orders) / elapsed:.1f}"
        ]
        for name in ("reserve", "deduct", "reserveMany", "deductMany", "restock"):
            lat = sorted(self.out.latencies.get(name, []))
            if lat:
                q = (
                    statistics.quantiles(lat, n=100, method="inclusive")
                    if len(lat) > 1
                    else [lat[0]] * 99
                )
                lines.append(
                    f"{name:8s} n={len(lat):6d}  p50={q[49] * 1000:7.2f} ms  "
                    f"p95={q[94] * 1000:7.2f} ms  p99={q[98] * 1000:7.2f} ms"
                )
        lines.append(
            "outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.out.counts.items()))
        )
        return "\n".join(lines)


async def run_replay(
    url: str,
    *,
    orders: int | None = None,
    data: Path = DEFAULT_DATA,
    clients: int = 8,
    fraction: float = 0.8,
    restock_days: int = 30,
    abandon_share: float = 0.2,
    abandon_ttl: int = 2,
    expire_wait: float = 15.0,
    batch: int | None = None,
) -> tuple[str, list[str]]:
    """Run a replay and its checks; returns (report text, failures). ``batch``: carts (and
    shipments) per reserveMany (deductMany) call; None: one reserve (deduct) per order."""
    replay = Replay(
        url,
        load_orders(data, orders),
        clients=clients,
        fraction=fraction,
        restock_days=restock_days,
        abandon_share=abandon_share,
        abandon_ttl=abandon_ttl,
        batch=batch,
    )
    elapsed = await replay.run()
    problems = await replay.check(expire_wait=expire_wait)
    return replay.report(elapsed), problems
