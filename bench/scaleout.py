"""Scale-out proof (issue 13, part 6): the Superstore replay against one and then several
``stockledger serve`` instances on one MariaDB and one Redis, then the kill variant.

    .venv/bin/python bench/scaleout.py [--orders N] [--clients 16] [--instances 4] [--kill]

Each replay gets a fresh database (the one ``--mysql`` names, dropped and created again, then
``stockledger migrate`` once) and an org of its own in the ``--redis`` database (its keys
deleted afterwards). The instances run one uvicorn worker each (``bench/benchmark.py``'s
``Server``). The clients take the carts in turn and send each call (reserve, later deduct) to an
instance picked at random; a call that meets a transport error or ``UNAVAILABLE`` (or a typed
``LOCK_TIMEOUT``) is sent again, same idempotency keys, on another one (bounded).

1. the full replay against one instance;
2. the same against ``--instances`` instances;
3. the kill variant: ``--instances`` instances, one SIGKILLed once 30 % of the carts are
   answered, while a request is in flight on it, and started again on the same port with the
   same environment.

Each prints the replay's report and the result of its checks (those of ``stockledger
replay``, plus exactly once: the retried calls and a sample of the others sent again answer
``replayed``, and the ledger holds each effect the client was told of once), then a summary of
carts/s. ``--kill`` runs the kill variant only. Exits non-zero when a check fails.

Needs MariaDB (or MySQL) and Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from benchmark import Server  # noqa: E402

from stockledger.replay import Interruption, Replay, interrupt, load_orders  # noqa: E402

KILL_AT = 0.3  # of the carts answered when the kill variant SIGKILLs an instance


def admin(mysql: str, statements: list[str]) -> None:
    """Run SQL statements on the server of ``mysql`` (no database selected)."""
    logging.getLogger("asyncmy").setLevel(logging.ERROR)  # no "Can't drop ...; doesn't exist" line
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> None:
        engine = create_async_engine(make_url(mysql).set(database=""))
        try:
            async with engine.connect() as conn:
                for statement in statements:
                    await conn.execute(text(statement))
        finally:
            await engine.dispose()

    asyncio.run(run())


def fresh_database(mysql: str) -> None:
    """Drop and create the database ``mysql`` names, then ``stockledger migrate`` it once."""
    from sqlalchemy.engine import make_url

    name = make_url(mysql).database
    admin(
        mysql,
        [f"DROP DATABASE IF EXISTS `{name}`", f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"],
    )
    env = dict(
        os.environ,
        STOCKLEDGER_DATABASE_URL=mysql,
        STOCKLEDGER_LOG_LEVEL="WARNING",
        STOCKLEDGER_DATA_DIR=tempfile.mkdtemp(prefix="stockledger-bench-"),
        # One key drives far more than the default 1000/second: no limit (its cost is apart).
        STOCKLEDGER_RATE_LIMIT="",
    )
    subprocess.run(
        [sys.executable, "-m", "stockledger.cli", "migrate"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def drop_org_keys(redis_url: str, org_id: str) -> None:
    """Delete the Redis keys of one org (``stockledger:{org}:*``)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"stockledger:{{{org_id}}}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def replay_once(args: argparse.Namespace, instances: int, kill: bool) -> tuple[str, float, bool]:
    """One replay on a fresh database against ``instances`` servers (one killed and restarted
    mid-run with ``kill``); prints its report and checks. Returns (title, carts/s, passed)."""
    title = f"{instances} instance{'s' if instances > 1 else ''}" + (
        ", one SIGKILLed and restarted" if kill else ""
    )
    print(f"\n== {title}", flush=True)
    fresh_database(args.mysql)
    org_id = f"scaleout-{uuid.uuid4().hex[:8]}"
    env = dict(
        os.environ,
        STOCKLEDGER_DATABASE_URL=args.mysql,
        STOCKLEDGER_REDIS_URL=args.redis,
        STOCKLEDGER_ORG_ID=org_id,
        STOCKLEDGER_LOG_LEVEL="WARNING",
        # Where `serve`/`migrate` write the first ADMIN key of a fresh database: not ./data.
        STOCKLEDGER_DATA_DIR=tempfile.mkdtemp(prefix="stockledger-bench-"),
        # One key drives far more than the default 1000/second: no limit (its cost is apart).
        STOCKLEDGER_RATE_LIMIT="",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    try:
        with ExitStack() as stack:
            t0 = time.monotonic()
            servers = [stack.enter_context(Server(env, 1)) for _ in range(instances)]
            print(
                f"{instances} ready in {time.monotonic() - t0:.1f} s: "
                + ", ".join(s.url for s in servers),
                flush=True,
            )
            replay = Replay(
                [f"{s.url}/graphql" for s in servers],
                load_orders(limit=args.orders),
                clients=args.clients,
                abandon_ttl=args.abandon_ttl,
                api_key=servers[0].api_key,
            )
            victim = servers[-1]

            def sigkill() -> None:
                victim.proc.kill()
                victim.proc.wait(10)

            async def run() -> tuple[float, list[str], Interruption | None]:
                killer = None
                if kill:
                    killer = asyncio.create_task(
                        interrupt(
                            replay, f"{victim.url}/graphql", sigkill, victim.__enter__, at=KILL_AT
                        )
                    )
                elapsed = await replay.run()
                done = await killer if killer else None
                return elapsed, await replay.check(expire_wait=args.expire_wait), done

            elapsed, problems, done = asyncio.run(run())
    finally:
        drop_org_keys(args.redis, org_id)
    if done is not None:
        print(done)
    print(replay.report(elapsed))
    print(
        "requests per instance: "
        + ", ".join(f"{u.split('/')[2]}={n}" for u, n in sorted(replay.out.sent.items()))
    )
    if problems:
        print(f"CHECKS FAILED ({len(problems)}):")
        for p in problems[:50]:
            print(f"  {p}")
    else:
        print("checks: all passed (exactly once included)")
    sys.stdout.flush()
    return title, len(replay.orders) / elapsed, not problems


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mysql",
        default="mysql+asyncmy://root@127.0.0.1:3306/stockledger_scaleout",
        help="its database is dropped and created again for each replay, and dropped at the end",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/11")
    parser.add_argument(
        "--orders", type=int, default=None, help="the first N orders (default: all 5,009)"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument(
        "--abandon-ttl", type=int, default=2, help="seconds, the abandoned carts' TTL"
    )
    parser.add_argument(
        "--expire-wait",
        type=float,
        default=15.0,
        help="seconds to wait for the abandoned carts to expire",
    )
    parser.add_argument("--kill", action="store_true", help="the kill variant only")
    args = parser.parse_args()
    if args.instances < 2 and args.kill:
        parser.error("the kill variant needs --instances 2 or more")

    from sqlalchemy.engine import make_url

    command = " ".join(["bench/scaleout.py", *sys.argv[1:]])
    print(f"Command: .venv/bin/python {command}  (started {time.strftime('%Y-%m-%d %H:%M:%S %Z')})")
    print(
        f"MariaDB: {make_url(args.mysql).render_as_string(hide_password=True)}  Redis: {args.redis}  cores: {os.cpu_count()}"
    )
    runs = (
        []
        if args.kill
        else [(1, False)] + ([(args.instances, False)] if args.instances > 1 else [])
    )
    if args.instances > 1:
        runs.append((args.instances, True))
    results = []
    try:
        for instances, kill in runs:
            results.append(replay_once(args, instances, kill))
    finally:
        name = make_url(args.mysql).database
        admin(args.mysql, [f"DROP DATABASE IF EXISTS `{name}`"])
    print("\n| run | carts/s | checks |\n|---|---|---|")
    for title, rate, passed in results:
        print(f"| {title} | {rate:.1f} | {'passed' if passed else 'FAILED'} |")
    if not all(passed for _, _, passed in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
