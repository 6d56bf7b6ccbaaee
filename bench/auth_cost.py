"""What access control costs over HTTP (issue 10): G (``stockledger serve`` under wrk) on the
spread and balance scenarios of ``bench/benchmark.py``, with keys off, with keys (auth and
tenancy), and with keys plus a Redis rate limit that never binds, each a fresh server, in turns
(``--rounds``), in one run; the best of the rounds counts, as a ratio to keys off.

Needs wrk, MariaDB and Redis. ``.venv/bin/python bench/auth_cost.py --duration 10``.
"""

from __future__ import annotations

from variants import main

MODES = {
    "auth off": {"STOCKLEDGER_AUTH": "off", "STOCKLEDGER_RATE_LIMIT": ""},
    "keys": {"STOCKLEDGER_RATE_LIMIT": ""},
    "keys + rate limit (Redis)": {"STOCKLEDGER_RATE_LIMIT": "1000000/second"},
}
SCENARIOS = ("spread", "balance")


if __name__ == "__main__":
    main(__doc__, MODES, SCENARIOS, "stockledger_auth_cost")
