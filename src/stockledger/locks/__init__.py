"""Admission control in front of the database row locks (ARCHITECTURE sections 4 and 12).

A unit of work asks a :class:`BalanceLocker` to claim the (location, sku) keys of a batch's
commands, each command all or nothing, without waiting: a command whose keys another holder has
waits for a later batch while the rest go ahead. The unit of work tells an :class:`ExpiryIndex`
when reservations start, move or stop expiring, and the sweeper pops what is due from it. The
database stays the correctness guarantee; these only keep a hot SKU's waiters out of the
database and make expiry prompt.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from stockledger.domain.model import BalanceKey


class LocksBusy(Exception):
    """The locks of a :meth:`BalanceLocker.hold` were not all free within the wait; nothing is
    held. ``retry_after_ms`` hints when a retry may succeed."""

    def __init__(self, retry_after_ms: int, message: str) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
        self.message = message


@dataclass
class Claim:
    """What one claim took: ``granted[i]`` tells whether command ``i`` has all its keys.

    ``names`` are the lock keys held under ``token`` (to give back); ``degraded`` means the
    locker could not reach its store and granted everything on database locks alone.
    """

    token: str
    granted: list[bool]
    names: list[str] = field(default_factory=list)
    degraded: bool = False


class BalanceLocker(Protocol):
    """One lock per (org, location, sku), held by a batch for the length of its transaction.

    ``wait`` (seconds) is how long a command may wait for its keys in all; ``ttl`` (seconds)
    bounds every lock's life when its holder dies.
    """

    wait: float
    ttl: float

    async def claim(self, org_id: str, groups: Sequence[Sequence[BalanceKey]]) -> Claim:
        """Take, without waiting, every key of each group (a command) that can have all of
        its keys, in group order; never raises for an unreachable store (degraded)."""
        ...

    def keep(self, claim: Claim) -> AbstractAsyncContextManager[None]:
        """Extend the claim's leases while the block runs (a batch still in the database)."""
        ...

    async def release_with(self, claim: Claim, index: ExpiryIndex, changes: IndexChanges) -> None:
        """Give the claim's keys back and apply ``changes`` to ``index`` (in one round trip
        where both live in the same store); raises nothing."""
        ...

    def retry_after_ms(self) -> int:
        """A jittered hint for a caller whose keys stayed busy (LockTimeoutError)."""
        ...

    def held_here(self, org_id: str, keys: Sequence[BalanceKey]) -> bool:
        """True when this process holds one of ``keys`` (another batch, or a hold)."""
        ...

    def hold(self, org_id: str, keys: Sequence[BalanceKey]) -> AbstractAsyncContextManager[None]:
        """Wait (up to ``wait``) for all of ``keys`` and hold them until exit; raises
        :class:`LocksBusy` when they stay busy (nothing is held then)."""
        ...


@dataclass
class IndexChanges:
    """What a batch changes in the expiry index: reservations that start or move
    (``schedule``: id -> expires_at) and those that no longer expire (``unschedule``)."""

    schedule: dict[int, datetime] = field(default_factory=dict)
    unschedule: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.schedule or self.unschedule)


class ExpiryIndex(Protocol):
    """Where reservation expiry times are kept for the sweeper.

    ``unindexed_until``: the latest expiry a write failed to record (None when none did); until
    it has passed the sweeper scans the database on every pass.
    """

    unindexed_until: datetime | None

    def of(self, org_id: str) -> ExpiryIndex:
        """The index of ``org_id`` (the same store; each org's expiries kept apart)."""
        ...

    async def apply(self, changes: IndexChanges) -> None:
        """Record ``changes``; a failure to reach the index moves ``unindexed_until``."""
        ...

    async def pop_due(self, now: datetime, limit: int) -> list[int]:
        """Up to ``limit`` ids due at ``now``, leased to the caller for a while: ids a caller
        takes and never settles come back due after the lease (a sweeper that died)."""
        ...

    async def reschedule(self, due: Mapping[int, datetime]) -> None:
        """Move ids still in the index to a new due time (expiry busy: try again later)."""
        ...

    def missed(self, changes: IndexChanges) -> None:
        """Changes that may not have reached the index: scan the database until the latest
        expiry among them has passed (moves ``unindexed_until``)."""
        ...


class NoLocks:
    """A locker that holds nothing: database row locks alone (the Redis-less mode)."""

    def __init__(self, wait: float = 5.0) -> None:
        self.wait = wait
        self.ttl = wait

    async def claim(self, org_id: str, groups: Sequence[Sequence[BalanceKey]]) -> Claim:
        return Claim("", [True] * len(groups))

    @asynccontextmanager
    async def keep(self, claim: Claim) -> AsyncIterator[None]:
        yield

    async def release_with(self, claim: Claim, index: ExpiryIndex, changes: IndexChanges) -> None:
        await index.apply(changes)

    def retry_after_ms(self) -> int:
        return 50

    def held_here(self, org_id: str, keys: Sequence[BalanceKey]) -> bool:
        return False

    @asynccontextmanager
    async def hold(self, org_id: str, keys: Sequence[BalanceKey]) -> AsyncIterator[None]:
        yield


class NoExpiryIndex:
    """An expiry index that keeps nothing: expiry then relies on the database scan alone."""

    unindexed_until: datetime | None = None

    def of(self, org_id: str) -> NoExpiryIndex:
        return self

    async def apply(self, changes: IndexChanges) -> None:
        return None

    async def pop_due(self, now: datetime, limit: int) -> list[int]:
        return []

    async def reschedule(self, due: Mapping[int, datetime]) -> None:
        return None

    def missed(self, changes: IndexChanges) -> None:
        return None
