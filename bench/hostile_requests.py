"""How long the red team's hostile requests (issue 10, item 7) take to refuse.

In process, on the served schema (``build_schema`` with default settings; a refusal never
reaches the database): the time of ``schema.execute`` for each hostile document, every run a
new text (a trailing comment), so the parser and validation caches never answer; and, for
comparison, parsing and validating realistic documents with the same rules.

    .venv/bin/python bench/hostile_requests.py               # --runs 20
    .venv/bin/python bench/hostile_requests.py --http        # also over HTTP, /healthz polled
    .venv/bin/python bench/hostile_requests.py --old 20      # the old guards, up to 20 levels

``--http`` starts ``stockledger serve`` (embedded default, a temporary data directory), sends
each hostile request over HTTP while a thread asks ``/healthz`` every 10 ms, and prints the
round trips and the slowest ``/healthz`` answer meanwhile. ``--old N`` validates the doubling
documents of 10 to N levels with Strawberry's QueryDepthLimiter and MaxAliasesLimiter, the
guards the service used before (their time doubles per level: keep N small).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402
from graphql import parse, specified_rules  # noqa: E402
from strawberry.extensions import MaxAliasesLimiter, QueryDepthLimiter  # noqa: E402
from strawberry.schema.schema import validate_document  # noqa: E402

from stockledger.config import Settings  # noqa: E402
from stockledger.resolvers.guards import query_guard_rule  # noqa: E402
from stockledger.resolvers.root import build_schema  # noqa: E402

RESTOCK_INTO = (
    "mutation($i: RestockInput!) { restock(input: $i) { __typename "
    "... on RestockSuccess { balances { ...F0 } } } }"
)
RESTOCK = "mutation($i: RestockInput!) { restock(input: $i) { __typename } }"
# The README's ledger query, and a full page of 500 ledger entries with every field.
README_QUERY = (
    '{ balance(sku: "TSHIRT-M") { onHand reserved available version } ledger(first: 10, '
    'filter: {sku: "TSHIRT-M"}) { edges { node { id eventType onHandDelta reservedDelta '
    "onHandAfter reservedAfter idempotencyKey reference { type id } } } "
    "pageInfo { hasNextPage endCursor } } }"
)
LEDGER_PAGE = (
    "query($first: Int!) { ledger(first: $first) { edges { cursor node { id eventType sku "
    "location onHandDelta reservedDelta onHandAfter reservedAfter reservationId "
    "reference { type id } reason idempotencyKey createdAt } } "
    "pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }"
)


def doubling(levels: int, head: str = RESTOCK_INTO) -> str:
    """Each fragment spreads the next one twice (about 1 KB at 30 levels)."""
    parts = [head]
    parts += [f"fragment F{i} on Balance {{ ...F{i + 1} ...F{i + 1} }}" for i in range(levels - 1)]
    parts.append(f"fragment F{levels - 1} on Balance {{ sku }}")
    return "\n".join(parts)


def chain(length: int, head: str = RESTOCK_INTO) -> str:
    """Each fragment spreads the next one once."""
    parts = [head]
    parts += [f"fragment F{i} on Balance {{ sku ...F{i + 1} }}" for i in range(length - 1)]
    parts.append(f"fragment F{length - 1} on Balance {{ sku }}")
    return "\n".join(parts)


def restock_vars(lines: int) -> dict[str, Any]:
    return {
        "i": {
            "idempotencyKey": "x",
            "lines": [{"sku": f"S{n}", "quantity": 1} for n in range(lines)],
        }
    }


HOSTILE: list[tuple[str, str, dict[str, Any]]] = [
    ("doubling fragments, 20 levels", doubling(20), restock_vars(1)),
    ("doubling fragments, 30 levels", doubling(30), restock_vars(1)),
    ("chain of 300 fragments", chain(300), restock_vars(1)),
    ("30,000 lines in variables", RESTOCK, restock_vars(30_000)),
]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.3f} ms"


def timings(run: Callable[[int], float], runs: int) -> tuple[float, float]:
    """Median and max over ``runs`` calls of ``run(i)`` (seconds), after one warm-up."""
    run(-1)
    times = [run(i) for i in range(runs)]
    return statistics.median(times), max(times)


def in_process(runs: int) -> None:
    settings = Settings()
    schema = build_schema(settings)
    loop = asyncio.new_event_loop()
    print(f"in process, median / max of {runs} uncached runs")
    messages: dict[str, str] = {}
    for name, document, variables in HOSTILE:

        def refuse(
            i: int, name: str = name, document: str = document, variables: Any = variables
        ) -> float:
            text = f"{document}\n# run {i}"
            start = time.perf_counter()
            result = loop.run_until_complete(schema.execute(text, variable_values=variables))
            elapsed = time.perf_counter() - start
            assert result.errors and result.data is None, result
            messages[name] = result.errors[0].message
            return elapsed

        median, worst = timings(refuse, runs)
        print(f"  refuse {name:32} {ms(median)} / {ms(worst)}  {messages[name][:60]!r}")

    # Validation alone, with the rules the served schema runs (specified + guard + Strawberry's).
    rules = (
        *specified_rules,
        query_guard_rule(
            max_depth=settings.max_query_depth,
            max_aliases=settings.max_aliases,
            max_cost=settings.max_query_cost,
        ),
    )
    for name, document in (
        ("README ledger query", README_QUERY),
        ("ledger page of 500, every field", LEDGER_PAGE),
    ):

        def validate(i: int, document: str = document) -> float:
            text = f"{document}\n# run {i}"
            start = time.perf_counter()
            errors = validate_document(schema._schema, parse(text), rules)
            elapsed = time.perf_counter() - start
            assert not errors, errors
            return elapsed

        median, worst = timings(validate, runs)
        print(f"  parse + validate {name:30} {ms(median)} / {ms(worst)}")
    loop.close()


def old_guards(max_levels: int) -> None:
    """The doubling documents of 10..max_levels levels under the guards used before."""
    schema = build_schema(Settings())
    rules = (
        *specified_rules,
        *QueryDepthLimiter(max_depth=12).validation_rules,
        *MaxAliasesLimiter(max_alias_count=50).validation_rules,
    )
    print("old guards (Strawberry's QueryDepthLimiter + MaxAliasesLimiter), validation")
    for levels in range(10, max_levels + 1, 2):
        document = parse(doubling(levels))
        start = time.perf_counter()
        validate_document(schema._schema, document, rules)
        print(f"  doubling fragments, {levels} levels {ms(time.perf_counter() - start)}")


def over_http(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKLEDGER_")}
        env.update(STOCKLEDGER_DATA_DIR=str(Path(tmp) / "data"), STOCKLEDGER_LOG_LEVEL="WARNING")
        command = [sys.executable, "-m", "stockledger.cli", "serve", "--port", str(port)]
        server = subprocess.Popen(command, env=env, cwd=tmp, stdout=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(base)
            print(f"over HTTP (stockledger serve, embedded), median / max of {runs} runs")
            secret = (Path(tmp) / "data" / "admin.key").read_text().strip()  # the bootstrap key
            headers = {"authorization": f"Bearer {secret}"}
            with httpx.Client(base_url=base, timeout=600, headers=headers) as client:
                for name, document, variables in HOSTILE:
                    health = _HealthPoller(base)
                    health.start()
                    times = []
                    for i in range(runs):
                        body = json.dumps(
                            {"query": f"{document}\n# run {i}", "variables": variables},
                            separators=(",", ":"),
                        )
                        start = time.perf_counter()
                        response = client.post(
                            "/graphql", content=body, headers={"content-type": "application/json"}
                        )
                        times.append(time.perf_counter() - start)
                        assert response.json()["data"] is None, response.text
                    slowest = health.stop()
                    print(
                        f"  refuse {name:32} {ms(statistics.median(times))} / {ms(max(times))}"
                        f"  /healthz meanwhile: {health.count} answers, slowest {ms(slowest)}"
                    )
        finally:
            server.terminate()
            server.wait(30)


class _HealthPoller(threading.Thread):
    """Asks ``/healthz`` every 10 ms until stopped; ``stop()`` returns the slowest answer."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.done = threading.Event()
        self.count = 0
        self.slowest = 0.0

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=600) as client:
            while not self.done.is_set():
                start = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                self.slowest = max(self.slowest, time.perf_counter() - start)
                self.count += 1
                self.done.wait(0.01)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.slowest


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"stockledger serve did not get ready at {base} within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per document (default 20)")
    parser.add_argument("--http", action="store_true", help="also over HTTP against a server")
    parser.add_argument("--old", type=int, metavar="N", help="the old guards, 10..N levels")
    args = parser.parse_args()
    in_process(args.runs)
    if args.http:
        over_http(args.runs)
    if args.old:
        old_guards(args.old)


if __name__ == "__main__":
    main()
