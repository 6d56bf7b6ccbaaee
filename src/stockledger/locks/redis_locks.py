"""Redis owner-verified locks, one per (org, location, sku), and the Redis expiry index.

Protocol (ARCHITECTURE sections 4 and 12):

- Keys: ``stockledger:{<org>}:lock:<len(location)>:<location>:<sku>`` for a lock and
  ``stockledger:{<org>}:turn:<len(location)>:<location>:<sku>`` for its turn marker; the
  expiry index is ``stockledger:{<org>}:expiry``. The word after the org tag keeps the three
  key spaces apart, and the length prefix keeps any two (location, sku) pairs apart, whatever
  characters they hold. The ``{org}`` hash tag puts a tenant's keys on one Redis Cluster slot,
  so one Lua call may touch a whole batch.
- Value: a random owner token per claim (never shared, unlike redis-py's ``Lock`` whose token
  lives in a thread-local; see ARCHITECTURE section 4).
- Claim (``_CLAIM``): one script call for a whole batch. Commands are taken in order, each all
  or nothing: a command gets its keys when every one is free (or already ours), else none, and
  it waits for a later batch while the rest go ahead. A free key whose turn marker names
  another process is left to that process (it is waiting for it): processes take turns on a hot
  key instead of one starving the other.
- Lease: every lock has a short TTL (``ttl``, 3 s by default), so a killed holder's locks stop
  blocking within it; a live holder extends its leases while its batch is still in the
  database (:meth:`RedisBalanceLocker.keep`).
- Release: Lua compare-and-delete of every key still ours, pipelined with the expiry-index
  changes in one round trip after the commit (:meth:`RedisBalanceLocker.release_with`). A key
  found gone or taken over means the lease ran out mid-write: counted
  (``inventory_lock_lost_total``) and logged, never an oversell because the database row locks
  were held all along.
- Redis down (unreachable, timing out, or a READONLY replica): every command is granted on
  database locks alone, counted (``inventory_redis_degraded_total``) and logged once per
  outage; Redis is tried again after ``retry_interval`` seconds.

We did not use redis-py's ``Lock``: it locks one key per object and would cost one round trip
per key and per release; the scripts below do a whole batch in one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MaxConnectionsError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from stockledger.domain.model import BalanceKey
from stockledger.locks import Claim, ExpiryIndex, IndexChanges, LocksBusy
from stockledger.observability import metrics

log = logging.getLogger(__name__)

# KEYS: n lock keys, then their n turn keys. ARGV: token, lock ttl ms, this process's id, turn
# ttl ms, n, then per command its key count and key indexes (1-based). Returns 1 or 0 per
# command: it now holds all its keys, or none of them was taken for it.
_CLAIM = """
local n = tonumber(ARGV[5])
local state = {}
local function probe(i)
  if state[i] ~= nil then return state[i] end
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[1] then state[i] = 1 return 1 end
  local waiting = redis.call('GET', KEYS[n + i])
  if holder == false and (waiting == false or waiting == ARGV[3]) then state[i] = 2 return 2 end
  if waiting == false then
    redis.call('SET', KEYS[n + i], ARGV[3], 'PX', ARGV[4])
  elseif waiting == ARGV[3] then
    redis.call('PEXPIRE', KEYS[n + i], ARGV[4])
  end
  state[i] = 0
  return 0
