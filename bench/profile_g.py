"""Where ``stockledger serve`` spends its CPU, per benchmark scenario (issue 9's profile of G).

Starts one server (one worker) on a fresh MariaDB database with Redis, seeds it as
``bench/benchmark.py`` does, then for each scenario runs wrk (``bench/wrk/graphql.lua``, 32
connections; for ``reserveMany``, ``bench/wrk/carts.lua`` with calls of 100 carts from 5)
while ``py-spy record -r 200 -f raw`` samples the server. It prints, per scenario, the share of samples by the package whose code was on top of the stack (self time:
``site-packages/<package>``, ``stockledger``, or the standard library module), and the five
costliest functions.

    .venv/bin/python bench/profile_g.py --duration 10

Needs py-spy in this interpreter's environment (``.venv/bin/pip install py-spy``; root or
ptrace allowed), wrk, MariaDB, Redis.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from benchmark import SCENARIOS, SPREAD_SKUS, Server, seed_over_http, wrk_counts  # noqa: E402

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def package_of(path: str) -> str:
    """The package a source file belongs to: the directory under site-packages, ``stockledger``
    for the project, the module under the standard library, else the file's name."""
    if "/stockledger/" in path:
        return "stockledger"
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    match = re.search(r"/lib/python3\.\d+/([^/]+)", path)
    if match:
        return match.group(1).removesuffix(".py")
    return Path(path).name or path


def aggregate(raw: str) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Self-time samples of a py-spy raw (collapsed stacks) file, by package and by function:
    ``(total samples, by package, by "function (package)")``. Compiled code (the asyncmy
    driver, uvloop) has no frames of its own: its time counts for the Python frame that called
    it."""
    by_package: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.rsplit(";", 1)[-1]
        match = FRAME.match(leaf)
        func, path = (match.group("func"), match.group("file")) if match else (leaf, leaf)
        package = package_of(path)
        by_package[package] += n
        by_function[f"{func} ({package})"] += n
    return total, by_package, by_function


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per scenario")
    parser.add_argument("--scenarios", default=",".join([*SCENARIOS, "reserveMany"]))
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    database = f"stockledger_prof_{uuid.uuid4().hex[:6]}"
    mysql = ["mariadb", "-h", "127.0.0.1", "-u", "root"]
    subprocess.run([*mysql, "-e", f"CREATE DATABASE {database}"], check=True)
    env = dict(
        os.environ,
        STOCKLEDGER_DATABASE_URL=f"mysql+asyncmy://root@127.0.0.1:3306/{database}",
        STOCKLEDGER_REDIS_URL="redis://127.0.0.1:6379/14",
        STOCKLEDGER_LOG_LEVEL="WARNING",
        # Where `serve`/`migrate` write the first ADMIN key of a fresh database: not ./data.
        STOCKLEDGER_DATA_DIR=tempfile.mkdtemp(prefix="stockledger-bench-"),
        # One key drives far more than the default 1000/second: no limit (its cost is apart).
        STOCKLEDGER_RATE_LIMIT="",
    )
    subprocess.run(
        [sys.executable, "-m", "stockledger.cli", "migrate"], env=env, check=True, timeout=120
    )
    try:
        with Server(env, workers=1) as server, tempfile.TemporaryDirectory() as tmp:
            seed_over_http(f"{server.url}/graphql", server.api_key)
            for scenario in args.scenarios.split(","):
                out = Path(tmp) / f"{scenario}.txt"
                spy_command = [str(Path(sys.executable).with_name("py-spy")), "record"]
                spy_command += ["--pid", str(server.proc.pid), "-r", "200", "-f", "raw"]
                spy_command += ["-d", str(args.duration), "-o", str(out)]
                spy_command += ["--nonblocking", "--full-filenames"]
                spy = subprocess.Popen(
                    spy_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                # reserveMany: calls of 100 carts of 1-5 lines from 5 connections, as in
                # bench/batch_benchmark.py; the rest: bench/benchmark.py's scenarios.
                many = scenario == "reserveMany"
                wrk_env = {
                    "SCENARIO": scenario,
                    "CARTS": "100",
                    "SKUS": str(SPREAD_SKUS),
                    "RUN": uuid.uuid4().hex,
                }
                conns = 5 if many else args.connections
                script = "carts.lua" if many else "graphql.lua"
                url = f"{server.url}/graphql"
                wrk_counts(script, url, conns, args.duration, wrk_env, api_key=server.api_key)
                spy.wait(args.duration + 30)
                total, by_package, by_function = aggregate(out.read_text())
                # py-spy leaves out samples of an idle thread: the rest of the rate is idle.
                busy = total / (200 * args.duration)
                print(f"\n== {scenario}: {total} samples, the server busy {busy:.0%} of the time")
                for package, n in by_package.most_common(10):
                    print(f"  {package:<24} {n / max(total, 1):6.1%}")
                print("  costliest functions (self):")
                for func, n in by_function.most_common(5):
                    print(f"    {n / max(total, 1):6.1%}  {func}")
                print("  costliest of stockledger's own:")
                own = [(f, n) for f, n in by_function.most_common() if f.endswith("(stockledger)")]
                for func, n in own[:5]:
                    print(f"    {n / max(total, 1):6.1%}  {func}")
    finally:
        subprocess.run([*mysql, "-e", f"DROP DATABASE IF EXISTS {database}"], check=False)


if __name__ == "__main__":
    main()
