#!/usr/bin/env bash
# Requests per second of `stockledger serve` on the embedded default (SQLite + fakeredis), one
# worker, under wrk at 32 connections: single-line reserves spread over 10,000 SKUs and balance
# queries. Needs wrk (Debian package) and the project installed in .venv.
#   bash bench/embedded_wrk.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8810}
DATA=$(mktemp -d)
trap 'kill "$SERVER" 2>/dev/null || true; rm -rf "$DATA"' EXIT
STOCKLEDGER_DATA_DIR=$DATA STOCKLEDGER_LOG_LEVEL=WARNING "$BIN/stockledger" serve --port "$PORT" \
  >/dev/null 2>&1 &
SERVER=$!
for _ in $(seq 1 100); do curl -sf "localhost:$PORT/readyz" >/dev/null && break; sleep 0.2; done
"$BIN/python" - "$PORT" <<'PY'
import sys, httpx
q = "mutation($i: RestockInput!){restock(input:$i){__typename}}"
url = f"http://127.0.0.1:{sys.argv[1]}/graphql"
with httpx.Client(timeout=60) as c:
    for start in range(0, 10000, 500):
        lines = [{"sku": f"S{i:05d}", "location": "bench", "quantity": 100_000_000}
                 for i in range(start, start + 500)]
        r = c.post(url, json={"query": q, "variables": {"i": {"idempotencyKey": f"seed-{start}", "lines": lines}}})
        assert "RestockSuccess" in r.text, r.text
PY
for scenario in spread balance; do
  echo "== $scenario"
  SCENARIO=$scenario SKUS=10000 RUN="emb$RANDOM" wrk -t1 -c32 -d10s --latency \
    -s bench/wrk/graphql.lua "http://127.0.0.1:$PORT/graphql" | grep -E "Requests/sec|WRKJSON"
done
