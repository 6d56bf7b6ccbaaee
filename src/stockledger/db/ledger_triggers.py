"""The ledger's append-only triggers: which are missing, and creating them where the server lets us.

MySQL 8 and MariaDB ship with binary logging on; there a user without SUPER may not create a
trigger unless ``log_bin_trust_function_creators`` is on (error 1419; MySQL manual, "Stored
Program Binary Logging"). ``stockledger migrate`` then completes without the triggers and says
so once; ``stockledger migrate --triggers``, run by a privileged user, adds them later. Without
them the ledger stays append-only by grants: the service's user gets SELECT and INSERT on
``inventory_ledger``, never UPDATE or DELETE (README, "Least-privilege grants").
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from stockledger.db.models import LEDGER_TRIGGER_NAMES, LEDGER_TRIGGERS

# MySQL/MariaDB errors that mean "not allowed to create a trigger here": 1419 binary logging
# without SUPER, 1227 a privilege (SUPER) missing, 1142 the TRIGGER privilege missing.
REFUSALS = frozenset({1419, 1227, 1142})

ADVICE = (
    "the ledger's append-only triggers were not created: {reason}. Either let the server "
    "accept them (SET GLOBAL log_bin_trust_function_creators = 1, or give this user SUPER) and "
    "run `stockledger migrate` again, or run `stockledger migrate --triggers` once as a user "
    "that may create triggers. Until then keep the ledger append-only by grants: the "
    "service's user gets SELECT and INSERT on inventory_ledger, never UPDATE or DELETE "
    "(README, Least-privilege grants)."
)


@dataclass(frozen=True, slots=True)
class TriggerOutcome:
    """What :func:`create_missing` did: the trigger names it ``created``, and when the server
    refused one, the ``refused`` message (the server's own words); ``missing`` are the names
    still absent afterwards."""

    created: tuple[str, ...]
    missing: tuple[str, ...]
    refused: str | None = None

    @property
    def advice(self) -> str | None:
        """The one message to show when triggers are missing (None when all are there)."""
        if not self.missing:
            return None
        return ADVICE.format(reason=self.refused or "they are missing")


def present(conn: Connection) -> set[str]:
    """Names of the ledger triggers that exist in ``conn``'s database."""
    if conn.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
    else:
        sql = (
            "SELECT trigger_name FROM information_schema.triggers WHERE trigger_schema = DATABASE()"
        )
    names = {str(row[0]) for row in conn.execute(text(sql))}
    return names & set(LEDGER_TRIGGER_NAMES[conn.dialect.name])


def missing(conn: Connection) -> tuple[str, ...]:
    """Names of the ledger triggers absent from ``conn``'s database, in creation order."""
    have = present(conn)
    return tuple(n for n in LEDGER_TRIGGER_NAMES[conn.dialect.name] if n not in have)


def create_missing(conn: Connection) -> TriggerOutcome:
    """Create every absent ledger trigger; idempotent (existing ones are left as they are).

    A refusal by the server (:data:`REFUSALS`) stops it and is reported in the outcome, not
    raised, so that a migration completes; any other database error is raised.
    """
    absent = set(missing(conn))
    created: list[str] = []
    names = LEDGER_TRIGGER_NAMES[conn.dialect.name]
    for name, statement in zip(names, LEDGER_TRIGGERS[conn.dialect.name], strict=True):
        if name not in absent:
            continue
        try:
            conn.exec_driver_sql(statement)
        except DBAPIError as error:
            code = error.orig.args[0] if error.orig is not None and error.orig.args else None
            if code not in REFUSALS:
                raise
            return TriggerOutcome(tuple(created), missing(conn), f"{error.orig}")
        created.append(name)
    return TriggerOutcome(tuple(created), missing(conn))
