"""The domain core imports nothing of the project but itself, and no I/O library (ARCHITECTURE
sections 1 and 12: "``domain`` imports nothing of the project but itself"; no SQLAlchemy, no
Redis, no strawberry).

Each check imports in a fresh interpreter (``python -c``) and reads its ``sys.modules``, so
what this test process has already imported (the shared ``tests/conftest.py`` loads the
database layer) cannot hide or fake a dependency.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import stockledger

SRC = str(Path(stockledger.__file__).resolve().parent.parent)
SUBMODULES = ["model", "errors", "validation", "commands", "state", "rules"]
FORBIDDEN = ["sqlalchemy", "redis", "strawberry", "starlette", "fakeredis"]
ALLOWED_OWN = ("stockledger", "stockledger.domain")

PROBE = """
import importlib, json, pkgutil, sys
before = set(sys.modules)
for name in {names!r}:
    importlib.import_module(name)
if {walk!r}:
    import stockledger.domain as package
    for info in pkgutil.walk_packages(package.__path__, "stockledger.domain."):
        importlib.import_module(info.name)
print(json.dumps({{"before": sorted(before), "after": sorted(sys.modules)}}))
"""


def loaded_by(names: list[str], walk: bool = False) -> tuple[set[str], set[str]]:
    """(modules loaded at start-up, modules loaded after importing ``names``) in a fresh
    interpreter that imports this checkout's ``stockledger``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(names=names, walk=walk)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    result = json.loads(out.stdout)
    return set(result["before"]), set(result["after"])


def offenders(modules: set[str]) -> list[str]:
    """Modules of a forbidden library, or of the project outside ``stockledger.domain``."""
    bad = []
    for name in sorted(modules):
        top = name.split(".")[0]
        if top in FORBIDDEN:
            bad.append(name)
        elif top == "stockledger" and not (
            name in ALLOWED_OWN or name.startswith("stockledger.domain.")
        ):
            bad.append(name)
    return bad


def test_the_probe_imports_this_checkout():
    _, after = loaded_by(["stockledger.domain"])
    assert "stockledger.domain" in after


def test_importing_the_domain_and_all_its_submodules_loads_no_io_library_or_other_layer():
    _, after = loaded_by(
        ["stockledger.domain", *(f"stockledger.domain.{m}" for m in SUBMODULES)], walk=True
    )
    assert {f"stockledger.domain.{m}" for m in SUBMODULES} <= after
    assert offenders(after) == []


@pytest.mark.parametrize("submodule", SUBMODULES)
def test_each_domain_module_alone_loads_no_io_library_or_other_layer(submodule):
    _, after = loaded_by([f"stockledger.domain.{submodule}"])
    assert offenders(after) == []


def test_the_domain_needs_only_the_standard_library():
    before, after = loaded_by(["stockledger.domain"], walk=True)
    new = after - before
    outside = sorted(
        name
        for name in new
        if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "stockledger"
    )
    assert outside == []


def test_the_offender_check_would_catch_a_leak():
    assert offenders({"sqlalchemy.engine", "redis", "stockledger.db.models"}) == [
        "redis",
        "sqlalchemy.engine",
        "stockledger.db.models",
    ]
    assert offenders({"stockledger", "stockledger.domain", "stockledger.domain.rules"}) == []
    assert offenders({"stockledger_domain_fake", "redistools"}) == []
