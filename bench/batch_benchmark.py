"""reserveMany against single reserves (issue 14), in one run on MariaDB + Redis, one worker.

Carts of 1-5 single-unit lines over 10,000 stocked SKUs, for ``--duration`` seconds each:
single ``reserve`` calls from 32 connections, then ``reserveMany`` calls of 100 carts from 5
connections (wrk, ``bench/wrk/carts.lua``, which counts every ReserveSuccess). Prints carts
per second, the ratio, and each request's p50 / p99.

    .venv/bin/python bench/batch_benchmark.py --duration 10

Target: reserveMany at >= 5x the carts/s of single reserves.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from benchmark import (  # noqa: E402
    SPREAD_SKUS,
    Server,
    batch_buckets,
    batch_sizes,
    seed,
    wrk_counts,
)


def wrk(url: str, per: int, conns: int, duration: float, api_key: str | None) -> dict[str, float]:
    env = {"CARTS": str(per), "SKUS": str(SPREAD_SKUS), "RUN": uuid.uuid4().hex[:8]}
    data = wrk_counts("carts.lua", url, conns, duration, env, api_key=api_key)
    secs = data["duration_us"] / 1e6
    return {
        "carts_per_s": data["carts_ok"] / secs,
        "requests_per_s": data["requests"] / secs,
        "p50_ms": data["p50_us"] / 1000,
        "p99_ms": data["p99_us"] / 1000,
        "bad": data["bad"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mysql", default="mysql+asyncmy://root@127.0.0.1:3306/stockledger_bench")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()

    from sqlalchemy.engine import make_url

    from stockledger.config import Settings
    from stockledger.db.migrate import upgrade
    from stockledger.observability.logs import configure_logging

    configure_logging("WARNING", "json")
    url = make_url(args.mysql)
    subprocess.run(
        [
            "mariadb",
            "-h",
            url.host or "127.0.0.1",
            "-u",
            url.username or "root",
            "-e",
            f"DROP DATABASE IF EXISTS `{url.database}`; CREATE DATABASE `{url.database}` "
            "CHARACTER SET utf8mb4",
        ],
        check=True,
    )
    upgrade(args.mysql)
    settings = Settings(database_url=args.mysql, redis_url=args.redis, org_id="bench")
    asyncio.run(seed(settings))
    env = dict(
        os.environ,
        STOCKLEDGER_DATABASE_URL=args.mysql,
        STOCKLEDGER_REDIS_URL=args.redis,
        STOCKLEDGER_ORG_ID="bench",
        STOCKLEDGER_LOG_LEVEL="WARNING",
        # Where `serve`/`migrate` write the first ADMIN key of a fresh database: not ./data.
        STOCKLEDGER_DATA_DIR=tempfile.mkdtemp(prefix="stockledger-bench-"),
        # One key drives far more than the default 1000/second: no limit (its cost is apart).
        STOCKLEDGER_RATE_LIMIT="",
    )
    rows = []
    with Server(env, 1) as server:
        for name, per, conns in (("reserve", 1, 32), ("reserveMany of 100", 100, 5)):
            before = batch_buckets(server.metrics())
            r = wrk(f"{server.url}/graphql", per, conns, args.duration, server.api_key)
            p50, p99 = batch_sizes(before, batch_buckets(server.metrics()))
            rows.append((name, conns, r, p50, p99))
            print(f"{name}: {r['carts_per_s']:.0f} carts/s", flush=True)
    single = rows[0][2]["carts_per_s"]
    text = (
        f"Carts of 1-5 lines, {args.duration:g} s each, one server (1 worker), MariaDB + Redis. "
        f"Command: `.venv/bin/python bench/batch_benchmark.py --duration {args.duration:g}`\n\n"
        "| calls | connections | carts/s | requests/s | request p50 / p99 ms | batch p50 / p99 | "
        "vs single |\n|---|---|---|---|---|---|---|\n"
    )
    for name, conns, r, p50, p99 in rows:
        text += (
            f"| {name} | {conns} | {r['carts_per_s']:.0f} | {r['requests_per_s']:.1f} | "
            f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {p50:g} / {p99:g} | "
            f"{r['carts_per_s'] / single:.1f}x |\n"
        )
    bad = sum(r["bad"] for _, _, r, _, _ in rows)
    text += f"\nRequests with errors: {bad}.\n"
    print(text)


if __name__ == "__main__":
    main()
