"""The container's entrypoint (``docker/entrypoint.sh``), run directly since Docker cannot run
here: pointed at an empty MySQL database it migrates, then serves, and ``/readyz`` answers."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import httpx
from conftest import MYSQL_URL, _mysql_admin, require_server
from server_process import base_env, running
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]


def test_entrypoint_migrates_an_empty_database_then_serves(redis_url: str, tmp_path: Path) -> None:
    require_server("MariaDB/MySQL", MYSQL_URL, 3306)
    name = f"stockledger_entrypoint_{uuid.uuid4().hex[:8]}"
    _mysql_admin([f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"])
    url = make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)
    env = {
        **base_env(tmp_path, database_url=url, redis_url=redis_url, log_level="WARNING"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    entrypoint = ["sh", str(ROOT / "docker" / "entrypoint.sh"), "serve"]
    try:
        with running(tmp_path, env, command=entrypoint) as server:
            ready = server.wait_ready()
            assert ready["checks"] == {"database": "ok", "redis": "ok"}
            assert (tmp_path / "metrics").is_dir()  # the entrypoint prepared multiprocess mode
            metrics = httpx.get(f"{server.url}/metrics", timeout=5)
            assert "inventory_reservations_expired_total 0.0" in metrics.text
    finally:
        _mysql_admin([f"DROP DATABASE IF EXISTS `{name}`"])
    assert "migrated" in server.stdout  # stockledger migrate ran before serve
