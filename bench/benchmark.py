"""How close stockledger runs to the raw database limit (issue 6).

For five scenarios (single-line reserves spread over 10,000 SKUs; single-line reserves on one
hot SKU; 10-line carts; balance queries; transfers, issue 11: one immediate transfer of 1 unit
of one of 1,000 SKUs between two of four locations, a key of its own per request, every balance
seeded with 10^8 units so none runs short) it measures, in one run on the same MariaDB and Redis:

- B0: the reserve transaction with the bare asyncmy driver: claim the key, lock the balance
  rows in key order in one SELECT ... FOR UPDATE, update them, insert the reservation, its
  lines and the ledger entries, commit (the same statements the service sends); for balance
  queries a primary-key SELECT. It runs before S and G and again after them, and the faster
  run counts;
- S: the same work through the service layer (InventoryService with Redis locks, no HTTP);
- G: the same work through ``stockledger serve`` over HTTP, driven by wrk with
  ``bench/wrk/graphql.lua`` (its transfer scenario too), which checks every
  response body for GraphQL errors and the expected success type.

B0 has no transfer transaction (it is the reserve's statements only), so the transfer scenario
runs S and G alone; its rows say so, with n/a for B0 and the ratios to it.

It prints one table per connection count (throughput, p50, p99, S/B0, G/B0, and the
distribution of the write batches' sizes in S and G), then:

- an open-loop run of G per scenario at half the rate G reached (wrk pausing before each
  request: ``DELAY_MS``), whose p99 is the latency at a load with room to spare;
- one connection alone, G against a baseline release's server (``--baseline``, a git ref; the
  server runs from a worktree of it), each on a fresh database of its own, in turns, since
  group commit must not add latency when there is nothing to group;
- the server's peak resident memory, and the service layer with Redis locks on and off.

It writes everything to ``bench/results.md``.

    .venv/bin/python bench/benchmark.py --duration 10 --connections 32,256 --baseline 545cc4e

Needs wrk (Debian package ``wrk``), MariaDB and Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncmy
import httpx

ROOT = Path(__file__).resolve().parents[1]
SPREAD_SKUS = 10_000
LOCATION = "bench"
SCENARIOS = ("spread", "hot", "cart", "balance", "transfer")
# The transfer scenario's stock: TRANSFER_SKUS SKUs "X00000".. at each of these locations.
TRANSFER_SKUS = 1_000
TRANSFER_LOCATIONS = ("xfer-a", "xfer-b", "xfer-c", "xfer-d")
TRANSFER_STOCK = 100_000_000  # units per balance: a 10 s run moves a few thousand
NO_B0 = "B0 n/a: the bare-driver baseline has no transfer transaction, S and G only"


@dataclass
class Result:
    """One measurement: requests per second and latency quantiles in milliseconds, and the
    write batches' sizes (p50, p99: upper bounds of their histogram buckets, in commands)."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    batch: tuple[float, float] | None = None


def batch_buckets(
    text: str | None = None, name: str = "inventory_batch_size"
) -> dict[float, float]:
    """Cumulative bucket counts of the histogram ``name`` (by default the write batches' sizes)
    from a /metrics text, or from this process's registry."""
    if text is None:
        from prometheus_client import REGISTRY

        families = REGISTRY.collect()
    else:
        from prometheus_client.parser import text_string_to_metric_families

        families = text_string_to_metric_families(text)
    out: dict[float, float] = {}
    for metric in families:
        if metric.name == name:
            for sample in metric.samples:
                if sample.name.endswith("_bucket"):
                    out[float(sample.labels["le"])] = sample.value
    return out


