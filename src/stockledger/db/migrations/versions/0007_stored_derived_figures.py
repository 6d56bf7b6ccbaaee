"""Balance.committed and Balance.incoming kept on the balance row (ARCHITECTURE section 14).

Both are derived figures: the units CONFIRMED reservations hold, and the units of open
(IN_TRANSIT, PARTIALLY_RECEIVED) transfers to the balance still in transit. The rules now keep
them up to date in the same transaction as what changes them (no version change, no ledger
entry), so a read, and an event about the balance (part EVENTS), has them without a query over
the reservation and transfer lines. The reconciliation query checks each against its
definition. This revision adds the columns and fills them from those definitions; idempotent.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-16
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COLUMNS = ("committed", "incoming")


def upgrade() -> None:
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("inventory_balance")}
    for name in COLUMNS:
        if name not in present:
            op.add_column(
                "inventory_balance",
                sa.Column(name, sa.BigInteger(), nullable=False, server_default=sa.text("0")),
            )
    # Grouped once, then one UPDATE per balance that holds any: no correlated scan of the lines
    # per balance row (reservation_line has no (location, sku) index).
    bind = op.get_bind()
    for column, grouped in (
        (
            "committed",
            "SELECT l.org_id, l.location, l.sku, SUM(l.quantity - l.deducted - l.released) "
            "FROM reservation_line l JOIN reservation r ON r.id = l.reservation_id AND "
            "r.org_id = l.org_id WHERE r.status = 'CONFIRMED' "
            "GROUP BY l.org_id, l.location, l.sku",
        ),
        (
            "incoming",
            "SELECT t.org_id, t.to_location, tl.sku, SUM(tl.quantity - tl.received - tl.returned) "
            "FROM transfer_line tl JOIN transfer t ON t.id = tl.transfer_id AND "
            "t.org_id = tl.org_id WHERE t.status IN ('IN_TRANSIT', 'PARTIALLY_RECEIVED') "
            "GROUP BY t.org_id, t.to_location, tl.sku",
        ),
    ):
        rows = [
            {"org": org, "location": location, "sku": sku, "units": int(units)}
            for org, location, sku, units in bind.execute(sa.text(grouped))
        ]
        if rows:
            bind.execute(
                sa.text(
                    f"UPDATE inventory_balance SET {column} = :units WHERE org_id = :org AND "
                    "location = :location AND sku = :sku"
                ),
                rows,
            )


def downgrade() -> None:
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("inventory_balance")}
    for name in COLUMNS:
        if name in present:
            op.drop_column("inventory_balance", name)
