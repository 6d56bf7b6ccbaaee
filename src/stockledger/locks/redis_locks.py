"""Redis owner-verified locks, one per (org, location, sku), taken in sorted key order.

Protocol (ARCHITECTURE section 4, step 2):

- Key ``stockledger:{<org>}:lock:<len(location)>:<location>:<sku>``; the ``{org}`` hash tag puts
  a tenant's keys on one Redis Cluster slot, so one Lua call may touch a whole cart.
- Value: a random owner token per acquisition (never shared between tasks, unlike redis-py's
  ``Lock`` whose token lives in a thread-local; see ARCHITECTURE section 4).
- Queue: in one process, a key's waiters line up on an in-process FIFO lock first, so only
  the head of each key's queue polls Redis (hundreds of pollers on one hot SKU starved the
  event loop, and with it the lock holder's transaction).
- Acquire: a Lua script takes keys in sorted order from a given index with ``SET PX`` and
  stops at the first key held by someone else, or free but promised to another process's
  waiter (``_ACQUIRE``: processes take turns on a hot key instead of one starving). So an
  uncontended cart costs one round trip and a contended one waits on exactly one key at a
  time while holding the ones before it (the sorted order makes that deadlock-free). Waits
  back off exponentially with full jitter (AWS Architecture Blog, "Exponential Backoff And
  Jitter"), bounded in total.
  On timeout everything taken is released and :class:`LocksBusy` raised.
- Release: Lua compare-and-delete of every key whose value is still our token (reverse order),
  in ``finally``, shielded from cancellation. A key found gone or taken over means the lease
  ran out mid-write: counted (``inventory_lock_lost_total``) and logged, never an oversell
  because the database row locks were held all along.
- Extend: Lua compare-and-``PEXPIRE``.
- Redis down: the write runs on database locks alone, counted
  (``inventory_redis_degraded_total``) and logged once per outage; Redis is tried again after
  ``retry_interval`` seconds, so locking resumes without a restart.

We did not use redis-py's ``Lock``: it locks one key per object and would cost one round trip
per key and per release; the scripts below do a whole cart in one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, NoReturn

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stockledger.locks import LocksBusy
from stockledger.observability import metrics

log = logging.getLogger(__name__)
BalanceKey = tuple[str, str]

# KEYS: the n lock keys in order, then their n turn keys. ARGV: token, lock ttl ms, 1-based
# index to start at, this process's id, turn ttl ms, n. Takes keys in order until the first
# one it cannot have, and returns how many are held from the start. A free lock whose turn key
# names another process is left to that process (it is waiting for it): without turns the
# holder's own next waiter would take it back at once and another process could starve.
_ACQUIRE = """
local n = tonumber(ARGV[6])
local taken = tonumber(ARGV[3]) - 1
for i = tonumber(ARGV[3]), n do
  local lock, turn = KEYS[i], KEYS[n + i]
  local holder = redis.call('GET', lock)
  if holder == ARGV[1] then
    redis.call('PEXPIRE', lock, ARGV[2])
    taken = i
  else
    local waiting = redis.call('GET', turn)
    if holder == false and (waiting == false or waiting == ARGV[4]) then
      redis.call('SET', lock, ARGV[1], 'PX', ARGV[2])
      if waiting then redis.call('DEL', turn) end
      taken = i
    else
      if waiting == false then
        redis.call('SET', turn, ARGV[4], 'PX', ARGV[5])
      elseif waiting == ARGV[4] then
        redis.call('PEXPIRE', turn, ARGV[5])
      end
      return taken
    end
  end
end
return taken
"""
# KEYS: lock keys; ARGV[1]: token. Deletes (in reverse order) the keys still ours; returns how many.
_RELEASE = """
local n = 0
for i = #KEYS, 1, -1 do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
"""
# KEYS: lock keys; ARGV[1]: token, ARGV[2]: ttl ms. Extends the keys still ours; returns how many.
_EXTEND = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    n = n + 1
  end
end
return n
"""

# Unusable for locks: unreachable, too slow, or a replica that refuses writes (READONLY, e.g.
# an old primary after a failover, whose clients have not moved yet).
REDIS_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, ReadOnlyError)


