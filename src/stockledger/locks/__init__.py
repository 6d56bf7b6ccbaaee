"""Admission control in front of the database row locks (ARCHITECTURE section 4).

The services ask a :class:`BalanceLocker` to hold the (location, sku) keys a write touches for
the length of its transaction, and tell an :class:`ExpiryIndex` when reservations start, move
or stop expiring. The database stays the correctness guarantee; these only keep a hot SKU's
waiters out of the connection pool and make expiry prompt.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Protocol

BalanceKey = tuple[str, str]  # (location, sku)


class LocksBusy(Exception):
    """The locks of a write were not all free within the wait; nothing is held.

    ``retry_after_ms`` hints when a retry may succeed. The services turn this into the
    contract's ``LockTimeoutError``.
    """

    def __init__(self, retry_after_ms: int, message: str) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
        self.message = message


class BalanceLocker(Protocol):
    """Holds one lock per (org, location, sku) key while a write runs."""

    def hold(self, org_id: str, keys: Sequence[BalanceKey]) -> AbstractAsyncContextManager[None]:
        """An async context manager holding every key (sorted) until exit.

        Raises :class:`LocksBusy` when they cannot all be taken within the configured wait;
        nothing is held then.
        """
        ...

    def busy(self, org_id: str, keys: Sequence[BalanceKey]) -> bool:
        """True when some key is held or waited on by another task of this process (a hint)."""
        ...


class ExpiryIndex(Protocol):
    """Where reservation expiry times are kept for the sweeper (seconds since the epoch)."""

    async def schedule(self, reservation_id: int, expires_at: datetime) -> None: ...

    async def unschedule(self, reservation_ids: Sequence[int]) -> None: ...


class NoLocks:
    """A locker that holds nothing: database row locks alone (the Redis-less mode)."""

    @asynccontextmanager
    async def hold(self, org_id: str, keys: Sequence[BalanceKey]) -> AsyncIterator[None]:
        yield

    def busy(self, org_id: str, keys: Sequence[BalanceKey]) -> bool:
        return False


class NoExpiryIndex:
    """An expiry index that keeps nothing: expiry then relies on the database scan alone."""

    async def schedule(self, reservation_id: int, expires_at: datetime) -> None:
        return None

    async def unschedule(self, reservation_ids: Sequence[int]) -> None:
        return None
