"""Builds the running parts from :class:`Settings`: database, Redis, locker, expiry index,
services, sweeper, and the events' relay, webhook endpoints and delivery worker (ARCHITECTURE
section 15). The app's lifespan and the CLI share it, so both run the same wiring.

Embedded default: SQLite file + in-process fakeredis (one process only). Production:
``STOCKLEDGER_DATABASE_URL`` (MySQL) and ``STOCKLEDGER_REDIS_URL``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis

from stockledger.config import Settings
from stockledger.db.engine import Database, create_database
from stockledger.locks import BalanceLocker, NoLocks
from stockledger.locks.redis_locks import RedisBalanceLocker, RedisExpiryIndex, RedisHealth
from stockledger.services.relay import Relay
from stockledger.services.rows import utcnow
from stockledger.services.sweeper import Sweeper
from stockledger.services.webhooks import Breakers, DeliveryWorker, Webhooks
from stockledger.services.writes import Clock, InventoryService


def create_redis(settings: Settings) -> Redis:
    """A Redis client: fakeredis in process when no URL is set.

    A blocking pool (also for fakeredis) so a full pool waits instead of raising (redis-py 8
    raises on a full plain pool; ARCHITECTURE section 4).
    """
    if settings.redis_url is None:
        from fakeredis import FakeAsyncRedis

        return FakeAsyncRedis(
            connection_pool_class=BlockingConnectionPool,
            max_connections=settings.redis_pool_size,
            timeout=settings.lock_wait_seconds,
        )
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_pool_size,
        timeout=settings.lock_wait_seconds,
        # Long enough that a busy event loop is not mistaken for an outage; a refused
        # connection (Redis down) fails at once anyway.
        socket_connect_timeout=2.0,
        socket_timeout=2.0,
    )
    return Redis(connection_pool=pool)


@dataclass
class Runtime:
    """The running parts of one process."""

    settings: Settings
    db: Database
    redis: Redis
    service: InventoryService
    sweeper: Sweeper
    expiry_index: RedisExpiryIndex
    # Events (section 15): the outbox relay (every org), the endpoints (the API's) and the
    # delivery worker, sharing one set of circuit breakers so circuitState shows the worker's.
    relay: Relay
    webhooks: Webhooks
    deliveries: DeliveryWorker


@asynccontextmanager
async def open_runtime(
    settings: Settings, *, clock: Clock = utcnow, database_url: str | None = None
) -> AsyncIterator[Runtime]:
    """Open the database and Redis, build the services; close both on exit."""
    db = create_database(settings, database_url)
    redis = create_redis(settings)
    health = RedisHealth()
    locker: BalanceLocker = (
        RedisBalanceLocker(
            redis, ttl=settings.lock_ttl_seconds, wait=settings.lock_wait_seconds, health=health
        )
        if settings.locks_enabled
        else NoLocks(settings.lock_wait_seconds)
    )
    index = RedisExpiryIndex(redis, settings.org_id, health)
    service = InventoryService(db, settings, clock=clock, locker=locker, expiry_index=index)
    sweeper = Sweeper(
        service,
        index,
        interval=settings.sweep_interval_seconds,
        scan_interval=settings.sweep_db_scan_interval_seconds,
        batch=settings.sweep_batch_size,
        every_org=True,  # the keys' orgs: each request acts for its key's (section 13)
    )
    breakers = Breakers(redis=redis)  # circuitState shared by every process
    relay = Relay(db, redis, settings, clock=clock)
    webhooks = Webhooks(db, settings, breakers=breakers, clock=clock)
    deliveries = DeliveryWorker(db, settings, breakers=breakers, clock=clock)
    try:
        yield Runtime(settings, db, redis, service, sweeper, index, relay, webhooks, deliveries)
    finally:
        await deliveries.aclose()
        await service.close()
        await redis.aclose()
        await db.dispose()


async def run_events(runtime: Runtime) -> None:
    """The relay and the webhook delivery worker of ``runtime``, until :func:`stop_events`."""
    await asyncio.gather(runtime.relay.run_forever(), runtime.deliveries.run_forever())


def stop_events(runtime: Runtime) -> None:
    """Ask :func:`run_events` to return after the current passes (the relay then gives its
    leases back, so another process takes its orgs over at once)."""
    runtime.relay.stop()
    runtime.deliveries.stop()