class _Script:
    """A registered Lua script whose READONLY refusal is always a ReadOnlyError.

    Redis 7 passes a script's READONLY error on as such; Redis 6 wraps it in "ERR Error
    running script ... -READONLY ...", which redis-py raises as a plain ResponseError
    (redis-py issue #3443).
    """

    def __init__(self, redis: Redis, source: str) -> None:
        self._script = redis.register_script(source)

    async def __call__(self, *, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._script(keys=keys, args=args)
        except ResponseError as exc:
            if not isinstance(exc, ReadOnlyError) and "READONLY" in str(exc):
                raise ReadOnlyError(str(exc)) from exc
            raise


def pool_exhausted(exc: BaseException) -> bool:
    """True when the error is our own connection pool being full, not Redis being down.

    redis-py raises MaxConnectionsError from a full plain pool and ConnectionError("No
    connection available.") when a blocking pool's wait runs out; both are load, not outage.
    """
    return isinstance(exc, MaxConnectionsError) or "No connection available" in str(exc)


class _LocalQueue:
    """In-process FIFO locks per Redis lock key, created on demand and dropped when unused.

    Only the task at the head of a key's queue polls Redis, so a hot SKU's hundreds of
    waiters in one process cost one Redis round trip per backoff step, not hundreds, and the
    event loop stays free for the lock holder's transaction.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, names: list[str], deadline: float) -> AsyncIterator[bool]:
        """Hold the local locks of ``names`` (already sorted); yields False on deadline."""
        taken: list[str] = []
        try:
            for name in names:
                lock, users = self._locks.get(name, (None, 0))
                if lock is None:
                    lock = asyncio.Lock()
                self._locks[name] = (lock, users + 1)
                remaining = deadline - time.monotonic()
                try:
                    async with asyncio.timeout(max(remaining, 0)):
                        await lock.acquire()
                except BaseException as exc:
                    # Not acquired (timed out or cancelled): leave the queue without
                    # releasing a lock that is someone else's.
                    self._drop(name, release=False)
                    if isinstance(exc, TimeoutError):
                        yield False
                        return
                    raise
                taken.append(name)  # only once acquired
            yield True
        finally:
            for name in reversed(taken):
                self._drop(name, release=True)

    def busy(self, names: list[str]) -> bool:
        """True when a task of this process holds or waits for one of ``names``."""
        return any(name in self._locks for name in names)

    def _drop(self, name: str, *, release: bool) -> None:
        lock, users = self._locks[name]
        if release:
            lock.release()
        if users <= 1:
            del self._locks[name]
        else:
            self._locks[name] = (lock, users - 1)


def lock_key(org_id: str, location: str, sku: str) -> str:
    """The Redis key of one balance's lock (length-prefixed so no two balances share a key)."""
    return f"stockledger:{{{org_id}}}:lock:{len(location)}:{location}:{sku}"


class RedisHealth:
    """Tracks whether Redis answers; logs once per outage and retries after ``retry_interval`` s."""

    def __init__(self, retry_interval: float = 1.0) -> None:
        self.retry_interval = retry_interval
        self._down_since: float | None = None
        self._next_try = 0.0

    def usable(self) -> bool:
        """False during an outage until the next retry is due."""
        return self._down_since is None or time.monotonic() >= self._next_try

    def failed(self, exc: BaseException) -> None:
        """Record a failed call: starts an outage (logged once) or pushes the next retry."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning("redis unavailable, continuing on database locks alone: %r", exc)
        self._next_try = now + self.retry_interval

    def succeeded(self) -> None:
        """Record a successful call: ends an outage (logged once)."""
        if self._down_since is not None:
            log.warning(
                "redis answers again after %.1f s, locking resumes",
                time.monotonic() - self._down_since,
            )
            self._down_since = None


class RedisBalanceLocker:
    """One owner-verified Redis lock per balance, held for the length of a write.

    ``ttl`` (seconds) bounds every lock's life; ``wait`` (seconds) bounds the total time to take
    a cart's keys. Use :meth:`hold` as ``async with locker.hold(org_id, keys):``.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        ttl: float = 15.0,
        wait: float = 5.0,
        health: RedisHealth | None = None,
        initial_backoff: float = 0.001,
        max_backoff: float = 0.02,
    ) -> None:
        self.redis = redis
        self.ttl_ms = max(1, int(ttl * 1000))
        self.wait = wait
        self.health = health or RedisHealth()
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._acquire = _Script(redis, _ACQUIRE)
        self._release = _Script(redis, _RELEASE)
        self._extend = _Script(redis, _EXTEND)
        self._local = _LocalQueue()
        # Turns are per process (only a key's queue head polls Redis); a turn outlives a few
        # backoff steps of its waiter and lapses quickly if that waiter goes away.
        self._process_id = secrets.token_hex(8)
        self._turn_ms = max(50, int(5 * max_backoff * 1000))
        # (keys, token) pairs that may still be held in Redis after a failed call.
        self._orphans: list[tuple[list[str], str]] = []

    @asynccontextmanager
    async def hold(self, org_id: str, keys: Sequence[BalanceKey]) -> AsyncIterator[None]:
        """Hold the locks of ``keys`` (sorted here) until exit.

        Raises LocksBusy (with a retry hint in ms) when they are not all free within
        ``wait`` seconds; nothing is held then. Runs on database locks alone while Redis is down.
        """
        names = [lock_key(org_id, loc, sku) for loc, sku in sorted(set(keys))]
        if not names:
            yield
            return
        token = secrets.token_hex(16)
        start = time.monotonic()
        deadline = start + self.wait
        async with self._local.hold(names, deadline) as queued:
            if not queued:
                self._timed_out(names, start)
            held = await self.acquire(names, token, deadline=deadline, start=start)
            try:
                yield
            finally:
                if held:
                    # Shielded so a cancelled request still gives its locks back promptly.
                    await asyncio.shield(self.release(names, token))

    def busy(self, org_id: str, keys: Sequence[BalanceKey]) -> bool:
        """True when another task of this process holds or queues for one of ``keys``."""
        return self._local.busy([lock_key(org_id, loc, sku) for loc, sku in keys])

    async def acquire(
        self,
        names: list[str],
        token: str,
        *,
        deadline: float | None = None,
        start: float | None = None,
    ) -> bool:
        """Take every lock of ``names`` in order. True when held, False when Redis is down.

        ``deadline``/``start`` (``time.monotonic()`` values) default to now + ``wait`` and now.
        Raises LocksBusy after releasing what was taken when the wait runs out.
        """
        if not self.health.usable():
            metrics.REDIS_DEGRADED_TOTAL.inc()
            return False
        if self._orphans and not await self._release_orphans():
            metrics.REDIS_DEGRADED_TOTAL.inc()
            return False
        start = time.monotonic() if start is None else start
        deadline = start + self.wait if deadline is None else deadline
        taken = 0
        attempt = 0
        try:
            while True:
                taken = int(
                    await self._acquire(
                        keys=names + [f"{name}:turn" for name in names],
                        args=[
                            token,
                            self.ttl_ms,
                            taken + 1,
                            self._process_id,
                            self._turn_ms,
                            len(names),
                        ],
                    )
                )
                if taken >= len(names):
                    self.health.succeeded()
                    metrics.LOCK_WAIT_SECONDS.observe(time.monotonic() - start)
                    return True
                attempt += 1
                # Full jitter: sleep uniformly in [0, min(cap, base * 2^attempt)].
                backoff = random.uniform(
                    0, min(self.max_backoff, self.initial_backoff * 2**attempt)
                )
                if time.monotonic() + backoff > deadline:
                    break
                await asyncio.sleep(backoff)
        except REDIS_UNAVAILABLE as exc:
            if not pool_exhausted(exc):
                # The script may have run before the connection failed: clean up later.
                self._orphans.append((names, token))
                self.health.failed(exc)
                metrics.REDIS_DEGRADED_TOTAL.inc()
                return False
            # Our own pool is full for the whole wait: load, not an outage.
        except BaseException:
            await asyncio.shield(self._release_quietly(names, token))
            raise
        await self._release_quietly(names, token)
        self._timed_out(names, start)
        raise AssertionError("unreachable")  # pragma: no cover

    def _timed_out(self, names: list[str], start: float) -> NoReturn:
        """Count a lock timeout and raise LocksBusy with a jittered retry hint."""
        metrics.LOCK_WAIT_SECONDS.observe(time.monotonic() - start)
        metrics.LOCK_TIMEOUTS_TOTAL.inc()
        retry_after_ms = max(1, int(min(self.ttl_ms, 1000 * self.wait) * random.uniform(0.05, 0.2)))
        raise LocksBusy(
            retry_after_ms,
            f"stock is busy: the locks of {len(names)} balance(s) were not free within "
            f"{self.wait:g} s; retry with the same idempotency key in {retry_after_ms} ms",
        )

    async def release(self, names: list[str], token: str) -> int:
        """Compare-and-delete ``names`` held under ``token``; returns how many were still ours.

        Keys found gone or taken over are counted as lost leases.
        """
        try:
            freed = int(await self._release(keys=names, args=[token]))
        except REDIS_UNAVAILABLE as exc:
            self._orphans.append((names, token))
            self.health.failed(exc)
            return 0
        except RedisError:
            log.exception("redis lock release failed")
            return 0
        if freed < len(names):
            metrics.LOCK_LOST_TOTAL.inc(len(names) - freed)
            log.warning(
                "redis lock lease lost for %d of %d key(s) (ttl %d ms ran out mid-write); "
                "database row locks kept the write safe",
                len(names) - freed,
                len(names),
                self.ttl_ms,
            )
        return freed

    async def _release_orphans(self) -> bool:
        """Compare-and-delete locks left behind by a Redis failure (a release that did not
        arrive, an acquire whose reply was lost), so they do not block writes for the rest
        of their TTL once Redis is back. False when Redis still does not answer."""
        # Take the whole list: concurrent callers must not release (or pop) the same entry.
        batch, self._orphans = self._orphans, []
        for i, (names, token) in enumerate(batch):
            try:
                await self._release(keys=names, args=[token])
            except REDIS_UNAVAILABLE as exc:
                self._orphans.extend(batch[i:])
                self.health.failed(exc)
                return False
        return True

    async def extend(self, names: list[str], token: str, ttl: float | None = None) -> int:
        """Compare-and-extend ``names`` held under ``token`` to ``ttl`` s; returns how many."""
        ttl_ms = self.ttl_ms if ttl is None else max(1, int(ttl * 1000))
        return int(await self._extend(keys=names, args=[token, ttl_ms]))

    async def _release_quietly(self, names: list[str], token: str) -> None:
        """Give back what a failed or cancelled acquire took; raises nothing. Keys Redis could
        not be told about are kept for :meth:`_release_orphans`, so they do not block the
        balance for the rest of their TTL."""
        try:
            await self._release(keys=names, args=[token])
        except REDIS_UNAVAILABLE as exc:
            self._orphans.append((names, token))
            self.health.failed(exc)
        except RedisError:
            pass


