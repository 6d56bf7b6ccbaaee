"""Confirmed reservations (part LOCATIONS, ARCHITECTURE section 14): status CONFIRMED, and
``reservation.expires_at`` nullable (NULL once CONFIRMED: no expiry). ``idempotency_key.result_ref``
widens from 64 to 1024 characters: a confirm by reference remembers every reservation it
confirmed there (it writes no ledger entry to find them by).

MariaDB / MySQL alter the columns in place (a VARCHAR that keeps its length bytes, and a
nullability change) and replace the status CHECK. SQLite cannot alter a column or a CHECK in
place: the tables are rebuilt (batch mode) from the frozen definitions below, with their rows.
Idempotent, like 0001: a run that stopped half-way (MySQL commits each DDL statement on its
own) runs again.

Downgrade: a CONFIRMED reservation becomes ACTIVE with an expiry of 9999-12-31 (v1 knows no
CONFIRMED; the hold stays), one that ended after a confirm takes its ``updated_at`` as its
expiry, and a result_ref longer than 64 characters is cleared.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from stockledger.db.types import BigId, ExactString, Timestamp

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

OLD_STATUSES = "status IN ('ACTIVE', 'COMMITTED', 'RELEASED', 'EXPIRED')"
NEW_STATUSES = "status IN ('ACTIVE', 'CONFIRMED', 'COMMITTED', 'RELEASED', 'EXPIRED')"
CHECK_NAME = "ck_reservation_status_known"
FAR_FUTURE = "9999-12-31 23:59:59"


def _reservation(statuses: str, expires_nullable: bool) -> sa.Table:
    """The reservation table as 0001 made it, with the given CHECK and expires_at nullability
    (frozen here: later revisions may change models.py)."""
    return sa.Table(
        "reservation",
        sa.MetaData(),
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("ref_type", ExactString(255), nullable=True),
        sa.Column("ref_id", ExactString(255), nullable=True),
        sa.Column("expires_at", Timestamp, nullable=expires_nullable),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reservation"),
        sa.CheckConstraint(statuses, name=CHECK_NAME),
        sa.Index("ix_reservation_status_expires", "status", "expires_at"),
        sa.Index("ix_reservation_reference", "org_id", "ref_type", "ref_id", "status"),
        sqlite_autoincrement=True,
    )


def _idempotency_key(result_ref_length: int) -> sa.Table:
    return sa.Table(
        "idempotency_key",
        sa.MetaData(),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("idempotency_key", ExactString(255), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("result_ref", sa.String(result_ref_length), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("org_id", "idempotency_key", name="pk_idempotency_key"),
    )


def _check_text() -> str | None:
    for ck in sa.inspect(op.get_bind()).get_check_constraints("reservation"):
        if ck["name"] == CHECK_NAME:
            return str(ck["sqltext"])
    return None


def _mysql(statuses: str, expires_nullable: bool, result_ref_length: int) -> None:
    op.alter_column("reservation", "expires_at", existing_type=Timestamp, nullable=expires_nullable)
    op.alter_column(
        "idempotency_key",
        "result_ref",
        existing_type=sa.String(64 if result_ref_length > 64 else 1024),
        type_=sa.String(result_ref_length),
        existing_nullable=True,
    )
    current = _check_text()
    wanted_confirmed = "CONFIRMED" in statuses
    if current is not None and ("CONFIRMED" in current) == wanted_confirmed:
        return
    if current is not None:
        op.drop_constraint(op.f(CHECK_NAME), "reservation", type_="check")
    op.create_check_constraint(op.f(CHECK_NAME), "reservation", sa.text(statuses))


def _sqlite(statuses: str, expires_nullable: bool, result_ref_length: int) -> None:
    # Rebuilding drops the old table: with foreign keys enforced, its lines would go with it
    # (ON DELETE CASCADE). `stockledger migrate` connects without them; refuse otherwise.
    if op.get_bind().exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError(
            "revision 0005 rebuilds the reservation table: run it on a connection without "
            "PRAGMA foreign_keys=ON (as `stockledger migrate` does), or every reservation "
            "line would be deleted with it"
        )
    # The rebuilt table takes these definitions whole; the rows are copied over.
    target = _reservation(statuses, expires_nullable)
    with op.batch_alter_table("reservation", copy_from=target, recreate="always"):
        pass
    with op.batch_alter_table(
        "idempotency_key", copy_from=_idempotency_key(result_ref_length), recreate="always"
    ):
        pass


def _apply(statuses: str, expires_nullable: bool, result_ref_length: int) -> None:
    args: Any = (statuses, expires_nullable, result_ref_length)
    if op.get_bind().dialect.name == "sqlite":
        _sqlite(*args)
    else:
        _mysql(*args)


def upgrade() -> None:
    _apply(NEW_STATUSES, True, 1024)


def downgrade() -> None:
    # A CONFIRMED hold stays a hold; an ended one that was confirmed first keeps its status
    # and takes its last change as its expiry (v1 needs one; nothing expires an ended one).
    op.execute(
        f"UPDATE reservation SET status = 'ACTIVE', expires_at = '{FAR_FUTURE}' "
        "WHERE status = 'CONFIRMED'"
    )
    op.execute("UPDATE reservation SET expires_at = updated_at WHERE expires_at IS NULL")
    op.execute("UPDATE idempotency_key SET result_ref = NULL WHERE LENGTH(result_ref) > 64")
    _apply(OLD_STATUSES, False, 64)