def quantile_bound(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the histogram bucket holding the ``q`` quantile of what moved."""
    delta = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    total = delta.get(float("inf"), 0)
    if not total:
        return 0.0
    for le in sorted(delta):
        if delta[le] >= q * total:
            return le
    return float("inf")


def batch_sizes(before: dict[float, float], after: dict[float, float]) -> tuple[float, float]:
    return quantile_bound(before, after, 0.5), quantile_bound(before, after, 0.99)


def pick_transfer(rng: random.Random) -> tuple[str, str, str]:
    """One transfer of the transfer scenario: (from location, to location, sku), two
    distinct locations."""
    src, dst = rng.sample(TRANSFER_LOCATIONS, 2)
    return src, dst, f"X{rng.randrange(TRANSFER_SKUS):05d}"


def pick_lines(scenario: str, rng: random.Random) -> list[tuple[str, str]]:
    """The (location, sku) keys one request of ``scenario`` touches, sorted (lock order)."""
    if scenario == "hot":
        return [(LOCATION, "HOT")]
    if scenario == "cart":
        return sorted((LOCATION, f"S{i:05d}") for i in rng.sample(range(SPREAD_SKUS), 10))
    return [(LOCATION, f"S{rng.randrange(SPREAD_SKUS):05d}")]


async def closed_loop(
    workers: int, duration: float, one: Callable[[int, random.Random], Awaitable[bool]]
) -> Result:
    """Run ``workers`` loops calling ``one`` for ``duration`` seconds; latency per call."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def loop(w: int) -> None:
        nonlocal errors
        rng = random.Random(w)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            ok = await one(w, rng)
            latencies.append(time.perf_counter() - t)
            errors += not ok

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(workers)))
    elapsed = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return Result(len(latencies) / elapsed, q[49] * 1000, q[98] * 1000, errors)


# ---------------------------------------------------------------- B0: the bare driver


async def bench_b0(
    dsn: dict[str, object], org: str, scenario: str, conns: int, duration: float, size: int
) -> Result:
    """``conns`` clients sharing a pool of ``size`` connections, one transaction each call."""
    pool = await asyncmy.create_pool(
        minsize=min(conns, size),
        maxsize=min(conns, size),
        init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        **dsn,
    )
    counter = 0
    # Reservation ids the way the service takes them (hi/lo blocks of the id_block sequence),
    # one block for the whole run, so B0 sends the same statements per reserve.
    async with pool.acquire() as conn:
        async with conn.cursor() as cur:
            await conn.begin()
            await cur.execute(
                "SELECT GREATEST(next_value, (SELECT COALESCE(MAX(id), 0) + 1 FROM reservation)) "
                "FROM id_block WHERE name = 'reservation' FOR UPDATE"
            )
            (first_id,) = await cur.fetchone()
            await cur.execute(
                "UPDATE id_block SET next_value = %s WHERE name = 'reservation'",
                (first_id + 10_000_000,),
            )
            await conn.commit()
    ids = iter(range(first_id, first_id + 10_000_000))

    async def one(w: int, rng: random.Random) -> bool:
        nonlocal counter
        keys = pick_lines(scenario, rng)
        async with pool.acquire() as conn:
            async with conn.cursor() as cur:
                if scenario == "balance":
                    await cur.execute(
                        "SELECT on_hand, reserved, version, updated_at FROM inventory_balance "
                        "WHERE org_id=%s AND location=%s AND sku=%s",
                        (org, *keys[0]),
                    )
                    return (await cur.fetchone()) is not None
                counter += 1
                key = f"b0-{w}-{counter}-{uuid.uuid4().hex[:6]}"
                now = datetime.now(UTC).replace(tzinfo=None)
                await conn.begin()
                try:
                    await cur.execute(
                        "INSERT INTO idempotency_key (org_id, idempotency_key, operation, "
                        "request_hash, created_at) VALUES (%s,%s,'reserve',%s,%s)",
                        (org, key, "0" * 64, now),
                    )
                    where = " OR ".join(["(location=%s AND sku=%s)"] * len(keys))
                    await cur.execute(
                        "SELECT location, sku, on_hand, reserved, version FROM inventory_balance "
                        f"WHERE org_id=%s AND ({where}) ORDER BY location, sku FOR UPDATE",
                        (org, *[x for k in keys for x in k]),
                    )
                    rows = await cur.fetchall()
                    if any(r[2] - r[3] < 1 for r in rows) or len(rows) != len(keys):
                        await conn.rollback()
                        return False
                    await cur.executemany(
                        "UPDATE inventory_balance SET on_hand=%s, reserved=%s, version=%s, "
                        "updated_at=%s WHERE org_id=%s AND location=%s AND sku=%s",
                        [(r[2], r[3] + 1, r[4] + 1, now, org, r[0], r[1]) for r in rows],
                    )
                    rid = next(ids)
                    await cur.execute(
                        "INSERT INTO reservation (id, org_id, status, expires_at, created_at, "
                        "updated_at) VALUES (%s,%s,'ACTIVE',%s,%s,%s)",
                        (rid, org, now + timedelta(seconds=1800), now, now),
                    )
                    await cur.executemany(
                        "INSERT INTO reservation_line (reservation_id, org_id, location, sku, "
                        "quantity, deducted, released) VALUES (%s,%s,%s,%s,1,0,0)",
                        [(rid, org, r[0], r[1]) for r in rows],
                    )
                    await cur.executemany(
                        "INSERT INTO inventory_ledger (org_id, location, sku, event_type, "
                        "on_hand_delta, reserved_delta, on_hand_after, reserved_after, "
                        "reservation_id, idempotency_key, created_at) "
                        "VALUES (%s,%s,%s,'RESERVE',0,1,%s,%s,%s,%s,%s)",
                        [(org, r[0], r[1], r[2], r[3] + 1, rid, key, now) for r in rows],
                    )
                    await conn.commit()
                    return True
                except asyncmy.errors.OperationalError as exc:
                    await conn.rollback()
                    if exc.args[0] in (1213, 1205):
                        return False
                    raise

    try:
        return await closed_loop(conns, duration, one)
    finally:
        pool.close()
        await pool.wait_closed()


