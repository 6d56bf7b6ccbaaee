"""G (``stockledger serve`` under wrk) in several configurations, each a fresh server on the
same seeded database, in turns (``rounds``), in one run: the best round counts, as a ratio to
the first configuration. Shared by ``auth_cost.py`` and ``outbox_cost.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import asyncmy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from benchmark import Server, seed  # noqa: E402

# What a configuration reports besides req/s: called with the server's /metrics text before
# and after a scenario's measurement; its string goes into that cell.
Extra = Callable[[str, str], str]


def compare(
    modes: Mapping[str, Mapping[str, str]],
    scenarios: Sequence[str],
    *,
    database: str,
    redis: str,
    duration: float,
    connections: int,
    rounds: int,
    extra: Extra | None = None,
) -> str:
    """Run every scenario on a fresh server of every mode (its environment overrides), in
    turns, and return the markdown table: best req/s and its ratio to the first mode, plus
    ``extra``'s figures from that mode's best round. Needs wrk, MariaDB and Redis."""
    from stockledger.config import Settings
    from stockledger.db.migrate import upgrade
    from stockledger.observability.logs import configure_logging

    configure_logging("WARNING", "json")
    url = f"mysql+asyncmy://root@127.0.0.1:3306/{database}"

    async def recreate() -> None:
        conn = await asyncmy.connect(host="127.0.0.1", user="root", password="")
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
            await cur.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
        conn.close()

    asyncio.run(recreate())
    upgrade(url)
    settings = Settings(database_url=url, redis_url=redis, org_id="bench", log_level="WARNING")
    asyncio.run(seed(settings))
    base = dict(
        os.environ,
        STOCKLEDGER_DATABASE_URL=url,
        STOCKLEDGER_REDIS_URL=redis,
        STOCKLEDGER_ORG_ID="bench",
        STOCKLEDGER_LOG_LEVEL="WARNING",
        STOCKLEDGER_DB_POOL_SIZE="32",
        STOCKLEDGER_DATA_DIR=tempfile.mkdtemp(prefix="stockledger-bench-"),
    )
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for n in range(rounds):
        for mode, overrides in modes.items():
            with Server(dict(base, **overrides), 1) as server:
                for scenario in scenarios:
                    before = server.metrics()
                    r = server.measure(scenario, connections, duration, 1)
                    note = "" if extra is None else extra(before, server.metrics())
                    print(f"round {n}, {mode}, {scenario}: {r.rps:.0f}/s, errors {r.errors} {note}")
                    if r.rps > best.get((mode, scenario), (0.0, ""))[0]:
                        best[(mode, scenario)] = (r.rps, note)
    first = next(iter(modes))
    table = f"\n| mode | {' | '.join(scenarios)} |\n|---|{'---|' * len(scenarios)}\n"
    for mode in modes:
        cells = []
        for scenario in scenarios:
            rps, note = best[(mode, scenario)]
            ratio = rps / best[(first, scenario)][0]
            cells.append(f"{rps:.0f}/s ({ratio:.2f}){' ' + note if note else ''}")
        table += f"| {mode} | {' | '.join(cells)} |\n"
    return table


def main(
    description: str | None,
    modes: Mapping[str, Mapping[str, str]],
    scenarios: Sequence[str],
    database: str,
    extra: Extra | None = None,
) -> None:
    """The command line of a comparison script: ``--database`` (default ``database``),
    ``--redis``, ``--duration`` (seconds), ``--connections``, ``--rounds``; prints
    :func:`compare`'s table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--database", default=database)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(
        compare(
            modes,
            scenarios,
            database=args.database,
            redis=args.redis,
            duration=args.duration,
            connections=args.connections,
            rounds=args.rounds,
            extra=extra,
        )
    )
