"""API keys (part ACCESS, ARCHITECTURE section 13): the secret's SHA-256 and display prefix,
org, scopes, name and times; never the secret.

Idempotent, like 0001: a table or index that exists is left alone.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from stockledger.db.types import BigId, ExactString, Timestamp

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

MYSQL: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("api_key"):
        op.create_table(
            "api_key",
            sa.Column("id", BigId, autoincrement=True, nullable=False),
            sa.Column("org_id", sa.String(64), nullable=False),
            sa.Column("name", ExactString(255), nullable=False),
            sa.Column("prefix", sa.String(16), nullable=False),
            sa.Column("secret_sha256", sa.String(64), nullable=False),
            sa.Column("scopes", sa.String(255), nullable=False),
            sa.Column("created_at", Timestamp, nullable=False),
            sa.Column("expires_at", Timestamp, nullable=True),
            sa.Column("revoked_at", Timestamp, nullable=True),
            sa.Column("last_used_at", Timestamp, nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("secret_sha256", name="uq_api_key_secret_sha256"),
            sqlite_autoincrement=True,
            **MYSQL,
        )
    indexes = {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes("api_key")}
    if "ix_api_key_org" not in indexes:
        op.create_index("ix_api_key_org", "api_key", ["org_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_api_key_org", table_name="api_key")
    op.drop_table("api_key")
