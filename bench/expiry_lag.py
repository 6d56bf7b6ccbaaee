"""How late reservations expire: 5,000 one-unit carts expiring within about a minute, two servers.

Two ``stockledger serve`` processes share one MariaDB database and one Redis (each runs its
sweeper every second). The carts are reserved over HTTP through both servers, with TTLs spread
so that they fall due over about a minute, while storefront clients keep reserving other SKUs
through both servers. Once every cart is due, the script waits for the sweepers and reads the
lag of every expiry from the database: the EXPIRE ledger entry's ``created_at`` minus the
reservation's ``expires_at``. It prints the lag's quantiles and the storefront's rate.

    .venv/bin/python bench/expiry_lag.py            # --carts 5000 --window 60

Target (issue 9): p99 lag under 2 s. Needs MariaDB and Redis at their defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncmy
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from benchmark import free_port  # noqa: E402

RESERVE = "mutation($i: ReserveInput!){reserve(input:$i){__typename ... on Error{code}}}"
RESTOCK = "mutation($i: RestockInput!){restock(input:$i){__typename}}"


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stockledger.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.terminate()
            raise RuntimeError("server did not become ready")
        time.sleep(0.2)


async def post(client: httpx.AsyncClient, url: str, query: str, i: dict[str, object]) -> str:
    r = await client.post(f"{url}/graphql", json={"query": query, "variables": {"i": i}})
    return r.text


async def run(args: argparse.Namespace, urls: list[str], api_key: str) -> tuple[float, int]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    headers = {"authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as client:
        carts = [{"sku": f"C{i:04d}", "location": "lag", "quantity": 1} for i in range(500)]
        text = await post(
            client,
            urls[0],
            RESTOCK,
            {"idempotencyKey": "lag-c", "lines": [{**c, "quantity": 1000} for c in carts]},
        )
        assert "RestockSuccess" in text, text
        shop = [{"sku": f"F{i:04d}", "location": "lag", "quantity": 1_000_000} for i in range(500)]
        text = await post(client, urls[0], RESTOCK, {"idempotencyKey": "lag-f", "lines": shop})
        assert "RestockSuccess" in text, text

        # The carts: reserved as fast as 32 clients can, TTLs spread over the window.
        run_id = uuid.uuid4().hex[:6]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(args.carts):
            queue.put_nowait(n)
        started = time.monotonic()

        async def cart_client(w: int) -> None:
            while True:
                try:
                    n = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                ttl = args.lead + int((n * args.window) / args.carts)
                i = {
                    "idempotencyKey": f"lag-{run_id}-{n}",
                    "lines": [carts[n % len(carts)]],
                    "ttlSeconds": max(1, ttl - int(time.monotonic() - started)),
                }
                text = await post(client, urls[n % len(urls)], RESERVE, i)
                assert "ReserveSuccess" in text, text

        await asyncio.gather(*(cart_client(w) for w in range(32)))
        made = time.monotonic() - started
        print(f"reserved {args.carts} carts in {made:.1f} s", flush=True)

        # Storefront traffic on other SKUs until every cart is due and a little after.
        stop = asyncio.Event()
        served = 0
        latencies: list[float] = []

        async def storefront(w: int) -> None:
            nonlocal served
            k = 0
            while not stop.is_set():
                k += 1
                i = {
                    "idempotencyKey": f"shop-{run_id}-{w}-{k}",
                    "lines": [{**shop[(w * 7919 + k) % len(shop)], "quantity": 1}],
                }
                t = time.monotonic()
                text = await post(client, urls[(w + k) % len(urls)], RESERVE, i)
                latencies.append(time.monotonic() - t)
                assert "ReserveSuccess" in text, text
                served += 1

        shoppers = [asyncio.create_task(storefront(w)) for w in range(args.storefront)]
        t0 = time.monotonic()
        await asyncio.sleep(max(0.0, args.lead + args.window - (time.monotonic() - started)) + 5)
        stop.set()
        await asyncio.gather(*shoppers)
        latencies.sort()
        if latencies:
            print(
                f"storefront reserve latency p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, "
                f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms",
                flush=True,
            )
        return served / (time.monotonic() - t0), args.carts


async def lags(db: str) -> list[float]:
    conn = await asyncmy.connect(host="127.0.0.1", user="root", password="", db=db)
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT TIMESTAMPDIFF(MICROSECOND, r.expires_at, MIN(l.created_at)) "
            "FROM reservation r JOIN inventory_ledger l ON l.reservation_id = r.id "
            "AND l.event_type = 'EXPIRE' WHERE r.org_id = 'lag' GROUP BY r.id"
        )
        rows = await cur.fetchall()
        await cur.execute(
            "SELECT COUNT(*) FROM reservation WHERE org_id = 'lag' AND status = 'ACTIVE' "
            "AND expires_at < NOW(6) - INTERVAL 1 SECOND AND id IN (SELECT reservation_id FROM "
            "reservation_line WHERE location = 'lag' AND sku LIKE 'C%')"
        )
        (left,) = await cur.fetchone()
    conn.close()
    if left:
        print(f"{left} due carts were still ACTIVE", flush=True)
    return [r[0] / 1e6 for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--carts", type=int, default=5000)
    parser.add_argument("--window", type=int, default=60, help="seconds the expiries spread over")
    parser.add_argument("--lead", type=int, default=15, help="seconds before the first is due")
    parser.add_argument("--storefront", type=int, default=16, help="storefront clients")
    parser.add_argument("--db", default="stockledger_lag")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    args = parser.parse_args()

    async def recreate() -> None:
        conn = await asyncmy.connect(host="127.0.0.1", user="root", password="")
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{args.db}`")
            await cur.execute(f"CREATE DATABASE `{args.db}` CHARACTER SET utf8mb4")
        conn.close()

    asyncio.run(recreate())
    url = f"mysql+asyncmy://root@127.0.0.1:3306/{args.db}"
    env = dict(
        os.environ,
        STOCKLEDGER_DATABASE_URL=url,
        STOCKLEDGER_REDIS_URL=args.redis,
        STOCKLEDGER_ORG_ID="lag",
        STOCKLEDGER_LOG_LEVEL="WARNING",
        # Where `serve`/`migrate` write the first ADMIN key of a fresh database: not ./data.
        STOCKLEDGER_DATA_DIR=tempfile.mkdtemp(prefix="stockledger-bench-"),
        # One key drives far more than the default 1000/second: no limit (its cost is apart).
        STOCKLEDGER_RATE_LIMIT="",
        PYTHONPATH=str(ROOT / "src"),
    )
    subprocess.run([sys.executable, "-m", "stockledger.cli", "migrate"], env=env, check=True)
    servers = [start_server(env) for _ in range(2)]
    try:
        # The first ADMIN key, which `migrate` made on the fresh database.
        api_key = (Path(env["STOCKLEDGER_DATA_DIR"]) / "admin.key").read_text().strip()
        rate, carts = asyncio.run(run(args, [u for _, u in servers], api_key))
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(10)
    found = sorted(asyncio.run(lags(args.db)))
    q = statistics.quantiles(found, n=100, method="inclusive") if len(found) > 1 else [0.0] * 99
    print(
        f"carts: {carts}, expired: {len(found)}; lag p50 {q[49]:.2f} s, p90 {q[89]:.2f} s, "
        f"p99 {q[98]:.2f} s, max {found[-1] if found else 0:.2f} s; storefront {rate:.0f} "
        "reserves/s meanwhile (two servers, sweepers every 1 s)"
    )


if __name__ == "__main__":
    main()
