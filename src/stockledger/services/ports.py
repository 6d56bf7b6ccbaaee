"""The storage the services need, as protocols: the SQL implementations are
:class:`stockledger.db.store.SqlStore` and :class:`stockledger.services.lookups.SqlLookups`;
``tests/unit/fakes.py`` has in-memory ones, so the write path runs with no database."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from stockledger.db.store import Locked, StoredKey, WriteSet
from stockledger.domain.model import (
    Balance,
    BalanceKey,
    Location,
    Reference,
    Reservation,
    Transfer,
)
from stockledger.services.records import WriteResult


class StoreTransaction(Protocol):
    """The statements of one batch transaction (the SQL ones: ``db/store.py``)."""

    async def find_keys(self, keys: Sequence[str]) -> dict[str, StoredKey]: ...

    async def active_reservation_ids(self, references: Sequence[Reference]) -> list[int]: ...

    async def lock_reservations(
        self, ids: Sequence[int], *, wait: bool
    ) -> Locked[int, Reservation]: ...

    async def lock_balances(
        self, keys: Sequence[BalanceKey], *, wait: bool
    ) -> Locked[BalanceKey, Balance]: ...

    async def lock_transfers(self, ids: Sequence[int], *, wait: bool) -> Locked[int, Transfer]: ...

    async def lock_locations(
        self, codes: Sequence[str], *, update: bool
    ) -> dict[str, Location]: ...

    async def due_holding(
        self, keys: Sequence[BalanceKey], now: datetime, limit: int
    ) -> list[int]: ...

    async def write(self, ws: WriteSet) -> dict[int, int]: ...

    async def insert_events(self, rows: Sequence[tuple[str, str]], now: datetime) -> None: ...

    async def commit(self) -> None: ...


class Store(Protocol):
    """One writer's store: batch transactions (each of one org), id blocks (shared by every
    org) and the unknown-commit check."""

    def transaction(self, org_id: str) -> AbstractAsyncContextManager[StoreTransaction]: ...

    async def allocate_ids(self, name: str, count: int) -> range: ...

    async def committed(self, org_id: str, ws: WriteSet) -> bool: ...

    async def discard(self) -> None: ...

    async def close(self) -> None: ...


class Lookups(Protocol):
    """The reads the write path makes outside its batches (committed state, no locks)."""

    async def replay(self, operation: str, key: str, request_hash: str) -> WriteResult | None:
        """The done call's result with ``replayed=True``; None when ``key`` is not done.
        Raises IdempotencyKeyReusedError when it was done for another request."""
        ...

    async def balances_and_key(
        self, keys: Sequence[BalanceKey], idempotency_key: str
    ) -> tuple[dict[BalanceKey, Balance], bool]:
        """The committed balances of ``keys`` (missing ones absent), then whether
        ``idempotency_key`` is done, read in that order."""
        ...

    async def reservation_keys(
        self, ids: Sequence[int], references: Sequence[Reference]
    ) -> dict[int | Reference, list[BalanceKey]]:
        """The balances held by reservations ``ids`` and by the ACTIVE ones of
        ``references`` (a hint for locks and routing)."""
        ...

    async def transfer_keys(self, ids: Sequence[int]) -> dict[int, list[BalanceKey]]:
        """The balances transfers ``ids`` move units between (a hint for locks and routing)."""
        ...

    async def due_reservation_ids(self, now: datetime, limit: int) -> list[int]:
        """Ids of ACTIVE reservations due at ``now``, soonest first."""
        ...

    async def any_due_holding(self, keys: Sequence[BalanceKey], now: datetime) -> bool:
        """Whether an ACTIVE reservation due at ``now`` holds units of one of ``keys``."""
        ...
