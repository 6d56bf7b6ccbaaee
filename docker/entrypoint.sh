#!/bin/sh
# Container entrypoint: with a MySQL URL, migrate first (serve refuses a database behind the
# migrations); the embedded default migrates its SQLite file itself.
set -eu
if [ "${1:-}" = "serve" ]; then
  if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
  fi
  if [ -n "${STOCKLEDGER_DATABASE_URL:-}" ]; then
    stockledger migrate
  fi
fi
exec stockledger "$@"
