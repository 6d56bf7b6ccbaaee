"""Locations and transfers (part LOCATIONS, ARCHITECTURE section 14).

- ``location``: one row per org and code. Every location a balance already names is registered
  (a WAREHOUSE named after its code, active), and so is ``default`` for every org the database
  knows (and for org ``default`` itself).
- ``transfer`` and ``transfer_line``, with the ``transfer`` id block (hi/lo ids, like
  reservations').
- ``inventory_ledger.transfer_id``, and TRANSFER_OUT / TRANSFER_IN in the event type CHECK.

MariaDB / MySQL add the column and replace the CHECK in place. SQLite cannot alter a CHECK: the
ledger is rebuilt (batch mode) from the frozen definition below with its rows, and its
append-only triggers, which go with the old table, are created again. Idempotent, like 0001: a
run that stopped half-way (MySQL commits each DDL statement on its own) runs again.

Downgrade refuses while the ledger holds transfer entries: the ledger is append-only, and v1
cannot read them. Without any, it drops the tables, the column and the id block.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-15
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from stockledger.db import ledger_triggers
from stockledger.db.types import BigId, ExactString, Timestamp

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

MYSQL: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}
V1_TYPES = ("RESTOCK", "ADJUST", "RESERVE", "RELEASE", "EXPIRE", "DEDUCT")
NEW_TYPES = (*V1_TYPES, "TRANSFER_OUT", "TRANSFER_IN")
CHECK_NAME = "ck_inventory_ledger_event_type_known"
# Where an org has any trace; each gets the `default` location.
ORG_TABLES = ("inventory_balance", "reservation", "idempotency_key", "api_key", "inventory_ledger")


def _types_check(types: tuple[str, ...]) -> str:
    return f"event_type IN ({', '.join(repr(t) for t in types)})"


def _ledger(types: tuple[str, ...], with_transfer: bool) -> sa.Table:
    """The ledger as 0001 made it, with the given event types and (or not) transfer_id
    (frozen here: later revisions may change models.py)."""
    columns: list[Any] = [
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("location", ExactString(255), nullable=False),
        sa.Column("sku", ExactString(255), nullable=False),
        sa.Column("event_type", sa.String(16), nullable=False),
        sa.Column("on_hand_delta", sa.BigInteger(), nullable=False),
        sa.Column("reserved_delta", sa.BigInteger(), nullable=False),
        sa.Column("on_hand_after", sa.BigInteger(), nullable=False),
        sa.Column("reserved_after", sa.BigInteger(), nullable=False),
        sa.Column("reservation_id", sa.BigInteger(), nullable=True),
        sa.Column("ref_type", ExactString(255), nullable=True),
        sa.Column("ref_id", ExactString(255), nullable=True),
        sa.Column("reason", ExactString(255), nullable=True),
        sa.Column("idempotency_key", ExactString(255), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
    ]
    indexes = [
        sa.Index("ix_inventory_ledger_balance", "org_id", "location", "sku", "id"),
        sa.Index("ix_inventory_ledger_sku", "org_id", "sku", "id"),
        sa.Index("ix_inventory_ledger_created", "org_id", "created_at"),
        sa.Index("ix_inventory_ledger_reservation", "reservation_id", "id"),
        sa.Index("ix_inventory_ledger_reference", "org_id", "ref_type", "ref_id", "id"),
        sa.Index("ix_inventory_ledger_key", "org_id", "idempotency_key", "id"),
    ]
    if with_transfer:
        columns.append(sa.Column("transfer_id", sa.BigInteger(), nullable=True))
        indexes.append(sa.Index("ix_inventory_ledger_transfer", "transfer_id", "id"))
    return sa.Table(
        "inventory_ledger",
        sa.MetaData(),
        *columns,
        sa.PrimaryKeyConstraint("id", name="pk_inventory_ledger"),
        sa.CheckConstraint(_types_check(types), name=CHECK_NAME),
        *indexes,
        sqlite_autoincrement=True,
    )


def _create_tables() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("location"):
        op.create_table(
            "location",
            sa.Column("org_id", sa.String(64), nullable=False),
            sa.Column("code", ExactString(255), nullable=False),
            sa.Column("name", ExactString(255), nullable=False),
            sa.Column("type", sa.String(16), nullable=False),
            sa.Column("active", sa.Boolean(create_constraint=False), nullable=False),
            sa.Column("created_at", Timestamp, nullable=False),
            sa.Column("updated_at", Timestamp, nullable=False),
            sa.PrimaryKeyConstraint("org_id", "code"),
            sa.CheckConstraint("type IN ('WAREHOUSE', 'STORE', 'VIRTUAL')", name="type_known"),
            **MYSQL,
        )
    if not inspector.has_table("transfer"):
        op.create_table(
            "transfer",
            sa.Column("id", BigId, autoincrement=False, nullable=False),
            sa.Column("org_id", sa.String(64), nullable=False),
            sa.Column("status", sa.String(20), nullable=False),
            sa.Column("from_location", ExactString(255), nullable=False),
            sa.Column("to_location", ExactString(255), nullable=False),
            sa.Column("ref_type", ExactString(255), nullable=True),
            sa.Column("ref_id", ExactString(255), nullable=True),
            sa.Column("reason", ExactString(255), nullable=True),
            sa.Column("created_at", Timestamp, nullable=False),
            sa.Column("updated_at", Timestamp, nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.CheckConstraint(
                "status IN ('IN_TRANSIT', 'PARTIALLY_RECEIVED', 'RECEIVED', 'CANCELLED')",
                name="status_known",
            ),
            sa.Index("ix_transfer_org", "org_id", "id"),
            sa.Index("ix_transfer_open", "org_id", "status", "to_location"),
            **MYSQL,
        )
    if not inspector.has_table("transfer_line"):
        op.create_table(
            "transfer_line",
            sa.Column("transfer_id", sa.BigInteger(), nullable=False),
            sa.Column("org_id", sa.String(64), nullable=False),
            sa.Column("sku", ExactString(255), nullable=False),
            sa.Column("quantity", sa.BigInteger(), nullable=False),
            sa.Column("received", sa.BigInteger(), nullable=False),
            sa.Column("returned", sa.BigInteger(), nullable=False),
            sa.PrimaryKeyConstraint("transfer_id", "sku"),
            sa.ForeignKeyConstraint(
                ["transfer_id"],
                ["transfer.id"],
                name="fk_transfer_line_transfer_id_transfer",
                ondelete="CASCADE",
            ),
            sa.CheckConstraint("quantity > 0", name="quantity_positive"),
            sa.CheckConstraint("received >= 0 AND returned >= 0", name="counts_nonnegative"),
            sa.CheckConstraint("received + returned <= quantity", name="within_quantity"),
            sa.Index("ix_transfer_line_sku", "org_id", "sku"),
            **MYSQL,
        )
    op.execute(
        "INSERT INTO id_block (name, next_value) SELECT 'transfer', 1 "
        "WHERE NOT EXISTS (SELECT 1 FROM id_block WHERE name = 'transfer')"
    )


def _register_locations() -> None:
    """Every location a balance names, and `default` of every org (idempotent)."""
    true = "TRUE" if op.get_bind().dialect.name != "sqlite" else "1"
    now = "CURRENT_TIMESTAMP"
    orgs = " UNION ".join(f"SELECT org_id FROM {t}" for t in ORG_TABLES)
    named = (
        "SELECT DISTINCT org_id, location AS code FROM inventory_balance UNION "
        f"SELECT o.org_id, 'default' FROM ({orgs} UNION SELECT 'default') o"
    )
    op.execute(
        "INSERT INTO location (org_id, code, name, type, active, created_at, updated_at) "
        f"SELECT n.org_id, n.code, n.code, 'WAREHOUSE', {true}, {now}, {now} FROM ({named}) n "
        "WHERE NOT EXISTS (SELECT 1 FROM location l WHERE l.org_id = n.org_id AND "
        "l.code = n.code)"
    )


def _ledger_check() -> str | None:
    for ck in sa.inspect(op.get_bind()).get_check_constraints("inventory_ledger"):
        if ck["name"] == CHECK_NAME:
            return str(ck["sqltext"])
    return None


def _alter_ledger(types: tuple[str, ...], with_transfer: bool) -> None:
    bind = op.get_bind()
    columns = {c["name"] for c in sa.inspect(bind).get_columns("inventory_ledger")}
    current = _ledger_check()
    if (
        ("transfer_id" in columns) == with_transfer
        and current is not None
        and (("TRANSFER_IN" in current) == ("TRANSFER_IN" in types))
    ):
        return
    if bind.dialect.name == "sqlite":
        # The rebuilt table takes this definition whole; the rows are copied over (the new
        # column first added in place, so that the copy finds it). The old table's triggers
        # are dropped with it.
        if with_transfer and "transfer_id" not in columns:
            op.add_column(
                "inventory_ledger", sa.Column("transfer_id", sa.BigInteger(), nullable=True)
            )
        with op.batch_alter_table(
            "inventory_ledger", copy_from=_ledger(types, with_transfer), recreate="always"
        ):
            pass
        ledger_triggers.create_missing(bind)
        return
    if with_transfer and "transfer_id" not in columns:
        op.add_column("inventory_ledger", sa.Column("transfer_id", sa.BigInteger(), nullable=True))
        op.create_index("ix_inventory_ledger_transfer", "inventory_ledger", ["transfer_id", "id"])
    if not with_transfer and "transfer_id" in columns:
        op.drop_index("ix_inventory_ledger_transfer", "inventory_ledger")
        op.drop_column("inventory_ledger", "transfer_id")
    if current is not None:
        op.drop_constraint(op.f(CHECK_NAME), "inventory_ledger", type_="check")
    op.create_check_constraint(op.f(CHECK_NAME), "inventory_ledger", sa.text(_types_check(types)))


def upgrade() -> None:
    _create_tables()
    _register_locations()
    _alter_ledger(NEW_TYPES, True)


def downgrade() -> None:
    moved = op.get_bind().exec_driver_sql(
        "SELECT COUNT(*) FROM inventory_ledger WHERE event_type IN ('TRANSFER_OUT', 'TRANSFER_IN')"
    )
    if moved.scalar():
        raise RuntimeError(
            "the ledger holds transfer entries: it is append-only, and a release before "
            "0006 cannot read them; restore a backup taken before the upgrade instead"
        )
    _alter_ledger(V1_TYPES, False)
    op.execute("DELETE FROM id_block WHERE name = 'transfer'")
    for table in ("transfer_line", "transfer", "location"):
        if sa.inspect(op.get_bind()).has_table(table):
            op.drop_table(table)
