"""The Superstore replay (issue 6) at a small scale, against a real ``stockledger serve``
process: on the embedded default (SQLite + fakeredis) and on MariaDB + Redis.

The replay's own end checks (through the API alone) must all pass: no negative balance, no
reserved above on hand, ledger deltas summing to every balance, cart counts adding up.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from server_process import Server, base_env, running

from stockledger.replay import Replay, load_orders

pytestmark = pytest.mark.slow
ORDERS = 300


async def _replay(server: Server, batch: int | None) -> Replay:
    replay = Replay(
        f"{server.url}/graphql",
        load_orders(limit=ORDERS),
        clients=8,
        abandon_ttl=1,
        batch=batch,
        api_key=server.secret,
    )
    elapsed = await replay.run()
    problems = await replay.check(expire_wait=15)
    print("\n" + replay.report(elapsed))
    assert problems == []
    return replay


def _assert_counts(replay: Replay) -> None:
    c = replay.out.counts
    assert c["reserved"] + c["failed_insufficient_stock"] == ORDERS
    assert c["failed_insufficient_stock"] > 0, "opening stock below demand must fail some carts"
    assert c["abandoned"] > 0 and c["expired"] == c["abandoned"]
    assert c["deducted"] == c["reserved"] - c["abandoned"]


# None: one reserve (deduct) per order; 50: reserveMany (deductMany) calls of up to 50.
BATCHES = pytest.mark.parametrize("batch", [None, 50], ids=["single", "batch-50"])


@BATCHES
async def test_replay_on_the_embedded_default(tmp_path: Path, batch: int | None) -> None:
    with running(tmp_path, base_env(tmp_path, log_level="WARNING")) as server:
        server.wait_ready()
        replay = await _replay(server, batch)
        _assert_counts(replay)
        assert bool(replay.out.latencies.get("reserveMany")) == (batch is not None)


@BATCHES
async def test_replay_on_mariadb_and_redis(
    mysql_url: str, redis_url: str, org_id: str, tmp_path: Path, batch: int | None
) -> None:
    env = base_env(
        tmp_path, database_url=mysql_url, redis_url=redis_url, org_id=org_id, log_level="WARNING"
    )
    with running(tmp_path, env) as server:
        server.wait_ready()
        _assert_counts(await _replay(server, batch))
