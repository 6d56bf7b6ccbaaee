"""A process killed between sending and receiving leaves the units in transit, never lost
(ARCHITECTURE section 14): a real ``stockledger serve`` is SIGKILLed and started again on the
same database. An in-transit transfer is still IN_TRANSIT afterwards, its units gone from the
source and incoming at the destination, and receiving it completes it. Immediate transfers
killed mid-flight, retried with their keys, each replay or apply now; on hand is conserved
and the reconciliation is clean.

The first test runs on the embedded default (a SQLite file) and on MariaDB + Redis; the
burst, on MariaDB + Redis only. MariaDB tests use a database of their own (the server's
sweeper scans every org), and delete their org's Redis keys afterwards.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import drop_org_keys
from server_process import CLI, EXIT_TIMEOUT, Server, base_env

from stockledger.config import Settings
from stockledger.db.engine import create_database
from stockledger.services.reconcile import find_violations

SRC, DST = "wh-a", "wh-b"
TRANSFER = """
mutation($input: TransferInput!) {
  transfer(input: $input) {
    __typename
    ... on TransferSuccess {
      transfer { id status lines { sku quantity received remaining } } replayed
    }
    ... on Error { code message }
  }
}
"""
RECEIVE = """
mutation($input: ReceiveTransferInput!) {
  receiveTransfer(input: $input) {
    __typename
    ... on TransferSuccess { transfer { id status } replayed }
    ... on Error { code message }
  }
}
"""
RESTOCK = """
mutation($input: RestockInput!) {
  restock(input: $input) { __typename ... on RestockSuccess { replayed } ... on Error { code } }
}
"""
FIGURES = """
query($s: String!, $a: String!, $b: String!) {
  a: balance(sku: $s, location: $a) { onHand reserved incoming }
  b: balance(sku: $s, location: $b) { onHand reserved incoming }
}
"""


class Restartable(Server):
    """A :class:`Server` that can be SIGKILLed and started again on its port, same env."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        super().__init__(tmp_path, env)

    def sigkill(self) -> None:
        self.kill()
        self.proc.wait(EXIT_TIMEOUT)

    def restart(self) -> None:
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--port", str(self.port)],
                env=self.env,
                cwd=self.tmp_path,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.wait_ready()


