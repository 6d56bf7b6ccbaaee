"""The image and the compose file, tested as far as this machine allows (Docker cannot run
here; issue 13): the compose file read back (migrations run once, in a one-shot service the app
waits for), the Dockerfile's choices (a hash-checked lock file, a non-root user, no forced
multiprocess metrics), the lock file against pyproject.toml, and the image's two commands run
directly: ``stockledger migrate`` then ``stockledger serve`` on an empty MySQL database."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import MYSQL_URL, _mysql_admin, require_server
from packaging.requirements import Requirement
from server_process import CLI, base_env, running
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_runs_migrations_once_in_a_one_shot_service_the_app_waits_for() -> None:
    services = _compose()["services"]
    assert isinstance(services, dict)
    migrate, app = services["migrate"], services["app"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"mysql": {"condition": "service_healthy"}}
    assert app["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert app["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert app["command"][0] == "serve" and "migrate" not in app["command"]
    # Only the one-shot service migrates: no other service's command does.
    others = [s for name, s in services.items() if name != "migrate"]
    assert not any("migrate" in (s.get("command") or []) for s in others)
    for service in (migrate, app):
        env = service["environment"]
        assert env["STOCKLEDGER_DATABASE_URL"].startswith("mysql+asyncmy://")
        assert env["STOCKLEDGER_REDIS_URL"] == "redis://redis:6379/0"
        assert "STOCKLEDGER_AUTH" not in env  # keys required, as by default
    # The first ADMIN key that `migrate` writes lands on a volume the operator can read.
    data_dir = re.search(r"STOCKLEDGER_DATA_DIR=(\S+)", (ROOT / "Dockerfile").read_text())
    assert data_dir is not None
    assert f"stockledger-data:{data_dir.group(1)}" in migrate["volumes"]


def test_docker_compose_config_is_valid_where_docker_runs() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed: the compose file is read back by the test above")
    done = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "is not a docker command" in done.stderr or "unknown" in done.stderr.lower():
        pytest.skip(f"docker has no compose plugin here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr


def test_the_dockerfile_installs_the_lock_with_hashes_and_runs_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r /tmp/requirements.lock" in text
    assert "--no-deps /wheels/*.whl" in text  # the package adds nothing unpinned
    assert re.search(r"^USER stockledger$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["stockledger"]' in text
    # Metrics choose multiprocess mode only for --workers > 1 (cli.serve does it).
    assert "PROMETHEUS_MULTIPROC_DIR" not in text


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = (ROOT / "requirements.lock").read_text()
    pins: dict[str, str] = {}
    for name, version, hashes in re.findall(
        r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)((?:\s*\\\n\s+--hash=sha256:\w+)+)",
        lock,
        re.MULTILINE,
    ):
        assert "--hash=sha256:" in hashes
        pins[name.lower().replace("_", "-")] = version
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock: refresh it (see Dockerfile)"
        assert requirement.specifier.contains(pins[name]), (name, pins[name], spec)


def test_the_image_commands_migrate_then_serve_with_single_process_metrics(
    redis_url: str, tmp_path: Path
) -> None:
    require_server("MariaDB/MySQL", MYSQL_URL, 3306)
    name = f"{make_url(MYSQL_URL).database}_image_{uuid.uuid4().hex[:8]}"
    _mysql_admin([f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"])
    url = make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)
    env = base_env(tmp_path, database_url=url, redis_url=redis_url, log_level="WARNING")
    try:
        migrated = subprocess.run(
            [*CLI, "migrate"], env=env, capture_output=True, text=True, timeout=120
        )
        assert migrated.returncode == 0, migrated.stderr
        with running(tmp_path, env, "--host", "127.0.0.1") as server:
            ready = server.wait_ready()
            assert ready["checks"] == {"database": "ok", "redis": "ok"}
            metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
            # One worker: the default registry, with the process's memory and CPU.
            assert "process_resident_memory_bytes" in metrics
            assert "inventory_reservations_expired_total 0.0" in metrics
    finally:
        _mysql_admin([f"DROP DATABASE IF EXISTS `{name}`"])


def test_the_wheel_ships_the_migrations_and_the_replay_data_with_its_license(
    tmp_path: Path,
) -> None:
    """A plain install (the image's) has what ``migrate`` and ``replay`` read from the
    package: the migration scripts, and the Superstore orders with their MIT notice."""
    uv = Path(sys.executable).with_name("uv")
    done = subprocess.run(
        [str(uv), "build", "--wheel", "-q", "-o", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    [wheel] = tmp_path.glob("stockledger-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "stockledger/data/superstore/superstore.csv.gz",
        "stockledger/data/superstore/LICENSE",
        "stockledger/db/migrations/env.py",
        "stockledger/db/migrations/versions/0003_ledger_triggers.py",
    ):
        assert name in names, name
