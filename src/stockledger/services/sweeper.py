"""The expiry sweeper (ARCHITECTURE section 6).

Every ``interval`` seconds it pops the reservations due in the Redis expiry index and expires
each through :meth:`InventoryService.expire_reservation` (EXPIRE ledger entries, balances
restored). Every ``scan_interval`` seconds, and on its first pass, it also scans the database
index (status, expires_at), which catches whatever Redis lost; on every pass while expiries
that this process failed to write to Redis are not yet past (``index.unindexed_until``).
Expiry is idempotent: several sweepers (several servers) may run at once and each reservation
is expired exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from stockledger.locks import ExpiryIndex
from stockledger.observability import metrics
from stockledger.services.inventory import InventoryService

log = logging.getLogger(__name__)


class Sweeper:
    """Expires due reservations; :meth:`run_once` is one pass, :meth:`run_forever` the loop.

    ``index`` needs ``pop_due(now, limit) -> list[int]`` (the Redis index); without one only the
    database scan runs. Intervals are seconds; ``batch`` bounds the ids taken per pass.
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
        self.index = index
        self.interval = interval
        self.scan_interval = scan_interval
        self.batch = batch
        self._last_scan: float | None = None  # time.monotonic() of the last database scan
        self._last_scan_clock = datetime.min.replace(tzinfo=UTC)  # service clock, same scan

    async def run_once(self, *, scan: bool | None = None) -> int:
        """One pass: pop due ids from the index, then (if due or ``scan``) the database scan.

        Returns the number of reservations this pass expired.
        """
        expired = 0
        pop_due = getattr(self.index, "pop_due", None)
        if pop_due is not None:
            while True:
                ids = await pop_due(self.service.clock(), self.batch)
                done = await self._expire(ids)
                expired += done
                if len(ids) < self.batch or done == 0:
                    break
        now = time.monotonic()
        unindexed = getattr(self.index, "unindexed_until", None)
        if scan or (
            scan is None
            and (
                self._last_scan is None
                or now - self._last_scan >= self.scan_interval
                or (unindexed is not None and self._last_scan_clock <= unindexed)
            )
        ):
            self._last_scan = now
            self._last_scan_clock = self.service.clock()
            while True:
                ids = await self.service.due_reservation_ids(self.batch)
                done = await self._expire(ids)
                expired += done
                # A full batch that expired nothing (each failing) must not spin forever.
                if len(ids) < self.batch or done == 0:
                    break
        return expired

    async def _expire(self, ids: list[int]) -> int:
        count = 0
        for rid in ids:
            try:
                record = await self.service.expire_reservation(rid)
            except Exception:  # one bad reservation must not stop the sweep
                log.exception("expiring reservation %s failed", rid)
                # pop_due took it out of the index: put it back (due now) for the next pass.
                schedule = getattr(self.index, "schedule", None)
                if schedule is not None:
                    await schedule(rid, self.service.clock())
                continue
            if record is not None:
                count += 1
                lag = (self.service.clock() - record.expires_at).total_seconds()
                metrics.EXPIRY_BACKLOG_SECONDS.observe(max(lag, 0.0))
        return count

    async def run_forever(self) -> None:
        """Sweep every ``interval`` seconds until cancelled; errors are logged, not fatal."""
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("expiry sweep failed")
            await asyncio.sleep(self.interval)
