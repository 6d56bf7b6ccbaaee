"""Webhooks (ARCHITECTURE section 15): endpoints per org, SSRF checks, and the delivery worker.

**Endpoints.** ``createWebhookEndpoint`` stores a URL, the event types it wants and a fresh
Standard Webhooks secret (``whsec_`` + base64 of 32 random bytes, checked by the
``standardwebhooks`` library), shown once. ``deleteWebhookEndpoint`` sets ``deleted_at`` and
makes it inactive (its deliveries stay listed; pending ones end DEAD). Both are idempotent like
every write (ARCHITECTURE section 5), through the ``idempotency_key`` table and the same helpers
as API keys (:class:`~stockledger.services.api_keys.ApiKeys`).

**SSRF.** A URL must be http or https with a host, and every address the host resolves to must
be public (not private, loopback, link-local, multicast, reserved or unspecified, IPv4-mapped
ones included) unless ``webhook_allow_private``. Checked at creation and again before every
attempt (a name may resolve elsewhere later); redirects are never followed.

**Delivery.** The relay (``services/relay.py``) makes a PENDING ``webhook_delivery`` row per
(endpoint, event). :class:`DeliveryWorker` claims due rows (PENDING or FAILED whose
``next_attempt_at`` has come), ``FOR UPDATE SKIP LOCKED`` on MySQL so several processes share
the work, by pushing their ``next_attempt_at`` past the attempt (a worker that dies mid-attempt
leaves the row due again after that). It POSTs the event's payload with the Standard Webhooks
headers (``webhook-id``: the event id; ``webhook-timestamp``; ``webhook-signature``), timeout
``webhook_timeout_seconds``. A 2xx is DELIVERED; anything else (another status, a timeout, a
refused connection) is FAILED with the next attempt after an exponential backoff with full
jitter, and DEAD once ``webhook_give_up_seconds`` have passed since the delivery was made.

**Circuit breaker.** One pybreaker breaker per endpoint (per process): after ``fail_max``
consecutive failures it OPENs and the worker stops calling the endpoint (its due deliveries
wait, unattempted, until the breaker's ``reset_timeout`` has passed), then lets one probe
through (HALF_OPEN) and closes on success. Its state shows as the endpoint's ``circuitState``
(:class:`Breakers`, shared by the worker and the API of one process).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import random
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pybreaker
from redis.asyncio import Redis
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from standardwebhooks import Webhook

from stockledger.config import Settings
from stockledger.db.engine import Database
from stockledger.db.models import outbox_event, webhook_delivery, webhook_endpoint
from stockledger.domain.errors import NotFoundError, ValidationError
from stockledger.domain.validation import check_key, check_string, request_hash
from stockledger.observability import metrics
from stockledger.services.idempotent_calls import remember_call, retrying
from stockledger.services.lookups import done_call
from stockledger.services.queries import Page, check_first, decode_cursor, encode_cursor
from stockledger.services.rows import from_db_time, to_db_time, utcnow

log = logging.getLogger(__name__)

CREATE_OPERATION = "createWebhookEndpoint"
DELETE_OPERATION = "deleteWebhookEndpoint"
# Every EventType of the contract (schema-v2.graphql), the later parts' too.
EVENT_TYPES = (
    "STOCK_CHANGED",
    "STOCK_LOW",
    "STOCK_OUT",
    "STOCK_REPLENISHED",
    "RESERVATION_EXPIRED",
    "TRANSFER_UPDATED",
    "DISCREPANCY_OPENED",
    "APPROVAL_REQUESTED",
    "APPROVAL_DECIDED",
    "SUPPLIER_ORDER_UPDATED",
)
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MAX_URL_LENGTH = 2048  # the column's
_ENDPOINT_CURSOR = "w"
_DELIVERY_CURSOR = "d"
_MAX_ID = 2**63 - 1

PENDING, DELIVERED, FAILED, DEAD = "PENDING", "DELIVERED", "FAILED", "DEAD"
CLOSED, OPEN, HALF_OPEN = "CLOSED", "OPEN", "HALF_OPEN"
_STATE_NAMES = {
    pybreaker.STATE_CLOSED: CLOSED,
    pybreaker.STATE_OPEN: OPEN,
    pybreaker.STATE_HALF_OPEN: HALF_OPEN,
}
RESULTS = ("delivered", "failed", "dead", "circuit_open")  # WEBHOOK_DELIVERIES_TOTAL{result}


# ---------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A webhook endpoint as the API shows it (never its secret). ``circuit_state``: CLOSED,
    OPEN or HALF_OPEN (this process's breaker)."""

    id: int
    org: str
    url: str
    event_types: tuple[str, ...]
    active: bool
    created_at: datetime
    deleted_at: datetime | None
    circuit_state: str = CLOSED


