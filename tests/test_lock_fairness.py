"""Two processes (two lockers with their own in-process queues) contending for one hot key
take turns, so neither starves (ARCHITECTURE section 4, scale-out with several workers)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
from redis.asyncio import Redis

from stockledger.locks.redis_locks import RedisBalanceLocker

pytestmark = pytest.mark.slow


async def test_two_processes_take_turns_on_a_hot_key(redis_url: str) -> None:
    org = f"fair-{uuid.uuid4().hex[:8]}"
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    # A wait far above the run's length, so a slow machine cannot turn a late turn into a
    # timeout; starving shows in the order of turns, asserted below.
    lockers = [RedisBalanceLocker(c, wait=60.0) for c in clients]
    order: list[int] = []
    inside = 0

    async def holder(which: int) -> None:
        nonlocal inside
        async with lockers[which].hold(org, [("default", "HOT")]):
            inside += 1
            assert inside == 1, "two holders at once"
            order.append(which)
            await asyncio.sleep(0.004)  # a short transaction
            inside -= 1

    try:
        # Each "process" has 40 requests queued on the key at once (~0.3 s of work each).
        await asyncio.wait_for(asyncio.gather(*(holder(i % 2) for i in range(80))), timeout=120)
    finally:
        for c in clients:
            await c.aclose()
    assert Counter(order) == {0: 40, 1: 40}
    # Without turns one process kept the key for its whole queue; with them the holders
    # alternate, so the longest run of one process is short.
    longest = max(
        len(run)
        for run in "".join(str(x) for x in order).replace("01", "0 1").replace("10", "1 0").split()
    )
    assert longest <= 10, f"one process held the key {longest} times in a row: {order}"