# ---------------------------------------------------------------- S: the service layer


def lock_wait_buckets() -> dict[float, float]:
    """Cumulative bucket counts of ``inventory_lock_wait_seconds`` in this process."""
    from prometheus_client import REGISTRY

    out = {}
    for metric in REGISTRY.collect():
        if metric.name == "inventory_lock_wait_seconds":
            for sample in metric.samples:
                if sample.name.endswith("_bucket"):
                    out[float(sample.labels["le"])] = sample.value
    return out


def p99_from_buckets(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The upper bound (seconds) of the histogram bucket holding the 99th percentile."""
    delta = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    total = delta.get(float("inf"), 0)
    if not total:
        return None
    for le in sorted(delta):
        if delta[le] >= 0.99 * total:
            return le
    return None


async def bench_s(settings: object, scenario: str, conns: int, duration: float) -> Result:
    from stockledger.runtime import open_runtime
    from stockledger.services import Line, StockError
    from stockledger.services.queries import InventoryQueries
    from stockledger.services.records import TransferLineRequest

    async with open_runtime(settings) as rt:  # type: ignore[arg-type]
        queries = InventoryQueries(rt.db, rt.settings.org_id)
        counter = 0

        async def one(w: int, rng: random.Random) -> bool:
            nonlocal counter
            if scenario == "transfer":
                src, dst, sku = pick_transfer(rng)
                try:
                    await rt.service.transfer(
                        f"s-{uuid.uuid4().hex}", src, dst, [TransferLineRequest(sku, 1)]
                    )
                    return True
                except StockError:  # short, lock timeout: counted as an error
                    return False
            keys = pick_lines(scenario, rng)
            if scenario == "balance":
                return (await queries.balance(keys[0][1], keys[0][0])) is not None
            counter += 1
            try:
                await rt.service.reserve(
                    f"s-{uuid.uuid4().hex}", [Line(sku, 1, loc) for loc, sku in keys]
                )
                return True
            except StockError:
                return False

        before = batch_buckets()
        result = await closed_loop(conns, duration, one)
        if scenario != "balance":
            result.batch = batch_sizes(before, batch_buckets())
        return result


# ---------------------------------------------------------------- G: over HTTP with wrk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process and its children, MiB."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def wrk_counts(
    script: str,
    url: str,
    conns: int,
    duration: float,
    env: dict[str, str],
    threads: int = 1,
    api_key: str | None = None,
) -> dict[str, int]:
    """Run wrk with ``bench/wrk/<script>`` against ``url`` for ``duration`` seconds and return
    the numbers its ``done()`` prints after ``WRKJSON`` (counts; durations and latencies in
    microseconds). ``env`` is added to this process's environment; ``api_key`` (a secret) is
    sent as ``Authorization: Bearer`` (the scripts read it as ``API_KEY``). A request may take
    up to 10 s before wrk counts it a socket error (256 connections queue). Raises
    CalledProcessError when wrk fails."""
    if api_key:
        env = {**env, "API_KEY": api_key}
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{conns}",
            f"-d{int(duration)}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(ROOT / "bench" / "wrk" / script),
            url,
        ],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON"))
    # The numbers only: Lua's %q quoting of the sample body is not JSON's.
    return {k: int(v) for k, v in re.findall(r'"(\w+)":(\d+)', line)}


def run_wrk(
    url: str,
    scenario: str,
    conns: int,
    duration: float,
    threads: int,
    delay_ms: int = 0,
    api_key: str | None = None,
) -> Result:
    env = {
        "SCENARIO": scenario,
        "SKUS": str(SPREAD_SKUS),
        "RUN": uuid.uuid4().hex[:8],
        "DELAY_MS": str(delay_ms),
    }
    if scenario == "transfer":
        env.update(SKUS=str(TRANSFER_SKUS), LOCATIONS=",".join(TRANSFER_LOCATIONS))
    num = wrk_counts("graphql.lua", url, conns, duration, env, threads, api_key)
    secs = num["duration_us"] / 1e6
    return Result(
        num["requests"] / secs,
        num["p50_us"] / 1000,
        num["p99_us"] / 1000,
        num["bad"] + num["errors_socket"],
    )


def new_api_key(python: str, env: dict[str, str]) -> str | None:
    """The secret of a new ADMIN key for ``env``'s org and database, made with the
    ``stockledger apikey create`` of ``python``'s release; None for a release without API keys
    (a baseline from before them ignores the header)."""
    done = subprocess.run(
        [python, "-m", "stockledger.cli", "apikey", "create", "--name", "bench", "--role", "ADMIN"]
        + ["--org", env.get("STOCKLEDGER_ORG_ID", "default")],
        env=env,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() if done.returncode == 0 else None


class Server:
    """``stockledger serve`` in a subprocess, run by ``python`` (default this interpreter, so
    this checkout), ready when entered, with an ADMIN key (``api_key``, None for a release
    without keys); ``measure`` runs wrk against it and reads the batch sizes off /metrics."""

    def __init__(self, env: dict[str, str], workers: int, python: str = sys.executable) -> None:
        self.port = free_port()
        self.env = dict(env)
        self.python = python
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.rss = 0.0
        self.api_key: str | None = None

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(
            [
                self.python,
                "-m",
                "stockledger.cli",
                "serve",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    self.api_key = new_api_key(self.python, self.env)
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def measure(
        self, scenario: str, conns: int, duration: float, threads: int, delay_ms: int = 0
    ) -> Result:
        before = batch_buckets(self.metrics())
        result = run_wrk(
            f"{self.url}/graphql", scenario, conns, duration, threads, delay_ms, self.api_key
        )
        if scenario != "balance":
            result.batch = batch_sizes(before, batch_buckets(self.metrics()))
        self.rss = max(self.rss, peak_rss_mib(self.proc.pid))
        return result


# ---------------------------------------------------------------- set-up and report


async def seed(settings: object, transfers: bool = False) -> None:
    """Seed the scenarios' stock through the service; the transfer scenario's too when
    ``transfers`` (TRANSFER_STOCK units of each SKU at each of its locations)."""
    from stockledger.runtime import open_runtime
    from stockledger.services import Line

    async with open_runtime(settings) as rt:  # type: ignore[arg-type]
        if transfers:
            lines = [
                Line(f"X{i:05d}", TRANSFER_STOCK, loc)
                for loc in TRANSFER_LOCATIONS
                for i in range(TRANSFER_SKUS)
            ]
            for start in range(0, len(lines), 500):
                await rt.service.restock(
                    f"seed-xfer-{start}-{uuid.uuid4().hex}", lines[start : start + 500]
                )
        await rt.service.restock(
            f"seed-hot-{uuid.uuid4().hex}", [Line("HOT", 1_000_000_000, LOCATION)]
        )
        for start in range(0, SPREAD_SKUS, 500):
            await rt.service.restock(
                f"seed-{start}-{uuid.uuid4().hex}",
                [Line(f"S{i:05d}", 100_000_000, LOCATION) for i in range(start, start + 500)],
            )


def baseline_python(ref: str) -> str:
    """The interpreter of a virtual environment with ``ref`` (a git ref of this repository)
    installed, from a worktree under /tmp: the baseline runs with the dependencies it declared
    (v1 needed tenacity, which this release dropped)."""
    path = Path(f"/tmp/stockledger-baseline-{ref}")
    if not path.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
            check=True,
            capture_output=True,
        )
    python = path / ".venv" / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path / ".venv")], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", str(path)], check=True, capture_output=True
        )
    return str(python)


def seed_over_http(url: str, api_key: str | None) -> None:
    """The seed stock through a server's restock mutation (works with any release), sending
    ``api_key`` (a secret) when given."""
    q = "mutation($i: RestockInput!){restock(input:$i){__typename}}"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=60, headers=headers) as client:

        def restock(key: str, lines: list[dict[str, object]]) -> None:
            body = {"query": q, "variables": {"i": {"idempotencyKey": key, "lines": lines}}}
            assert "RestockSuccess" in client.post(url, json=body).text

        restock("seed-hot", [{"sku": "HOT", "location": LOCATION, "quantity": 1_000_000_000}])
        for start in range(0, SPREAD_SKUS, 500):
            lines = [
                {"sku": f"S{i:05d}", "location": LOCATION, "quantity": 100_000_000}
                for i in range(start, start + 500)
            ]
            restock(f"seed-{start}", lines)


def fmt_batch(r: Result) -> str:
    return "-" if r.batch is None else f"{r.batch[0]:g} / {r.batch[1]:g}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mysql", default="mysql+asyncmy://root@127.0.0.1:3306/stockledger_bench")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--connections", default="32,256", help="client connections, a list")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers for G")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument(
        "--baseline", default=None, help="git ref whose server G is compared with, one connection"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.md"))
    args = parser.parse_args()
    counts = [int(c) for c in args.connections.split(",")]
    scenarios = args.scenarios.split(",")

    sys.path.insert(0, str(ROOT / "src"))
    from sqlalchemy.engine import make_url

    from stockledger.config import Settings
    from stockledger.db.migrate import upgrade
    from stockledger.observability.logs import configure_logging

    configure_logging("WARNING", "json")  # S logs like the G server below (WARNING)

    url = make_url(args.mysql)
    org = "bench"

    async def recreate(name: str) -> None:
        conn = await asyncmy.connect(
            host=url.host, port=url.port or 3306, user=url.username, password=url.password or ""
        )
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            await cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        conn.close()

    asyncio.run(recreate(str(url.database)))
    upgrade(args.mysql)
    # Reads: a pool like a deployment's; B0 too, since 256 connections each would pass
    # MariaDB's default max_connections (151), and a hand-written service pools them as well.
    pool = 32
    settings = Settings(
        database_url=args.mysql,
        redis_url=args.redis,
        org_id=org,
        db_pool_size=pool,
        log_level="WARNING",
    )
    asyncio.run(seed(settings, transfers="transfer" in scenarios))
    dsn = {
        "host": url.host,
        "port": url.port or 3306,
        "user": url.username,
        "password": url.password or "",
        "db": url.database,
        "autocommit": False,
    }
    env = dict(
        os.environ,
        STOCKLEDGER_DATABASE_URL=args.mysql,
        STOCKLEDGER_REDIS_URL=args.redis,
        STOCKLEDGER_ORG_ID=org,
        STOCKLEDGER_LOG_LEVEL="WARNING",
        # Where `serve`/`migrate` write the first ADMIN key of a fresh database: not ./data.
        STOCKLEDGER_DATA_DIR=tempfile.mkdtemp(prefix="stockledger-bench-"),
        # One key drives far more than the default 1000/second: no limit (its cost is apart).
        STOCKLEDGER_RATE_LIMIT="",
        STOCKLEDGER_DB_POOL_SIZE=str(pool),
    )

    rows: dict[int, list[tuple[str, Result | None, Result, Result]]] = {}
    peak = 0.0
    open_loop: list[tuple[str, float, Result]] = []
    for conns in counts:
        rows[conns] = []
        with Server(env, args.workers) as server:
            for scenario in scenarios:
                b0: Result | None = None
                if scenario != "transfer":  # B0 cannot transfer (NO_B0)
                    b0 = asyncio.run(bench_b0(dsn, org, scenario, conns, args.duration, pool))
                s = asyncio.run(bench_s(settings, scenario, conns, args.duration))
                g = server.measure(scenario, conns, args.duration, args.wrk_threads)
                if b0 is not None:
                    # B0 again after S and G, and the faster of the two counts: a slow spell
                    # of the shared machine must not flatter the ratios (B0 varied 2.8x).
                    again = asyncio.run(bench_b0(dsn, org, scenario, conns, args.duration, pool))
                    b0 = max(b0, again, key=lambda r: r.rps)
                rows[conns].append((scenario, b0, s, g))
                print(
                    f"{conns} conns, {scenario}: "
                    + (f"B0 {b0.rps:.0f}/s  " if b0 is not None else f"({NO_B0})  ")
                    + f"S {s.rps:.0f}/s (errors {s.errors})  G {g.rps:.0f}/s  "
                    f"(G errors {g.errors})",
                    flush=True,
                )
                if conns == counts[0] and g.rps > 0:
                    # Half of the rate G reached, offered steadily on the same connections.
                    delay_ms = max(1, int(conns * 1000 / (g.rps / 2)))
                    half = server.measure(
                        scenario, conns, args.duration, args.wrk_threads, delay_ms
                    )
                    open_loop.append((scenario, g.rps / 2, half))
            peak = max(peak, server.rss)

    # One connection alone: this release against the baseline's server, each on a fresh
    # database seeded the same way (the main database is large by now, and InnoDB is still
    # purging what the runs above wrote), measured in turns so drift hits both alike.
    single: list[tuple[str, str, Result]] = []
    lone = [sc for sc in ("spread", "balance") if sc in scenarios]
    servers: list[tuple[str, dict[str, str], str]] = []
    if lone:  # none of its scenarios chosen (e.g. --scenarios transfer): no servers to start
        servers.append(("this", dict(env), sys.executable))
    if lone and args.baseline:
        servers.append((args.baseline, dict(env), baseline_python(args.baseline)))
    for n, (_, server_env, python) in enumerate(servers):
        fresh = url.set(database=f"{url.database}_single{n}")
        asyncio.run(recreate(str(fresh.database)))
        server_env["STOCKLEDGER_DATABASE_URL"] = fresh.render_as_string(hide_password=False)
        subprocess.run(
            [python, "-m", "stockledger.cli", "migrate"],
            env=server_env,
            check=True,
            capture_output=True,
        )
    with contextlib.ExitStack() as stack:
        running = []
        for name, server_env, python in servers:
            server = stack.enter_context(Server(server_env, args.workers, python))
            seed_over_http(f"{server.url}/graphql", server.api_key)
            running.append((name, server))
        for scenario in lone:
            for name, server in running:
                single.append((name, scenario, server.measure(scenario, 1, args.duration, 1)))

    # The service layer with the Redis locks on and off, and the p99 lock wait.
    lock_rows = []
    for scenario in ("spread", "hot"):
        if scenario not in scenarios:
            continue
        before = lock_wait_buckets()
        on = asyncio.run(bench_s(settings, scenario, counts[0], args.duration))
        p99 = p99_from_buckets(before, lock_wait_buckets())
        off_settings = settings.model_copy(update={"locks_enabled": False})
        off = asyncio.run(bench_s(off_settings, scenario, counts[0], args.duration))
        lock_rows.append((scenario, on, off, p99))

    command = (
        f"`.venv/bin/python bench/benchmark.py --duration {args.duration:g} "
        f"--connections {args.connections} --workers {args.workers}"
        + (f" --baseline {args.baseline}" if args.baseline else "")
        + (f" --scenarios {args.scenarios}" if scenarios != list(SCENARIOS) else "")
        + "`"
    )
    text = (
        f"Machine: {platform.node()} ({os.cpu_count()} cores), Python {platform.python_version()}, "
        f"MariaDB/MySQL at {url.host}, Redis locks on; {args.duration:g} s per measurement, "
        f"G with {args.workers} uvicorn worker(s), wrk -t{args.wrk_threads}; B0 and the reads "
        f"pool {pool} database connections. {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n"
        f"Command: {command}\n"
    )
    for conns, table_rows in rows.items():
        text += (
            f"\n{conns} connections (batch: commands per write batch, p50 / p99, upper bounds of "
            "the histogram buckets):\n\n"
            "| scenario | B0 req/s | B0 p50 / p99 ms | S req/s | S p50 / p99 ms | S batch | "
            "G req/s | G p50 / p99 ms | G batch | S/B0 | G/B0 | G errors |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        )
        for scenario, b0, s, g in table_rows:
            b0_cells = (
                ("n/a", "n/a", "n/a", "n/a")
                if b0 is None
                else (
                    f"{b0.rps:.0f}",
                    f"{b0.p50_ms:.1f} / {b0.p99_ms:.1f}",
                    f"{s.rps / b0.rps:.2f}",
                    f"{g.rps / b0.rps:.2f}",
                )
            )
            text += (
                f"| {scenario} | {b0_cells[0]} | {b0_cells[1]} | {s.rps:.0f} | "
                f"{s.p50_ms:.1f} / {s.p99_ms:.1f} | {fmt_batch(s)} | {g.rps:.0f} | "
                f"{g.p50_ms:.1f} / {g.p99_ms:.1f} | {fmt_batch(g)} | {b0_cells[2]} | "
                f"{b0_cells[3]} | {g.errors} |\n"
            )
        if any(b0 is None for _, b0, _, _ in table_rows):
            text += (
                f"\ntransfer: req/s are transfers/s (one immediate transfer per request); "
                f"{NO_B0}.\n"
            )
    text += f"\nServer peak resident memory during G: {peak:.0f} MiB.\n"
    if open_loop:
        text += (
            f"\nG at half its rate, offered steadily ({counts[0]} connections, wrk pausing "
            "before each request):\n\n| scenario | offered req/s | served req/s | p50 / p99 ms | "
            "batch |\n|---|---|---|---|---|\n"
        )
        for scenario, offered, r in open_loop:
            text += (
                f"| {scenario} | {offered:.0f} | {r.rps:.0f} | {r.p50_ms:.1f} / {r.p99_ms:.1f} | "
                f"{fmt_batch(r)} |\n"
            )
    if single:
        text += (
            "\nOne connection alone (G, no concurrency):\n\n| server | scenario | req/s | "
            "p50 / p99 ms |\n|---|---|---|---|\n"
        )
        for who, scenario, r in single:
            text += f"| {who} | {scenario} | {r.rps:.0f} | {r.p50_ms:.2f} / {r.p99_ms:.2f} |\n"
    if lock_rows:
        text += (
            f"\nRedis locks on and off (service layer, {counts[0]} connections, reserves per "
            "second; p99 lock wait is the upper bound of its histogram bucket):\n\n"
            "| scenario | locks on req/s | p50 / p99 ms | locks off req/s | p50 / p99 ms | p99 lock wait |\n"
            "|---|---|---|---|---|---|\n"
        )
        for scenario, on, off, p99 in lock_rows:
            wait = "n/a" if p99 is None else f"<= {p99 * 1000:g} ms"
            text += (
                f"| {scenario} | {on.rps:.0f} | {on.p50_ms:.1f} / {on.p99_ms:.1f} | {off.rps:.0f} | "
                f"{off.p50_ms:.1f} / {off.p99_ms:.1f} | {wait} |\n"
            )
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
