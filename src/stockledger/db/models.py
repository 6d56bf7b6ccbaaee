"""The tables of ARCHITECTURE section 2, as SQLAlchemy Core metadata.

Migrations (``db/migrations``) create exactly this; ``tests/test_migrations.py`` checks there is
no drift. Every table carries ``org_id`` (the tenant; v1 uses one org, ``default``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKeyConstraint,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
    text,
)

from stockledger.db.types import BigId, ExactString, LongText, Timestamp
from stockledger.domain.model import (
    LEDGER_EVENT_TYPES,
    LOCATION_TYPES,
    RESERVATION_STATUSES,
    TRANSFER_STATUSES,
)

NAME_LENGTH = 255  # SKU, location, reference type/id, reason, idempotency key (section 11)
ORG_LENGTH = 64

naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
}
metadata = MetaData(naming_convention=naming_convention)

# MySQL table options: InnoDB for row locks and CHECKs, utf8mb4 throughout.
_mysql_opts: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


inventory_balance = Table(
    "inventory_balance",
    metadata,
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("location", ExactString(NAME_LENGTH), nullable=False),
    Column("sku", ExactString(NAME_LENGTH), nullable=False),
    Column("on_hand", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # Derived figures the rules keep (migration 0007): units CONFIRMED reservations hold, and
    # units of open transfers to this balance still in transit.
    Column("committed", BigInteger, nullable=False, server_default=text("0")),
    Column("incoming", BigInteger, nullable=False, server_default=text("0")),
    # The reorder point (NULL: none) and the stored alert state (migration 0008, section 15).
    Column("reorder_minimum", BigInteger, nullable=True),
    Column("reorder_quantity", BigInteger, nullable=True),
    Column("reorder_maximum", BigInteger, nullable=True),
    Column("alert_state", String(8), nullable=False, server_default=text("'OK'")),
    PrimaryKeyConstraint("org_id", "location", "sku"),
    CheckConstraint("on_hand >= 0", name="on_hand_nonnegative"),
    CheckConstraint("reserved >= 0", name="reserved_nonnegative"),
    CheckConstraint("reserved <= on_hand", name="reserved_within_on_hand"),
    Index("ix_inventory_balance_org_sku", "org_id", "sku"),
    **_mysql_opts,
)

inventory_ledger = Table(
    "inventory_ledger",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("location", ExactString(NAME_LENGTH), nullable=False),
    Column("sku", ExactString(NAME_LENGTH), nullable=False),
    Column("event_type", String(16), nullable=False),
    Column("on_hand_delta", BigInteger, nullable=False),
    Column("reserved_delta", BigInteger, nullable=False),
    Column("on_hand_after", BigInteger, nullable=False),
    Column("reserved_after", BigInteger, nullable=False),
    Column("reservation_id", BigInteger, nullable=True),
    Column("ref_type", ExactString(NAME_LENGTH), nullable=True),
    Column("ref_id", ExactString(NAME_LENGTH), nullable=True),
    Column("reason", ExactString(NAME_LENGTH), nullable=True),
    Column("idempotency_key", ExactString(NAME_LENGTH), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    # The transfer a TRANSFER_OUT / TRANSFER_IN entry moves units for (migration 0006).
    Column("transfer_id", BigInteger, nullable=True),
    CheckConstraint(_in("event_type", LEDGER_EVENT_TYPES), name="event_type_known"),
    Index("ix_inventory_ledger_balance", "org_id", "location", "sku", "id"),
    Index("ix_inventory_ledger_sku", "org_id", "sku", "id"),
    Index("ix_inventory_ledger_created", "org_id", "created_at"),
    Index("ix_inventory_ledger_reservation", "reservation_id", "id"),
    Index("ix_inventory_ledger_reference", "org_id", "ref_type", "ref_id", "id"),
    Index("ix_inventory_ledger_key", "org_id", "idempotency_key", "id"),
    Index("ix_inventory_ledger_transfer", "transfer_id", "id"),
    sqlite_autoincrement=True,  # ids never reused, so ledger ids are monotonic
    **_mysql_opts,
)

reservation = Table(
    "reservation",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("status", String(16), nullable=False),
    Column("ref_type", ExactString(NAME_LENGTH), nullable=True),
    Column("ref_id", ExactString(NAME_LENGTH), nullable=True),
    # NULL once CONFIRMED (no expiry; migration 0005).
    Column("expires_at", Timestamp, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint(_in("status", RESERVATION_STATUSES), name="status_known"),
    Index("ix_reservation_status_expires", "status", "expires_at"),
    Index("ix_reservation_reference", "org_id", "ref_type", "ref_id", "status"),
    sqlite_autoincrement=True,
    **_mysql_opts,
)

reservation_line = Table(
    "reservation_line",
    metadata,
    Column("reservation_id", BigInteger, nullable=False),
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("location", ExactString(NAME_LENGTH), nullable=False),
    Column("sku", ExactString(NAME_LENGTH), nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("deducted", BigInteger, nullable=False),
    Column("released", BigInteger, nullable=False),
    PrimaryKeyConstraint("reservation_id", "location", "sku"),
    ForeignKeyConstraint(["reservation_id"], ["reservation.id"], ondelete="CASCADE"),
    CheckConstraint("quantity > 0", name="quantity_positive"),
    CheckConstraint("deducted >= 0 AND released >= 0", name="counts_nonnegative"),
    CheckConstraint("deducted + released <= quantity", name="within_quantity"),
    **_mysql_opts,
)

idempotency_key = Table(
    "idempotency_key",
    metadata,
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("idempotency_key", ExactString(NAME_LENGTH), nullable=False),
    Column("operation", String(32), nullable=False),
    Column("request_hash", String(64), nullable=False),
    # The result is found through the ledger entries that carry the key; this column holds
    # what the ledger cannot tell (the reservation an extend acted on, the reservations a
    # confirm acted on, comma-separated; 1024 since migration 0005).
    Column("result_ref", String(1024), nullable=True),
    Column("created_at", Timestamp, nullable=False),
    PrimaryKeyConstraint("org_id", "idempotency_key"),
    **_mysql_opts,
)

# Locations (ARCHITECTURE section 14): what every balance's ``location`` names, per org.
location = Table(
    "location",
    metadata,
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("code", ExactString(NAME_LENGTH), nullable=False),
    Column("name", ExactString(NAME_LENGTH), nullable=False),
    Column("type", String(16), nullable=False),
    Column("active", Boolean(create_constraint=False), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    PrimaryKeyConstraint("org_id", "code"),
    CheckConstraint(_in("type", LOCATION_TYPES), name="type_known"),
    **_mysql_opts,
)

# Transfers between locations; ids from the ``transfer`` id block, like reservations'.
transfer = Table(
    "transfer",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=False),
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("status", String(20), nullable=False),
    Column("from_location", ExactString(NAME_LENGTH), nullable=False),
    Column("to_location", ExactString(NAME_LENGTH), nullable=False),
    Column("ref_type", ExactString(NAME_LENGTH), nullable=True),
    Column("ref_id", ExactString(NAME_LENGTH), nullable=True),
    Column("reason", ExactString(NAME_LENGTH), nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint(_in("status", TRANSFER_STATUSES), name="status_known"),
    # Listing by org (newest first) and the open ones' incoming at a destination.
    Index("ix_transfer_org", "org_id", "id"),
    Index("ix_transfer_open", "org_id", "status", "to_location"),
    **_mysql_opts,
)

transfer_line = Table(
    "transfer_line",
    metadata,
    Column("transfer_id", BigInteger, nullable=False),
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("sku", ExactString(NAME_LENGTH), nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("received", BigInteger, nullable=False),
    Column("returned", BigInteger, nullable=False),
    PrimaryKeyConstraint("transfer_id", "sku"),
    ForeignKeyConstraint(["transfer_id"], ["transfer.id"], ondelete="CASCADE"),
    CheckConstraint("quantity > 0", name="quantity_positive"),
    CheckConstraint("received >= 0 AND returned >= 0", name="counts_nonnegative"),
    CheckConstraint("received + returned <= quantity", name="within_quantity"),
    Index("ix_transfer_line_sku", "org_id", "sku"),
    **_mysql_opts,
)

# The transactional outbox (ARCHITECTURE section 15): a write's events, inserted in its
# transaction; ``payload`` is the Standard Webhooks body (JSON) that webhooks and subscriptions
# carry, the id its webhook-id.
outbox_event = Table(
    "outbox_event",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("payload", LongText, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_outbox_event_org", "org_id", "id"),
    sqlite_autoincrement=True,  # ids never reused: the relay reads them in order
    **_mysql_opts,
)

# Where each org's relay is: under a lease (one relay per org at a time), up to which event.
relay_state = Table(
    "relay_state",
    metadata,
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("owner", String(64), nullable=True),
    Column("lease_expires_at", Timestamp, nullable=True),
    Column("last_event_id", BigInteger, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    PrimaryKeyConstraint("org_id"),
    **_mysql_opts,
)

webhook_endpoint = Table(
    "webhook_endpoint",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("url", ExactString(2048), nullable=False),
    # Space-separated EventType names.
    Column("event_types", String(512), nullable=False),
    # The whsec_ signing secret (Standard Webhooks): the service must sign with it.
    Column("secret", String(128), nullable=False),
    Column("active", Boolean(create_constraint=False), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("deleted_at", Timestamp, nullable=True),
    Index("ix_webhook_endpoint_org", "org_id", "id"),
    sqlite_autoincrement=True,
    **_mysql_opts,
)

webhook_delivery = Table(
    "webhook_delivery",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("endpoint_id", BigInteger, nullable=False),
    Column("event_id", BigInteger, nullable=False),
    Column("event_type", String(32), nullable=False),
    # PENDING, DELIVERED, FAILED (will retry), DEAD (gave up).
    Column("status", String(16), nullable=False),
    Column("attempts", BigInteger, nullable=False),
    Column("last_status_code", BigInteger, nullable=True),
    Column("last_error", String(1024), nullable=True),
    Column("next_attempt_at", Timestamp, nullable=True),
    Column("delivered_at", Timestamp, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_delivery_endpoint_event"),
    Index("ix_webhook_delivery_due", "status", "next_attempt_at"),
    Index("ix_webhook_delivery_endpoint", "org_id", "endpoint_id", "id"),
    sqlite_autoincrement=True,
    **_mysql_opts,
)

# Sequences for hi/lo id blocks (ARCHITECTURE section 12): ``next_value`` is the first id not
# yet handed out; a writer moves it by a block in a short transaction of its own.
id_block = Table(
    "id_block",
    metadata,
    Column("name", String(32), nullable=False),
    Column("next_value", BigInteger, nullable=False),
    PrimaryKeyConstraint("name"),
    **_mysql_opts,
)

# API keys (ARCHITECTURE section 13): the secret's SHA-256, never the secret; scopes as a
# space-separated list of the contract's Scope names.
api_key = Table(
    "api_key",
    metadata,
    Column("id", BigId, autoincrement=True, nullable=False),
    Column("org_id", String(ORG_LENGTH), nullable=False),
    Column("name", ExactString(NAME_LENGTH), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("scopes", String(255), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp, nullable=True),
    Column("revoked_at", Timestamp, nullable=True),
    Column("last_used_at", Timestamp, nullable=True),
    PrimaryKeyConstraint("id"),
    UniqueConstraint("secret_sha256", name="uq_api_key_secret_sha256"),
    Index("ix_api_key_org", "org_id", "id"),
    sqlite_autoincrement=True,
    **_mysql_opts,
)

# Triggers that make the ledger append-only in the database itself (ARCHITECTURE section 2).
LEDGER_TRIGGERS = {
    "mysql": [
        "CREATE TRIGGER inventory_ledger_no_update BEFORE UPDATE ON inventory_ledger "
        "FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'inventory_ledger is append-only'",
        "CREATE TRIGGER inventory_ledger_no_delete BEFORE DELETE ON inventory_ledger "
        "FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'inventory_ledger is append-only'",
    ],
    "sqlite": [
        "CREATE TRIGGER inventory_ledger_no_update BEFORE UPDATE ON inventory_ledger "
        "BEGIN SELECT RAISE(ABORT, 'inventory_ledger is append-only'); END",
        "CREATE TRIGGER inventory_ledger_no_delete BEFORE DELETE ON inventory_ledger "
        "BEGIN SELECT RAISE(ABORT, 'inventory_ledger is append-only'); END",
        # INSERT OR REPLACE deletes the old row without firing DELETE triggers unless
        # recursive_triggers is on (SQLite docs, "ON CONFLICT clause", REPLACE): refuse an
        # insert onto an existing id outright. MySQL's REPLACE fires the DELETE trigger.
        "CREATE TRIGGER inventory_ledger_no_replace BEFORE INSERT ON inventory_ledger "
        "WHEN NEW.id IS NOT NULL AND EXISTS (SELECT 1 FROM inventory_ledger WHERE id = NEW.id) "
        "BEGIN SELECT RAISE(ABORT, 'inventory_ledger is append-only'); END",
    ],
}
# The trigger names each dialect gets, read off the statements above.
LEDGER_TRIGGER_NAMES = {
    dialect: tuple(statement.split()[2] for statement in statements)
    for dialect, statements in LEDGER_TRIGGERS.items()
}