class RedisExpiryIndex:
    """Reservation expiry times in one Redis sorted set per org (score: epoch seconds).

    The sweeper pops due ids atomically (:meth:`pop_due`), so two sweepers never get the same
    id from Redis; the service's expiry is idempotent anyway. Redis errors are swallowed and
    counted: the database scan of (status, expires_at) is the fallback (ARCHITECTURE section 6).
    """

    _POP_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #ids > 0 then redis.call('ZREM', KEYS[1], unpack(ids)) end
return ids
"""

    def __init__(self, redis: Redis, org_id: str, health: RedisHealth | None = None) -> None:
        self.redis = redis
        self.key = f"stockledger:{{{org_id}}}:expiry"
        self.health = health or RedisHealth()
        self._pop = _Script(redis, self._POP_DUE)
        # The latest expiry that a schedule() lost to a Redis failure: until it has passed,
        # the sweeper scans the database on every pass, so those reservations still expire
        # within one interval (ARCHITECTURE section 6).
        self.unindexed_until: datetime | None = None

    async def schedule(self, reservation_id: int, expires_at: datetime) -> None:
        """Add or move a reservation's expiry; a failure moves :attr:`unindexed_until`."""
        if not await self._quietly(
            self.redis.zadd(self.key, {str(reservation_id): expires_at.timestamp()})
        ):
            if self.unindexed_until is None or expires_at > self.unindexed_until:
                self.unindexed_until = expires_at

    async def unschedule(self, reservation_ids: Sequence[int]) -> None:
        """Forget reservations that are no longer ACTIVE."""
        if reservation_ids:
            await self._quietly(self.redis.zrem(self.key, *[str(i) for i in reservation_ids]))

    async def pop_due(self, now: datetime, limit: int) -> list[int]:
        """Remove and return up to ``limit`` ids due at ``now`` (empty while Redis is down)."""
        if not self.health.usable():
            return []
        try:
            ids = await self._pop(keys=[self.key], args=[now.timestamp(), limit])
        except REDIS_UNAVAILABLE as exc:
            self.health.failed(exc)
            metrics.REDIS_DEGRADED_TOTAL.inc()
            return []
        self.health.succeeded()
        return [int(i) for i in ids]

    async def _quietly(self, call: object) -> bool:
        """Await ``call`` unless Redis is down; False when it did not reach Redis."""
        if not self.health.usable():
            close = getattr(call, "close", None)
            if close:
                close()  # the coroutine was never awaited
            metrics.REDIS_DEGRADED_TOTAL.inc()
            return False
        try:
            await call  # type: ignore[misc]
            self.health.succeeded()
            return True
        except REDIS_UNAVAILABLE as exc:
            self.health.failed(exc)
            metrics.REDIS_DEGRADED_TOTAL.inc()
            return False
