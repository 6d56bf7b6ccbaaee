"""What access control costs over HTTP (issue 10): G (``stockledger serve`` under wrk) on the
spread and balance scenarios of ``bench/benchmark.py``, with keys off, with keys (auth and
tenancy), and with keys plus a Redis rate limit that never binds, each a fresh server, in turns
(``--rounds``), in one run; the best of the rounds counts, as a ratio to keys off.

Needs wrk, MariaDB and Redis. ``.venv/bin/python bench/auth_cost.py --duration 10``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import asyncmy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from benchmark import Server, seed  # noqa: E402

MODES = {
    "auth off": {"STOCKLEDGER_AUTH": "off", "STOCKLEDGER_RATE_LIMIT": ""},
    "keys": {"STOCKLEDGER_RATE_LIMIT": ""},
    "keys + rate limit (Redis)": {"STOCKLEDGER_RATE_LIMIT": "1000000/second"},
}
SCENARIOS = ("spread", "balance")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database", default="stockledger_auth_cost")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from stockledger.config import Settings
    from stockledger.db.migrate import upgrade
    from stockledger.observability.logs import configure_logging

    configure_logging("WARNING", "json")
    url = f"mysql+asyncmy://root@127.0.0.1:3306/{args.database}"

    async def recreate() -> None:
        conn = await asyncmy.connect(host="127.0.0.1", user="root", password="")
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{args.database}`")
            await cur.execute(f"CREATE DATABASE `{args.database}` CHARACTER SET utf8mb4")
        conn.close()

    asyncio.run(recreate())
    upgrade(url)
    settings = Settings(database_url=url, redis_url=args.redis, org_id="bench", log_level="WARNING")
    asyncio.run(seed(settings))
    base = dict(
        os.environ,
        STOCKLEDGER_DATABASE_URL=url,
        STOCKLEDGER_REDIS_URL=args.redis,
        STOCKLEDGER_ORG_ID="bench",
        STOCKLEDGER_LOG_LEVEL="WARNING",
        STOCKLEDGER_DB_POOL_SIZE="32",
        STOCKLEDGER_DATA_DIR=tempfile.mkdtemp(prefix="stockledger-bench-"),
    )
    rates: dict[str, dict[str, list[float]]] = {m: {s: [] for s in SCENARIOS} for m in MODES}
    for n in range(args.rounds):
        for mode, extra in MODES.items():
            with Server(dict(base, **extra), 1) as server:
                for scenario in SCENARIOS:
                    r = server.measure(scenario, args.connections, args.duration, 1)
                    rates[mode][scenario].append(r.rps)
                    print(f"round {n}, {mode}, {scenario}: {r.rps:.0f}/s, errors {r.errors}")
    print(f"\n| mode | {' | '.join(SCENARIOS)} |\n|---|{'---|' * len(SCENARIOS)}")
    for mode in MODES:
        cells = []
        for scenario in SCENARIOS:
            best, off = max(rates[mode][scenario]), max(rates["auth off"][scenario])
            cells.append(f"{best:.0f}/s ({best / off:.2f})")
        print(f"| {mode} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
