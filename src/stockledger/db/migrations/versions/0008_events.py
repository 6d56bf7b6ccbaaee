"""Events (part EVENTS, ARCHITECTURE section 15): reorder points and the stored alert state on
each balance, the transactional outbox, the relay's state per org, webhook endpoints and their
deliveries.

Every balance starts in alert state OK (section 15: "starting at OK when the balance is
created"); the first write that moves it settles its state. Idempotent: a run that stopped
half-way runs again.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-17
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from stockledger.db.types import BigId, ExactString, LongText, Timestamp

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

MYSQL: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}
BALANCE_COLUMNS = ("reorder_minimum", "reorder_quantity", "reorder_maximum", "alert_state")
TABLES = ("webhook_delivery", "webhook_endpoint", "relay_state", "outbox_event")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    present = {c["name"] for c in inspector.get_columns("inventory_balance")}
    for name in BALANCE_COLUMNS[:3]:
        if name not in present:
            op.add_column("inventory_balance", sa.Column(name, sa.BigInteger(), nullable=True))
    if "alert_state" not in present:
        op.add_column(
            "inventory_balance",
            sa.Column("alert_state", sa.String(8), nullable=False, server_default=sa.text("'OK'")),
        )
    if not inspector.has_table("outbox_event"):
        op.create_table(
            "outbox_event",
            sa.Column("id", BigId, autoincrement=True, nullable=False),
            sa.Column("org_id", sa.String(64), nullable=False),
            sa.Column("event_type", sa.String(32), nullable=False),
            sa.Column("payload", LongText, nullable=False),
            sa.Column("created_at", Timestamp, nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.Index("ix_outbox_event_org", "org_id", "id"),
            sqlite_autoincrement=True,
            **MYSQL,
        )
    if not inspector.has_table("relay_state"):
        op.create_table(
            "relay_state",
            sa.Column("org_id", sa.String(64), nullable=False),
            sa.Column("owner", sa.String(64), nullable=True),
            sa.Column("lease_expires_at", Timestamp, nullable=True),
            sa.Column("last_event_id", sa.BigInteger(), nullable=False),
            sa.Column("updated_at", Timestamp, nullable=False),
            sa.PrimaryKeyConstraint("org_id"),
            **MYSQL,
        )
    if not inspector.has_table("webhook_endpoint"):
        op.create_table(
            "webhook_endpoint",
            sa.Column("id", BigId, autoincrement=True, nullable=False),
            sa.Column("org_id", sa.String(64), nullable=False),
            sa.Column("url", ExactString(2048), nullable=False),
            sa.Column("event_types", sa.String(512), nullable=False),
            sa.Column("secret", sa.String(128), nullable=False),
            sa.Column("active", sa.Boolean(create_constraint=False), nullable=False),
            sa.Column("created_at", Timestamp, nullable=False),
            sa.Column("deleted_at", Timestamp, nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.Index("ix_webhook_endpoint_org", "org_id", "id"),
            sqlite_autoincrement=True,
            **MYSQL,
        )
    if not inspector.has_table("webhook_delivery"):
        op.create_table(
            "webhook_delivery",
            sa.Column("id", BigId, autoincrement=True, nullable=False),
            sa.Column("org_id", sa.String(64), nullable=False),
            sa.Column("endpoint_id", sa.BigInteger(), nullable=False),
            sa.Column("event_id", sa.BigInteger(), nullable=False),
            sa.Column("event_type", sa.String(32), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("attempts", sa.BigInteger(), nullable=False),
            sa.Column("last_status_code", sa.BigInteger(), nullable=True),
            sa.Column("last_error", sa.String(1024), nullable=True),
            sa.Column("next_attempt_at", Timestamp, nullable=True),
            sa.Column("delivered_at", Timestamp, nullable=True),
            sa.Column("created_at", Timestamp, nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint(
                "endpoint_id", "event_id", name="uq_webhook_delivery_endpoint_event"
            ),
            sa.Index("ix_webhook_delivery_due", "status", "next_attempt_at"),
            sa.Index("ix_webhook_delivery_endpoint", "org_id", "endpoint_id", "id"),
            sqlite_autoincrement=True,
            **MYSQL,
        )


def downgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for table in TABLES:
        if inspector.has_table(table):
            op.drop_table(table)
    present = {c["name"] for c in inspector.get_columns("inventory_balance")}
    for name in BALANCE_COLUMNS:
        if name in present:
            op.drop_column("inventory_balance", name)