class Setup:
    """The server, its database URL and org (for the reconciliation), and a client."""

    def __init__(self, server: Restartable, database_url: str, org: str) -> None:
        self.server, self.database_url, self.org = server, database_url, org
        self.http = httpx.AsyncClient(timeout=30)

    async def post(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post(
            f"{self.server.url}/graphql",
            json={"query": query, "variables": variables},
            headers=self.server.headers,
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data

    async def figures(self, sku: str) -> dict[str, tuple[int, int, int] | None]:
        data = await self.post(FIGURES, {"s": sku, "a": SRC, "b": DST})
        return {
            k: None if v is None else (v["onHand"], v["reserved"], v["incoming"])
            for k, v in data.items()
        }

    async def violations(self) -> list[Any]:
        db = create_database(Settings(database_url=self.database_url), self.database_url)
        try:
            return list(await find_violations(db, self.org))
        finally:
            await db.dispose()


@pytest.fixture(params=["sqlite", "mysql"])
def crash_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def env_and_url(
    crash_backend: str, tmp_path: Path, request: pytest.FixtureRequest, org_id: str
) -> Iterator[tuple[dict[str, str], str, str]]:
    """(server env, database URL, org) for this test's backend."""
    if crash_backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'stockledger.sqlite3'}"
        yield base_env(tmp_path, log_level="WARNING"), url, "default"
        return
    url = str(request.getfixturevalue("own_mysql_url"))
    redis_url = str(request.getfixturevalue("redis_url"))
    env = base_env(
        tmp_path, database_url=url, redis_url=redis_url, org_id=org_id, log_level="WARNING"
    )
    yield env, url, org_id
    drop_org_keys(redis_url, org_id)


@pytest.fixture
async def setup(
    env_and_url: tuple[dict[str, str], str, str], tmp_path: Path
) -> AsyncIterator[Setup]:
    env, url, org = env_and_url
    server = Restartable(tmp_path, env)
    try:
        await asyncio.to_thread(server.wait_ready)
        s = Setup(server, url, org)
        yield s
        await s.http.aclose()
    finally:
        server.stop()
        server.kill()


async def restock(s: Setup, sku: str, quantity: int) -> None:
    data = await s.post(
        RESTOCK,
        {
            "input": {
                "idempotencyKey": f"restock-{sku}",
                "lines": [{"sku": sku, "quantity": quantity, "location": SRC}],
            }
        },
    )
    assert data["restock"]["__typename"] == "RestockSuccess", data


def transfer_input(key: str, sku: str, quantity: int, in_transit: bool) -> dict[str, Any]:
    return {
        "input": {
            "idempotencyKey": key,
            "fromLocation": SRC,
            "toLocation": DST,
            "lines": [{"sku": sku, "quantity": quantity}],
            "inTransit": in_transit,
        }
    }


async def test_a_killed_server_leaves_the_units_in_transit_never_lost(setup: Setup) -> None:
    s = setup
    await restock(s, "MUG", 10)
    sent = (await s.post(TRANSFER, transfer_input("send", "MUG", 6, True)))["transfer"]
    assert sent["__typename"] == "TransferSuccess", sent
    tid = sent["transfer"]["id"]
    assert sent["transfer"]["status"] == "IN_TRANSIT"
    assert await s.figures("MUG") == {"a": (4, 0, 0), "b": (0, 0, 6)}

    await asyncio.to_thread(s.server.sigkill)
    await asyncio.to_thread(s.server.restart)

    found = await s.post(
        "query($id: ID!) { transfer(id: $id) { id status "
        "lines { sku quantity received remaining returned } } }",
        {"id": tid},
    )
    assert found["transfer"] == {
        "id": tid,
        "status": "IN_TRANSIT",
        "lines": [{"sku": "MUG", "quantity": 6, "received": 0, "remaining": 6, "returned": 0}],
    }
    assert await s.figures("MUG") == {"a": (4, 0, 0), "b": (0, 0, 6)}
    assert await s.violations() == []
    # the send's retry replays: the same transfer, nothing sent twice
    again = (await s.post(TRANSFER, transfer_input("send", "MUG", 6, True)))["transfer"]
    assert (again["__typename"], again["replayed"], again["transfer"]["id"]) == (
        "TransferSuccess",
        True,
        tid,
    )

    received = await s.post(RECEIVE, {"input": {"idempotencyKey": "receive", "transferId": tid}})
    assert received["receiveTransfer"] == {
        "__typename": "TransferSuccess",
        "transfer": {"id": tid, "status": "RECEIVED"},
        "replayed": False,
    }
    assert await s.figures("MUG") == {"a": (4, 0, 0), "b": (6, 0, 0)}
    assert await s.violations() == []


BURST = 50
PER_TRANSFER = 2
KILL_AFTER = 10  # answers


@pytest.mark.parametrize("crash_backend", ["mysql"], indirect=True)
async def test_transfers_killed_mid_flight_replay_or_apply_when_sent_again(
    setup: Setup,
) -> None:
    s = setup
    stock = BURST * PER_TRANSFER + 7
    await restock(s, "CUP", stock)
    keys = [f"move-{i}" for i in range(BURST)]
    answered: dict[str, str] = {}  # key -> transfer id, of the calls answered before the kill
    enough = asyncio.Event()

    async def move(key: str) -> None:
        data = await s.post(TRANSFER, transfer_input(key, "CUP", PER_TRANSFER, False))
        result = data["transfer"]
        assert result["__typename"] == "TransferSuccess", result
        answered[key] = result["transfer"]["id"]
        if len(answered) >= KILL_AFTER:
            enough.set()

    # warm: a connection per call and the key cached, so the calls reach the server together
    await asyncio.gather(*(s.figures("CUP") for _ in keys))
    tasks = [asyncio.create_task(move(key)) for key in keys]
    await asyncio.wait_for(enough.wait(), 30)
    await asyncio.to_thread(s.server.sigkill)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    lost = [k for k, o in zip(keys, outcomes, strict=True) if isinstance(o, BaseException)]
    for outcome in outcomes:
        assert outcome is None or isinstance(outcome, httpx.TransportError), outcome
    assert lost, "the kill must hit transfers in flight"
    print(f"\n{len(answered)} answered before the kill, {len(lost)} lost their answer")

    await asyncio.to_thread(s.server.restart)
    replayed, applied = [], []
    for key in keys:
        for _ in range(10):  # a dead holder's Redis locks stop blocking within their lease
            result = (await s.post(TRANSFER, transfer_input(key, "CUP", PER_TRANSFER, False)))[
                "transfer"
            ]
            if result["__typename"] != "LockTimeoutError":
                break
        assert result["__typename"] == "TransferSuccess", (key, result)
        assert result["transfer"]["status"] == "RECEIVED"
        assert result["transfer"]["lines"] == [
            {"sku": "CUP", "quantity": PER_TRANSFER, "received": PER_TRANSFER, "remaining": 0}
        ]
        if key in answered:  # told of before the kill: its retry must replay it
            assert (result["replayed"], result["transfer"]["id"]) == (True, answered[key])
        (replayed if result["replayed"] else applied).append(result["transfer"]["id"])
    print(f"{len(replayed)} replayed, {len(applied)} applied after the restart")
    assert len(set(replayed + applied)) == BURST  # one transfer per key

    figures = await s.figures("CUP")
    a, b = figures["a"], figures["b"]
    assert a is not None and b is not None
    assert a[0] + b[0] == stock, figures  # conservation: nothing lost, nothing doubled
    assert figures == {
        "a": (stock - BURST * PER_TRANSFER, 0, 0),
        "b": (BURST * PER_TRANSFER, 0, 0),
    }
    listed = await s.post("{ transfers(first: 500) { edges { node { id status } } } }", {})
    assert sorted(e["node"]["id"] for e in listed["transfers"]["edges"]) == sorted(
        replayed + applied
    )
    assert await s.violations() == []
