"""Id sequences for hi/lo blocks: reservation ids without a round trip per row.

Each writer takes a block of ids (``next_value`` moves by the block size in a short
transaction of its own, ARCHITECTURE section 12), so a batch's reservations, their lines and
ledger entries are written without reading ids back. The sequence starts above every
reservation id already given out by AUTO_INCREMENT.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

MYSQL: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


def upgrade() -> None:
    # Idempotent, like 0001: a run that failed after the CREATE TABLE can be run again.
    if not sa.inspect(op.get_bind()).has_table("id_block"):
        op.create_table(
            "id_block",
            sa.Column("name", sa.String(32), nullable=False),
            sa.Column("next_value", sa.BigInteger(), nullable=False),
            sa.PrimaryKeyConstraint("name"),
            **MYSQL,
        )
    op.execute(
        # An aggregate answers one row even when WHERE drops them all: filter outside it.
        "INSERT INTO id_block (name, next_value) "
        "SELECT 'reservation', m.next_value FROM "
        "(SELECT COALESCE(MAX(id), 0) + 1 AS next_value FROM reservation) AS m "
        "WHERE NOT EXISTS (SELECT 1 FROM id_block WHERE name = 'reservation')"
    )


def downgrade() -> None:
    op.drop_table("id_block")