end
local granted = {}
local pos = 6
while pos <= #ARGV do
  local count = tonumber(ARGV[pos])
  local ok = 1
  for j = 1, count do
    if probe(tonumber(ARGV[pos + j])) == 0 then ok = 0 end
  end
  if ok == 1 then
    for j = 1, count do
      local i = tonumber(ARGV[pos + j])
      if state[i] == 2 then
        redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
        if redis.call('GET', KEYS[n + i]) == ARGV[3] then redis.call('DEL', KEYS[n + i]) end
        state[i] = 1
      end
    end
  end
  granted[#granted + 1] = ok
  pos = pos + count + 1
end
return granted
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

# A lease is extended every third of its TTL, but at most 20 times a second.
_MIN_KEEP_INTERVAL = 0.05


def _readonly(exc: ResponseError) -> ResponseError:
    """Redis 7 passes a script's READONLY error on as such; Redis 6 wraps it in "ERR Error
    running script ... -READONLY ...", which redis-py raises as a plain ResponseError
    (redis-py issue #3443): make both a ReadOnlyError."""
    if not isinstance(exc, ReadOnlyError) and "READONLY" in str(exc):
        return ReadOnlyError(str(exc))
    return exc


class _Script:
    """A registered Lua script whose READONLY refusal is always a ReadOnlyError."""

    def __init__(self, redis: Redis, source: str) -> None:
        self._script = redis.register_script(source)

    def queue(self, pipe: Any, *, keys: list[str], args: list[Any]) -> None:
        """Queue an EVALSHA on ``pipe``. Not through the Script object: on a pipeline that
        costs a SCRIPT EXISTS round trip before every execute (redis-py issue #1470). A
        NoScriptError result (Redis lost its script cache) means it did not run: call the
        script again directly (:meth:`__call__` loads it)."""
        pipe.evalsha(self._script.sha, len(keys), *keys, *args)

    async def __call__(self, *, keys: list[str], args: list[Any], client: Any = None) -> Any:
        try:
            return await self._script(keys=keys, args=args, client=client)
        except ResponseError as exc:
            converted = _readonly(exc)
            if converted is exc:
                raise
            raise converted from exc


def pool_exhausted(exc: BaseException) -> bool:
    """True when the error is our own connection pool being full, not Redis being down.

    redis-py raises MaxConnectionsError from a full plain pool and ConnectionError("No
    connection available.") when a blocking pool's wait runs out; both are load, not outage.
    """
    return isinstance(exc, MaxConnectionsError) or "No connection available" in str(exc)


def _balance_part(location: str, sku: str) -> str:
    return f"{len(location)}:{location}:{sku}"


def lock_key(org_id: str, location: str, sku: str) -> str:
    """The Redis key of one balance's lock (see the module docstring for why it is unique)."""
    return f"stockledger:{{{org_id}}}:lock:{_balance_part(location, sku)}"


def turn_key(org_id: str, location: str, sku: str) -> str:
    """The Redis key of one balance's turn marker (a key space apart from the locks)."""
    return f"stockledger:{{{org_id}}}:turn:{_balance_part(location, sku)}"


def expiry_key(org_id: str) -> str:
    """The Redis key of an org's expiry index (a sorted set of reservation ids)."""
    return f"stockledger:{{{org_id}}}:expiry"


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
    """One owner-verified Redis lock per balance, claimed by a batch for its transaction.

    ``ttl`` (seconds) bounds every lock's life (its lease; a live holder extends it);
    ``wait`` (seconds) bounds how long a command waits for its keys. :meth:`claim` is the batch
    path; :meth:`hold` waits for one set of keys (tools and tests).
    """

    def __init__(
        self,
        redis: Redis,
        *,
        ttl: float = 3.0,
        wait: float = 5.0,
        health: RedisHealth | None = None,
        initial_backoff: float = 0.001,
        max_backoff: float = 0.02,
    ) -> None:
        self.redis = redis
        self.ttl = ttl
        self.ttl_ms = max(1, int(ttl * 1000))
        self.wait = wait
        self.health = health or RedisHealth()
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._claim = _Script(redis, _CLAIM)
        self._release = _Script(redis, _RELEASE)
        self._extend = _Script(redis, _EXTEND)
        # Turns are per process; a turn outlives a few backoff steps of its waiter and lapses
        # quickly if that waiter goes away.
        self._process_id = secrets.token_hex(8)
        self._turn_ms = max(50, int(5 * max_backoff * 1000))
        # (keys, token) pairs that may still be held in Redis after a failed call.
        self._orphans: list[tuple[list[str], str]] = []
        # Lock keys this process holds now (claims and holds), with how many holders.
        self._held: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ the batch path

    async def claim(self, org_id: str, groups: Sequence[Sequence[BalanceKey]]) -> Claim:
        """Take, in one script call, the keys of every group (command) that can have all of
        its keys now, in group order. Never waits and never raises for Redis being away:
        then every group is granted, ``degraded`` (database row locks alone)."""
        token = secrets.token_hex(16)
        keys = sorted({k for group in groups for k in group})
        if not keys:
            return Claim(token, [True] * len(groups))
        if not self.health.usable() or (self._orphans and not await self._release_orphans()):
            return self._degraded(token, len(groups))
        index = {k: i + 1 for i, k in enumerate(keys)}
        args: list[Any] = [token, self.ttl_ms, self._process_id, self._turn_ms, len(keys)]
        for group in groups:
            wanted = sorted({index[k] for k in group})
            args += [len(wanted), *wanted]
        names = [lock_key(org_id, *k) for k in keys]
        try:
            granted = await self._claim(
                keys=names + [turn_key(org_id, *k) for k in keys], args=args
            )
        except REDIS_UNAVAILABLE as exc:
            if pool_exhausted(exc):
                # Our own pool is full: load, not an outage; nothing was taken.
                return Claim(token, [False] * len(groups))
            # The script may have run before the connection failed: clean up later.
            self._orphans.append((names, token))
            self.health.failed(exc)
            return self._degraded(token, len(groups))
        except RedisError as exc:
            # Out of memory, no permission, cluster down, busy script ...: Redis cannot lock
            # for us now, and a write must not fail for it (ARCHITECTURE section 4).
            self.health.failed(exc)
            return self._degraded(token, len(groups))
        self.health.succeeded()
        result = [bool(int(g)) for g in granted]
        held = {k for group, ok in zip(groups, result, strict=True) if ok for k in group}
        claim = Claim(token, result, [lock_key(org_id, *k) for k in sorted(held)])
        self._held.update(claim.names)
        return claim

    def held_here(self, org_id: str, keys: Sequence[BalanceKey]) -> bool:
        """True when a claim or hold of this process holds one of ``keys`` now."""
        return any(self._held[lock_key(org_id, *k)] > 0 for k in keys)

    def _forget(self, names: Sequence[str]) -> None:
        self._held.subtract(names)
        for name in names:
            if self._held[name] <= 0:
                del self._held[name]

    def _degraded(self, token: str, count: int) -> Claim:
        metrics.REDIS_DEGRADED_TOTAL.inc(count)
        return Claim(token, [True] * count, degraded=True)

    @contextlib.asynccontextmanager
    async def keep(self, claim: Claim) -> AsyncIterator[None]:
        """Extend the claim's leases every third of the TTL while the block runs, so a batch
        still in the database never loses them (at most 20 extensions a second).

        The keeper stops on an event, not by cancellation: a cancel that lands inside a
        redis-py call can be swallowed (Python 3.11's ``asyncio.wait_for``), and the keeper
        would then run on and hold its writer. Leaving waits for an extension in flight
        (bounded by the client's socket timeout).
        """
        if not claim.names:
            yield
            return
        interval = max(self.ttl / 3, _MIN_KEEP_INTERVAL)
        done = asyncio.Event()

        async def renew() -> None:
            while True:
                try:
                    async with asyncio.timeout(interval):
                        await done.wait()
                    return
                except TimeoutError:
                    pass
                try:
                    await self.extend(claim.names, claim.token)
                except (RedisError, OSError):
                    return  # the release counts what was lost; row locks keep writes safe

        task = asyncio.create_task(renew(), name="stockledger-lease")
        try:
            yield
        finally:
            done.set()
            await task

    async def release_with(
        self, claim: Claim | None, index: ExpiryIndex | None, changes: IndexChanges
    ) -> None:
        """Give a claim's keys back (compare-and-delete) and apply ``changes`` to ``index``, in
        one pipelined round trip when the index uses this client. Raises nothing: keys Redis
        could not be told about are released later, and index changes it missed move
        ``index.unindexed_until`` (the sweeper then scans the database)."""
        names = claim.names if claim is not None else []
        self._forget(names)
        together = (
            isinstance(index, RedisExpiryIndex)
            and index.redis is self.redis
            and index.health.usable()
        )
        if index is not None and not together:
            await index.apply(changes)
        if not names and not (together and changes):
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if names:
                    assert claim is not None
                    self._release.queue(pipe, keys=names, args=[claim.token])
                if together:
                    assert isinstance(index, RedisExpiryIndex)
                    index.add_to(pipe, changes)
                results = await pipe.execute(raise_on_error=False)
        except REDIS_UNAVAILABLE as exc:
            if names and claim is not None:
                self._orphans.append((names, claim.token))
            self.health.failed(exc)
            if together:
                assert isinstance(index, RedisExpiryIndex)
                index.health.failed(exc)
                index.missed(changes)
            return
        if names and claim is not None and isinstance(results[0], NoScriptError):
            results[0] = await self._release_again(names, claim.token)
        failed = [r for r in results if isinstance(r, BaseException)]
        if names and claim is not None:
            freed = results[0]
            if isinstance(freed, BaseException):
                self._orphans.append((names, claim.token))
            else:
                self._count_lost(len(names) - int(freed))
        if together and any(isinstance(r, BaseException) for r in results[1 if names else 0 :]):
            assert isinstance(index, RedisExpiryIndex)
            index.missed(changes)
        if failed:
            log.warning("redis refused part of a batch's release: %r", failed[0])
            self.health.failed(failed[0])
        else:
            self.health.succeeded()

    async def _release_again(self, names: list[str], token: str) -> Any:
        """The release of a pipeline that found the script gone, run directly: the freed
        count, or the error (as a pipeline result is)."""
        try:
            return await self._release(keys=names, args=[token])
        except RedisError as exc:
            return exc

    def retry_after_ms(self) -> int:
        """A jittered hint for when a busy balance may be free again (5-20 % of the wait)."""
        return max(1, int(min(self.ttl_ms, 1000 * self.wait) * random.uniform(0.05, 0.2)))

    # ------------------------------------------------------------------ one set of keys

    @contextlib.asynccontextmanager
    async def hold(self, org_id: str, keys: Sequence[BalanceKey]) -> AsyncIterator[None]:
        """Hold the locks of ``keys`` until exit, waiting up to ``wait`` seconds for them.

        Raises LocksBusy (with a retry hint in ms) when they are not all free within the
        wait; nothing is held then. Runs on database locks alone while Redis is down.
        """
        names = [lock_key(org_id, loc, sku) for loc, sku in sorted(set(keys))]
        if not names:
            yield
            return
        token = secrets.token_hex(16)
        held = await self.acquire(names, token)
        if held:
            self._held.update(names)
        try:
            yield
        finally:
            if held:
                self._forget(names)
                # Shielded so a cancelled holder still gives its locks back promptly.
                await asyncio.shield(self.release(names, token))

    async def acquire(self, names: list[str], token: str, *, deadline: float | None = None) -> bool:
        """Take every lock of ``names`` (lock keys), all or nothing, retrying with full
        jitter (AWS Architecture Blog, "Exponential Backoff And Jitter") until ``deadline``
        (``time.monotonic()``; default now + ``wait``). True when held, False when Redis is
        down (database locks alone). Raises LocksBusy when the wait runs out."""
        if not self.health.usable() or (self._orphans and not await self._release_orphans()):
            metrics.REDIS_DEGRADED_TOTAL.inc()
            return False
        start = time.monotonic()
        deadline = start + self.wait if deadline is None else deadline
        turns = [name.replace("}:lock:", "}:turn:", 1) for name in names]
        args: list[Any] = [token, self.ttl_ms, self._process_id, self._turn_ms, len(names)]
        args += [len(names), *range(1, len(names) + 1)]
        attempt = 0
        try:
            while True:
                granted = await self._claim(keys=names + turns, args=args)
                if int(granted[0]):
                    self.health.succeeded()
                    metrics.LOCK_WAIT_SECONDS.observe(time.monotonic() - start)
                    return True
                attempt += 1
                backoff = random.uniform(
                    0, min(self.max_backoff, self.initial_backoff * 2**attempt)
                )
                if time.monotonic() + backoff > deadline:
                    break
                await asyncio.sleep(backoff)
        except REDIS_UNAVAILABLE as exc:
            if not pool_exhausted(exc):
                self._orphans.append((names, token))
                self.health.failed(exc)
                metrics.REDIS_DEGRADED_TOTAL.inc()
                return False
        except BaseException:
            await asyncio.shield(self._release_quietly(names, token))
            raise
        metrics.LOCK_WAIT_SECONDS.observe(time.monotonic() - start)
        metrics.LOCK_TIMEOUTS_TOTAL.inc()
        retry_after_ms = self.retry_after_ms()
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
        self._count_lost(len(names) - freed)
        return freed

    def _count_lost(self, lost: int) -> None:
        if lost > 0:
            metrics.LOCK_LOST_TOTAL.inc(lost)
            log.warning(
                "redis lock lease lost for %d key(s) (ttl %d ms ran out mid-write); "
                "database row locks kept the write safe",
                lost,
                self.ttl_ms,
            )

    async def extend(self, names: list[str], token: str, ttl: float | None = None) -> int:
        """Compare-and-extend ``names`` held under ``token`` to ``ttl`` s; returns how many."""
        ttl_ms = self.ttl_ms if ttl is None else max(1, int(ttl * 1000))
        return int(await self._extend(keys=names, args=[token, ttl_ms]))

    async def _release_orphans(self) -> bool:
        """Compare-and-delete locks left behind by a Redis failure (a release that did not
        arrive, a claim whose reply was lost), so they do not block writes for the rest of
        their TTL once Redis is back. False when Redis still does not answer."""
        # Take the whole list: concurrent callers must not release (or pop) the same entry.
        batch, self._orphans = self._orphans, []
        for i, (names, token) in enumerate(batch):
            try:
                await self._release(keys=names, args=[token])
            except RedisError as exc:
                self._orphans.extend(batch[i:])
                self.health.failed(exc)
                return False
        return True

    async def _release_quietly(self, names: list[str], token: str) -> None:
        """Give back what a failed or cancelled acquire took; raises nothing."""
        try:
            await self._release(keys=names, args=[token])
        except REDIS_UNAVAILABLE as exc:
            self._orphans.append((names, token))
            self.health.failed(exc)
        except RedisError:
            pass


class RedisExpiryIndex:
    """Reservation expiry times in one Redis sorted set per org (score: epoch seconds).

    The sweeper pops due ids with a lease (:meth:`pop_due`): popped ids get the score now +
    ``lease`` seconds, so two sweepers never get the same id at once, and an id whose sweeper
    died comes back due after the lease. Settled ids leave the index with the batch that
    settled them. Redis errors are swallowed and counted: the database scan of (status,
    expires_at) is the fallback (ARCHITECTURE section 6).
    """

    _POP_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for i = 1, #ids do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ids[i]) end
return ids
"""

    def __init__(
        self,
        redis: Redis,
        org_id: str,
        health: RedisHealth | None = None,
        *,
        lease: float = 5.0,
    ) -> None:
        self.redis = redis
        self.org_id = org_id
        self.key = expiry_key(org_id)
        self.health = health or RedisHealth()
        self.lease = lease
        self._pop = _Script(redis, self._POP_DUE)
        self.unindexed_until: datetime | None = None
        self._orgs: dict[str, RedisExpiryIndex] = {org_id: self}

    def of(self, org_id: str) -> RedisExpiryIndex:
        """The index of ``org_id``: the same client, health and lease, its own sorted set
        (made once per org and kept)."""
        index = self._orgs.get(org_id)
        if index is None:
            index = RedisExpiryIndex(self.redis, org_id, self.health, lease=self.lease)
            index._orgs = self._orgs  # one map for the whole family
            self._orgs[org_id] = index
        return index

    async def apply(self, changes: IndexChanges) -> None:
        """Add or move the expiries of ``changes.schedule`` and forget ``changes.unschedule``."""
        if not changes:
            return
        if not self.health.usable():
            self.missed(changes)
            return
        try:
            if changes.schedule:
                await self.redis.zadd(
                    self.key, {str(i): t.timestamp() for i, t in changes.schedule.items()}
                )
            if changes.unschedule:
                await self.redis.zrem(self.key, *[str(i) for i in changes.unschedule])
        except REDIS_UNAVAILABLE as exc:
            self.health.failed(exc)
            self.missed(changes)
            return
        self.health.succeeded()

    def add_to(self, pipe: Any, changes: IndexChanges) -> None:
        """Queue ``changes`` on a pipeline (see :meth:`RedisBalanceLocker.release_with`)."""
        if changes.schedule:
            pipe.zadd(self.key, {str(i): t.timestamp() for i, t in changes.schedule.items()})
        if changes.unschedule:
            pipe.zrem(self.key, *[str(i) for i in changes.unschedule])

    def missed(self, changes: IndexChanges) -> None:
        """Changes that did not reach Redis: count them, and scan the database until the
        latest expiry they held has passed (ARCHITECTURE section 6)."""
        if not changes:
            return
        metrics.REDIS_DEGRADED_TOTAL.inc()
        if changes.schedule:
            latest = max(changes.schedule.values())
            if self.unindexed_until is None or latest > self.unindexed_until:
                self.unindexed_until = latest

    async def pop_due(self, now: datetime, limit: int) -> list[int]:
        """Lease and return up to ``limit`` ids due at ``now`` (empty while Redis is down)."""
        if not self.health.usable():
            return []
        try:
            ids = await self._pop(
                keys=[self.key], args=[now.timestamp(), limit, now.timestamp() + self.lease]
            )
        except REDIS_UNAVAILABLE as exc:
            self.health.failed(exc)
            metrics.REDIS_DEGRADED_TOTAL.inc()
            return []
        self.health.succeeded()
        return [int(i) for i in ids]

    async def reschedule(self, due: Mapping[int, datetime]) -> None:
        """Move ids that are still in the index to new due times (others stay out)."""
        if not due or not self.health.usable():
            return
        try:
            await self.redis.zadd(
                self.key, {str(i): t.timestamp() for i, t in due.items()}, xx=True
            )
        except REDIS_UNAVAILABLE as exc:
            self.health.failed(exc)
            metrics.REDIS_DEGRADED_TOTAL.inc()
