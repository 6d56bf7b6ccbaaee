"""The ledger's append-only triggers, in a revision of their own because a server may refuse them.

With binary logging on (MySQL 8's default) a user without SUPER gets error 1419 at CREATE
TRIGGER unless ``log_bin_trust_function_creators`` is on. This revision then completes without
them, and ``stockledger migrate`` says once what to set or grant
(:mod:`stockledger.db.ledger_triggers`); ``stockledger migrate --triggers`` adds them later.
Idempotent: triggers already in place (every database migrated before this split) are kept.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

from stockledger.db import ledger_triggers
from stockledger.db.models import LEDGER_TRIGGER_NAMES

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    outcome = ledger_triggers.create_missing(op.get_bind())
    config = op.get_context().config
    if outcome.refused is not None and config is not None:  # for `migrate` to say, once
        config.attributes["ledger_triggers_refused"] = outcome.refused


def downgrade() -> None:
    for name in LEDGER_TRIGGER_NAMES[op.get_bind().dialect.name]:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
