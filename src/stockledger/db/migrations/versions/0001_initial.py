"""Initial schema: balances, append-only ledger, reservations, idempotency keys.

Idempotent, so that a run that failed half-way (MySQL commits each DDL statement on its own)
can be run again: a table or index that exists is left alone. The ledger's triggers, which a
server may refuse (error 1419), are revision 0003's; databases migrated before that split got
them here, and 0003 then finds them in place.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from stockledger.db.models import LEDGER_TRIGGER_NAMES
from stockledger.db.types import BigId, ExactString, Timestamp

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

MYSQL: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}
EVENTS = "event_type IN ('RESTOCK', 'ADJUST', 'RESERVE', 'RELEASE', 'EXPIRE', 'DEDUCT')"
STATUSES = "status IN ('ACTIVE', 'COMMITTED', 'RELEASED', 'EXPIRED')"


def _name() -> ExactString:
    return ExactString(255)


def _create_table(name: str, *elements: Any, **kw: Any) -> None:
    if not sa.inspect(op.get_bind()).has_table(name):
        op.create_table(name, *elements, **kw)


def _create_index(name: str, table: str, columns: list[str]) -> None:
    if name not in {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes(table)}:
        op.create_index(name, table, columns)


def upgrade() -> None:
    _create_table(
        "inventory_balance",
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("location", _name(), nullable=False),
        sa.Column("sku", _name(), nullable=False),
        sa.Column("on_hand", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("org_id", "location", "sku"),
        sa.CheckConstraint("on_hand >= 0", name=op.f("ck_inventory_balance_on_hand_nonnegative")),
        sa.CheckConstraint("reserved >= 0", name=op.f("ck_inventory_balance_reserved_nonnegative")),
        sa.CheckConstraint(
            "reserved <= on_hand", name=op.f("ck_inventory_balance_reserved_within_on_hand")
        ),
        **MYSQL,
    )
    _create_index("ix_inventory_balance_org_sku", "inventory_balance", ["org_id", "sku"])

    _create_table(
        "inventory_ledger",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("location", _name(), nullable=False),
        sa.Column("sku", _name(), nullable=False),
        sa.Column("event_type", sa.String(16), nullable=False),
        sa.Column("on_hand_delta", sa.BigInteger(), nullable=False),
        sa.Column("reserved_delta", sa.BigInteger(), nullable=False),
        sa.Column("on_hand_after", sa.BigInteger(), nullable=False),
        sa.Column("reserved_after", sa.BigInteger(), nullable=False),
        sa.Column("reservation_id", sa.BigInteger(), nullable=True),
        sa.Column("ref_type", _name(), nullable=True),
        sa.Column("ref_id", _name(), nullable=True),
        sa.Column("reason", _name(), nullable=True),
        sa.Column("idempotency_key", _name(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint(EVENTS, name=op.f("ck_inventory_ledger_event_type_known")),
        sqlite_autoincrement=True,
        **MYSQL,
    )
    for name, cols in [
        ("ix_inventory_ledger_balance", ["org_id", "location", "sku", "id"]),
        ("ix_inventory_ledger_sku", ["org_id", "sku", "id"]),
        ("ix_inventory_ledger_created", ["org_id", "created_at"]),
        ("ix_inventory_ledger_reservation", ["reservation_id", "id"]),
        ("ix_inventory_ledger_reference", ["org_id", "ref_type", "ref_id", "id"]),
        ("ix_inventory_ledger_key", ["org_id", "idempotency_key", "id"]),
    ]:
        _create_index(name, "inventory_ledger", cols)

    _create_table(
        "reservation",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("ref_type", _name(), nullable=True),
        sa.Column("ref_id", _name(), nullable=True),
        sa.Column("expires_at", Timestamp, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint(STATUSES, name=op.f("ck_reservation_status_known")),
        sqlite_autoincrement=True,
        **MYSQL,
    )
    _create_index("ix_reservation_status_expires", "reservation", ["status", "expires_at"])
    _create_index(
        "ix_reservation_reference", "reservation", ["org_id", "ref_type", "ref_id", "status"]
    )

    _create_table(
        "reservation_line",
        sa.Column("reservation_id", sa.BigInteger(), nullable=False),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("location", _name(), nullable=False),
        sa.Column("sku", _name(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("deducted", sa.BigInteger(), nullable=False),
        sa.Column("released", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("reservation_id", "location", "sku"),
        sa.ForeignKeyConstraint(
            ["reservation_id"],
            ["reservation.id"],
            name=op.f("fk_reservation_line_reservation_id_reservation"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_reservation_line_quantity_positive")),
        sa.CheckConstraint(
            "deducted >= 0 AND released >= 0", name=op.f("ck_reservation_line_counts_nonnegative")
        ),
        sa.CheckConstraint(
            "deducted + released <= quantity", name=op.f("ck_reservation_line_within_quantity")
        ),
        **MYSQL,
    )

    _create_table(
        "idempotency_key",
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("idempotency_key", _name(), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("result_ref", sa.String(64), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("org_id", "idempotency_key"),
        **MYSQL,
    )


def downgrade() -> None:
    for name in LEDGER_TRIGGER_NAMES[op.get_bind().dialect.name]:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("idempotency_key")
    op.drop_table("reservation_line")
    op.drop_index("ix_reservation_reference", table_name="reservation")
    op.drop_index("ix_reservation_status_expires", table_name="reservation")
    op.drop_table("reservation")
    op.drop_table("inventory_ledger")
    op.drop_index("ix_inventory_balance_org_sku", table_name="inventory_balance")
    op.drop_table("inventory_balance")
