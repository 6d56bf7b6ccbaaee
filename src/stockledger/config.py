"""Settings, read once from the environment (``STOCKLEDGER_*``) with pydantic-settings.

Every knob of the service lives here; nothing else reads ``os.environ``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from limits import parse_many
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings. Each field is read from ``STOCKLEDGER_<FIELD NAME>``.

    With no ``database_url`` the service uses the embedded default: a SQLite file
    ``stockledger.sqlite3`` under ``data_dir``; with no ``redis_url`` it uses an
    in-process fakeredis (one worker only).
    """

    model_config = SettingsConfigDict(env_prefix="STOCKLEDGER_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL, e.g. mysql+asyncmy://root@127.0.0.1:3306/stockledger. "
        "Unset: the embedded SQLite file under data_dir.",
    )
    redis_url: str | None = Field(
        default=None,
        description="redis:// URL, e.g. redis://127.0.0.1:6379/0. Unset: in-process fakeredis.",
    )
    data_dir: Path = Field(
        default=Path("data"), description="Where the embedded SQLite file lives."
    )
    org_id: str = Field(default="default", description="The tenant of v1 (one org).")

    default_reservation_ttl_seconds: int = Field(default=1800, ge=1)
    max_reservation_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1)

    # Batch retries on deadlock, lock wait timeout, duplicate key or a lost connection (MySQL
    # 1213, 1205, 1062, MariaDB 1020): attempts of one batch before it is split in halves; a
    # command alone runs again until its lock wait runs out. Backoff with full jitter.
    retry_max_attempts: int = Field(default=3, ge=1)
    retry_initial_backoff_seconds: float = Field(default=0.005, gt=0)
    retry_max_backoff_seconds: float = Field(default=0.25, gt=0)

    # Group commit (ARCHITECTURE section 12): writer connections per process (one on SQLite),
    # and a batch's caps in commands and in lines.
    write_connections: int = Field(default=4, ge=1)
    batch_max_commands: int = Field(default=256, ge=1)
    batch_max_rows: int = Field(default=5000, ge=1)
    id_block_size: int = Field(default=100, ge=1)

    # Server-side bound on one statement's row-lock wait (seconds; InnoDB's minimum is 1), so no
    # coroutine is ever cancelled mid-query; a write's total time is bounded by the lock wait.
    db_lock_wait_timeout_seconds: int = Field(default=1, ge=1)
    db_pool_size: int = Field(default=20, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0)

    # Redis locks (ARCHITECTURE section 4): a lock's lease (a live holder extends it, so a dead
    # one's locks stop blocking within it) and a write's total wait, retries included.
    locks_enabled: bool = True
    lock_ttl_seconds: float = Field(default=3.0, gt=0)
    lock_wait_seconds: float = Field(default=5.0, gt=0)
    redis_pool_size: int = Field(default=64, ge=1)

    # Expiry sweeper (ARCHITECTURE section 6).
    sweep_interval_seconds: float = Field(default=1.0, gt=0)
    sweep_db_scan_interval_seconds: float = Field(default=30.0, gt=0)
    sweep_batch_size: int = Field(default=200, ge=1)

    # GraphQL API limits (ARCHITECTURE section 9 and 11).
    introspection_enabled: bool = True
    graphiql_enabled: bool = True
    max_query_depth: int = Field(default=12, ge=1)
    max_aliases: int = Field(default=50, ge=1)
    # A document's cost (resolvers.guards): 1 per field, a page's selection counted `first`
    # times (500 when a variable), fragments counted at every spread. A page of 500 ledger
    # entries with every field costs 11,501, so four such pages pass; fragments spreading each
    # other twice per level (2^levels fields) are refused from 16 levels, 11 under a page.
    max_query_cost: int = Field(default=50_000, ge=1)
    max_tokens: int = Field(default=5000, ge=1)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    # Slow clients (issue 10): a request body must arrive within this (seconds, else 408),
    # and at most this many connections are open per process (more get 503: uvicorn's
    # limit_concurrency). Headers have no timeout of their own in uvicorn: run behind a
    # reverse proxy that bounds them (README).
    body_read_timeout_seconds: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=2048, ge=1)
    # Authentication (ARCHITECTURE section 13): "required" (a Bearer API key on /graphql) or
    # "off" (every request is ADMIN; `serve` allows it on a loopback address only).
    auth: Literal["required", "off"] = "required"
    # Origins allowed to call the API from a browser (CORS), comma-separated; empty: none.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Requests per API key (ARCHITECTURE section 13), in the `limits` library's notation:
    # "1000/second", "10/second;500/minute" (each must pass); empty turns rate limits off.
    rate_limit: str = "1000/second"
    # Locations (ARCHITECTURE section 14): true makes every write naming an unregistered
    # location answer LocationUnavailableError instead of registering it as a WAREHOUSE.
    require_registered_locations: bool = False
    # Events (ARCHITECTURE section 15): every write inserts its events into the outbox in its
    # transaction; false turns that off (nothing is published then).
    outbox: bool = True
    # The relay (in `serve`, or `stockledger relay` alone): how often it looks for new events
    # (seconds), its lease per org (seconds), how long an id gap waits for a late commit before
    # the relay passes it (seconds), and how long delivered events are kept (seconds).
    relay_interval_seconds: float = Field(default=0.2, gt=0)
    relay_lease_seconds: float = Field(default=10.0, gt=0)
    relay_gap_seconds: float = Field(default=60.0, gt=0)
    outbox_retention_seconds: float = Field(default=7 * 86400, gt=0)
    # Webhooks: endpoint URLs that resolve to private or loopback addresses are refused unless
    # this is true (SSRF); each attempt's timeout (seconds); give up (DEAD) after this long.
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)
    webhook_give_up_seconds: float = Field(default=86400.0, gt=0)
    # Subscriptions (graphql-transport-ws on /graphql): per connection, and per API key.
    max_subscriptions_per_connection: int = Field(default=20, ge=1)
    max_connections_per_key: int = Field(default=50, ge=1)

    # SIGTERM ends `serve` within this bound (seconds): in-flight requests get half of it,
    # the sweeper and the write batches a quarter; past it the process exits anyway.
    shutdown_timeout_seconds: float = Field(default=30.0, gt=0)

    log_level: str = "INFO"
    log_format: str = Field(
        default="auto", description="json, console, or auto (json unless a TTY)."
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_notation(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        try:
            items = parse_many(value)
        except ValueError as exc:
            raise ValueError(
                f"STOCKLEDGER_RATE_LIMIT={value!r} is not a rate limit in the `limits` notation "
                f"(e.g. '1000/second' or '10/second;500/minute', empty for none): {exc}"
            ) from None
        if any(item.amount < 1 for item in items):
            raise ValueError(
                f"STOCKLEDGER_RATE_LIMIT={value!r} allows no request at all: give at least "
                "1 per period, or an empty value to turn rate limits off"
            )
        return value

    @field_validator("database_url", "redis_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def embedded_database(self) -> bool:
        """True when no database URL is set and the SQLite file is used."""
        return self.database_url is None

    def resolved_database_url(self) -> str:
        """The database URL in force: the setting, or ``sqlite+aiosqlite:///<data_dir>/stockledger.sqlite3``."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'stockledger.sqlite3').resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first call."""
    return Settings()