@dataclass(frozen=True, slots=True)
class Delivery:
    """One (endpoint, event) delivery: ``status`` PENDING, DELIVERED, FAILED (will retry) or
    DEAD (gave up); ``attempts`` made so far; times aware UTC."""

    id: int
    endpoint_id: int
    event_id: int
    event_type: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CreatedEndpoint:
    """What ``createWebhookEndpoint`` answers: the endpoint, its ``secret`` (None on a
    replay: shown once) and whether the idempotency key was ``replayed``."""

    endpoint: Endpoint
    secret: str | None
    replayed: bool


@dataclass(frozen=True, slots=True)
class DeletedEndpoint:
    endpoint: Endpoint
    replayed: bool


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 32 bytes from the OS's CSPRNG, in the
    form the ``standardwebhooks`` library reads (checked by building a signer from it)."""
    secret = SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")
    Webhook(secret)  # raises if the library could not use it
    return secret


def sign(secret: str, event_id: str, at: datetime, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of ``body`` (the payload JSON) for ``event_id`` at ``at``:
    webhook-id, webhook-timestamp (Unix seconds), webhook-signature (``v1,<base64>``)."""
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(event_id, at, body),
        "content-type": "application/json",
    }


# ---------------------------------------------------------------------- SSRF


def _forbidden_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


async def check_url(url: str, *, allow_private: bool) -> str:
    """``url`` when it may be an endpoint: http(s), a host, at most 2048 characters, no user
    info, and (unless ``allow_private``) a host whose every address is public. Raises
    ValidationError (field ``url``): malformed, another scheme, a host that does not resolve,
    or one that resolves to a private, loopback or link-local address (SSRF)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise ValidationError(f"must be 1 to {MAX_URL_LENGTH} characters", "url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"is not a valid URL ({exc})", "url") from None
    if parts.scheme not in ("http", "https"):
        raise ValidationError("must be an http or https URL", "url")
    host = parts.hostname
    if not host:
        raise ValidationError("must name a host", "url")
    if parts.username is not None or parts.password is not None:
        raise ValidationError("must not carry credentials", "url")
    if allow_private:
        return url
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port or (443 if parts.scheme == "https" else 80), type=0
        )
    except OSError:
        raise ValidationError(f"host {host!r} does not resolve", "url") from None
    addresses = {str(info[4][0]) for info in infos}
    refused = sorted(a for a in addresses if _forbidden_address(a))
    if refused or not addresses:
        raise ValidationError(
            f"host {host!r} resolves to a private, loopback or link-local address "
            f"({', '.join(refused)}): refused (set STOCKLEDGER_WEBHOOK_ALLOW_PRIVATE=true "
            "to allow it)",
            "url",
        )
    return url


def check_event_types(event_types: Iterable[str]) -> tuple[str, ...]:
    """The distinct event types, in contract order; at least one, each an EventType.
    Raises ValidationError (field ``eventTypes``)."""
    given = set(event_types)
    unknown = sorted(given - set(EVENT_TYPES))
    if unknown:
        raise ValidationError(f"unknown event types {unknown}", "eventTypes")
    if not given:
        raise ValidationError("give at least one event type", "eventTypes")
    return tuple(t for t in EVENT_TYPES if t in given)


# ---------------------------------------------------------------------- breakers


class Breakers:
    """One pybreaker breaker per endpoint id, made on first use: after ``fail_max``
    consecutive failures it opens for ``reset_timeout`` seconds, then lets a probe through.

    Breakers live in the worker's process; with ``redis``, every state change is also stored
    there (``stockledger:webhook:<id>:circuit``, kept an hour), so that ``circuitState`` is the
    same on every process (several workers of ``serve``, or ``stockledger relay`` apart): the
    last change any worker saw. Without Redis (or while it is away) a process shows its own.
    """

    def __init__(
        self, *, fail_max: int = 5, reset_timeout: float = 30.0, redis: Redis | None = None
    ) -> None:
        self.fail_max = fail_max
        self.reset_timeout = reset_timeout
        self.redis = redis
        self._by_endpoint: dict[int, pybreaker.CircuitBreaker] = {}

    def of(self, endpoint_id: int) -> pybreaker.CircuitBreaker:
        breaker = self._by_endpoint.get(endpoint_id)
        if breaker is None:
            breaker = pybreaker.CircuitBreaker(
                fail_max=self.fail_max,
                reset_timeout=self.reset_timeout,
                name=f"webhook-endpoint-{endpoint_id}",
            )
            self._by_endpoint[endpoint_id] = breaker
        return breaker

    def state(self, endpoint_id: int) -> str:
        """This process's view: CLOSED, OPEN or HALF_OPEN (CLOSED for an endpoint never
        called here)."""
        breaker = self._by_endpoint.get(endpoint_id)
        return CLOSED if breaker is None else _STATE_NAMES[breaker.current_state]

    async def share(self, endpoint_id: int) -> None:
        """Store this process's state of ``endpoint_id`` in Redis (a failure is only logged:
        the state is shown, never relied on)."""
        if self.redis is None:
            return
        try:
            await self.redis.set(_circuit_key(endpoint_id), self.state(endpoint_id), ex=3600)
        except Exception:
            log.debug("could not share a breaker state", exc_info=True)

    async def states(self, endpoint_ids: Iterable[int]) -> dict[int, str]:
        """The state of each endpoint: the last one stored in Redis, else this process's."""
        ids = list(endpoint_ids)
        found = {i: self.state(i) for i in ids}
        if self.redis is None or not ids:
            return found
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.get(_circuit_key(i))
                values = await pipe.execute()
        except Exception:
            log.debug("could not read the shared breaker states", exc_info=True)
            return found
        for i, value in zip(ids, values, strict=True):
            if value is not None:
                text = value.decode() if isinstance(value, bytes) else str(value)
                if text in (CLOSED, OPEN, HALF_OPEN):
                    found[i] = text
        return found

    def probe_at(self, endpoint_id: int) -> datetime | None:
        """When an OPEN breaker lets its next probe through (aware UTC), else None."""
        breaker = self._by_endpoint.get(endpoint_id)
        if breaker is None or breaker.current_state != pybreaker.STATE_OPEN:
            return None
        opened = breaker._state_storage.opened_at  # pybreaker keeps it there only
        if opened is None:
            return None
        return opened + timedelta(seconds=self.reset_timeout)


