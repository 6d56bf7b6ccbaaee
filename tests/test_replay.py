"""The Superstore replay (issue 6) at a small scale, against a real ``stockledger serve``
process: on the embedded default (SQLite + fakeredis) and on MariaDB + Redis.

The replay's own end checks (through the API alone) must all pass: no negative balance, no
reserved above on hand, ledger deltas summing to every balance, cart counts adding up,
conservation per SKU. With transfers between regions (issue 11), the service's reconciliation
query (``find_violations``, conservation and transfer lines included) must find nothing either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from server_process import Server, base_env, running

from stockledger.config import Settings
from stockledger.db.engine import create_database
from stockledger.replay import Replay, load_orders
from stockledger.services.reconcile import find_violations

pytestmark = pytest.mark.slow
ORDERS = 300


async def _replay(server: Server, batch: int | None, **options: Any) -> Replay:
    replay = Replay(
        f"{server.url}/graphql",
        load_orders(limit=options.pop("orders", ORDERS)),
        clients=8,
        abandon_ttl=1,
        batch=batch,
        api_key=server.secret,
        **options,
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


# ------------------------------------------------------------------ transfers (issue 11)

TRANSFER_ORDERS = 150  # 2014-01-03 .. 04-12 (ship dates): 9 restocks 10 days apart


async def _violations(env: dict[str, str]) -> list[str]:
    """The reconciliation query's findings for the server's database and org."""
    settings = Settings(
        data_dir=Path(env["STOCKLEDGER_DATA_DIR"]),
        database_url=env.get("STOCKLEDGER_DATABASE_URL"),
        org_id=env.get("STOCKLEDGER_ORG_ID", "default"),
    )
    db = create_database(settings)
    try:
        return await find_violations(db, settings.org_id)
    finally:
        await db.dispose()


async def _replay_with_transfers(server: Server, in_transit: bool) -> Replay:
    """A short replay moving half the fullest region's stock at every 10-day restock; its
    checks (conservation included) pass and it moved stock. No abandoned carts, to keep it
    short; a transfer still meets reserved units (carts between order and ship date)."""
    replay = await _replay(
        server,
        None,
        orders=TRANSFER_ORDERS,
        restock_days=10,
        abandon_share=0.0,  # no wait for the sweeper: the carts above test expiry
        transfer_share=0.5,
        transfer_in_transit=in_transit,
    )
    c = replay.out.counts
    assert c["transfers_ok"] > 0 and c["transfers_other"] == 0
    assert c["transfer_units"] >= c["transfers_ok"]
    assert len(replay.out.transfers) == c["transfers_ok"]
    assert replay.out.conservation is not None and replay.out.conservation.endswith("holds")
    left = [m for m in replay.out.transfers.values() if m.in_transit]
    if in_transit:
        # Every interval's transfers but the last one's were received at the next.
        assert c["received"] > 0 and left
        assert c["received"] + len(left) == c["transfers_ok"]
    else:
        assert c["received"] == 0 and not left
    report = replay.report(1.0)
    assert f"transfers: ok={c['transfers_ok']} short={c['transfers_short']} other=0" in report
    assert "holds" in report
    return replay


async def test_replay_with_transfers_in_transit_on_the_embedded_default(tmp_path: Path) -> None:
    env = base_env(tmp_path, log_level="WARNING")
    with running(tmp_path, env) as server:
        server.wait_ready()
        await _replay_with_transfers(server, in_transit=True)
        assert await _violations(env) == []


async def test_replay_with_transfers_at_once_on_mariadb_and_redis(
    mysql_url: str, redis_url: str, org_id: str, tmp_path: Path
) -> None:
    env = base_env(
        tmp_path, database_url=mysql_url, redis_url=redis_url, org_id=org_id, log_level="WARNING"
    )
    with running(tmp_path, env) as server:
        server.wait_ready()
        await _replay_with_transfers(server, in_transit=False)
        assert await _violations(env) == []


def test_a_transfer_share_outside_0_to_1_is_refused() -> None:
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="transfer_share"):
            Replay("http://a/graphql", [], transfer_share=share)


def _moved_replay() -> Replay:
    """A replay as if run: 5 units of S1 restocked at East, 2 deducted, 1 sent to West in
    transit (not received yet)."""
    from datetime import date

    from stockledger.replay import Moved, Order

    day = date(2020, 1, 1)
    replay = Replay(
        "http://a/graphql",
        [Order("A", day, day, {("East", "S1"): 2}), Order("B", day, day, {("West", "S1"): 1})],
        run_id="run",
        transfer_share=0.5,
        transfer_in_transit=True,
    )
    replay._opening = {}
    replay.out.restocks["run:opening-0"] = [{"location": "East", "sku": "S1", "quantity": 5}]
    replay.out.deducted.add("A")
    replay.out.transfers["run:transfer:1:S1"] = Moved(
        replay._transfer_input(1, "S1", "East", "West", 1), "T1"
    )
    return replay


def _level(east: int, west: int, incoming: int) -> dict[str, Any]:
    return {
        "onHand": east + west,
        "incoming": incoming,
        "locations": [
            {"location": "East", "onHand": east, "incoming": 0},
            {"location": "West", "onHand": west, "incoming": incoming},
        ],
    }


def test_the_conservation_check_sees_a_unit_made_or_lost() -> None:
    replay = _moved_replay()
    assert replay._conservation({"S1": _level(2, 0, 1)}) == []
    assert replay.out.conservation is not None and replay.out.conservation.endswith("holds")
    made = replay._conservation({"S1": _level(2, 1, 1)})  # the transfer also arrived: doubled
    assert len(made) == 1 and made[0].startswith("conservation S1"), made
    lost = replay._conservation({"S1": _level(2, 0, 0)})  # in transit vanished
    assert len(lost) == 2 and "FAILED" in (replay.out.conservation or ""), lost


def test_the_transfer_check_sees_a_missing_wrong_or_unknown_transfer() -> None:
    replay = _moved_replay()
    line = {"sku": "S1", "quantity": 1, "received": 0, "remaining": 1, "returned": 0}
    sent = {
        "id": "T1",
        "status": "IN_TRANSIT",
        "fromLocation": "East",
        "toLocation": "West",
        "reference": {"type": "REBALANCE", "id": "run:1:S1"},
        "lines": [line],
    }
    assert replay._transfers_agree([sent]) == []
    assert replay._transfers_agree([]) == ["transfer run:transfer:1:S1 (T1) found 0 times"]
    wrong = replay._transfers_agree([{**sent, "status": "RECEIVED"}])
    assert len(wrong) == 1 and "expected" in wrong[0], wrong
    ghost = {**sent, "id": "T2"}
    assert replay._transfers_agree([sent, ghost])[0].startswith("transfer T2 the run was not")


# ------------------------------------------------------------------ events (issue 12)

EVENTS_ORDERS = 120


async def _replay_with_events(server: Server) -> Replay:
    """A short replay with a webhook receiver and a subscriber attached: its checks (every
    STOCK_CHANGED against the ledger at its version, every transition the ledger implies
    received, the subscriber's versions rising) pass, and it saw transitions of each kind."""
    replay = await _replay(
        server,
        None,
        orders=EVENTS_ORDERS,
        restock_days=10,
        abandon_share=0.0,  # no wait for the sweeper: the tests above cover expiry
        events=True,
        events_wait=20,
    )
    c = replay.out.counts
    assert c["reorder_points"] > 0
    assert c["events_changes"] > 0 and c["events_rejected"] == 0
    assert c["events_received"] >= c["events_changes"] + c["events_transitions"]
    assert c["events_subscribed"] > 0
    assert replay.out.events is not None and replay.out.events.endswith(": hold")
    for kind in ("LOW", "OUT", "REPLENISHED"):
        assert f"{kind} 0," not in replay.out.events, replay.out.events
    return replay


async def test_replay_with_events_on_the_embedded_default(tmp_path: Path) -> None:
    env = base_env(tmp_path, log_level="WARNING", webhook_allow_private="true")
    with running(tmp_path, env) as server:
        server.wait_ready()
        await _replay_with_events(server)


async def test_replay_with_events_on_mariadb_and_redis(
    mysql_url: str, redis_url: str, org_id: str, tmp_path: Path
) -> None:
    env = base_env(
        tmp_path,
        database_url=mysql_url,
        redis_url=redis_url,
        org_id=org_id,
        log_level="WARNING",
        webhook_allow_private="true",
    )
    with running(tmp_path, env) as server:
        server.wait_ready()
        await _replay_with_events(server)


def test_the_alert_walk_follows_section_15() -> None:
    from stockledger.replay import expected_alerts

    # With a reorder point at 2: 5 -> 2 LOW, -> 0 OUT, -> 1 nothing (OUT -> LOW), -> 4
    # REPLENISHED, -> 0 LOW then OUT (from OK), -> 3 REPLENISHED.
    moves = [(1, 5), (2, 2), (3, 0), (4, 1), (5, 4), (6, 0), (7, 3)]
    assert expected_alerts(moves, 2) == [
        (2, "STOCK_LOW"),
        (3, "STOCK_OUT"),
        (5, "STOCK_REPLENISHED"),
        (6, "STOCK_LOW"),
        (6, "STOCK_OUT"),
        (7, "STOCK_REPLENISHED"),
    ]
    # Without one: OUT and REPLENISHED only; from a stored LOW, a move up is REPLENISHED.
    assert expected_alerts(moves, None) == [
        (3, "STOCK_OUT"),
        (4, "STOCK_REPLENISHED"),
        (6, "STOCK_OUT"),
        (7, "STOCK_REPLENISHED"),
    ]
    assert expected_alerts([(9, 3)], None, "LOW") == [(9, "STOCK_REPLENISHED")]


def _event(kind: str, version: int, on_hand: int, reserved: int) -> dict[str, Any]:
    """A webhook body as the receiver keeps it, for S1 at East."""
    balance = {"sku": "S1", "location": "East", "onHand": on_hand, "reserved": reserved}
    return {
        "type": kind,
        "data": {"balance": {**balance, "version": version}, "ledgerEntryIds": [str(version)]},
    }


async def test_the_events_check_sees_a_wrong_balance_a_lost_alert_and_a_stale_version() -> None:
    from datetime import date

    from stockledger.replay import Order, Receiver, Subscriber

    day = date(2020, 1, 1)
    # S1 at East, reorder point 2: restock 5 (v1), reserve 4 (v2: available 1, LOW), deduct
    # (v3: still 1, nothing).
    ledger = [
        {"id": str(v), "sku": "S1", "location": "East", "onHandAfter": h, "reservedAfter": r}
        for v, h, r in [(1, 5, 0), (2, 5, 4), (3, 1, 0)]
    ]
    good = {
        "c1": _event("STOCK_CHANGED", 1, 5, 0),
        "c2": _event("STOCK_CHANGED", 2, 5, 4),
        "l2": _event("STOCK_LOW", 2, 5, 4),
        "c3": _event("STOCK_CHANGED", 3, 1, 0),
    }

    async def check(events: dict[str, dict[str, Any]], seen: list[int]) -> list[str]:
        replay = Replay(
            "http://a/graphql", [Order("A", day, day, {("East", "S1"): 4})], events_wait=0
        )
        replay._minimums = {("East", "S1"): 2}
        receiver = replay._receiver = Receiver()
        receiver.events = dict(events)
        sub = replay._subscriber = Subscriber("ws://a/graphql", ["S1"], None)
        sub.seen = [{**good[f"c{v}"]["data"]["balance"]} for v in seen]
        try:
            return await replay._check_events(ledger)
        finally:
            receiver.close()

    assert await check(good, [1, 2, 3]) == []
    wrong = await check({**good, "c2": _event("STOCK_CHANGED", 2, 5, 3)}, [1, 2, 3])
    assert len(wrong) == 1 and "the ledger 5/4" in wrong[0], wrong
    lost = await check({k: v for k, v in good.items() if k != "l2"}, [1, 2, 3])
    assert len(lost) == 1 and lost[0].startswith("alerts ('East', 'S1')"), lost
    gone = await check({k: v for k, v in good.items() if k != "c3"}, [1, 2, 3])
    assert len(gone) == 1 and "1 of 3 changes never reached" in gone[0], gone
    stale = await check(good, [1, 3, 2])
    assert len(stale) == 1 and "version 2 after 3" in stale[0], stale
