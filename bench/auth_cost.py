"""What access control costs over HTTP (issue 10): G (``stockledger serve`` under wrk) on the
spread and balance scenarios of ``bench/benchmark.py``, with keys off, with keys (auth and
tenancy), and with keys plus a Redis rate limit that never binds, each a fresh server, in turns
(``--rounds``), in one run; the best of the rounds counts, as a ratio to keys off.

Needs wrk, MariaDB and Redis. ``.venv/bin/python bench/auth_cost.py --duration 10``.
"""

from __future__ import annotations

import argparse

from variants import compare

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
    print(
        compare(
            MODES,
            SCENARIOS,
            database=args.database,
            redis=args.redis,
            duration=args.duration,
            connections=args.connections,
            rounds=args.rounds,
        )
    )


if __name__ == "__main__":
    main()