def _circuit_key(endpoint_id: int) -> str:
    return f"stockledger:webhook:{endpoint_id}:circuit"


# ---------------------------------------------------------------------- endpoints


class Webhooks:
    """The endpoints of every org over ``db``; ``breakers`` supply ``circuitState`` (the
    worker's, in a process that runs one). ``clock`` returns aware UTC. Raises
    ValidationError, NotFoundError (an unknown id, or another org's),
    IdempotencyKeyReusedError, ServiceUnavailableError."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        breakers: Breakers | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.settings = settings
        self.breakers = breakers or Breakers()
        self.clock = clock
        # The API keys' idempotency helpers (one row per call in idempotency_key, retried on
        # a concurrent call with the same key): reused, not copied.

    async def create_once(
        self, org: str, key: str, url: str, event_types: Iterable[str]
    ) -> CreatedEndpoint:
        """``createWebhookEndpoint``: an active endpoint of ``org`` for ``url`` (checked by
        :func:`check_url`) and ``event_types``, with a fresh secret, once per idempotency
        ``key`` of ``org``; a replay answers the endpoint as it is now, with no secret."""
        check_key(key)
        types = check_event_types(event_types)
        rhash = request_hash(CREATE_OPERATION, {"url": url, "eventTypes": list(types)})

        async def attempt() -> CreatedEndpoint:
            now = self.clock()
            async with self.db.engine.begin() as conn:
                done = await self._done(conn, org, key, CREATE_OPERATION, rhash)
                if done is not None:
                    return CreatedEndpoint(done, None, True)
                secret = new_secret()
                result = await conn.execute(
                    insert(webhook_endpoint).values(
                        org_id=org,
                        url=url,
                        event_types=" ".join(types),
                        secret=secret,
                        active=True,
                        created_at=to_db_time(now),
                    )
                )
                inserted = result.inserted_primary_key
                assert inserted is not None
                endpoint_id = int(inserted[0])
                await remember_call(conn, org, key, CREATE_OPERATION, rhash, endpoint_id, now)
            made = Endpoint(endpoint_id, org, url, types, True, now, None)
            return CreatedEndpoint(made, secret, False)

        # The URL is resolved before any transaction (DNS may be slow), and only when the
        # key is new: a replay is answered even if the name resolves elsewhere now.
        async with self.db.read() as conn:
            replayed = await self._done(conn, org, key, CREATE_OPERATION, rhash)
        if replayed is not None:
            return CreatedEndpoint(replayed, None, True)
        await check_url(url, allow_private=self.settings.webhook_allow_private)
        return await retrying(attempt)

    async def delete_once(self, org: str, key: str, endpoint_id: str) -> DeletedEndpoint:
        """``deleteWebhookEndpoint``: ``deleted_at`` set (the first time) and inactive, once
        per idempotency ``key`` of ``org``; another org's id, or no number, is NOT_FOUND."""
        check_key(key)
        text = check_string(endpoint_id, "id")
        number = _parse_id(text)
        rhash = request_hash(DELETE_OPERATION, {"id": text if number is None else number})

        async def attempt() -> DeletedEndpoint:
            now = self.clock()
            async with self.db.engine.begin() as conn:
                done = await self._done(conn, org, key, DELETE_OPERATION, rhash)
                if done is not None:
                    return DeletedEndpoint(done, True)
                if number is None:
                    raise NotFoundError("WebhookEndpoint", text)
                c = webhook_endpoint.c
                await conn.execute(
                    update(webhook_endpoint)
                    .where(c.id == number, c.org_id == org, c.deleted_at.is_(None))
                    .values(active=False, deleted_at=to_db_time(now))
                )
                row = (
                    await conn.execute(
                        select(webhook_endpoint).where(c.id == number, c.org_id == org)
                    )
                ).first()
                if row is None:
                    raise NotFoundError("WebhookEndpoint", text)
                await remember_call(conn, org, key, DELETE_OPERATION, rhash, number, now)
            return DeletedEndpoint(self._endpoint(row), False)

        return await retrying(attempt)

    async def get(self, org: str, endpoint_id: int) -> Endpoint | None:
        """The endpoint ``endpoint_id`` of ``org`` (deleted ones too), or None."""
        c = webhook_endpoint.c
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(webhook_endpoint).where(c.id == endpoint_id, c.org_id == org)
                )
            ).first()
        return None if row is None else self._endpoint(row)

    async def page(self, org: str, first: int = 50, after: str | None = None) -> Page[Endpoint]:
        """``webhookEndpoints``: the org's endpoints by id, oldest first, deleted ones
        included (inactive); keyset cursors. Raises ValidationError (``first``, ``after``)."""
        first = check_first(first)
        c = webhook_endpoint.c
        conds = [c.org_id == org]
        if after is not None:
            conds.append(c.id > _cursor_id(after, _ENDPOINT_CURSOR))
        query = select(webhook_endpoint).where(*conds).order_by(c.id).limit(first + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        states = await self.breakers.states(int(r.id) for r in rows[:first])
        edges = [
            (encode_cursor(_ENDPOINT_CURSOR, int(r.id)), self._endpoint(r, states.get(int(r.id))))
            for r in rows[:first]
        ]
        return Page(edges, len(rows) > first, after is not None)

    async def deliveries(
        self, org: str, endpoint_id: str, first: int = 50, after: str | None = None
    ) -> Page[Delivery]:
        """``webhookDeliveries``: the deliveries of an endpoint of ``org``, newest first
        (by id); an unknown endpoint (or another org's) has none (nothing leaks about other
        orgs). Raises ValidationError (``first``, ``after``, ``endpointId``)."""
        first = check_first(first)
        text = check_string(endpoint_id, "endpointId")
        number = _parse_id(text)
        if number is None:
            return Page([], False, after is not None)
        c = webhook_delivery.c
        conds = [c.org_id == org, c.endpoint_id == number]
        if after is not None:
            conds.append(c.id < _cursor_id(after, _DELIVERY_CURSOR))
        query = select(webhook_delivery).where(*conds).order_by(c.id.desc()).limit(first + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        edges = [(encode_cursor(_DELIVERY_CURSOR, int(r.id)), delivery_of(r)) for r in rows]
        return Page(edges[:first], len(rows) > first, after is not None)

    async def _done(
        self, conn: AsyncConnection, org: str, key: str, operation: str, rhash: str
    ) -> Endpoint | None:
        """The endpoint a done call with ``key`` acted on, as it is now; None when no call
        used ``key``. Raises IdempotencyKeyReusedError for another operation or request."""
        row = await done_call(conn, org, key, operation, rhash)
        if row is None:
            return None
        found = (
            await conn.execute(
                select(webhook_endpoint).where(webhook_endpoint.c.id == int(row.result_ref))
            )
        ).first()
        if found is None:  # endpoints are never removed; a hand-made row could still say so
            raise NotFoundError("WebhookEndpoint", row.result_ref)
        return self._endpoint(found)

    def _endpoint(self, row: Any, state: str | None = None) -> Endpoint:
        """A row as an :class:`Endpoint`; ``state``: its breaker's (default: this process's)."""
        return Endpoint(
            id=int(row.id),
            org=str(row.org_id),
            url=str(row.url),
            event_types=tuple(str(row.event_types).split()),
            active=bool(row.active),
            created_at=from_db_time(row.created_at),
            deleted_at=None if row.deleted_at is None else from_db_time(row.deleted_at),
            circuit_state=state or self.breakers.state(int(row.id)),
        )


def delivery_of(row: Any) -> Delivery:
    """A ``webhook_delivery`` row as a :class:`Delivery`."""

    def t(value: datetime | None) -> datetime | None:
        return None if value is None else from_db_time(value)

    return Delivery(
        id=int(row.id),
        endpoint_id=int(row.endpoint_id),
        event_id=int(row.event_id),
        event_type=str(row.event_type),
        status=str(row.status),
        attempts=int(row.attempts),
        last_status_code=None if row.last_status_code is None else int(row.last_status_code),
        last_error=row.last_error,
        next_attempt_at=t(row.next_attempt_at),
        delivered_at=t(row.delivered_at),
        created_at=from_db_time(row.created_at),
    )


def _parse_id(text: str) -> int | None:
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    return None


def _cursor_id(cursor: str, kind: str) -> int:
    value = decode_cursor(cursor, kind)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_ID:
        raise ValidationError("is not a valid cursor", "after")
    return value


# ---------------------------------------------------------------------- the worker


class DeliveryFailed(Exception):
    """An attempt that did not deliver: ``status`` (None: no response) and ``error``."""

    def __init__(self, error: str, status: int | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.status = status


@dataclass
class _Claimed:
    delivery: Delivery
    url: str
    secret: str
    active: bool
    payload: str | None


class DeliveryWorker:
    """Delivers due webhook deliveries; :meth:`run_once` is one pass, :meth:`run_forever`
    the loop (every ``interval`` seconds, at once while work remains).

    ``backoff_base`` / ``backoff_max`` (seconds): attempt n waits a uniform random time in
    [d/2, d] with d = min(max, base * 2^(n-1)) (jitter spreads retries of many deliveries).
    ``batch``: deliveries claimed per pass; ``concurrency``: endpoints called at once (one
    endpoint's deliveries go one after another, so its breaker sees them in turn).
    ``client``: an httpx client to use (default: one of the worker's, closed by
    :meth:`aclose`). ``orgs``: deliver only these orgs' (default: every org's).
    """

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        breakers: Breakers | None = None,
        clock: Callable[[], datetime] = utcnow,
        interval: float | None = None,
        backoff_base: float = 1.0,
        backoff_max: float = 3600.0,
        batch: int = 100,
        concurrency: int = 16,
        client: httpx.AsyncClient | None = None,
        orgs: Iterable[str] | None = None,
    ) -> None:
        self.db = db
        self.orgs = None if orgs is None else sorted(set(orgs))
        self.settings = settings
        self.breakers = breakers or Breakers()
        self.clock = clock
        self.interval = settings.relay_interval_seconds if interval is None else interval
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.batch = batch
        self.concurrency = concurrency
        self.timeout = settings.webhook_timeout_seconds
        # An attempt's claim: the row is due again after this if the worker died in it.
        self.claim = timedelta(seconds=2 * self.timeout + 5)
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout), follow_redirects=False
        )
        self._stopping = asyncio.Event()
        for result in RESULTS:
            metrics.WEBHOOK_DELIVERIES_TOTAL.labels(result=result)

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()

    def stop(self) -> None:
        self._stopping.set()

    async def run_forever(self) -> None:
        """Pass after pass until :meth:`stop`; a failed pass is logged and retried."""
        self._stopping.clear()
        while not self._stopping.is_set():
            claimed = 0
            try:
                claimed = await self.run_once()
            except Exception:
                log.warning("webhook delivery pass failed; retrying", exc_info=True)
            if claimed >= self.batch:
                await asyncio.sleep(0)
                continue
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            except TimeoutError:
                pass

    async def run_once(self) -> int:
        """Claim the due deliveries and attempt each; returns how many were claimed."""
        claimed = await self._claim()
        by_endpoint: dict[int, list[_Claimed]] = {}
        for item in claimed:
            by_endpoint.setdefault(item.delivery.endpoint_id, []).append(item)
        gate = asyncio.Semaphore(self.concurrency)

        async def endpoint_turn(items: list[_Claimed]) -> None:
            async with gate:
                for item in items:
                    await self._attempt(item)

        await asyncio.gather(*(endpoint_turn(items) for items in by_endpoint.values()))
        return len(claimed)

    async def _claim(self) -> list[_Claimed]:
        """Due deliveries (PENDING or FAILED, ``next_attempt_at`` <= now), oldest due first,
        with their endpoint and payload; each one's ``next_attempt_at`` moved past the
        attempt in the same (short) transaction, so no other worker takes it meanwhile."""
        now = self.clock()
        c = webhook_delivery.c
        query = (
            select(webhook_delivery)
            .where(c.status.in_((PENDING, FAILED)), c.next_attempt_at <= to_db_time(now))
            .order_by(c.next_attempt_at, c.id)
            .limit(self.batch)
        )
        if self.orgs is not None:
            query = query.where(c.org_id.in_(self.orgs))
        # A plain read first: an idle worker takes no write lock (SQLite's is the database's).
        async with self.db.read() as conn:
            if (await conn.execute(query.with_only_columns(c.id).limit(1))).first() is None:
                return []
        if not self.db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        async with self.db.engine.begin() as conn:
            rows = (await conn.execute(query)).all()
            if not rows:
                return []
            ids = [int(r.id) for r in rows]
            await conn.execute(
                update(webhook_delivery)
                .where(c.id.in_(ids))
                .values(next_attempt_at=to_db_time(now + self.claim))
            )
        deliveries = [delivery_of(r) for r in rows]
        endpoint_ids = sorted({d.endpoint_id for d in deliveries})
        event_ids = sorted({d.event_id for d in deliveries})
        async with self.db.read() as conn:
            endpoints = {
                int(r.id): r
                for r in (
                    await conn.execute(
                        select(webhook_endpoint).where(webhook_endpoint.c.id.in_(endpoint_ids))
                    )
                ).all()
            }
            payloads = {
                int(r.id): str(r.payload)
                for r in (
                    await conn.execute(
                        select(outbox_event.c.id, outbox_event.c.payload).where(
                            outbox_event.c.id.in_(event_ids)
                        )
                    )
                ).all()
            }
        claimed = []
        for d in deliveries:
            endpoint = endpoints.get(d.endpoint_id)
            claimed.append(
                _Claimed(
                    d,
                    "" if endpoint is None else str(endpoint.url),
                    "" if endpoint is None else str(endpoint.secret),
                    endpoint is not None and bool(endpoint.active),
                    payloads.get(d.event_id),
                )
            )
        return claimed

    async def _attempt(self, item: _Claimed) -> None:
        """One attempt of ``item`` (:meth:`_attempt_once`); a change of its endpoint's breaker
        state is shared (:meth:`Breakers.share`)."""
        endpoint_id = item.delivery.endpoint_id
        before = self.breakers.state(endpoint_id)
        try:
            await self._attempt_once(item)
        finally:
            if self.breakers.state(endpoint_id) != before:
                await self.breakers.share(endpoint_id)

    async def _attempt_once(self, item: _Claimed) -> None:
        """One attempt of ``item`` through its endpoint's breaker, and its outcome stored."""
        d = item.delivery
        if not item.active:
            await self._finish(d, DEAD, error="endpoint deleted", count=False)
            return
        if item.payload is None:
            await self._finish(d, DEAD, error="event no longer in the outbox", count=False)
            return
        breaker = self.breakers.of(d.endpoint_id)
        attempted = False
        status: int | None = None
        try:
            # pybreaker's context manager around the await: one event loop thread, and one
            # endpoint's deliveries go one at a time (run_once), so its counts stay exact.
            # Entering raises CircuitBreakerError when open (nothing attempted); a failure
            # that trips the breaker raises it too (then attempted, the cause in __context__).
            with breaker.calling():
                attempted = True
                status = await self._post(item)
        except pybreaker.CircuitBreakerError as exc:
            if not attempted:
                await self._circuit_open(d)
                return
            cause = exc.__context__
            error = cause.error if isinstance(cause, DeliveryFailed) else str(exc)
            code = cause.status if isinstance(cause, DeliveryFailed) else None
            await self._failed(d, error, code)
            return
        except DeliveryFailed as exc:
            await self._failed(d, exc.error, exc.status)
            return
        await self._finish(d, DELIVERED, status=status)

    async def _post(self, item: _Claimed) -> int:
        """POST the payload, signed; the status code of a 2xx answer. Raises DeliveryFailed
        (a refused URL, a timeout, a transport error, a non-2xx answer)."""
        d = item.delivery
        try:
            await check_url(item.url, allow_private=self.settings.webhook_allow_private)
        except ValidationError as exc:
            raise DeliveryFailed(f"refused: {exc}") from None
        assert item.payload is not None
        # The wall clock, not the service's: receivers check the timestamp against theirs
        # (the library allows 5 minutes either way).
        headers = sign(item.secret, str(d.event_id), datetime.now(UTC), item.payload)
        try:
            response = await self.client.post(item.url, content=item.payload, headers=headers)
        except httpx.TimeoutException:
            raise DeliveryFailed(f"timed out after {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}"[:1000]) from None
        if not 200 <= response.status_code < 300:
            raise DeliveryFailed(f"answered {response.status_code}", response.status_code)
        return response.status_code

    def backoff(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts`` failed ones (full jitter in
        the upper half, so retries never bunch at 0)."""
        delay = min(self.backoff_max, self.backoff_base * 2 ** max(0, attempts - 1))
        return random.uniform(delay / 2, delay)

    async def _failed(self, d: Delivery, error: str, status: int | None) -> None:
        attempts = d.attempts + 1
        now = self.clock()
        due = now + timedelta(seconds=self.backoff(attempts))
        give_up = d.created_at + timedelta(seconds=self.settings.webhook_give_up_seconds)
        if due > give_up:
            await self._finish(d, DEAD, error=error, status=status)
            return
        metrics.WEBHOOK_DELIVERIES_TOTAL.labels(result="failed").inc()
        await self._store(
            d.id,
            status=FAILED,
            attempts=attempts,
            last_status_code=status,
            last_error=error[:1024],
            next_attempt_at=to_db_time(due),
        )

    async def _circuit_open(self, d: Delivery) -> None:
        """Not attempted (the breaker is open): due again when the breaker probes, or DEAD
        past the give-up time."""
        now = self.clock()
        give_up = d.created_at + timedelta(seconds=self.settings.webhook_give_up_seconds)
        if now >= give_up:
            await self._finish(d, DEAD, error="circuit open until the give-up time", count=False)
            return
        metrics.WEBHOOK_DELIVERIES_TOTAL.labels(result="circuit_open").inc()
        probe = self.breakers.probe_at(d.endpoint_id) or now + timedelta(
            seconds=self.breakers.reset_timeout
        )
        await self._store(d.id, next_attempt_at=to_db_time(max(probe, now)))

    async def _finish(
        self,
        d: Delivery,
        status_name: str,
        *,
        error: str | None = None,
        status: int | None = None,
        count: bool = True,
    ) -> None:
        """DELIVERED or DEAD; ``count``: this was an attempt (adds to ``attempts``)."""
        now = self.clock()
        values: dict[str, Any] = {
            "status": status_name,
            "attempts": d.attempts + (1 if count else 0),
            "next_attempt_at": None,
        }
        if status is not None:
            values["last_status_code"] = status
        if error is not None:
            values["last_error"] = error[:1024]
        if status_name == DELIVERED:
            values["delivered_at"] = to_db_time(now)
            values["last_error"] = None
        metrics.WEBHOOK_DELIVERIES_TOTAL.labels(result=status_name.lower()).inc()
        await self._store(d.id, **values)

    async def _store(self, delivery_id: int, **values: Any) -> None:
        async with self.db.engine.begin() as conn:
            await conn.execute(
                update(webhook_delivery)
                .where(webhook_delivery.c.id == delivery_id)
                .values(**values)
            )
