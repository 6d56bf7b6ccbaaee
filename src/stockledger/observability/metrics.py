"""Every Prometheus collector of stockledger, in one place (ARCHITECTURE section 10).

Counters end in ``_total``, histograms in ``_seconds``. No label takes a SKU, location,
reference or idempotency key (unbounded cardinality). With several uvicorn workers set
``PROMETHEUS_MULTIPROC_DIR`` and the exposition collects every process (prometheus-client's
multiprocess mode).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Lock waits are milliseconds on a quiet SKU and seconds on a hot one.
_LOCK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

RESERVE_TOTAL = Counter(
    "inventory_reserve_total",
    "Reserve calls by outcome (success, insufficient_stock, replayed, validation_error, ...).",
    ["status"],
)
DEDUCT_TOTAL = Counter(
    "inventory_deduct_total",
    "Deduct calls by outcome (success, insufficient_stock, replayed, not_active, ...).",
    ["status"],
)
IDEMPOTENT_HIT_TOTAL = Counter(
    "inventory_idempotent_hit_total",
    "Writes answered from an idempotency key already done (replays), any operation.",
)
STOCK_MOVEMENTS_TOTAL = Counter(
    "stock_movements_total",
    "Write calls by movement type (restock, adjust, reserve, release, deduct, extend, expire), "
    "result (success, replayed, or the error code) and reason (the adjust reason class).",
    ["type", "result", "reason"],
)
LOCK_WAIT_SECONDS = Histogram(
    "inventory_lock_wait_seconds",
    "Time to take all Redis locks of one write (seconds), timeouts included.",
    buckets=_LOCK_BUCKETS,
)
LOCK_TIMEOUTS_TOTAL = Counter(
    "inventory_lock_timeouts_total",
    "Lock waits that ran out: the call answers LOCK_TIMEOUT, or INSUFFICIENT_STOCK when it "
    "then finds the stock short.",
)
LOCK_LOST_TOTAL = Counter(
    "inventory_lock_lost_total",
    "Redis locks found gone or taken over at release (lease ran out mid-write). "
    "Harmless for correctness: the database row locks still held.",
)
REDIS_DEGRADED_TOTAL = Counter(
    "inventory_redis_degraded_total",
    "Operations that ran without Redis (locks or expiry index) because Redis did not answer.",
)
RATE_LIMITED_TOTAL = Counter(
    "inventory_rate_limited_total",
    "GraphQL requests refused with HTTP 429: their API key was past STOCKLEDGER_RATE_LIMIT "
    "(ARCHITECTURE section 13). A check that Redis did not answer lets the request through "
    "and counts in inventory_redis_degraded_total instead.",
)
TRANSACTION_RETRIES_TOTAL = Counter(
    "inventory_transaction_retries_total",
    "Whole-transaction retries by reason (deadlock, lock_wait_timeout, record_changed, ...).",
    ["reason"],
)
RESERVATIONS_EXPIRED_TOTAL = Counter(
    "inventory_reservations_expired_total",
    "Reservations expired by the service (sweeper, database scan, or found past due).",
)
EXPIRY_BACKLOG_SECONDS = Histogram(
    "inventory_expiry_lag_seconds",
    "How late a reservation was expired: now - expires_at at expiry (seconds).",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
TRANSFER_DURATION_SECONDS = Histogram(
    "inventory_transfer_duration_seconds",
    "How long an in-transit transfer took from sent to fully received (seconds).",
    # Minutes (a van across town) to weeks (a container).
    buckets=(60, 600, 3600, 4 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400),
)
GRAPHQL_REQUEST_SECONDS = Histogram(
    "inventory_graphql_request_seconds",
    "GraphQL request latency (seconds) by operation type (query, mutation), root field "
    "(reserve, reserveMany, balance, ...; multiple, introspection, unknown) and outcome "
    "(ok, domain_error, error).",
    ["operation_type", "field", "outcome"],
)
BATCH_SIZE = Histogram(
    "inventory_batch_size",
    "Commands per committed write batch (group commit, ARCHITECTURE section 12).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
BATCH_SECONDS = Histogram(
    "inventory_batch_seconds",
    "Time of one committed write batch (seconds): Redis claim, transaction, lock release.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
UNEXPECTED_ERRORS_TOTAL = Counter(
    "inventory_unexpected_errors_total",
    "GraphQL errors answered as 'Unexpected error.' (masked: a bug or a failure with no typed "
    "answer), reads and writes alike; the log has each traceback.",
)

# Events (ARCHITECTURE section 15).
OUTBOX_LAG_SECONDS = Histogram(
    "inventory_outbox_lag_seconds",
    "From an event's commit (its created_at) to its publication by the relay (seconds).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
OUTBOX_PENDING = Gauge(
    "inventory_outbox_pending",
    "Committed events the relay has not published yet, as of its last pass.",
)
WEBHOOK_DELIVERIES_TOTAL = Counter(
    "inventory_webhook_deliveries_total",
    "Webhook delivery attempts, by result (delivered, failed, dead, circuit_open).",
    ["result"],
)
SUBSCRIPTIONS_ACTIVE = Gauge(
    "inventory_subscriptions_active",
    "GraphQL subscriptions open on this process.",
)
