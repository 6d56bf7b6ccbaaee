"""Rate limits per API key at the HTTP edge (ARCHITECTURE section 13; issue 10, item 5).

``STOCKLEDGER_RATE_LIMIT`` (``settings.rate_limit``, the `limits` library's notation, default
``1000/second``; empty: off) bounds the ``/graphql`` requests of each API key with the
library's moving window: a request passes when fewer than N requests of that key were let
through in the last period. Past it the answer is HTTP 429 (RFC 6585, section 4) with
``Retry-After`` in whole seconds, at least 1 (RFC 9110, section 10.2.3), and
``{"errors": [{"message": ..., "extensions": {"code": "RATE_LIMITED"}}]}``; nothing of
GraphQL runs, so nothing changes. Refusals count in ``inventory_rate_limited_total`` and do
not use up the budget: a client that keeps retrying gets through once the window has moved.

Budgets live in Redis (``settings.redis_url``; every instance shares them) under
``stockledger:{<org>}:ratelimit/<key id>/<amount>/<multiples>/<granularity>``: the org's
hash tag, like every other Redis key of ours, and the key id. With no Redis URL (the embedded
default, one process) they live in process memory.

With ``STOCKLEDGER_AUTH=off`` there is no key, and no limit: such a server listens on
loopback only and every request is the one trusted caller (ARCHITECTURE section 13), whom a
budget shared by all would throttle in a local load test (one worker serves 1,000+ req/s).

A Redis outage (refused, timing out, a READONLY replica, any Redis error) never turns into a
429 or a 500: the request goes through (fail open), counts in
``inventory_redis_degraded_total`` and the outage is logged once; Redis is tried again after
:class:`~stockledger.locks.redis_locks.RedisHealth`'s retry interval, so requests in between
do not wait on a dead server.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import orjson
from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from stockledger.app.auth import GRAPHQL_PATH
from stockledger.config import Settings
from stockledger.locks.redis_locks import RedisHealth, pool_exhausted
from stockledger.observability import metrics

log = logging.getLogger(__name__)

KEY_PREFIX = "stockledger"
# A check waits at most this long on Redis (seconds: connect, reply, a free pooled
# connection) before the request goes through unchecked: it runs before every request.
_REDIS_TIMEOUT_SECONDS = 1.0
_REDIS_FAILURES = (RedisError, OSError)


class RateLimiter:
    """Moving-window budgets (``limits``' :class:`MovingWindowRateLimiter`) of ``items`` per
    (org, key id), in ``storage``.

    ``items``: the parsed ``STOCKLEDGER_RATE_LIMIT`` (each must pass). ``health``: given for a
    Redis storage, whose failures then let requests through (see the module docstring);
    None for the in-memory one, which cannot fail so. ``pool``: closed by :meth:`aclose`.
    """

    def __init__(
        self,
        items: Sequence[RateLimitItem],
        storage: Storage,
        *,
        health: RedisHealth | None = None,
        pool: BlockingConnectionPool | None = None,
    ) -> None:
        if not items:
            raise ValueError("a rate limiter needs at least one limit")
        self.items = list(items)
        self.storage = storage
        self.health = health
        self._pool = pool
        self._strategy = MovingWindowRateLimiter(storage)
        self._per_org: dict[str, list[RateLimitItem]] = {}
        self._outage = False

    def describe(self) -> str:
        """The limits for people, e.g. ``"1000 per 1 second"``."""
        return "; ".join(str(item) for item in self.items)

    def _items_for(self, org: str) -> list[RateLimitItem]:
        # The namespace starts the storage key after the prefix: the org's hash tag comes
        # first, so a Redis Cluster keeps an org's keys on one slot.
        items = self._per_org.get(org)
        if items is None:
            items = [
                type(item)(item.amount, item.multiples, namespace=f"{{{org}}}:ratelimit")
                for item in self.items
            ]
            self._per_org[org] = items
        return items

    async def check(self, org: str, key_id: str) -> int | None:
        """Take one request from the budget of ``key_id`` (an API key's id) in ``org``.

        Returns None when the request may go on (also when Redis did not answer), else the
        whole seconds (at least 1) until it may be tried again, for ``Retry-After``. A
        refused request takes nothing from the budget. Raises nothing for a Redis failure.
        """
        if self.health is not None and not self.health.usable():
            metrics.REDIS_DEGRADED_TOTAL.inc()  # a known outage: do not wait on Redis
            return None
        try:
            for item in self._items_for(org):
                if not await self._strategy.hit(item, key_id):
                    stats = await self._strategy.get_window_stats(item, key_id)
                    self._answered()
                    return max(1, math.ceil(stats.reset_time - time.time()))
        except _REDIS_FAILURES as exc:
            if self.health is None:
                raise
            self._failed(self.health, exc)
            return None
        self._answered()
        return None

    def _answered(self) -> None:
        if self.health is None:
            return
        self.health.succeeded()
        if self._outage:
            self._outage = False
            log.warning("redis answers again: rate limits are enforced again")

    def _failed(self, health: RedisHealth, exc: BaseException) -> None:
        metrics.REDIS_DEGRADED_TOTAL.inc()
        if pool_exhausted(exc):
            return  # our own pool is full: load, not an outage
        # RedisHealth logs the outage as the locks see it; this line says what it means here.
        if not self._outage:
            self._outage = True
            log.warning(
                "redis unavailable: rate limits are not enforced until it answers "
                "(requests go through): %r",
                exc,
            )
        health.failed(exc)

    async def aclose(self) -> None:
        """Close the Redis connections (none for the in-memory storage)."""
        if self._pool is not None:
            await self._pool.aclose()


def build_rate_limiter(settings: Settings) -> RateLimiter | None:
    """The limiter of ``settings.rate_limit``, or None (no limits) when it is empty or
    ``settings.auth`` is ``off`` (no keys; see the module docstring): on Redis at
    ``settings.redis_url`` (its own pool of at most ``settings.redis_pool_size``
    connections), or in memory without one. Connects lazily: a Redis down at startup is an
    outage like any other, not a startup failure. Raises ValueError for a value the `limits`
    notation does not parse (:class:`Settings` refuses it first)."""
    if not settings.rate_limit or settings.auth != "required":
        return None
    items = parse_many(settings.rate_limit)
    url = settings.redis_url
    if url is None:
        return RateLimiter(items, MemoryStorage())
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_pool_size,
        timeout=_REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=_REDIS_TIMEOUT_SECONDS,
        socket_timeout=_REDIS_TIMEOUT_SECONDS,
    )
    # `limits` parses the URL for its scheme only: the client uses our pool (a documented
    # option that its annotation, float | str | bool for every option, leaves out).
    scheme = "async+" if url.startswith(("redis://", "rediss://")) else "async+redis+"
    storage = RedisStorage(
        scheme + url,
        implementation="redispy",
        key_prefix=KEY_PREFIX,
        connection_pool=pool,  # type: ignore[arg-type]
    )
    return RateLimiter(items, storage, health=RedisHealth(), pool=pool)


class RateLimitMiddleware:
    """ASGI middleware for HTTP requests to :data:`GRAPHQL_PATH`; other paths (``/healthz``,
    ``/readyz``, ``/metrics``, GraphiQL's files) are never limited. Installed inside
    :class:`~stockledger.app.auth.AuthMiddleware`, whose key (``scope["state"]["api_key"]``,
    an :class:`~stockledger.domain.access.ApiKey`) names the budget. A request that auth let
    through without a key (GraphiQL's page) is not limited. Past the limit: 429, see the
    module docstring."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != GRAPHQL_PATH:
            await self.app(scope, receive, send)
            return
        key = (scope.get("state") or {}).get("api_key")
        retry_after = None if key is None else await self.limiter.check(key.org, str(key.id))
        if retry_after is None:
            await self.app(scope, receive, send)
            return
        metrics.RATE_LIMITED_TOTAL.inc()
        await _too_many(send, retry_after, self.limiter.describe())


async def _too_many(send: Send, retry_after: int, limit: str) -> None:
    message = f"rate limit of this API key exceeded ({limit}): retry after {retry_after} s"
    body: dict[str, Any] = {
        "errors": [{"message": message, "extensions": {"code": "RATE_LIMITED"}}]
    }
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"retry-after", str(retry_after).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
