"""Servers of a test's own (a MariaDB it may kill, restart or start with other options), on free
ports, stopped by their pid; and the skip-or-fail rule for a missing server binary."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import REQUIRE_SERVERS
from server_process import free_port


def no_server_binary(reason: str) -> None:
    """Skip, or fail where the servers are required (STOCKLEDGER_TEST_REQUIRE_SERVERS=1)."""
    if REQUIRE_SERVERS:
        pytest.fail(f"{reason} and STOCKLEDGER_TEST_REQUIRE_SERVERS=1", pytrace=False)
    pytest.skip(reason)


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], what: str, timeout: float, log: Path | None = None
) -> None:
    """Wait (bounded) until ``proc`` accepts connections on ``port`` and sends a greeting
    (MariaDB's handshake, protocol 10; any reply for Redis's PING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
            pytest.fail(f"{what} exited with {proc.returncode}\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as s:
                s.settimeout(1.0)
                if what == "redis":
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
                else:
                    greeting = s.recv(64)
                    if len(greeting) > 4 and greeting[4] == 10:
                        return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{what} did not answer on port {port} within {timeout} s")


def mariadb_binaries() -> tuple[str, str]:
    """``(mariadbd, mariadb-install-db)``; skips (or fails, servers required) without them."""
    server = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    install = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
    if not (os.access(server, os.X_OK) and os.access(install, os.X_OK)):
        no_server_binary("mariadbd / mariadb-install-db are not installed: no MariaDB of its own")
    return server, install


class OwnMariaDB:
    """A MariaDB server of this test's own (root, no password) that it may kill and restart
    on the same port and data directory; ``options`` are more mariadbd options (e.g.
    ``--log-bin``)."""

    def __init__(self, base: Path, options: Sequence[str] = ()) -> None:
        self.base = base
        self.options = list(options)
        self.datadir = base / "data"
        self.port = free_port()
        self.url = f"mysql+asyncmy://root@127.0.0.1:{self.port}/stockledger"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def install(self, binary: str) -> None:
        subprocess.run(
            [
                binary,
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )

    def start(self, binary: str) -> None:
        """Start the server and wait (bounded) until it accepts connections."""
        self.starts += 1
        user = ["--user=root"] if os.geteuid() == 0 else []
        log_path = self.base / f"server-{self.starts}.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--no-defaults",
                    f"--datadir={self.datadir}",
                    f"--port={self.port}",
                    f"--socket={self.base / 's.sock'}",
                    f"--pid-file={self.base / 'server.pid'}",
                    "--bind-address=127.0.0.1",
                    "--skip-name-resolve",
                    "--innodb-buffer-pool-size=64M",
                    *self.options,
                    *user,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, self.proc, "mariadbd", 60, log_path)

    def kill(self) -> None:
        """SIGKILL the server (a crash) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def redis_server(binary: str, tmp_path: Path, *options: str) -> Iterator[int]:
    """A ``redis-server`` of the test's own on a free port (no persistence, its files in
    ``tmp_path``, more ``options`` such as ``--replicaof``), answering PING when entered; its
    port. Stopped by its pid on exit (SIGTERM, then SIGKILL after 10 s)."""
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--dir", str(tmp_path), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc, "redis", 30)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
