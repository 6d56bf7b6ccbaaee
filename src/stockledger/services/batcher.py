"""Group commit: concurrent commands wait on a queue; a few writers run them in batches.

Each writer (``STOCKLEDGER_WRITE_CONNECTIONS``, one database connection each; one on SQLite)
has its own queue. A command goes to the writer of its first balance key, so one hot SKU's
commands always meet in one writer's batches (its row is locked once per batch) while other
SKUs' go to the others. A writer takes whatever waits, up to ``batch_max_commands`` commands and
``batch_max_rows`` lines, and runs it as one transaction (:class:`UnitOfWork`); batches form
while the previous transaction is in flight, with no timer, so one request alone is not delayed
(ARCHITECTURE section 12).

Per command (its ``deadline`` is its arrival plus the lock wait, ``STOCKLEDGER_LOCK_WAIT_SECONDS``):

- keys another holder has: it waits for a later batch (jittered backoff), and past its
  deadline it is settled :class:`Busy`; one that waited too often for rows other transactions
  held runs alone on a lane of its own (one more connection), waiting on the row locks instead
  of skipping them, which is fair when Redis cannot arbitrate and never holds up a writer;
- deadlock, lock wait timeout, duplicate key (a copy committed elsewhere), a lost connection:
  the whole batch runs again (bounded, jittered), on a fresh connection after a lost one; a
  batch that keeps failing is split in halves, so one poisoned command fails alone
  (:class:`Crashed`); past its deadline a command the database kept failing is
  :class:`Unavailable`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from stockledger.config import Settings
from stockledger.db.engine import retry_reason
from stockledger.domain.commands import Command, addressed_reference, addressed_reservation
from stockledger.domain.model import BalanceKey
from stockledger.locks import BalanceLocker, ExpiryIndex
from stockledger.observability import metrics
from stockledger.services.ports import Store
from stockledger.services.unit_of_work import (
    Busy,
    Crashed,
    IdBlocks,
    Outcome,
    Pending,
    Unavailable,
    UnitOfWork,
    weight,
)

log = logging.getLogger(__name__)

# A command deferred this many times for busy rows runs alone, waiting for the row locks.
PATIENT_AFTER_WAITS = 25
# Connection-level failures: past the deadline the command is Unavailable, not Busy.
_DATABASE_AWAY = {"connection_lost"}


class Batcher:
    """Per-process queues and ``writers`` writer tasks, each with its own store from
    ``stores()`` (one database connection), for every org: each batch is one org's (the
    commands a writer takes are those of the org of the first one waiting).

    Writers start with the first command. ``clock`` is the services' UTC clock; the lock wait
    of ``locker`` (seconds) bounds each command's total time, retries included.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        stores: Callable[[], Store],
        writers: int,
        locker: BalanceLocker,
        index: ExpiryIndex,
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = settings
        self.locker = locker
        self.wait = locker.wait
        self.writers = writers
        self.max_commands = settings.batch_max_commands
        self.max_rows = settings.batch_max_rows
        self.ids = ids = IdBlocks(settings.id_block_size)
        self.transfer_ids = transfer_ids = IdBlocks(settings.id_block_size, "transfer")
        required = settings.require_registered_locations
        self._stores = [stores() for _ in range(self.writers)]
        self._units = [
            UnitOfWork(
                s,
                locker=locker,
                index=index,
                clock=clock,
                ids=ids,
                transfer_ids=transfer_ids,
                locations_required=required,
                outbox=settings.outbox,
            )
            for s in self._stores
        ]
        # The patient lane: commands that starved behind rows held elsewhere, one at a time,
        # waiting on the row locks on a connection of their own.
        self._patient_store = stores()
        self._patient_unit = UnitOfWork(
            self._patient_store,
            locker=locker,
            index=index,
            clock=clock,
            ids=ids,
            transfer_ids=transfer_ids,
            locations_required=required,
            outbox=settings.outbox,
        )
        self._patient: collections.deque[Pending] = collections.deque()
        self._patient_wake = asyncio.Event()
        self._database_away = False  # the last batch lost its connection
        self._queues: list[collections.deque[Pending]] = [
            collections.deque() for _ in range(self.writers)
        ]
        self._wake: list[asyncio.Event] = [asyncio.Event() for _ in range(self.writers)]
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._outstanding: set[Pending] = set()  # submitted and not settled

    # ------------------------------------------------------------------ callers

    async def submit(
        self,
        org_id: str,
        command: Command,
        keys: Sequence[BalanceKey],
        *,
        early: bool = False,
        patience: float | None = None,
    ) -> Outcome:
        """Run ``command`` for ``org_id`` in the next batch of its writer; its outcome once
        that committed.

        ``keys``: the balances it touches as far as known (a hint for locks and routing).
        ``early``: settle it :class:`Busy` at its first busy key held by this process (its
        stock looked sold out: the caller reads the balance first). ``patience`` (seconds,
        default the lock wait) bounds its wait.
        """
        outcomes = await self.submit_many(org_id, [(command, keys)], patience=patience, early=early)
        return outcomes[0]

    async def submit_many(
        self,
        org_id: str,
        items: Sequence[tuple[Command, Sequence[BalanceKey]]],
        *,
        patience: float | None = None,
        early: bool = False,
        together: bool = False,
    ) -> list[Outcome]:
        """Queue every command of ``org_id`` at once (in order) and return their outcomes in
        that order.

        ``together``: all go to one writer, whose batches run one after another, so the
        commands apply in input order (an earlier one wins the last units), unless one waits
        for a balance busy elsewhere.
        """
        self._start()
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        deadline = now + (self.wait if patience is None else patience)
        pendings: list[Pending] = []
        for command, keys in items:
            p = Pending(
                command,
                tuple(sorted(set(keys))),
                weight(command),
                now,
                deadline,
                loop.create_future(),
                org_id,
                early,
            )
            if together and pendings:
                p.writer = pendings[0].writer
            elif together:
                p.writer = self._writer_of(p)
            pendings.append(p)
            self._outstanding.add(p)
            self._enqueue(p)
            # The caller's answer is bounded even if a writer is stuck in the database: past
            # its deadline by another wait, it is UNAVAILABLE (the batch may still commit
            # later; a retry with the same key then replays it).
            p.timer = loop.call_at(loop.time() + (deadline - now) + self.wait, self._give_up, p)
        return list(await asyncio.gather(*(p.future for p in pendings)))

    def _give_up(self, p: Pending) -> None:
        if not p.future.done():
            log.warning("a write outlived its wait in the database: answering UNAVAILABLE")
            self._settle(p, Unavailable(self.locker.retry_after_ms(), "database too slow"))

    async def close(self, grace: float = 10.0) -> None:
        """Stop the writers once what is queued has run, and give their connections back.

        A writer is never cancelled in the middle of a query (ARCHITECTURE section 4): it
        finishes its batch; only past ``grace`` seconds are the stragglers cancelled.
        """
        tasks, self._tasks = self._tasks, []
        self._closing = True
        for wake in [*self._wake, self._patient_wake]:
            wake.set()
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=grace)
        for task in stuck:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Commands waiting in a backoff timer when the writers stopped get an answer too.
        for p in list(self._outstanding):
            self._settle(p, Unavailable(self.locker.retry_after_ms(), "shutting down"))

    # ------------------------------------------------------------------ queues

    def _start(self) -> None:
        if self._closing:
            raise RuntimeError("the batcher is closed")
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._writer(i), name=f"stockledger-writer-{i}")
                for i in range(self.writers)
            ]
            self._tasks.append(
                asyncio.create_task(self._patient_lane(), name="stockledger-patient")
            )

    def _writer_of(self, p: Pending) -> int:
        if self.writers == 1:
            return 0
        if p.writer is not None:
            return p.writer
        if p.keys:
            return hash((p.org_id, p.keys[0])) % self.writers
        rid = addressed_reservation(p.command)
        if rid is not None:
            return rid % self.writers  # ids are unique across orgs
        return hash((p.org_id, addressed_reference(p.command))) % self.writers

    def _enqueue(self, p: Pending, *, front: bool = False) -> None:
        i = self._writer_of(p)
        if front:
            self._queues[i].appendleft(p)
        else:
            self._queues[i].append(p)
        self._wake[i].set()

    def _enqueue_first(self, p: Pending) -> None:
        """Queue a command that waited ahead of newer ones (it arrived before them)."""
        if self._closing:
            self._settle(p, Unavailable(self.locker.retry_after_ms(), "shutting down"))
            return
        self._enqueue(p, front=True)

    def _retry_later(self, p: Pending) -> None:
        """Queue a deferred command again after a jittered backoff (1 ms growing to 20 ms)."""
        p.waits += 1
        if p.early and self.locker.held_here(p.org_id, p.keys):
            self._settle(p, Busy(self.locker.retry_after_ms(), early=True))
            return
        if p.waits >= PATIENT_AFTER_WAITS and p.problem == "row":
            self._patient.append(p)
            self._patient_wake.set()
            return
        delay = random.uniform(0, min(0.02, 0.001 * 2 ** min(p.waits, 5)))
        asyncio.get_running_loop().call_later(delay, self._enqueue_first, p)

    def _take(self, queue: collections.deque[Pending]) -> list[Pending]:
        """Whatever waits of the first waiting command's org, in order, up to the caps (at
        least one command); other orgs' commands keep their places for the next batches."""
        batch: list[Pending] = []
        others: list[Pending] = []
        rows = 0
        while queue and len(batch) < self.max_commands:
            p = queue[0]
            if p.future.done():  # its caller went away before it ran
                self._outstanding.discard(queue.popleft())
                continue
            if batch and p.org_id != batch[0].org_id:
                others.append(queue.popleft())
                continue
            if batch and rows + p.weight > self.max_rows:
                break
            batch.append(queue.popleft())
            rows += p.weight
        queue.extendleft(reversed(others))
        return batch

    def _settle(self, p: Pending, outcome: Outcome) -> None:
        self._outstanding.discard(p)
        if p.timer is not None:
            p.timer.cancel()  # and the command is not kept alive until it would have fired
        if not p.future.done():
            p.future.set_result(outcome)

    # ------------------------------------------------------------------ writers

    async def _writer(self, i: int) -> None:
        queue, wake, uow = self._queues[i], self._wake[i], self._units[i]
        try:
            while True:
                wake.clear()  # before looking, so a command queued meanwhile wakes us
                batch = self._take(queue)
                if batch:
                    await self._guarded(uow, batch)
                    continue
                # Idle: the connection goes back to the pool (cheap: no reset round trip,
                # every batch ended its transaction) and is taken again with the next batch.
                await self._stores[i].close()
                if self._closing:
                    return
                if not queue:
                    await wake.wait()
        finally:
            await self._stores[i].discard()

    async def _patient_lane(self) -> None:
        queue, wake = self._patient, self._patient_wake
        try:
            while True:
                wake.clear()
                if queue:
                    await self._guarded(self._patient_unit, [queue.popleft()], patient=True)
                    continue
                await self._patient_store.close()
                if self._closing:
                    return
                await wake.wait()
        finally:
            await self._patient_store.discard()

    async def _guarded(
        self, uow: UnitOfWork, batch: list[Pending], *, patient: bool = False
    ) -> None:
        """:meth:`_run`, where a failure of the batcher itself fails the batch, not the
        writer (which goes on with the next batch)."""
        try:
            await self._run(uow, batch, patient=patient)
        except Exception as exc:
            log.exception("a write batch failed")
            for p in batch:
                self._settle(p, Crashed(exc))

    async def _run(self, uow: UnitOfWork, batch: list[Pending], *, patient: bool = False) -> None:
        """Run ``batch`` until every command is settled or deferred; see the module docstring."""
        attempt = 0
        while True:
            batch = self._drop_late(batch)
            if not batch:
                return
            started = time.monotonic()
            try:
                result = await uow.run(batch, patient=patient)
            except Exception as exc:
                reason = retry_reason(exc)
                if reason is None:
                    if len(batch) == 1:
                        log.error("a write failed unexpectedly", exc_info=exc)
                        self._settle(batch[0], Crashed(exc))
                        return
                    await self._split(uow, batch, patient)
                    return
                metrics.TRANSACTION_RETRIES_TOTAL.labels(reason=reason).inc()
                problem = "database" if reason in _DATABASE_AWAY else "row"
                for p in batch:
                    p.problem = problem
                if reason in _DATABASE_AWAY:
                    self._database_away = True
                    await uow.store.discard()
                if reason == "duplicate_key":
                    self.ids.discard()  # maybe a reservation id given out elsewhere
                attempt += 1
                if attempt >= self.settings.retry_max_attempts and len(batch) > 1:
                    await self._split(uow, batch, patient)
                    return
                await asyncio.sleep(self._backoff(attempt))
                continue
            self._database_away = False
            metrics.BATCH_SIZE.observe(len(batch))
            metrics.BATCH_SECONDS.observe(time.monotonic() - started)
            for p, outcome in result.outcomes:
                self._settle(p, outcome)
            for p in result.deferred:
                self._retry_later(p)
            return

    async def _split(self, uow: UnitOfWork, batch: list[Pending], patient: bool) -> None:
        half = len(batch) // 2
        await self._run(uow, batch[:half], patient=patient)
        await self._run(uow, batch[half:], patient=patient)

    def _drop_late(self, batch: list[Pending]) -> list[Pending]:
        """Settle the commands whose wait ran out (Busy, or Unavailable while the database
        does not answer: whatever a command waited for, it could not have committed); the
        rest run."""
        now = time.monotonic()
        keep = []
        for p in batch:
            if p.future.done():
                self._outstanding.discard(p)
                continue
            if now < p.deadline:
                keep.append(p)
            elif p.problem == "database" or self._database_away:
                self._settle(p, Unavailable(self.locker.retry_after_ms(), "database unavailable"))
            else:
                self._settle(p, Busy(self.locker.retry_after_ms()))
        return keep

    def _backoff(self, attempt: int) -> float:
        """Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter") between the
        settings' initial and maximum backoff (seconds)."""
        s = self.settings
        cap = min(s.retry_max_backoff_seconds, s.retry_initial_backoff_seconds * 2**attempt)
        return random.uniform(0, cap)
