"""The ``stockledger serve`` process's life (issue 13): a busy port ends it at once, SIGTERM ends
it within its bound even with due expiries to sweep, a shutdown that hangs is ended by the
watchdog, and everything it logs is one JSON line format with the pid, one access line per
request."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import make_settings
from graphql_helpers import line, mutation_document
from server_process import CLI, GRACEFUL, Server, base_env, running

from stockledger.app.server import SHUTDOWN_TIMED_OUT
from stockledger.db.engine import create_database
from stockledger.services.reconcile import find_violations


def _post(server: Server, name: str, operation: str, **input: Any) -> dict[str, Any]:
    document = mutation_document(name).replace("mutation", f"mutation {operation}", 1)
    response = httpx.post(
        f"{server.url}/graphql",
        json={"query": document, "variables": {"input": input}, "operationName": operation},
        headers=server.headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert "errors" not in body, body
    return body


def _backend_env(tmp_path: Path, backend: str, mysql_url: str, redis_url: str) -> dict[str, str]:
    if backend == "embedded":
        return base_env(tmp_path)
    return base_env(tmp_path, database_url=mysql_url, redis_url=redis_url)


@pytest.mark.parametrize("backend", ["embedded", "mysql"])
def test_a_busy_port_exits_non_zero_at_once(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    mysql_url = request.getfixturevalue("mysql_url") if backend == "mysql" else ""
    redis_url = request.getfixturevalue("redis_url") if backend == "mysql" else ""
    env = _backend_env(tmp_path, backend, mysql_url, redis_url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        done = subprocess.run(
            [*CLI, "serve", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert time.monotonic() - start < 20
    assert "address already in use" in done.stderr, done.stderr


@pytest.mark.mysql
@pytest.mark.redis
def test_sigterm_with_due_expiries_ends_within_the_bound_and_loses_nothing(
    tmp_path: Path, mysql_url: str, redis_url: str, tenant: str
) -> None:
    bound = 8.0
    env = base_env(
        tmp_path,
        database_url=mysql_url,
        redis_url=redis_url,
        org_id=tenant,
        shutdown_timeout_seconds=str(bound),
        sweep_interval_seconds="0.2",
    )
    with running(tmp_path, env) as server:
        server.wait_ready()
        _post(
            server,
            "restock",
            "Stock",
            idempotencyKey="s-1",
            lines=[line(f"SKU-{i}", 10) for i in range(50)],
        )
        for i in range(150):  # due within the next second: the sweeper has work
            _post(
                server,
                "reserve",
                "Hold",
                idempotencyKey=f"c-{i}",
                lines=[line(f"SKU-{i % 50}", 1)],
                ttlSeconds=1,
            )
        time.sleep(1.0)
        start = time.monotonic()
        code = server.stop()
        took = time.monotonic() - start
    assert code in GRACEFUL, server.stderr
    assert took < bound, f"{took:.1f} s"

    async def violations() -> list[str]:
        db = create_database(make_settings(), mysql_url)
        try:
            return await find_violations(db, tenant)
        finally:
            await db.dispose()

    assert asyncio.run(violations()) == []


def test_the_watchdog_ends_a_shutdown_that_hangs(tmp_path: Path) -> None:
    """A process with a handler in place (as uvicorn's), the watchdog entered, a SIGTERM, and
    then work that never ends: the watchdog ends the process at the bound."""
    script = textwrap.dedent(
        """
        import os, signal, time
        from stockledger.app.server import shutdown_watchdog
        from stockledger.observability.logs import configure_logging

        configure_logging("INFO", "json")
        signal.signal(signal.SIGTERM, lambda s, f: None)  # uvicorn's: note it, carry on
        with shutdown_watchdog(1.0):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # a shutdown step that hangs
        """
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == SHUTDOWN_TIMED_OUT, done.stderr
    assert time.monotonic() - start < 10
    assert "shutdown took longer than 1 s" in done.stderr


def test_every_line_is_json_with_the_pid_and_an_access_line_per_request(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    with running(tmp_path, env) as server:
        server.wait_ready()
        _post(server, "restock", "Stock", idempotencyKey="k-1", lines=[line("A", 3)])
        httpx.post(
            f"{server.url}/graphql",
            json={"query": 'query Look { balance(sku: "A", location: "default") { onHand } }'},
            headers=server.headers,
            timeout=10,
        ).raise_for_status()
        for _ in range(3):
            httpx.get(f"{server.url}/readyz", timeout=10)
        pid = server.proc.pid
        assert server.stop() in GRACEFUL
    lines = [json.loads(raw) for raw in server.stderr.splitlines() if raw.strip()]
    assert lines, server.stderr
    assert {entry["pid"] for entry in lines} == {pid}
    assert any(entry["logger"].startswith("uvicorn") for entry in lines)  # uvicorn's too
    access = [entry for entry in lines if entry["logger"] == "stockledger.access"]
    assert [(a["operation_name"], a["operation_type"], a["field"]) for a in access] == [
        ("Stock", "mutation", "restock"),
        ("Look", "query", "balance"),
    ]  # probes log at DEBUG only
    for entry in access:
        assert entry["status"] == 200 and entry["method"] == "POST"
        assert entry["path"] == "/graphql" and entry["duration_ms"] > 0
        assert entry["outcome"] == "ok" and len(entry["request_id"]) == 32
    # Each request's lines name the key that made it (section 13), never its secret.
    writes = [entry for entry in lines if entry["logger"] == "stockledger.writes"]
    assert len(writes) == 1
    for entry in [*access, *writes]:
        assert (entry["api_key_name"], entry["org"]) == ("bootstrap admin", "default"), entry
        assert isinstance(entry["api_key_id"], int)
    assert server.headers["authorization"].split()[1] not in server.stderr + server.stdout
