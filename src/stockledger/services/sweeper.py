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
    time.
    """

    def __init__(
        self,
        service: InventoryService,
        index: ExpiryIndex | None,
        *,
        interval: float = 1.0,
        scan_interval: float = 30.0,
        batch: int = 200,
    ) -> None:
        self.service = service
        self.index: ExpiryIndex = index or NoExpiryIndex()
        self.interval = interval
        self.scan_interval = scan_interval
        self.batch = batch
        self._last_scan: float | None = None  # time.monotonic() of the last database scan
        self._last_scan_clock = datetime.min.replace(tzinfo=UTC)  # service clock, same scan
        self._scan_again = False  # a scanned expiry was busy: scan on the next pass too
        self._stopping = asyncio.Event()

    async def run_once(self, *, scan: bool | None = None) -> int:
        """One pass: the due ids of the index, then (if due or ``scan``) the database scan.

        Returns the number of reservations this pass expired.
        """
        expired = 0
        while True:
            ids = await self.index.pop_due(self.service.clock(), self.batch)
            if not ids:
                break
            done, busy = await self._expire(ids)
            expired += done
            if busy:
                await self.index.reschedule({i: self._later() for i in busy})
            if len(ids) < self.batch or len(busy) == len(ids):
                break
        if self._scan_due(scan):
            self._last_scan = time.monotonic()
            self._last_scan_clock = self.service.clock()
            self._scan_again = False
            while True:
                ids = await self.service.due_reservation_ids(self.batch)
                done, busy = await self._expire(ids)
                expired += done
                self._scan_again = self._scan_again or bool(busy)
                # A full batch that expired nothing (each busy) must not spin.
                if len(ids) < self.batch or done == 0:
                    break
        return expired

    def _scan_due(self, scan: bool | None) -> bool:
        if scan is not None:
            return scan
        unindexed = self.index.unindexed_until
        return (
            self._last_scan is None
            or self._scan_again
            or time.monotonic() - self._last_scan >= self.scan_interval
            or (unindexed is not None and self._last_scan_clock <= unindexed)
        )

    def _later(self) -> datetime:
        return self.service.clock() + timedelta(seconds=self.interval)

    async def _expire(self, ids: list[int]) -> tuple[int, list[int]]:
        """Expire ``ids``; returns how many this call expired and the ids that were busy."""
        if not ids:
            return 0, []
        try:
            expiries = await self.service.expire_many(ids)
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
