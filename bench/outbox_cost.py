"""What the events cost over HTTP (issue 12): G on the spread and hot scenarios of
``bench/benchmark.py`` with the outbox off (``STOCKLEDGER_OUTBOX=false``) and on (every write
inserts its events; the server's relay publishes them to Redis), each a fresh server, in turns,
in one run; the best round counts, as a ratio to the outbox off. With the outbox on it also
gives the outbox lag during each measurement: p50 / p99 of ``inventory_outbox_lag_seconds``
(commit to publish), as the upper bounds of their histogram buckets.

Needs wrk, MariaDB and Redis. ``.venv/bin/python bench/outbox_cost.py --duration 10``.
"""

from __future__ import annotations

from benchmark import batch_buckets, quantile_bound
from variants import main

MODES = {
    "outbox off": {"STOCKLEDGER_OUTBOX": "false", "STOCKLEDGER_RATE_LIMIT": ""},
    "outbox on (relay publishing)": {"STOCKLEDGER_RATE_LIMIT": ""},
}
SCENARIOS = ("spread", "hot")


def outbox_lag(before: str, after: str) -> str:
    """The lag quantiles of what the relay published between two /metrics texts."""
    lag = "inventory_outbox_lag_seconds"
    a, b = batch_buckets(before, lag), batch_buckets(after, lag)
    if not b or b.get(float("inf"), 0) == a.get(float("inf"), 0):
        return ""
    p50, p99 = quantile_bound(a, b, 0.5), quantile_bound(a, b, 0.99)
    return f"lag p50 <= {p50 * 1000:g} ms, p99 <= {p99 * 1000:g} ms"


if __name__ == "__main__":
    main(__doc__, MODES, SCENARIOS, "stockledger_outbox_cost", outbox_lag)
