"""What the events cost over HTTP (issue 12): G on the spread and hot scenarios of
``bench/benchmark.py`` with the outbox off (``STOCKLEDGER_OUTBOX=false``) and on (every write
inserts its events; the server's relay publishes them to Redis), each a fresh server, in turns,
in one run; the best round counts, as a ratio to the outbox off. With the outbox on it also
gives the outbox lag during each measurement: p50 / p99 of ``inventory_outbox_lag_seconds``
(commit to publish), as the upper bounds of their histogram buckets.

Needs wrk, MariaDB and Redis. ``.venv/bin/python bench/outbox_cost.py --duration 10``.
"""

from __future__ import annotations

import argparse

from benchmark import quantile_bound
from prometheus_client.parser import text_string_to_metric_families
from variants import compare

MODES = {
    "outbox off": {"STOCKLEDGER_OUTBOX": "false", "STOCKLEDGER_RATE_LIMIT": ""},
    "outbox on (relay publishing)": {"STOCKLEDGER_RATE_LIMIT": ""},
}
SCENARIOS = ("spread", "hot")


def lag_buckets(text: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "inventory_outbox_lag_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    out[float(sample.labels["le"])] = sample.value
    return out


def outbox_lag(before: str, after: str) -> str:
    """The lag quantiles of what the relay published between two /metrics texts."""
    a, b = lag_buckets(before), lag_buckets(after)
    if not b or b.get(float("inf"), 0) == a.get(float("inf"), 0):
        return ""
    p50, p99 = quantile_bound(a, b, 0.5), quantile_bound(a, b, 0.99)
    return f"lag p50 <= {p50 * 1000:g} ms, p99 <= {p99 * 1000:g} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database", default="stockledger_outbox_cost")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(
        compare(
            MODES,
            SCENARIOS,
            database=args.database,
            redis=args.redis,
            duration=args.duration,
            connections=args.connections,
            rounds=args.rounds,
            extra=outbox_lag,
        )
    )


if __name__ == "__main__":
    main()
