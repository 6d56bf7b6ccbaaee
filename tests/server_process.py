"""A real ``stockledger serve`` (or container entrypoint) child process for tests: start it on a
free port, wait for ``/readyz`` (bounded), stop it and its workers (bounded)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from stockledger.config import Settings
from stockledger.db.engine import create_database
from stockledger.domain.access import Scope
from stockledger.services.api_keys import ApiKeys

READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 20.0
CLI = [sys.executable, "-m", "stockledger.cli"]
# uvicorn shuts down cleanly on SIGTERM, then re-raises the signal it caught (uvicorn >= 0.29).
GRACEFUL = (0, -signal.SIGTERM)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def base_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment without any STOCKLEDGER_* or multiprocess setting, plus ``settings``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STOCKLEDGER_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["STOCKLEDGER_DATA_DIR"] = str(tmp_path / "data")
    env["STOCKLEDGER_LOG_FORMAT"] = "json"
    env.update({f"STOCKLEDGER_{k.upper()}": v for k, v in settings.items()})
    return env


def admin_secret(env: dict[str, str]) -> str:
    """The secret of an ADMIN key for the org of ``env`` (a :func:`base_env`) in its database:
    the bootstrap key in ``<data dir>/admin.key`` if ``serve`` or ``migrate`` wrote one, else
    a new one (the database must be migrated)."""
    bootstrap = Path(env["STOCKLEDGER_DATA_DIR"]) / "admin.key"
    if bootstrap.exists():
        return bootstrap.read_text().strip()
    settings = Settings(
        data_dir=Path(env["STOCKLEDGER_DATA_DIR"]),
        database_url=env.get("STOCKLEDGER_DATABASE_URL"),
        org_id=env.get("STOCKLEDGER_ORG_ID", "default"),
    )

    async def create() -> str:
        db = create_database(settings)
        try:
            _, secret = await ApiKeys(db).create(settings.org_id, "tests", [Scope.ADMIN])
            return secret
        finally:
            await db.dispose()

    # In a thread of its own: callers may be inside a running event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, create()).result(timeout=60)


class Server:
    """One ``stockledger serve`` child process (own session), its output in files.

    ``command`` replaces ``python -m stockledger.cli serve`` (``--port`` and ``args`` follow).
    """

    def __init__(
        self, tmp_path: Path, env: dict[str, str], *args: str, command: list[str] | None = None
    ) -> None:
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        name = uuid.uuid4().hex[:6]
        self.out_path = tmp_path / f"serve-{name}.out"
        self.err_path = tmp_path / f"serve-{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*(command or [*CLI, "serve"]), "--port", str(self.port), *args],
                env=env,
                cwd=tmp_path,
                stdout=out,
                stderr=err,
                start_new_session=True,  # so the workers can be killed with it
            )

    @functools.cached_property
    def secret(self) -> str:
        """An ADMIN key's secret for the server's org, once started: the bootstrap key
        ``serve`` wrote to ``<data dir>/admin.key`` on an empty key table, else a new key made
        in the server's database (a shared one has keys already)."""
        return admin_secret(self.env)

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization: Bearer`` with :attr:`secret`."""
        return {"authorization": f"Bearer {self.secret}"}

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_ready(self) -> dict[str, Any]:
        """Poll ``/readyz`` until 200 (bounded); the readiness body."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"serve exited with {self.proc.returncode}:\n{self.stdout}\n{self.stderr}"
                )
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200:
                    body: dict[str, Any] = response.json()
                    return body
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"not ready within {READY_TIMEOUT} s:\n{self.stdout}\n{self.stderr}")

    def wait_started(self, workers: int) -> None:
        """Wait (bounded) until ``workers`` processes have logged uvicorn's start-up line.

        ``/readyz`` answers as soon as one worker is up; a test that needs every worker
        serving waits for this too.
        """
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if (self.stdout + self.stderr).count("Application startup complete") >= workers:
                return
            time.sleep(0.1)
        pytest.fail(f"{workers} workers not up in {READY_TIMEOUT} s:\n{self.stdout}\n{self.stderr}")

    def stop(self) -> int:
        """SIGTERM and wait (bounded); SIGKILL the whole session if it does not exit."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.wait(EXIT_TIMEOUT)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session this test started
        except ProcessLookupError:
            pass


@contextmanager
def running(
    tmp_path: Path, env: dict[str, str], *args: str, command: list[str] | None = None
) -> Iterator[Server]:
    """A started :class:`Server`, stopped (and its session killed) on exit."""
    server = Server(tmp_path, env, *args, command=command)
    try:
        yield server
    finally:
        server.stop()
        server.kill()  # leftover workers, if any
