"""The expiry sweeper (ARCHITECTURE section 6).

Every ``interval`` seconds it takes the reservations due in the expiry index (leased, so two
sweepers never take the same id and a sweeper that dies gives its ids back after the lease)
and expires them through the batcher, like every other write: a few transactions for many
expiries (:meth:`InventoryService.expire_many`). An expiry whose rows stay held elsewhere is
tried again on the next pass, and the rest go ahead. Every ``scan_interval`` seconds, and on
its first pass, it also scans the database index (status, expires_at), which catches whatever
the index lost; on every pass while expiries that a write failed to record in the index are
not yet past (``index.unindexed_until``), or while a scanned expiry was busy. Expiry is
idempotent: several sweepers (several servers) may run at once and each reservation is
expired exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

from stockledger.locks import ExpiryIndex, NoExpiryIndex
from stockledger.observability import metrics
from stockledger.services.writes import Expiry, InventoryService

log = logging.getLogger(__name__)


class Sweeper:
    """Expires due reservations; :meth:`run_once` is one pass, :meth:`run_forever` the loop.

    Intervals are seconds; ``batch`` bounds the ids taken from the index (or the scan) at a
    time. ``every_org``: sweep every org, not only the service's (``serve`` does): the orgs
    the service has served since it started (:meth:`InventoryService.served_orgs`) and every
    org the database scan finds reservations due in (it scans all orgs at once, by status and
    expiry time); each org's expiries run through that org's service and index.
    """

    def __init__(
        self,
        service: InventoryService,
        index: ExpiryIndex | None,
        *,
        interval: float = 1.0,
        scan_interval: float = 30.0,
        batch: int = 200,
        every_org: bool = False,
    ) -> None:
        self.service = service
        self.index: ExpiryIndex = index or NoExpiryIndex()
        self.interval = interval
        self.scan_interval = scan_interval
        self.batch = batch
        self.every_org = every_org
        self._found: set[str] = set()  # orgs the scan found due reservations in
        self._last_scan: float | None = None  # time.monotonic() of the last database scan
        self._last_scan_clock = datetime.min.replace(tzinfo=UTC)  # service clock, same scan
        self._scan_again = False  # a scanned expiry was busy: scan on the next pass too
        self._stopping = asyncio.Event()

    async def run_once(self, *, scan: bool | None = None) -> int:
        """One pass: the due ids of each org's index, then (if due or ``scan``) the database
        scan.

        Returns the number of reservations this pass expired.
        """
        expired = 0
        for org_id in self._orgs():
            index = self.index.of(org_id)
            while True:
                ids = await index.pop_due(self.service.clock(), self.batch)
                if not ids:
                    break
                done, busy = await self._expire(org_id, ids)
                expired += done
                if busy:
                    await index.reschedule({i: self._later() for i in busy})
                if len(ids) < self.batch or len(busy) == len(ids):
                    break
        if self._scan_due(scan):
            self._last_scan = time.monotonic()
            self._last_scan_clock = self.service.clock()
            self._scan_again = False
            while True:
                due = await self._due()
                done = 0
                for org_id in sorted({org for org, _ in due}):
                    ids = [i for org, i in due if org == org_id]
                    org_done, busy = await self._expire(org_id, ids)
                    done += org_done
                    self._scan_again = self._scan_again or bool(busy)
                expired += done
                # A full batch that expired nothing (each busy) must not spin.
                if len(due) < self.batch or done == 0:
                    break
        return expired

    def _orgs(self) -> list[str]:
        if not self.every_org:
            return [self.service.org_id]
        return sorted({*self.service.served_orgs(), *self._found})

    async def _due(self) -> list[tuple[str, int]]:
        """(org, id) of due reservations from the database, soonest first."""
        if not self.every_org:
            ids = await self.service.due_reservation_ids(self.batch)
            return [(self.service.org_id, i) for i in ids]
        due = await self.service.due_reservations_of_every_org(self.batch)
        self._found.update(org for org, _ in due)
        return due

    def _scan_due(self, scan: bool | None) -> bool:
        if scan is not None:
            return scan
        unindexed = [
            u for org in self._orgs() if (u := self.index.of(org).unindexed_until) is not None
        ]
        return (
            self._last_scan is None
            or self._scan_again
            or time.monotonic() - self._last_scan >= self.scan_interval
            or (bool(unindexed) and self._last_scan_clock <= max(unindexed))
        )

    def _later(self) -> datetime:
        return self.service.clock() + timedelta(seconds=self.interval)

    async def _expire(self, org_id: str, ids: list[int]) -> tuple[int, list[int]]:
        """Expire ``ids`` of ``org_id``; returns how many this call expired and the ids that
        were busy."""
        if not ids:
            return 0, []
        try:
            expiries = await self.service.for_org(org_id).expire_many(ids)
        except Exception:  # e.g. the database is away: the ids are tried again later
            log.exception("expiring %d reservation(s) failed", len(ids))
            return 0, list(ids)
        return self._count(expiries), [e.reservation_id for e in expiries if e.busy]

    def _count(self, expiries: list[Expiry]) -> int:
        now = self.service.clock()
        count = 0
        for e in expiries:
            if e.expired is not None:
                count += 1
                if e.expired.expires_at is not None:  # always: only a due one expires
                    lag = (now - e.expired.expires_at).total_seconds()
                    metrics.EXPIRY_BACKLOG_SECONDS.observe(max(lag, 0.0))
        return count

    async def run_forever(self) -> None:
        """Sweep every ``interval`` seconds until :meth:`stop`; errors are logged, not fatal."""
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except Exception:
                log.exception("expiry sweep failed")
            try:
                async with asyncio.timeout(self.interval):
                    await self._stopping.wait()
            except TimeoutError:
                pass

    def stop(self) -> None:
        """End :meth:`run_forever` after the pass under way. An event, not a cancel: a cancel
        that lands inside a redis-py call can be swallowed (Python 3.11's
        ``asyncio.wait_for``), and the loop would run on."""
        self._stopping.set()
