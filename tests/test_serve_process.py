"""The real ``stockledger serve`` process over HTTP: the embedded default end to end, refusing a
never-migrated MySQL database until ``stockledger migrate``, and ``--workers 2`` whose
``/metrics`` (and ``--metrics-port``) add up every worker's samples."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MYSQL_URL, _mysql_admin, require_server
from graphql_helpers import LEDGER, line, mutation_document
from prometheus_client.parser import text_string_to_metric_families
from server_process import (
    CLI,
    GRACEFUL,
    READY_TIMEOUT,
    Server,
    base_env,
    free_port,
    running,
)
from sqlalchemy.engine import make_url


def mutate(server: Server, name: str, **input: Any) -> dict[str, Any]:
    """One mutation on a fresh connection, with an ADMIN key; its result object."""
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as http:
        response = http.post(
            "/graphql", json={"query": mutation_document(name), "variables": {"input": input}}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    result: dict[str, Any] = body["data"][name]
    return result


def query(server: Server, document: str, variables: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        f"{server.url}/graphql",
        json={"query": document, "variables": variables},
        headers=server.headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    data: dict[str, Any] = body["data"]
    return data


def metric(text: str, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


# -------------------------------------------------------------------- embedded default


def test_embedded_default_serves_restock_reserve_deduct_ledger(tmp_path: Path) -> None:
    with running(tmp_path, base_env(tmp_path)) as server:
        ready = server.wait_ready()
        assert ready == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}
        # Secure by default: no key, no answer; the bootstrap key is the owner's alone.
        anonymous = httpx.post(f"{server.url}/graphql", json={"query": "{ __typename }"})
        assert anonymous.status_code == 401, anonymous.text
        key_file = tmp_path / "data" / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert str(key_file) in server.stdout + server.stderr
        assert key_file.read_text().strip() not in server.stdout + server.stderr

        restocked = mutate(server, "restock", idempotencyKey="p-restock", lines=[line("MUG-1", 10)])
        assert restocked["__typename"] == "RestockSuccess"
        reserved = mutate(
            server,
            "reserve",
            idempotencyKey="p-reserve",
            lines=[line("MUG-1", 3)],
            reference={"type": "ORDER", "id": "A-1"},
        )
        assert reserved["__typename"] == "ReserveSuccess"
        assert [(b["onHand"], b["reserved"], b["available"]) for b in reserved["balances"]] == [
            (10, 3, 7)
        ]
        rid = reserved["reservation"]["id"]
        deducted = mutate(server, "deduct", idempotencyKey="p-deduct", reservationId=rid)
        assert deducted["__typename"] == "DeductSuccess"
        assert deducted["reservations"][0]["status"] == "COMMITTED"
        assert [(b["onHand"], b["reserved"], b["available"]) for b in deducted["balances"]] == [
            (7, 0, 7)
        ]

        ledger = query(
            server,
            f'{{ ledger(filter: {{sku: "MUG-1"}}) {{ edges {{ node {{ {LEDGER} }} }} }} }}',
            {},
        )["ledger"]["edges"]
        assert [
            (
                e["node"]["eventType"],
                e["node"]["onHandDelta"],
                e["node"]["reservedDelta"],
                e["node"]["onHandAfter"],
                e["node"]["reservedAfter"],
                e["node"]["idempotencyKey"],
            )
            for e in ledger
        ] == [
            ("DEDUCT", -3, -3, 7, 0, "p-deduct"),
            ("RESERVE", 0, 3, 10, 3, "p-reserve"),
            ("RESTOCK", 10, 0, 10, 0, "p-restock"),
        ]
        assert {e["node"]["reservationId"] for e in ledger[:2]} == {rid}
        assert server.stop() in GRACEFUL, server.stderr

    assert "Application shutdown complete." in server.stderr
    assert (tmp_path / "data" / "stockledger.sqlite3").is_file()
    out = server.stdout
    db_file = (tmp_path / "data" / "stockledger.sqlite3").resolve()
    assert f"database: SQLite file {db_file}" in out, out
    assert "in-process fakeredis" in out, out
    assert f"listening on http://127.0.0.1:{server.port}/graphql" in out, out
    # JSON logs: the writes' lines parse and name their operation.
    writes = [
        entry
        for entry in (json.loads(ln) for ln in server.stderr.splitlines() if ln.startswith("{"))
        if entry.get("logger") == "stockledger.writes"
    ]
    assert [(w["operation"], w["idempotency_key"], w["outcome"]) for w in writes] == [
        ("restock", "p-restock", "success"),
        ("reserve", "p-reserve", "success"),
        ("deduct", "p-deduct", "success"),
    ]


def test_embedded_default_refuses_several_workers(tmp_path: Path) -> None:
    port = str(free_port())
    result = subprocess.run(
        [*CLI, "serve", "--port", port, "--workers", "2"],
        env=base_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,
    )
    assert result.returncode != 0
    assert "one worker only" in result.stderr, result.stderr
    assert "STOCKLEDGER_DATABASE_URL" in result.stderr and "STOCKLEDGER_REDIS_URL" in result.stderr
    assert "listening" not in result.stdout
    assert not (tmp_path / "data" / "stockledger.sqlite3").exists()


# -------------------------------------------------------------------- MySQL and Redis


@pytest.fixture
def scratch_mysql_url() -> Iterator[str]:
    """An empty, never migrated MySQL database of this test's own, dropped afterwards."""
    require_server("MariaDB/MySQL", MYSQL_URL, 3306)
    url = make_url(MYSQL_URL)
    name = f"{url.database}_scratch_{uuid.uuid4().hex[:8]}"
    _mysql_admin([f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"])
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        _mysql_admin([f"DROP DATABASE IF EXISTS `{name}`"])


@pytest.mark.mysql
@pytest.mark.redis
def test_mysql_refuses_until_migrated(
    tmp_path: Path, scratch_mysql_url: str, redis_url: str, tenant: str
) -> None:
    env = base_env(tmp_path, database_url=scratch_mysql_url, redis_url=redis_url, org_id=tenant)
    server = Server(tmp_path, env)
    try:
        code = server.proc.wait(READY_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve did not refuse within {READY_TIMEOUT} s:\n{server.stderr}")
    finally:
        server.stop()
        server.kill()
    assert code != 0
    assert "run `stockledger migrate` first" in server.stderr, server.stderr

    migrated = subprocess.run(
        [*CLI, "migrate"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert migrated.returncode == 0, migrated.stderr
    assert "migrated" in migrated.stdout and "to head" in migrated.stdout

    with running(tmp_path, env) as server:
        ready = server.wait_ready()
        assert ready == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}
        # `migrate` made the first key of the fresh database, and said where, not what.
        key_file = tmp_path / "data" / "admin.key"
        assert str(key_file) in migrated.stdout
        assert key_file.read_text().strip() not in migrated.stdout + migrated.stderr
        restocked = mutate(server, "restock", idempotencyKey="m-1", lines=[line("BOLT", 4)])
        assert [b["onHand"] for b in restocked["balances"]] == [4]
        assert server.stop() in GRACEFUL, server.stderr
    assert "Application shutdown complete." in server.stderr
    out = server.stdout
    assert "database: MySQL at mysql+asyncmy://" in out, out
    assert f"Redis at {redis_url.split('@')[-1]}" in out, out
    assert f"listening on http://127.0.0.1:{server.port}/graphql" in out, out


RESERVES = 40


def per_process_reserves(metrics_dir: Path) -> dict[str, float]:
    """``inventory_reserve_total{status="success"}`` per process, from the multiprocess files."""
    from prometheus_client.multiprocess import MultiProcessCollector

    out = {}
    for path in metrics_dir.glob("counter_*.db"):
        for family in MultiProcessCollector.merge([str(path)]):
            for s in family.samples:
                if s.name == "inventory_reserve_total" and s.labels == {"status": "success"}:
                    out[path.stem.removeprefix("counter_")] = s.value
    return out


@pytest.mark.mysql
@pytest.mark.redis
def test_two_workers_sum_their_metrics(
    tmp_path: Path, mysql_url: str, redis_url: str, tenant: str
) -> None:
    env = base_env(tmp_path, database_url=mysql_url, redis_url=redis_url, org_id=tenant)
    env["TMPDIR"] = str(tmp_path)  # where serve makes its PROMETHEUS_MULTIPROC_DIR
    metrics_port = free_port()
    with running(tmp_path, env, "--workers", "2", "--metrics-port", str(metrics_port)) as server:
        server.wait_ready()
        server.wait_started(workers=2)
        restocked = mutate(server, "restock", idempotencyKey="w-restock", lines=[line("NUT", 500)])
        assert restocked["__typename"] == "RestockSuccess"
        [metrics_dir] = tmp_path.glob("stockledger-metrics-*")

        def reserve(i: int) -> str:
            result = mutate(server, "reserve", idempotencyKey=f"w-{i}", lines=[line("NUT", 1)])
            return str(result["__typename"])

        # Separate connections from several threads; more rounds until both workers served some.
        sent = 0
        with ThreadPoolExecutor(8) as pool:
            for _ in range(5):
                kinds = list(pool.map(reserve, range(sent, sent + RESERVES)))
                assert kinds == ["ReserveSuccess"] * RESERVES
                sent += RESERVES
                if len([n for n in per_process_reserves(metrics_dir).values() if n > 0]) >= 2:
                    break
        by_process = per_process_reserves(metrics_dir)
        assert len([n for n in by_process.values() if n > 0]) == 2, by_process
        assert sum(by_process.values()) == sent

        scrapes = [httpx.get(f"{server.url}/metrics", timeout=10).text for _ in range(6)]
        scrapes.append(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text)
        for text in scrapes:
            assert metric(text, "inventory_reserve_total", {"status": "success"}) == sent
            assert (
                metric(
                    text,
                    "stock_movements_total",
                    {"type": "restock", "result": "success", "reason": "none"},
                )
                == 1
            )
            assert (
                metric(
                    text,
                    "inventory_graphql_request_seconds_count",
                    {"operation_type": "mutation", "field": "reserve", "outcome": "ok"},
                )
                == sent
            )
            assert (
                metric(
                    text,
                    "inventory_graphql_request_seconds_count",
                    {"operation_type": "mutation", "field": "restock", "outcome": "ok"},
                )
                == 1
            )
        balance = query(server, '{ balance(sku: "NUT") { onHand reserved } }', {})["balance"]
        assert balance == {"onHand": 500, "reserved": sent}
        assert server.stop() in GRACEFUL, server.stderr

    workers = set(re.findall(r"Started server process \[(\d+)\]", server.stderr))
    assert len(workers) == 2, server.stderr
    assert set(by_process) <= workers | {str(server.proc.pid)}
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in server.stdout


@pytest.mark.mysql
def test_several_workers_need_redis(tmp_path: Path, mysql_url: str) -> None:
    result = subprocess.run(
        [*CLI, "serve", "--port", str(free_port()), "--workers", "2"],
        env=base_env(tmp_path, database_url=mysql_url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,
    )
    assert result.returncode != 0
    assert "one worker only" in result.stderr, result.stderr


def test_auth_off_is_refused_off_loopback_and_warned_about_on_it(tmp_path: Path) -> None:
    """ARCHITECTURE section 13: STOCKLEDGER_AUTH=off makes every request ADMIN, so `serve`
    refuses it unless bound to a loopback address, and warns when it is."""
    env = base_env(tmp_path, auth="off", log_level="WARNING")
    for host in ("0.0.0.0", "::", "example.com"):
        refused = subprocess.run(
            [*CLI, "serve", "--host", host, "--port", str(free_port())],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode != 0, refused.stdout
        assert "STOCKLEDGER_AUTH=off lets anyone who reaches the port act as ADMIN" in (
            refused.stderr
        ), refused.stderr
    with running(tmp_path, env, "--host", "127.0.0.1") as server:
        server.wait_ready()
        answer = httpx.post(f"{server.url}/graphql", json={"query": "{ __typename }"}, timeout=10)
        assert answer.json() == {"data": {"__typename": "Query"}}
        assert "STOCKLEDGER_AUTH=off: every request acts as ADMIN" in server.stderr
