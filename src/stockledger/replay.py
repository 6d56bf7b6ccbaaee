"""Replay the Superstore orders through a running server's GraphQL API (``stockledger replay``).

Data: ``stockledger/data/superstore/superstore.csv.gz``, shipped inside the package (MIT,
copyright 2020 Andrew Stein; license beside the file). Locations are the four regions, SKUs
are Product IDs, each Order ID is one cart reserved at its Order Date with reference
``{type: "ORDER", id}`` and deducted at its Ship Date, in date order.

Stock: opening stock per (location, SKU) is ``ceil(fraction * total demand)`` (most balances
see only a few units of demand, so rounding down would open many of them short of their one
order); every
``restock_days`` days each balance is restocked with ``ceil((1 - fraction) * demand of the
period just ended)``, so supply roughly meets demand but lags it and some carts meet
insufficient stock. A deterministic ``abandon_share`` of carts is reserved with a short TTL and
never deducted: the server's sweeper expires them.

Transfers (issue 11, off by default): with ``transfer_share`` s, at each restock interval, after
its restock, every SKU just restocked that has balances in two or more regions sends
``floor(s * on hand)`` units from its region with the most on hand to the one with the least
(one ``transfer`` of one line per SKU; none when they hold the same). The source needs them
*available*: when reserved units are among them the server answers InsufficientStockError,
counted ``transfers_short`` (not retried). With ``transfer_in_transit`` the units travel:
``inTransit: true``, received whole (``receiveTransfer``, no lines) at the next interval before
its restock; the last interval's transfers are left in transit, so the end checks see units
in transit.

Concurrency: the days are replayed in order; within a day, restocks, then reserves, then
deducts run on ``clients`` concurrent connections (so each order keeps reserve -> deduct).
With ``batch`` N, a day's carts go in ``reserveMany`` calls of up to N carts and its
shipments in ``deductMany`` calls (part BATCH), on the same connections.

Instances (issue 13, part 6): given several GraphQL URLs (``stockledger serve`` instances on
one database and one Redis), every call goes to one picked at random. A call is sent again,
with the same body and so the same idempotency keys, on another instance (at most
``retries`` attempts in all, with a bounded backoff) when it meets a transport error (refused
or reset connection, a server gone mid-request, a timeout) or a top-level ``UNAVAILABLE``
(HTTP 503); a typed ``LockTimeoutError`` (``LOCK_TIMEOUT``) is sent again likewise (for a
batch, its timed-out items). No other error is retried. :func:`interrupt` SIGKILLs (through a
callback) one instance mid-run and restarts it.

At the end it checks through the API alone: no negative balance, no reserved above on hand,
the ledger's deltas sum to every balance, and the cart counts add up. Conservation, per SKU of
the run (``stockLevels``): the change in on hand over all locations plus units in transit
(``incoming``) since the run began equals the run's own tally of restocks - deducts (the
replay adjusts nothing), the change in ``incoming`` equals the units the run left in transit,
and every transfer the run was told of exists once with the lines and status it should have
(it assumes no other client writes the run's SKUs meanwhile). Then exactly once: every
retried call and a sample of the others, sent again with the same keys, answer ``replayed``
(with the same reservation, or transfer); the run's ledger entries are exactly the effects
the client was told of (transfers and receipts included), each once (by idempotency key, and
by reservation for the sweeper's expiries); each reserved cart has exactly one reservation,
each refused cart none. It prints carts per second, p50/p95/p99 latency per mutation, the
outcome, transfer and retry counts and the conservation totals, and exits non-zero when a
check fails. HTTP client: httpx (HTTP/1.1 keep-alive pool).

Events (issue 12, ``events``, off by default): a loopback webhook receiver in this process
(``http.server`` in a thread; signatures verified with ``standardwebhooks``, deduped by
webhook-id) registered for STOCK_CHANGED, STOCK_LOW, STOCK_OUT and STOCK_REPLENISHED, one
graphql-transport-ws subscriber (``stockChanged`` on up to 500 of the run's SKUs) and reorder
points on half the run's balances. After the run (bounded wait for the deliveries): every
STOCK_CHANGED's balance equals the ledger at its version and every version the run wrote
arrived; per balance, the alert transitions received equal those section 15's table implies
over the ledger; the subscriber's versions rise per balance and match the ledger.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import math
import random
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "superstore" / "superstore.csv.gz"

RESERVE = """mutation($input: ReserveInput!) { reserve(input: $input) {
  __typename
  ... on ReserveSuccess { reservation { id } replayed }
  ... on LockTimeoutError { retryAfterMs }
  ... on Error { code message } } }"""
DEDUCT = """mutation($input: DeductInput!) { deduct(input: $input) {
  __typename
  ... on DeductSuccess { replayed }
  ... on LockTimeoutError { retryAfterMs }
  ... on Error { code message } } }"""
RESERVE_MANY = """mutation($input: ReserveManyInput!) { reserveMany(input: $input) { results {
  __typename
  ... on ReserveSuccess { reservation { id } replayed }
  ... on LockTimeoutError { retryAfterMs }
  ... on Error { code message } } } }"""
DEDUCT_MANY = """mutation($input: DeductManyInput!) { deductMany(input: $input) { results {
  __typename
  ... on DeductSuccess { replayed }
  ... on LockTimeoutError { retryAfterMs }
  ... on Error { code message } } } }"""
RESTOCK = """mutation($input: RestockInput!) { restock(input: $input) {
  __typename
  ... on RestockSuccess { replayed }
  ... on LockTimeoutError { retryAfterMs }
  ... on Error { code message } } }"""
BALANCES = """query($after: String) { balances(first: 500, after: $after) {
  edges { node { sku location onHand reserved available } }
  pageInfo { hasNextPage endCursor } } }"""
LEDGER = """query($after: String) { ledger(first: 500, after: $after, direction: ASC) {
  edges { node { id sku location onHandDelta reservedDelta onHandAfter reservedAfter eventType
    idempotencyKey reservationId } }
  pageInfo { hasNextPage endCursor } } }"""
TRANSFER = """mutation($input: TransferInput!) { transfer(input: $input) {
  __typename
  ... on TransferSuccess { transfer { id status } replayed }
  ... on InsufficientStockError { shortages { sku requested available } }
  ... on LockTimeoutError { retryAfterMs }
  ... on Error { code message } } }"""
RECEIVE = """mutation($input: ReceiveTransferInput!) { receiveTransfer(input: $input) {
  __typename
  ... on TransferSuccess { transfer { id status } replayed }
  ... on LockTimeoutError { retryAfterMs }
  ... on Error { code message } } }"""
BALANCES_OF = """query($skus: [String!], $after: String) {
  balances(first: 500, after: $after, filter: {skus: $skus}) {
  edges { node { sku location onHand reserved available incoming version
    reorderPoint { minimumLevel } } }
  pageInfo { hasNextPage endCursor } } }"""
STOCK_LEVELS = """query($sku: String!) { stockLevels(sku: $sku) {
  onHand reserved available incoming locations { location onHand reserved incoming } } }"""
TRANSFERS = """query($after: String) { transfers(first: 500, after: $after) {
  edges { node { id status fromLocation toLocation reference { type id }
    lines { sku quantity received remaining returned } } }
  pageInfo { hasNextPage endCursor } } }"""
RESERVATIONS = """query($after: String, $status: ReservationStatus) {
  reservations(first: 500, after: $after, filter: {status: $status}) {
  edges { node { id status reference { type id } } }
  pageInfo { hasNextPage endCursor } } }"""

# Transport errors a call is sent again for (on another instance): a refused, reset or
# dropped connection, a server gone mid-request, a timeout. Not LocalProtocolError (our bug).
RETRIED_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
RETRY_BACKOFF = 0.05  # seconds before the first resend after a transport error; doubles
RETRY_MAX_DELAY = 2.0  # seconds, the cap on any wait between two attempts
MAX_FILTER_SKUS = 500  # the server's cap on a filter's list (balances(filter: {skus}))


@dataclass
class Order:
    """One cart: ``lines`` maps (location, sku) to units."""

    order_id: str
    order_date: date
    ship_date: date
    lines: dict[tuple[str, str], int]


@dataclass
class Moved:
    """One transfer the server answered TransferSuccess for: its ``input`` (as sent, for the
    idempotency probe), its opaque ``transfer_id``, and the receipt's idempotency key once it
    was received (``received_key``; None while in transit, or for an immediate transfer)."""

    input: dict[str, Any]
    transfer_id: str
    received_key: str | None = None

    @property
    def sku(self) -> str:
        return str(self.input["lines"][0]["sku"])

    @property
    def quantity(self) -> int:
        return int(self.input["lines"][0]["quantity"])

    @property
    def in_transit(self) -> bool:
        """Sent in transit and not received yet."""
        return bool(self.input["inTransit"]) and self.received_key is None


@dataclass
class Outcome:
    """What the replay saw, and the per-mutation latencies in seconds.

    ``reservation_ids``: order id -> reservation id of the carts to deduct; ``reserved``: of
    every reserved cart (abandoned ones too); ``deducted``: the orders deducted; ``restocks``:
    idempotency key -> lines of every restock that succeeded; ``retries``: resends by reason
    (the transport error's class name, ``UNAVAILABLE`` or ``LOCK_TIMEOUT``); ``retried_keys``:
    the idempotency keys of the calls sent more than once; ``sent``: requests per instance
    URL (every attempt); ``transfers``: transfer idempotency key -> :class:`Moved`, of every
    transfer that succeeded; ``receipts``: receipt idempotency key -> its transfer's key;
    ``conservation``: the conservation check's summary line, once checked; ``events``: the
    events check's summary line (issue 12), once checked.
    """

    counts: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    reservation_ids: dict[str, str] = field(default_factory=dict)
    reserved: dict[str, str] = field(default_factory=dict)
    deducted: set[str] = field(default_factory=set)
    restocks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    retries: Counter[str] = field(default_factory=Counter)
    retried_keys: set[str] = field(default_factory=set)
    sent: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    transfers: dict[str, Moved] = field(default_factory=dict)
    receipts: dict[str, str] = field(default_factory=dict)
    conservation: str | None = None
    events: str | None = None


@dataclass(frozen=True, slots=True)
class _Resend:
    """An attempt's answer that asks to send again (on another instance) after ``delay``
    seconds: ``reason`` (the transport error's class name, or ``UNAVAILABLE``) and the
    transport ``error``, if that was it."""

    reason: str
    delay: float
    error: httpx.TransportError | None = None


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


def _unavailable_ms(body: Any) -> int | None:
    """``retryAfterMs`` of a top-level ``UNAVAILABLE`` error in a GraphQL body, else None."""
    if not isinstance(body, dict):
        return None
    for error in body.get("errors") or []:
        extensions = (error.get("extensions") or {}) if isinstance(error, dict) else {}
        if extensions.get("code") == "UNAVAILABLE":
            return int(extensions.get("retryAfterMs") or 100)
    return None


def _keys(variables: dict[str, Any]) -> list[str]:
    """The idempotency keys in a mutation's variables (one call, or a batch's items)."""
    payload = variables.get("input") or {}
    if "idempotencyKey" in payload:
        return [payload["idempotencyKey"]]
    return [i["idempotencyKey"] for i in payload.get("carts", payload.get("items", []))]


# ------------------------------------------------------------------ events (issue 12)

SET_REORDER_POINT = """mutation($input: SetReorderPointInput!) { setReorderPoint(input: $input) {
  __typename
  ... on ReorderPointSuccess { replayed }
  ... on Error { code message } } }"""
CREATE_WEBHOOK = """mutation($input: CreateWebhookEndpointInput!) {
  createWebhookEndpoint(input: $input) {
  __typename
  ... on CreateWebhookEndpointSuccess { endpoint { id } secret replayed }
  ... on Error { code message } } }"""
DELETE_WEBHOOK = """mutation($input: DeleteWebhookEndpointInput!) {
  deleteWebhookEndpoint(input: $input) { __typename } }"""
STOCK_CHANGED_SUBSCRIPTION = """subscription($skus: [String!]!) {
  stockChanged(skus: $skus) { sku location onHand reserved version } }"""
ALERT_TYPES = ("STOCK_LOW", "STOCK_OUT", "STOCK_REPLENISHED")
EVENT_TYPES = ("STOCK_CHANGED", *ALERT_TYPES)
# Of two transitions at one version (OK -> OUT with a reorder point), LOW goes out first.
ALERT_RANK = {t: i for i, t in enumerate(ALERT_TYPES)}
SUBSCRIBED_SKUS = 500  # the server's cap on stockChanged(skus) (MAX_LINES)
WS_PROTOCOL = "graphql-transport-ws"


def expected_alerts(
    after: Sequence[tuple[int, int]], minimum: int | None, state: str = "OK"
) -> list[tuple[int, str]]:
    """Section 15's transitions of one balance, independently of the server's code.

    ``after``: (version, available after it) of each of the balance's moves in order
    (available = onHandAfter - reservedAfter of the ledger entry at that version);
    ``minimum``: the reorder point's minimumLevel throughout (None: no reorder point);
    ``state``: the stored alert state before the first of them (``OK``, ``LOW`` or ``OUT``).
    Returns the (version, event type) of every STOCK_LOW / STOCK_OUT / STOCK_REPLENISHED in
    order. Target after a move: OUT at available <= 0, else LOW at available <= minimum, else
    OK; OK -> LOW: LOW; OK -> OUT: LOW (with a reorder point) then OUT; LOW -> OUT: OUT;
    LOW/OUT -> OK: REPLENISHED; OUT -> LOW: nothing.
    """
    out: list[tuple[int, str]] = []
    for version, available in after:
        if available <= 0:
            target = "OUT"
        elif minimum is not None and available <= minimum:
            target = "LOW"
        else:
            target = "OK"
        if target == state:
            continue
        if target == "OK":
            out.append((version, "STOCK_REPLENISHED"))
        elif target == "LOW":
            if state == "OK":
                out.append((version, "STOCK_LOW"))
        else:
            if state == "OK" and minimum is not None:
                out.append((version, "STOCK_LOW"))
            out.append((version, "STOCK_OUT"))
        state = target
    return out


class Receiver:
    """A loopback webhook receiver (``http.server`` in a daemon thread, so the replay's event
    loop never delays an answer past the server's 5 s timeout).

    Each POST is verified with the ``standardwebhooks`` library against :attr:`secret` (set
    once the endpoint exists: until then it answers 503, so the delivery is retried): a bad
    signature answers 400 and counts in ``rejected``. A verified one answers 204; the first
    of a webhook-id is kept in ``events`` (webhook-id -> the parsed body, in arrival order),
    a later one counts in ``duplicates`` (at-least-once delivery). Thread-safe reads: take
    :attr:`lock`.
    """

    def __init__(self) -> None:
        import http.server
        import threading

        self.secret: str | None = None
        self.events: dict[str, dict[str, Any]] = {}
        self.duplicates = 0
        self.rejected = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(receiver.receive(body, dict(self.headers.items())))
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per delivery would drown the report

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        # A short poll: close() waits up to one poll interval for the loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def receive(self, body: bytes, headers: dict[str, str]) -> int:
        """One delivery: the HTTP status to answer (204 kept or duplicate, 400 bad
        signature, 503 no secret yet)."""
        from standardwebhooks import Webhook, WebhookVerificationError

        if self.secret is None:
            return 503
        try:
            event = Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError:
            with self.lock:
                self.rejected += 1
            return 400
        event_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
        with self.lock:
            if event_id in self.events:
                self.duplicates += 1
            else:
                self.events[event_id] = event
        return 204

    def snapshot(self) -> list[dict[str, Any]]:
        """The distinct events received so far, in arrival order."""
        with self.lock:
            return list(self.events.values())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Subscriber:
    """One graphql-transport-ws connection on ``url`` (a ``ws://.../graphql``) with one
    ``stockChanged(skus)`` subscription, as an asyncio task: ``seen`` collects each balance it
    receives ({sku, location, onHand, reserved, version}) in arrival order; ``error`` the
    reason it stopped early, if it did (a closed socket, an error message)."""

    def __init__(self, url: str, skus: Sequence[str], api_key: str | None) -> None:
        self.url = url
        self.skus = list(skus)
        self.api_key = api_key
        self.seen: list[dict[str, Any]] = []
        self.error: str | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, within: float = 10.0) -> None:
        """Connect, authenticate and subscribe (bounded by ``within`` seconds). Raises
        RuntimeError when the server refuses (the close code and reason)."""
        self._task = asyncio.create_task(self._listen())
        try:
            async with asyncio.timeout(within):
                await self._ready.wait()
        except TimeoutError:
            self.error = self.error or f"not subscribed within {within} s"
        if self.error is not None:
            await self.close()
            raise RuntimeError(f"subscriber: {self.error}")

    async def _listen(self) -> None:
        import json

        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed
        from websockets.typing import Subprotocol

        payload = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with connect(self.url, subprotocols=[Subprotocol(WS_PROTOCOL)]) as ws:
                await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
                ack = json.loads(await ws.recv())
                if ack.get("type") != "connection_ack":
                    self.error = f"no connection_ack: {ack}"
                    return
                variables = {"skus": self.skus}
                op = {"query": STOCK_CHANGED_SUBSCRIPTION, "variables": variables}
                await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": op}))
                self._ready.set()  # the protocol has no subscribe ack
                async for frame in ws:
                    message = json.loads(frame)
                    kind = message.get("type")
                    if kind == "ping":
                        await ws.send(json.dumps({"type": "pong"}))
                    elif kind == "next" and not message["payload"].get("errors"):
                        self.seen.append(message["payload"]["data"]["stockChanged"])
                    elif kind in ("next", "error", "complete"):
                        self.error = f"subscription ended: {message}"
                        return
        except ConnectionClosed as closed:
            rcvd = closed.rcvd
            self.error = f"closed {rcvd.code if rcvd else None} {rcvd.reason if rcvd else ''}"
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()

    async def close(self) -> None:
        """Stop listening (cancels the task; closing the socket ends the subscription)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


class Replay:
    """One replay run against ``url``: one server's ``/graphql``, or several instances' (a
    call goes to one at random).

    ``retries``: attempts per call in all (>= 1) for transport errors, ``UNAVAILABLE`` and
    ``LOCK_TIMEOUT``; ``probe``: how many calls that were not retried the idempotency check
    sends again (every retried one is). ``api_key``: the secret sent as ``Authorization:
    Bearer`` (it needs STOCK_WRITE, RESERVATIONS_WRITE and STOCK_READ: an OPERATOR key), or
    None for a server with ``STOCKLEDGER_AUTH=off``. ``transfer_share``: the share (0 < s <=
    1) of the fullest region's on hand each restocked SKU sends to the emptiest at each restock
    interval, None for no transfers; ``transfer_in_transit``: send them in transit, received at
    the next interval (else immediate). The transfers also need STOCK_WRITE.

    ``events`` (issue 12): before the run, start a loopback webhook :class:`Receiver`,
    register it for STOCK_CHANGED and the three alert types (``createWebhookEndpoint``: an
    ADMIN key; the server needs ``STOCKLEDGER_WEBHOOK_ALLOW_PRIVATE=true``), open a
    :class:`Subscriber` on up to 500 of the run's SKUs, and set a reorder point on half the
    run's balances (chosen by hash) with minimumLevel ``max(1, floor(reorder_level * opening
    stock))``; :meth:`check` then waits up to ``events_wait`` seconds for the deliveries and
    checks them against the ledger (:meth:`_check_events`). Raises ValueError for no URL,
    ``retries`` < 1, ``transfer_share`` outside (0, 1] or ``reorder_level`` outside [0, 1].
    """

    def __init__(
        self,
        url: str | Sequence[str],
        orders: list[Order],
        *,
        clients: int = 8,
        fraction: float = 0.8,
        restock_days: int = 30,
        abandon_share: float = 0.2,
        abandon_ttl: int = 2,
        run_id: str | None = None,
        batch: int | None = None,
        retries: int = 8,
        probe: int = 20,
        api_key: str | None = None,
        transfer_share: float | None = None,
        transfer_in_transit: bool = False,
        events: bool = False,
        events_wait: float = 30.0,
        reorder_level: float = 0.5,
    ) -> None:
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("no GraphQL URL")
        if retries < 1:
            raise ValueError(f"retries must be at least 1, not {retries}")
        if transfer_share is not None and not 0 < transfer_share <= 1:
            raise ValueError(f"transfer_share must be in (0, 1], not {transfer_share}")
        if not 0 <= reorder_level <= 1:
            raise ValueError(f"reorder_level must be in [0, 1], not {reorder_level}")
        self.transfer_share = transfer_share
        self.transfer_in_transit = transfer_in_transit
        self.api_key = api_key
        self.events = events
        self.events_wait = events_wait
        self.reorder_level = reorder_level
        self.url = self.urls[0]
        self.batch = batch
        self.orders = orders
        self.clients = clients
        self.fraction = fraction
        self.restock_days = restock_days
        self.abandon_share = abandon_share
        self.abandon_ttl = abandon_ttl
        self.retries = retries
        self.probe = probe
        self.run_id = run_id or hashlib.sha256(str(time.time()).encode()).hexdigest()[:8]
        self.out = Outcome()
        self.in_flight: Counter[str] = Counter()  # url -> requests sent, not answered yet
        self.running = False
        self._rng = random.Random(self.run_id)
        self._by_id = {o.order_id: o for o in orders}
        self._regions = sorted({loc for o in orders for loc, _ in o.lines})
        self._skus = sorted({sku for o in orders for _, sku in o.lines})
        # sku -> (on hand over all locations, incoming) before the run; None until it ran.
        self._opening: dict[str, tuple[int, int]] | None = None
        self._client: httpx.AsyncClient | None = None
        # Events (issue 12): (location, sku) -> (version, available, minimumLevel or None)
        # before the run, of the balances that existed; the minimumLevel the run set.
        self._before: dict[tuple[str, str], tuple[int, int, int | None]] = {}
        self._minimums: dict[tuple[str, str], int] = {}
        self._receiver: Receiver | None = None
        self._subscriber: Subscriber | None = None
        self._endpoint_id: str | None = None

    @property
    def answered(self) -> int:
        """Carts answered so far (reserved or refused)."""
        c = self.out.counts
        return c["reserved"] + sum(v for k, v in c.items() if k.startswith("failed_"))

    def _pick(self, avoid: str | None = None) -> str:
        """A random instance, another than ``avoid`` when there is one."""
        others = [u for u in self.urls if u != avoid] or self.urls
        return self._rng.choice(others)

    async def _post(
        self, url: str, query: str, variables: dict[str, Any], attempt: int
    ) -> dict[str, Any] | _Resend:
        """One attempt: the GraphQL body, or a :class:`_Resend` for what is sent again."""
        assert self._client is not None
        self.in_flight[url] += 1
        self.out.sent[url] += 1
        try:
            resp = await self._client.post(url, json={"query": query, "variables": variables})
        except RETRIED_ERRORS as exc:
            delay = min(RETRY_BACKOFF * 2 ** (attempt - 1), RETRY_MAX_DELAY)
            return _Resend(type(exc).__name__, delay * self._rng.uniform(0.5, 1.0), exc)
        finally:
            self.in_flight[url] -= 1
        try:
            body = resp.json()
        except ValueError:
            body = None
        retry_after_ms = _unavailable_ms(body)
        if retry_after_ms is not None:
            return _Resend("UNAVAILABLE", min(retry_after_ms / 1000, RETRY_MAX_DELAY))
        resp.raise_for_status()
        if not isinstance(body, dict):
            raise RuntimeError(f"not a GraphQL answer from {url}: {resp.text[:200]!r}")
        return body

    async def call(self, name: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        """POST one GraphQL operation to a random instance; returns ``data``.

        A transport error or a top-level ``UNAVAILABLE`` sends the same body again on another
        instance, after a backoff (at most ``RETRY_MAX_DELAY`` s), up to ``retries`` attempts
        in all. The latency recorded under ``name`` (seconds) spans every attempt. Raises the
        last error when the attempts run out (an httpx.TransportError, or RuntimeError for
        UNAVAILABLE), RuntimeError for any other top-level GraphQL error, and
        httpx.HTTPStatusError for another HTTP error status.
        """
        start = time.perf_counter()
        url = self._pick()
        attempt = 1
        while True:
            answer = await self._post(url, query, variables, attempt)
            if not isinstance(answer, _Resend):
                body = answer
                break
            if attempt >= self.retries:
                if answer.error is not None:
                    raise answer.error
                raise RuntimeError(f"{name}: {answer.reason} after {attempt} attempts")
            self.out.retries[answer.reason] += 1
            self.out.retried_keys.update(_keys(variables))
            await asyncio.sleep(answer.delay)
            url = self._pick(avoid=url)
            attempt += 1
        self.out.latencies[name].append(time.perf_counter() - start)
        if body.get("errors"):
            raise RuntimeError(f"{name}: GraphQL errors {body['errors']}")
        return body["data"]  # type: ignore[no-any-return]

    async def _lock_timeout_wait(self, results: list[dict[str, Any]], keys: list[str]) -> None:
        """Count a resend for each LOCK_TIMEOUT result and sleep its ``retryAfterMs``."""
        waits = [r.get("retryAfterMs") or 100 for r in results]
        self.out.retries["LOCK_TIMEOUT"] += len(results)
        self.out.retried_keys.update(keys)
        await asyncio.sleep(min(max(waits) / 1000, RETRY_MAX_DELAY))

    async def mutate(
        self, name: str, query: str, field_name: str, input: dict[str, Any]
    ) -> dict[str, Any]:
        """One mutation's result object (``data[field_name]``), sent again with the same
        key while it answers LockTimeoutError, up to ``retries`` calls; the last result.
        Raises what :meth:`call` raises."""
        for attempt in range(1, self.retries + 1):
            result = (await self.call(name, query, {"input": input}))[field_name]
            if result.get("code") != "LOCK_TIMEOUT" or attempt == self.retries:
                break
            await self._lock_timeout_wait([result], _keys({"input": input}))
        return result  # type: ignore[no-any-return]

    async def mutate_many(
        self, name: str, query: str, field_name: str, list_name: str, items: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """A batch mutation's results, one per item in order; the items answered
        LockTimeoutError are sent again (in one batch, same keys) up to ``retries`` calls.
        Raises what :meth:`call` raises."""
        results: list[dict[str, Any] | None] = [None] * len(items)
        todo = list(range(len(items)))
        for attempt in range(1, self.retries + 1):
            data = await self.call(name, query, {"input": {list_name: [items[i] for i in todo]}})
            answers = data[field_name]["results"]
            for i, r in zip(todo, answers, strict=True):
                results[i] = r
            timed_out = [
                i for i, r in zip(todo, answers, strict=True) if r.get("code") == "LOCK_TIMEOUT"
            ]
            if not timed_out or attempt == self.retries:
                break
            await self._lock_timeout_wait(
                [answers[todo.index(i)] for i in timed_out],
                [items[i]["idempotencyKey"] for i in timed_out],
            )
            todo = timed_out
        return [r for r in results if r is not None]

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
        """Restock ``lines`` ((location, sku) -> units) in calls of up to 500 lines, keys
        ``{key}-{i}``. Raises RuntimeError when one does not answer RestockSuccess."""
        items = [
            {"location": loc, "sku": sku, "quantity": q} for (loc, sku), q in lines.items() if q > 0
        ]
        for i in range(0, len(items), 500):
            chunk = items[i : i + 500]
            chunk_key = f"{key}-{i}"
            input = {"idempotencyKey": chunk_key, "lines": chunk, "reason": "replay"}
            result = await self.mutate("restock", RESTOCK, "restock", input)
            if result["__typename"] != "RestockSuccess":
                raise RuntimeError(f"restock failed: {result}")
            self._replayed(chunk_key, result)
            self.out.restocks[chunk_key] = chunk
            self.out.counts["restocks"] += 1

    def _replayed(self, key: str, result: dict[str, Any]) -> None:
        """Count an answer ``replayed``: expected only for a key sent more than once."""
        if result.get("replayed"):
            self.out.counts["replayed"] += 1
            if key not in self.out.retried_keys:
                self.out.failures.append(f"{key}: replayed on its first send")

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
            self._replayed(f"{self.run_id}:reserve:{order.order_id}", result)
            self.out.counts["reserved"] += 1
            self.out.reserved[order.order_id] = result["reservation"]["id"]
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
            self._replayed(f"{self.run_id}:deduct:{order.order_id}", result)
            self.out.counts["deducted"] += 1
            self.out.deducted.add(order.order_id)
        else:
            self.out.counts[f"deduct_{result['__typename']}"] += 1
            self.out.failures.append(f"deduct {order.order_id}: {result}")

    async def reserve(self, order: Order) -> None:
        """Reserve one cart (``reserve``) and count its answer."""
        self._reserved(
            order, await self.mutate("reserve", RESERVE, "reserve", self._reserve_input(order))
        )

    async def deduct(self, order: Order) -> None:
        """Deduct one reserved cart (``deduct``) and count its answer; none if not reserved."""
        rid = self.out.reservation_ids.get(order.order_id)
        if rid is None:
            return
        result = await self.mutate("deduct", DEDUCT, "deduct", self._deduct_input(order, rid))
        self._deducted(order, result)

    async def reserve_many(self, orders: list[Order]) -> None:
        """Reserve carts in one ``reserveMany`` call and count the answers."""
        carts = [self._reserve_input(o) for o in orders]
        results = await self.mutate_many("reserveMany", RESERVE_MANY, "reserveMany", "carts", carts)
        for order, result in zip(orders, results, strict=True):
            self._reserved(order, result)

    async def deduct_many(self, orders: list[Order]) -> None:
        """Deduct the reserved ones of ``orders`` in one ``deductMany`` call; count them."""
        shipped = [(o, rid) for o in orders if (rid := self.out.reservation_ids.get(o.order_id))]
        if not shipped:
            return
        items = [self._deduct_input(o, rid) for o, rid in shipped]
        results = await self.mutate_many("deductMany", DEDUCT_MANY, "deductMany", "items", items)
        for (order, _), result in zip(shipped, results, strict=True):
            self._deducted(order, result)

    def _jobs(self, orders: list[Order], one: Any, many: Any) -> list[Any]:
        """A day's calls: one per order, or (with ``batch``) one per ``batch`` orders."""
        if not self.batch:
            return [lambda o=o: one(o) for o in orders]
        chunks = [orders[i : i + self.batch] for i in range(0, len(orders), self.batch)]
        return [lambda c=c: many(c) for c in chunks]

    # ------------------------------------------------------------------ transfers (issue 11)

    async def levels(self, skus: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``stockLevels`` of each of ``skus`` (one query per SKU, on the pool): sku -> its
        StockLevels (onHand, reserved, available, incoming, locations), absent for a SKU with
        no balance anywhere. Raises what :meth:`call` raises."""
        found: dict[str, dict[str, Any]] = {}

        async def one(sku: str) -> None:
            level = (await self.call("query_stockLevels", STOCK_LEVELS, {"sku": sku}))[
                "stockLevels"
            ]
            if level is not None:
                found[sku] = level

        await self._pool([lambda s=s: one(s) for s in skus])
        return found

    async def _balances_of(self, skus: Sequence[str]) -> list[dict[str, Any]]:
        """The balances of ``skus`` at every location (in filters of up to 500 SKUs)."""
        ordered = sorted(skus)
        found: list[dict[str, Any]] = []
        for i in range(0, len(ordered), MAX_FILTER_SKUS):
            chunk = ordered[i : i + MAX_FILTER_SKUS]
            found.extend(await self._pages(BALANCES_OF, "balances", skus=chunk))
        return found

    async def rebalance(self, period: int, skus: Sequence[str]) -> None:
        """At the restock of ``period``: for each of ``skus`` with balances in two or more
        regions, send ``floor(transfer_share * on hand)`` units from the region with the most on
        hand to the one with the least (ties broken by location code), one transfer per SKU,
        on the pool. Nothing when ``transfer_share`` is None. Raises what :meth:`call` raises."""
        share = self.transfer_share
        if share is None or not skus:
            return
        per_sku: dict[str, list[dict[str, Any]]] = defaultdict(list)
        regions = set(self._regions)
        for b in await self._balances_of(skus):
            if b["location"] in regions:
                per_sku[b["sku"]].append(b)
        jobs = []
        for sku, held in sorted(per_sku.items()):
            fullest = max(held, key=lambda b: (b["onHand"], b["location"]))
            emptiest = min(held, key=lambda b: (b["onHand"], b["location"]))
            quantity = math.floor(share * fullest["onHand"])
            if fullest["onHand"] == emptiest["onHand"] or quantity < 1:
                continue  # one region, or already even: nothing to move
            jobs.append(
                lambda sku=sku, src=fullest["location"], dst=emptiest["location"], q=quantity: (
                    self.transfer(period, sku, src, dst, q)
                )
            )
        await self._pool(jobs)

    def _transfer_input(
        self, period: int, sku: str, src: str, dst: str, quantity: int
    ) -> dict[str, Any]:
        return {
            "idempotencyKey": f"{self.run_id}:transfer:{period}:{sku}",
            "fromLocation": src,
            "toLocation": dst,
            "lines": [{"sku": sku, "quantity": quantity}],
            "inTransit": self.transfer_in_transit,
            "reference": {"type": "REBALANCE", "id": f"{self.run_id}:{period}:{sku}"},
            "reason": "replay rebalance",
        }

    async def transfer(self, period: int, sku: str, src: str, dst: str, quantity: int) -> None:
        """Send one transfer of ``quantity`` units of ``sku`` from ``src`` to ``dst`` and count
        its answer: ``transfers_ok`` (and ``transfer_units``), ``transfers_short``
        (InsufficientStockError: reserved units at the source), else ``transfers_other`` and
        a failure. Raises what :meth:`call` raises."""
        input = self._transfer_input(period, sku, src, dst, quantity)
        key = input["idempotencyKey"]
        result = await self.mutate("transfer", TRANSFER, "transfer", input)
        kind = result["__typename"]
        if kind == "TransferSuccess":
            self._replayed(key, result)
            self.out.counts["transfers_ok"] += 1
            self.out.counts["transfer_units"] += quantity
            self.out.transfers[key] = Moved(input, result["transfer"]["id"])
        elif kind == "InsufficientStockError":
            self.out.counts["transfers_short"] += 1
        else:
            self.out.counts["transfers_other"] += 1
            self.out.failures.append(f"transfer {key}: {result}")

    def _receipt_input(self, key: str) -> dict[str, Any]:
        """The receipt of transfer ``key``: everything remaining (no lines)."""
        return {
            "idempotencyKey": key.replace(":transfer:", ":receive:", 1),
            "transferId": self.out.transfers[key].transfer_id,
        }

    async def receive(self, key: str) -> None:
        """Receive the whole of in-transit transfer ``key`` (``receiveTransfer``); count
        ``received`` (a failure unless it answers TransferSuccess with status RECEIVED).
        Raises what :meth:`call` raises."""
        input = self._receipt_input(key)
        result = await self.mutate("receiveTransfer", RECEIVE, "receiveTransfer", input)
        if result["__typename"] == "TransferSuccess":
            self._replayed(input["idempotencyKey"], result)
            self.out.transfers[key].received_key = input["idempotencyKey"]
            self.out.receipts[input["idempotencyKey"]] = key
            self.out.counts["received"] += 1
            if result["transfer"]["status"] != "RECEIVED":
                self.out.failures.append(f"receipt of {key}: {result}")
        else:
            self.out.counts[f"receive_{result['__typename']}"] += 1
            self.out.failures.append(f"receipt of {key}: {result}")

    async def receive_in_transit(self) -> None:
        """Receive every transfer still in transit, on the pool."""
        pending = [k for k, m in self.out.transfers.items() if m.in_transit]
        await self._pool([lambda k=k: self.receive(k) for k in pending])

    async def run(self) -> float:
        """Replay every order; returns the elapsed wall time in seconds. Raises what
        :meth:`call` raises once its retries are spent, and RuntimeError for a failed restock."""
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        self.running = True
        try:
            async with httpx.AsyncClient(timeout=60, limits=limits, headers=self.headers) as client:
                self._client = client
                return await self._run()
        except BaseException:
            await self._stop_events(delete=False)  # check() will not run: no receiver left
            raise
        finally:
            self.running = False

    async def _run(self) -> float:
        total, per_period = self._demand()
        start_day = self.orders[0].order_date
        # Where the run's SKUs stand before it (other runs may have left stock): the
        # conservation check compares the change. From balance pages (a few queries, where
        # stockLevels takes one per SKU); the end check reads stockLevels. Not timed.
        opening: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))
        for b in await self._balances_of(self._skus):
            on_hand, incoming = opening[b["sku"]]
            opening[b["sku"]] = (on_hand + b["onHand"], incoming + b["incoming"])
            point = b.get("reorderPoint")
            self._before[(b["location"], b["sku"])] = (
                b["version"],
                b["onHand"] - b["reserved"],
                None if point is None else point["minimumLevel"],
            )
        self._opening = dict(opening)
        if self.events:
            await self._start_events(total)
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
                # Last interval's transfers arrive first, so this one's see them on hand.
                await self.receive_in_transit()
                ended = {
                    k: math.ceil((1 - self.fraction) * q)
                    for (p, k), q in per_period.items()
                    if p == last_period
                }
                await self.restock(ended, f"{self.run_id}:restock:{period}")
                await self.rebalance(
                    period, sorted({sku for (_, sku), q in ended.items() if q > 0})
                )
                last_period = period
            today = by_order_day.get(day, [])
            await self._pool(self._jobs(today, self.reserve, self.reserve_many))
            shipped = by_ship_day.get(day, [])
            await self._pool(self._jobs(shipped, self.deduct, self.deduct_many))
            day += timedelta(days=1)
        return time.perf_counter() - t0

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

    async def _mine(self, status: str | None) -> list[dict[str, Any]]:
        """This run's reservations (by reference), of ``status`` or (None) all."""
        prefix = f"{self.run_id}:"
        return [
            r
            for r in await self._pages(RESERVATIONS, "reservations", status=status)
            if (r.get("reference") or {}).get("id", "").startswith(prefix)
        ]

    async def probe_idempotency(self) -> list[str]:
        """Send again, with the same keys and payloads, every call of the run that was sent
        more than once and succeeded, and ``probe`` of the other successful ones, chosen at
        random: each must answer its success with ``replayed: true`` (a reserve, with the
        reservation it got first; a transfer or receipt, with its transfer). Returns the
        problems (empty: all replayed). Needs an open client (within :meth:`check`); raises
        what :meth:`call` raises."""
        prefix = f"{self.run_id}:"
        done: dict[str, tuple[str, str]] = {
            f"{prefix}reserve:{o}": ("reserve", o) for o in self.out.reserved
        }
        done.update({f"{prefix}deduct:{o}": ("deduct", o) for o in self.out.deducted})
        done.update({k: ("restock", k) for k in self.out.restocks})
        done.update({k: ("transfer", k) for k in self.out.transfers})
        done.update({k: ("receive", t) for k, t in self.out.receipts.items()})
        retried = sorted(k for k in self.out.retried_keys if k in done)
        others = sorted(set(done) - set(retried))
        keys = retried + self._rng.sample(others, min(self.probe, len(others)))
        problems: list[str] = []

        async def again(key: str) -> None:
            kind, subject = done[key]
            if kind == "restock":
                input = {"idempotencyKey": key, "lines": self.out.restocks[key], "reason": "replay"}
                result = await self.mutate("probe", RESTOCK, "restock", input)
                success = "RestockSuccess"
            elif kind in ("transfer", "receive"):
                moved = self.out.transfers[subject]
                if kind == "transfer":
                    result = await self.mutate("probe", TRANSFER, "transfer", moved.input)
                else:
                    input = self._receipt_input(subject)
                    result = await self.mutate("probe", RECEIVE, "receiveTransfer", input)
                success = "TransferSuccess"
                if result.get("transfer", {}).get("id", moved.transfer_id) != moved.transfer_id:
                    problems.append(f"{key} sent again: {result}, first {moved.transfer_id}")
            elif kind == "reserve":
                input = self._reserve_input(self._by_id[subject])
                result = await self._probe_one(
                    input, RESERVE, "reserve", RESERVE_MANY, "reserveMany", "carts"
                )
                success = "ReserveSuccess"
            else:
                input = self._deduct_input(self._by_id[subject], self.out.reserved[subject])
                result = await self._probe_one(
                    input, DEDUCT, "deduct", DEDUCT_MANY, "deductMany", "items"
                )
                success = "DeductSuccess"
            if result["__typename"] != success or result.get("replayed") is not True:
                problems.append(f"{key} sent again: {result}")
            elif kind == "reserve" and result["reservation"]["id"] != self.out.reserved[subject]:
                problems.append(
                    f"{key} sent again: reservation {result['reservation']['id']}, "
                    f"first {self.out.reserved[subject]}"
                )

        await self._pool([lambda k=k: again(k) for k in keys])
        self.out.counts["probed"] = len(keys)
        self.out.counts["probed_retried"] = len(retried)
        return problems

    async def _probe_one(
        self,
        input: dict[str, Any],
        one: str,
        one_field: str,
        many: str,
        many_field: str,
        list_name: str,
    ) -> dict[str, Any]:
        """Send one item again the way the run sent it (single, or a batch of one)."""
        if self.batch:
            return (await self.mutate_many("probe", many, many_field, list_name, [input]))[0]
        return await self.mutate("probe", one, one_field, input)

    def _exactly_once(
        self, ledger: list[dict[str, Any]], reservations: list[dict[str, Any]]
    ) -> list[str]:
        """The run's ledger entries against the effects the client was told of, each once;
        one reservation per reserved cart, none per refused one."""
        prefix = f"{self.run_id}:"
        expected: Counter[tuple[Any, ...]] = Counter()
        for key, lines in self.out.restocks.items():
            for ln in lines:
                expected[("RESTOCK", key, ln["location"], ln["sku"], ln["quantity"], 0)] += 1
        for oid, rid in self.out.reserved.items():
            for (loc, sku), q in self._by_id[oid].lines.items():
                expected[("RESERVE", f"{prefix}reserve:{oid}", loc, sku, 0, q)] += 1
                if oid in self.out.deducted:
                    expected[("DEDUCT", f"{prefix}deduct:{oid}", loc, sku, -q, -q)] += 1
                elif abandoned(oid, self.abandon_share):
                    expected[("EXPIRE", rid, loc, sku, 0, -q)] += 1
        for key, moved in self.out.transfers.items():
            src, dst = moved.input["fromLocation"], moved.input["toLocation"]
            q = moved.quantity
            expected[("TRANSFER_OUT", key, src, moved.sku, -q, 0)] += 1
            # Immediate: both entries under the transfer's key; else the receipt's key.
            arrived = key if not moved.input["inTransit"] else moved.received_key
            if arrived is not None:
                expected[("TRANSFER_IN", arrived, dst, moved.sku, q, 0)] += 1
        rids = set(self.out.reserved.values())
        actual: Counter[tuple[Any, ...]] = Counter()
        for e in ledger:
            key, of, kind = e["idempotencyKey"], e.get("reservationId"), e["eventType"]
            ident: str = key
            if kind == "EXPIRE" and of in rids:
                ident = str(of)
            elif not (key.startswith(prefix) or of in rids):
                continue
            actual[
                (kind, ident, e["location"], e["sku"], e["onHandDelta"], e["reservedDelta"])
            ] += 1
        problems = []
        missing, extra = expected - actual, actual - expected
        if missing:
            problems.append(
                f"ledger: {sum(missing.values())} entries the client was told of are missing "
                f"(lost), e.g. {sorted(missing)[:3]}"
            )
        if extra:
            problems.append(
                f"ledger: {sum(extra.values())} entries beyond the effects the client was told "
                f"of (doubled or unknown), e.g. {sorted(extra)[:3]}"
            )
        per_order: dict[str, list[str]] = defaultdict(list)
        for r in reservations:
            per_order[r["reference"]["id"].removeprefix(prefix)].append(r["id"])
        for oid, rid in self.out.reserved.items():
            ids = per_order.pop(oid, [])
            if ids != [rid]:
                problems.append(f"order {oid}: reserved as {rid}, its reservations {ids}")
        for oid, ids in sorted(per_order.items()):
            problems.append(f"order {oid} was not reserved, yet has reservations {ids}")
        return problems

    async def check(self, expire_wait: float = 10.0) -> list[str]:
        """The end-of-run checks through the API; returns the failures (empty: all passed).

        Waits up to ``expire_wait`` seconds for the abandoned carts to expire. Raises what
        :meth:`call` raises once its retries are spent.
        """
        problems = list(self.out.failures)
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(timeout=60, limits=limits, headers=self.headers) as client:
            self._client = client
            # Abandoned carts expire on the server's sweeper; wait for them (bounded).
            deadline = time.monotonic() + expire_wait
            while True:
                active = await self._mine("ACTIVE")
                if not active or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            if active:
                problems.append(f"{len(active)} reservations still ACTIVE after {expire_wait} s")
            problems.extend(await self.probe_idempotency())
            mine = await self._mine(None)
            balances = await self._pages(BALANCES, "balances")
            ledger = await self._pages(LEDGER, "ledger")
            if self.events:
                try:
                    problems.extend(await self._check_events(ledger))
                finally:
                    await self._stop_events(delete=True)
            levels = await self.levels(self._skus)
            transfers = (
                await self._pages(TRANSFERS, "transfers")
                if self.transfer_share is not None or self.out.transfers
                else []
            )
        expired = [r for r in mine if r["status"] == "EXPIRED"]
        committed = [r for r in mine if r["status"] == "COMMITTED"]
        self.out.counts["expired"] = len(expired)
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
        problems.extend(self._exactly_once(ledger, mine))
        problems.extend(self._conservation(levels))
        problems.extend(self._transfers_agree(transfers))
        return problems

    # ------------------------------------------------------------------ events (issue 12)

    async def _start_events(self, total: dict[tuple[str, str], int]) -> None:
        """Before the run: the receiver, its webhook endpoint, the subscriber and the reorder
        points (``total``: (location, sku) -> the run's demand, for the opening stock). Raises
        RuntimeError when the endpoint or a reorder point is refused or the subscriber is
        not let in, and what :meth:`call` raises."""
        self._receiver = Receiver()
        created = await self.mutate(
            "createWebhookEndpoint",
            CREATE_WEBHOOK,
            "createWebhookEndpoint",
            {
                "idempotencyKey": f"{self.run_id}:webhook",
                "url": self._receiver.url,
                "eventTypes": list(EVENT_TYPES),
            },
        )
        if created["__typename"] != "CreateWebhookEndpointSuccess" or not created["secret"]:
            raise RuntimeError(f"createWebhookEndpoint for {self._receiver.url}: {created}")
        self._endpoint_id = created["endpoint"]["id"]
        self._receiver.secret = created["secret"]
        ws_url = "ws" + self.url.removeprefix("http")  # http -> ws, https -> wss
        self._subscriber = Subscriber(ws_url, self._skus[:SUBSCRIBED_SKUS], self.api_key)
        await self._subscriber.start()

        async def set_point(loc: str, sku: str, minimum: int, quantity: int) -> None:
            input = {
                "idempotencyKey": f"{self.run_id}:reorder:{loc}:{sku}",
                "sku": sku,
                "location": loc,
                "minimumLevel": minimum,
                "reorderQuantity": quantity,
            }
            result = await self.mutate(
                "setReorderPoint", SET_REORDER_POINT, "setReorderPoint", input
            )
            if result["__typename"] != "ReorderPointSuccess":
                raise RuntimeError(f"setReorderPoint {loc}/{sku}: {result}")
            self._minimums[(loc, sku)] = minimum

        jobs = []
        for (loc, sku), demand in sorted(total.items()):
            if abandoned(f"{loc}/{sku}", 0.5):  # half, by hash: the rest keep LOW-less alerts
                stock = max(1, math.ceil(self.fraction * demand))
                minimum = max(1, math.floor(self.reorder_level * stock))
                jobs.append(lambda a=(loc, sku, minimum, stock): set_point(*a))
        await self._pool(jobs)
        self.out.counts["reorder_points"] = len(self._minimums)

    async def _stop_events(self, *, delete: bool) -> None:
        """Close the subscriber and the receiver; with ``delete`` (an open client) delete the
        endpoint first, so the server stops delivering to a receiver that is gone."""
        if delete and self._endpoint_id is not None:
            input = {"idempotencyKey": f"{self.run_id}:webhook-delete", "id": self._endpoint_id}
            await self.call("deleteWebhookEndpoint", DELETE_WEBHOOK, {"input": input})
            self._endpoint_id = None
        if self._subscriber is not None:
            await self._subscriber.close()
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None

    def _received(
        self, entries: dict[tuple[str, str], list[dict[str, Any]]]
    ) -> tuple[
        dict[tuple[str, str], dict[int, dict[str, Any]]],
        dict[tuple[str, str], list[tuple[int, str]]],
    ]:
        """The receiver's events of the run's balances (``entries``' keys) after the run
        began: (STOCK_CHANGED by balance and version, alert (version, type) per balance in
        version order)."""
        assert self._receiver is not None
        changed: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
        alerts: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
        for event in self._receiver.snapshot():
            b = (event.get("data") or {}).get("balance")
            if not b:
                continue
            key = (b["location"], b["sku"])
            if key not in entries or b["version"] <= self._before.get(key, (0, 0, None))[0]:
                continue  # not the run's, or from before it
            if event["type"] == "STOCK_CHANGED":
                changed[key][b["version"]] = event
            elif event["type"] in ALERT_RANK:
                alerts[key].append((b["version"], event["type"]))
        for found in alerts.values():
            found.sort(key=lambda a: (a[0], ALERT_RANK[a[1]]))
        return changed, alerts

    async def _check_events(self, ledger: list[dict[str, Any]]) -> list[str]:
        """The events checks, against ``ledger`` (every entry, ascending, as :meth:`check`
        reads it), after waiting up to ``events_wait`` seconds for the deliveries to cover
        it. Returns the problems:

        (a) every STOCK_CHANGED received of a run's balance carries onHand / reserved equal to
        onHandAfter / reservedAfter of the balance's entry at that version (its entry number
        ``version``, counting from 1), and that entry's id among its ``ledgerEntryIds``; every
        version the run wrote reached the receiver;
        (b) per balance, the STOCK_LOW / OUT / REPLENISHED received (by version) equal
        :func:`expected_alerts` over the run's entries (reorder point: the run's, else the
        one found before; start state from the balance before the run);
        (c) the subscriber stayed up, its balances' versions rise per balance and each matches
        the ledger like (a).

        Sets ``out.events`` and the ``events_*`` counts. Assumes no other client writes the
        run's balances meanwhile."""
        assert self._receiver is not None and self._subscriber is not None
        skus, regions = set(self._skus), set(self._regions)
        entries: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for e in ledger:  # ids rise per balance: its row is locked across each write
            if e["sku"] in skus and e["location"] in regions:
                entries[(e["location"], e["sku"])].append(e)
        expected: dict[tuple[str, str], list[tuple[int, str]]] = {}
        wanted: set[tuple[tuple[str, str], int]] = set()
        for key, mine in entries.items():
            v0, available0, min0 = self._before.get(key, (0, 0, None))
            minimum = self._minimums.get(key, min0)
            # Stored state before the run: the target at its last move (none yet: OK).
            state = "OK"
            if v0 > 0 and available0 <= 0:
                state = "OUT"
            elif v0 > 0 and min0 is not None and available0 <= min0:
                state = "LOW"
            moves = [
                (v, mine[v - 1]["onHandAfter"] - mine[v - 1]["reservedAfter"])
                for v in range(v0 + 1, len(mine) + 1)
            ]
            expected[key] = expected_alerts(moves, minimum, state)
            wanted.update((key, v) for v, _ in moves)
        # Deliveries trail the commits (relay interval, one endpoint's calls in turn): wait
        # until every change and transition the ledger implies is in, or the bound.
        deadline = time.monotonic() + self.events_wait
        while True:
            changed, alerts = self._received(entries)
            missing = {(k, v) for k, v in wanted if v not in changed.get(k, {})}
            short = [k for k, want in expected.items() if alerts.get(k, []) != want]
            if (not missing and not short) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        problems: list[str] = []

        def at(key: tuple[str, str], b: dict[str, Any], what: str) -> dict[str, Any] | None:
            """The ledger entry at ``b``'s version if it agrees with ``b``, else a problem."""
            mine, v = entries.get(key, []), int(b["version"])
            if not 1 <= v <= len(mine):
                problems.append(f"{what} {key} v{v}: the ledger has {len(mine)} entries")
                return None
            e = mine[v - 1]
            if (b["onHand"], b["reserved"]) != (e["onHandAfter"], e["reservedAfter"]):
                problems.append(
                    f"{what} {key} v{v}: onHand/reserved {b['onHand']}/{b['reserved']}, the "
                    f"ledger {e['onHandAfter']}/{e['reservedAfter']}"
                )
            return e

        for key, by_version in sorted(changed.items()):
            for event in by_version.values():
                entry = at(key, event["data"]["balance"], "STOCK_CHANGED")
                if entry is not None and entry["id"] not in event["data"]["ledgerEntryIds"]:
                    problems.append(
                        f"STOCK_CHANGED {key} v{event['data']['balance']['version']}: entry "
                        f"{entry['id']} not in ledgerEntryIds {event['data']['ledgerEntryIds']}"
                    )
        if missing:
            problems.append(
                f"events: {len(missing)} of {len(wanted)} changes never reached the receiver "
                f"within {self.events_wait:g} s, e.g. {sorted(missing)[:3]}"
            )
        for key in sorted(set(expected) | set(alerts)):
            want, got = expected.get(key, []), alerts.get(key, [])
            if want != got:
                problems.append(f"alerts {key}: received {got}, the ledger implies {want}")
        sub = self._subscriber
        if sub.error is not None:
            problems.append(f"subscriber: {sub.error}")
        last: dict[tuple[str, str], int] = {}
        for b in sub.seen:
            key = (b["location"], b["sku"])
            if b["version"] <= last.get(key, 0):
                problems.append(f"subscriber {key}: version {b['version']} after {last[key]}")
            last[key] = b["version"]
            if key in entries:
                at(key, b, "subscriber")
        c = self.out.counts
        c["events_received"] = len(self._receiver.events)
        c["events_duplicates"] = self._receiver.duplicates
        c["events_rejected"] = self._receiver.rejected
        c["events_changes"] = sum(len(v) for v in changed.values())
        c["events_transitions"] = sum(len(v) for v in alerts.values())
        c["events_subscribed"] = len(sub.seen)
        if self._receiver.rejected:
            problems.append(f"receiver: {self._receiver.rejected} deliveries failed verification")
        kinds = Counter(t for found in alerts.values() for _, t in found)
        verdict = f"FAILED for {len(problems)}" if problems else "hold"
        self.out.events = (
            f"events: received {c['events_received']} (duplicates dropped "
            f"{c['events_duplicates']}, bad signatures {c['events_rejected']}); run's changes "
            f"{c['events_changes']}/{len(wanted)}; transitions "
            f"{c['events_transitions']}/{sum(len(v) for v in expected.values())} (LOW "
            f"{kinds['STOCK_LOW']}, OUT {kinds['STOCK_OUT']}, REPLENISHED "
            f"{kinds['STOCK_REPLENISHED']}) over {len(self._minimums)} reorder points; "
            f"subscriber {len(sub.seen)} balances on {len(sub.skus)} SKUs: {verdict}"
        )
        return problems

    def _conservation(self, levels: dict[str, dict[str, Any]]) -> list[str]:
        """Per SKU of the run, from ``levels`` (sku -> StockLevels, as :meth:`levels`): the
        change since the run began of on hand over all locations plus ``incoming`` equals the
        run's restocks - deducts; the change of ``incoming`` equals the units the run left in
        transit; a StockLevels' totals equal the sums of its locations. Sets
        ``out.conservation`` (the summary line); returns the problems. Nothing before
        :meth:`run` (no opening levels)."""
        if self._opening is None:
            return []
        restocked: Counter[str] = Counter()
        for lines in self.out.restocks.values():
            for ln in lines:
                restocked[ln["sku"]] += ln["quantity"]
        deducted: Counter[str] = Counter()
        for oid in self.out.deducted:
            for (_, sku), q in self._by_id[oid].lines.items():
                deducted[sku] += q
        in_transit: Counter[str] = Counter()
        for moved in self.out.transfers.values():
            if moved.in_transit:
                in_transit[moved.sku] += moved.quantity
        problems: list[str] = []
        totals = Counter[str]()
        for sku in self._skus:
            level = levels.get(sku) or {"onHand": 0, "incoming": 0, "locations": []}
            places = level["locations"]
            if (level["onHand"], level["incoming"]) != (
                sum(b["onHand"] for b in places),
                sum(b["incoming"] for b in places),
            ):
                problems.append(f"stockLevels({sku}) totals != the sums of its locations: {level}")
            on_hand0, incoming0 = self._opening.get(sku, (0, 0))
            on_hand, incoming = level["onHand"] - on_hand0, level["incoming"] - incoming0
            totals.update(
                on_hand=on_hand, incoming=incoming, restocked=restocked[sku], deducted=deducted[sku]
            )
            if on_hand + incoming != restocked[sku] - deducted[sku]:
                problems.append(
                    f"conservation {sku}: on hand {on_hand:+d} + in transit {incoming:+d} != "
                    f"restocked {restocked[sku]} - deducted {deducted[sku]}"
                )
            if incoming != in_transit[sku]:
                problems.append(
                    f"in transit {sku}: incoming {incoming:+d}, the run left {in_transit[sku]}"
                )
        verdict = f"FAILED for {len(problems)}" if problems else "holds"
        self.out.conservation = (
            f"conservation ({len(self._skus)} SKUs, all locations): on hand {totals['on_hand']} "
            f"+ in transit {totals['incoming']} = restocked {totals['restocked']} - deducted "
            f"{totals['deducted']}: {verdict}"
        )
        return problems

    def _transfers_agree(self, transfers: list[dict[str, Any]]) -> list[str]:
        """The run's transfers (by reference) in ``transfers`` (the server's, all of them)
        against those it was told of: each exactly once, with its locations, its one line
        (received all, or none while in transit) and status RECEIVED or IN_TRANSIT; none for a
        transfer it was refused. Returns the problems."""
        prefix = f"{self.run_id}:"
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for t in transfers:
            if (t.get("reference") or {}).get("id", "").startswith(prefix):
                found[t["id"]].append(t)
        problems: list[str] = []
        for key, moved in self.out.transfers.items():
            seen = found.pop(moved.transfer_id, [])
            if len(seen) != 1:
                problems.append(f"transfer {key} ({moved.transfer_id}) found {len(seen)} times")
                continue
            q, moving = moved.quantity, moved.in_transit
            want = {
                "status": "IN_TRANSIT" if moving else "RECEIVED",
                "fromLocation": moved.input["fromLocation"],
                "toLocation": moved.input["toLocation"],
                "lines": [
                    {
                        "sku": moved.sku,
                        "quantity": q,
                        "received": 0 if moving else q,
                        "remaining": q if moving else 0,
                        "returned": 0,
                    }
                ],
            }
            got = {k: seen[0][k] for k in want}
            if got != want:
                problems.append(f"transfer {key}: {got}, expected {want}")
        for tid, seen in sorted(found.items()):
            problems.append(f"transfer {tid} the run was not told of: {seen}")
        return problems

    def report(self, elapsed: float) -> str:
        """Carts per second, p50/p95/p99 per mutation (ms), the outcome counts (transfers:
        ``transfers_ok``, ``transfers_short``, ``transfers_other``, ``transfer_units``,
        ``received``), the conservation line once checked and, when there were any, the
        resends by reason."""
        lines = [
            f"orders: {len(self.orders)}  clients: {self.clients}  "
            + (f"instances: {len(self.urls)}  " if len(self.urls) > 1 else "")
            + (f"batch: {self.batch}  " if self.batch else "")
            + (
                f"transfer share: {self.transfer_share:g}"
                + (" in transit  " if self.transfer_in_transit else " at once  ")
                if self.transfer_share is not None
                else ""
            )
            + f"elapsed: {elapsed:.2f} s  carts/s: {len(self.orders) / elapsed:.1f}"
        ]
        names = ("reserve", "deduct", "reserveMany", "deductMany", "restock", "transfer")
        for name in (*names, "receiveTransfer"):
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
        if self.transfer_share is not None:
            c = self.out.counts
            left = sum(m.quantity for m in self.out.transfers.values() if m.in_transit)
            lines.append(
                f"transfers: ok={c['transfers_ok']} short={c['transfers_short']} "
                f"other={c['transfers_other']}  units moved={c['transfer_units']}  "
                f"received={c['received']}  units left in transit={left}"
            )
        if self.out.conservation:
            lines.append(self.out.conservation)
        if self.out.events:
            lines.append(self.out.events)
        if self.out.retries:
            lines.append(
                "resends: "
                + ", ".join(f"{k}={v}" for k, v in sorted(self.out.retries.items()))
                + f"  (calls sent more than once: {len(self.out.retried_keys)} keys)"
            )
        return "\n".join(lines)


@dataclass
class Interruption:
    """What :func:`interrupt` did: the instance it killed, the carts answered by then, the
    requests in flight on that instance at the kill, and how long (seconds) the restart took
    until it was ready again."""

    url: str
    answered: int
    in_flight: int
    down_seconds: float

    def __str__(self) -> str:
        return (
            f"killed {self.url} after {self.answered} carts with {self.in_flight} requests in "
            f"flight on it; restarted, ready again {self.down_seconds:.2f} s after the kill"
        )


async def interrupt(
    replay: Replay,
    url: str,
    kill: Callable[[], object],
    restart: Callable[[], object],
    *,
    at: float = 0.3,
    in_flight_wait: float = 5.0,
    within: float = 600.0,
) -> Interruption:
    """Kill one instance of a running replay mid-run, then restart it.

    Run it as a task beside :meth:`Replay.run`. Once ``at`` (a fraction) of the carts are
    answered, it waits up to ``in_flight_wait`` seconds for a request in flight on ``url``,
    calls ``kill()`` (SIGKILL the instance and reap it; it must not block long, the replay's
    event loop waits for it), then ``restart()`` in a thread (start it again on the same port
    with the same environment; return once ready). Raises RuntimeError when the replay ends,
    or ``within`` seconds pass, before ``at`` is reached; what ``kill`` and ``restart`` raise.
    """
    target = math.ceil(at * len(replay.orders))
    deadline = time.monotonic() + within
    started = False
    while replay.answered < target:
        started = started or replay.running
        if (started and not replay.running) or time.monotonic() > deadline:
            raise RuntimeError(f"the replay did not reach {target} carts to kill {url}")
        await asyncio.sleep(0.005)
    wait_until = time.monotonic() + in_flight_wait
    while time.monotonic() < wait_until:
        if replay.in_flight[url]:
            break
        await asyncio.sleep(0.001)
    in_flight, answered = replay.in_flight[url], replay.answered
    killed = time.monotonic()
    kill()
    await asyncio.to_thread(restart)
    return Interruption(url, answered, in_flight, time.monotonic() - killed)


async def run_replay(
    url: str | Sequence[str],
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
    api_key: str | None = None,
    transfer_share: float | None = None,
    transfer_in_transit: bool = False,
    events: bool = False,
    events_wait: float = 30.0,
) -> tuple[str, list[str]]:
    """Run a replay and its checks; returns (report text, failures). ``url``: one GraphQL
    URL or several instances'. ``batch``: carts (and shipments) per reserveMany (deductMany)
    call; None: one reserve (deduct) per order. ``api_key``, ``transfer_share`` and
    ``transfer_in_transit``, ``events`` and ``events_wait``: see :class:`Replay`. Raises what
    :class:`Replay` and :meth:`Replay.run` raise."""
    replay = Replay(
        url,
        load_orders(data, orders),
        clients=clients,
        fraction=fraction,
        restock_days=restock_days,
        abandon_share=abandon_share,
        abandon_ttl=abandon_ttl,
        batch=batch,
        api_key=api_key,
        transfer_share=transfer_share,
        transfer_in_transit=transfer_in_transit,
        events=events,
        events_wait=events_wait,
    )
    elapsed = await replay.run()
    problems = await replay.check(expire_wait=expire_wait)
    return replay.report(elapsed), problems
