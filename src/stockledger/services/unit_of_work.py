"""The unit of work: a batch of commands applied in one transaction (ARCHITECTURE section 12).

:meth:`UnitOfWork.run` takes a batch (commands in arrival order) and:

1. claims the Redis locks of every command's balances in one script call, each command all or
   nothing; a command whose keys another holder has waits for a later batch (``deferred``);
2. in one transaction: looks the idempotency keys up in one statement; locks the reservations
   the commands address, then their balances, in key order, one statement per table, skipping
   rows another transaction holds (those commands are deferred too);
3. applies the commands one after another to the in-memory state (``domain/rules.py``): a
   command that fails fails alone and leaves no trace; a key already done, or done earlier in
   the batch, is a replay;
4. when a reserve or direct deduct is short, loads the due reservations that hold its short
   balances and plans again, so the rule can expire them first;
5. writes every table once (the diff of the final state against what was loaded, plus the
   ledger entries and key rows) and commits once;
6. gives the Redis locks back and updates the expiry index in one pipelined round trip.

Database errors propagate (the batcher retries or splits the batch); a COMMIT whose outcome is
unknown (the connection dropped) is settled by looking the batch's keys up first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from stockledger.db.store import Locked, WriteSet
from stockledger.domain.commands import (
    Adjust,
    Command,
    Confirm,
    Deduct,
    DeductDirect,
    Expire,
    Extend,
    LocationCommand,
    Release,
    Reserve,
    Restock,
    TransferCommand,
    TransferStock,
    addressed_reference,
    addressed_reservation,
    addressed_transfer,
    known_balance_keys,
    named_locations,
)
from stockledger.domain.errors import InsufficientStockError
from stockledger.domain.model import ACTIVE, Balance, BalanceKey, Location, Reservation, Transfer
from stockledger.domain.rules import decide
from stockledger.domain.state import Changes, Refusal, Stock, key_reused
from stockledger.locks import BalanceLocker, ExpiryIndex, IndexChanges
from stockledger.observability import metrics
from stockledger.services.outbox import outbox_rows
from stockledger.services.ports import Store, StoreTransaction

log = logging.getLogger(__name__)

# Due reservations loaded at most per batch for the short balances of its reserves.
MAX_DUE_HOLDS = 500


# ---------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Applied:
    """The command's changes committed (ledger ids filled in where its result shows them).
    An Expire with no changes found nothing to expire."""

    changes: Changes


@dataclass(frozen=True, slots=True)
class Refused:
    """The command failed with a domain error; ``refusal.committed`` did commit."""

    refusal: Refusal


@dataclass(frozen=True, slots=True)
class Replayed:
    """The command's key was already done with the same payload: the call changed nothing,
    except ``committed``: the past-due reservations it addresses, expired on the way when none
    of them is left ACTIVE (a retry that finds them past due expires them like any call)."""

    committed: Changes | None = None


@dataclass(frozen=True, slots=True)
class Busy:
    """The command's balances or reservation stayed held by others past its wait.

    ``early``: given up at its first key busy in this process, because its stock looked sold
    out (the caller reads the balance, then submits again if it was not).
    """

    retry_after_ms: int
    early: bool = False


@dataclass(frozen=True, slots=True)
class Unavailable:
    """The database did not answer within the command's wait; nothing is known to have
    changed (a retry with the same key is safe)."""

    retry_after_ms: int
    cause: str


@dataclass(frozen=True, slots=True)
class Crashed:
    """An unexpected error applying this command alone (a bug, or data the database refused)."""

    error: BaseException


Outcome = Applied | Refused | Replayed | Busy | Unavailable | Crashed


@dataclass(eq=False)
class Pending:
    """A command waiting for its batch, with what the batcher needs to schedule it.

    ``keys``: the balances it will touch as far as known before locking (sorted), for the
    Redis claim and the choice of writer. ``weight``: rows it adds to a batch. ``deadline``
    (``time.monotonic()``): when waiting for busy keys or an absent database ends. ``org_id``:
    the org it acts for (a batch is one org's). ``early``: give up at the first busy key (see
    :class:`Busy`). ``problem``: why it last waited.
    """

    command: Command
    keys: tuple[BalanceKey, ...]
    weight: int
    submitted: float
    deadline: float
    future: asyncio.Future[Outcome]
    org_id: str
    early: bool = False
    problem: str | None = None
    waits: int = 0
    writer: int | None = None  # set: the writer it must go to (else by its first key)
    timer: asyncio.TimerHandle | None = None  # the caller's hard bound (see Batcher)


@dataclass
class BatchResult:
    """What :meth:`UnitOfWork.run` settled, and what waits for a later batch."""

    outcomes: list[tuple[Pending, Outcome]] = field(default_factory=list)
    deferred: list[Pending] = field(default_factory=list)


class IdBlocks:
    """Ids of table ``name`` (reservation, transfer) from hi/lo blocks of its ``id_block``
    sequence, shared by a process's writers; a block costs one short transaction
    (ARCHITECTURE section 12). The next block is fetched in the background when half of the
    one at hand is used, so a batch rarely waits.
    """

    def __init__(self, block_size: int, name: str = "reservation") -> None:
        self.block_size = block_size
        self.name = name
        self._ids: list[int] = []
        self._lock = asyncio.Lock()
        self._refill: asyncio.Task[None] | None = None

    async def take(self, store: Store, count: int) -> list[int]:
        """``count`` fresh ids, increasing; fetches blocks through ``store`` as needed."""
        if count == 0:
            return []
        async with self._lock:
            if len(self._ids) < count and self._refill is not None:
                await asyncio.shield(self._refill)
            while len(self._ids) < count:
                # Shielded: a cancelled caller must not leave the sequence row locked.
                block = await asyncio.shield(
                    store.allocate_ids(self.name, max(self.block_size, count))
                )
                self._ids.extend(block)
            taken, self._ids = self._ids[:count], self._ids[count:]
            if len(self._ids) < self.block_size // 2 and self._refill is None:
                self._refill = asyncio.create_task(self._fetch(store))
        return taken

    async def _fetch(self, store: Store) -> None:
        try:
            block = await store.allocate_ids(self.name, self.block_size)
        except Exception:  # the next take() fetches one itself
            log.warning("fetching the next block of %s ids failed", self.name, exc_info=True)
        else:
            self._ids.extend(block)
        finally:
            self._refill = None

    def discard(self) -> None:
        """Drop the ids at hand (a batch found one already used): the next block starts
        above every id in use."""
        self._ids = []


# ---------------------------------------------------------------------------- the unit of work


@dataclass
class _Loaded:
    """The rows a batch transaction locked, and the rows it found held by others."""

    reservations: dict[int, Reservation] = field(default_factory=dict)
    balances: dict[BalanceKey, Balance] = field(default_factory=dict)
    busy_reservations: set[int] = field(default_factory=set)
    busy_balances: set[BalanceKey] = field(default_factory=set)
    due_checked: set[BalanceKey] = field(default_factory=set)
    transfers: dict[int, Transfer] = field(default_factory=dict)
    busy_transfers: set[int] = field(default_factory=set)
    locations: dict[str, Location] = field(default_factory=dict)


@dataclass
class _Plan:
    """The commands of one batch applied in memory: outcomes so far, and what to write."""

    stock: Stock
    outcomes: list[tuple[Pending, Outcome]] = field(default_factory=list)
    deferred: list[Pending] = field(default_factory=list)
    applied: list[tuple[Pending, Changes]] = field(default_factory=list)
    short: set[BalanceKey] = field(default_factory=set)
    index: IndexChanges = field(default_factory=IndexChanges)


class UnitOfWork:
    """Runs batches on one writer's ``store``; each batch is one org's (its commands'
    ``org_id``: their keys, rows and locks are that org's alone, ARCHITECTURE section 13).

    ``locker``/``index``: the Redis locks and expiry index (no-ops without Redis; the index
    of each batch's org is ``index.of(org_id)``). ``clock`` returns the current UTC time.
    ``ids`` and ``transfer_ids`` hand out reservation and transfer ids (one sequence each for
    every org). ``locations_required``: writes may name registered locations only.
    ``outbox``: write each command's events to the outbox (ARCHITECTURE section 15).
    """

    def __init__(
        self,
        store: Store,
        *,
        locker: BalanceLocker,
        index: ExpiryIndex,
        clock: Callable[[], datetime],
        ids: IdBlocks,
        transfer_ids: IdBlocks | None = None,
        locations_required: bool = False,
        outbox: bool = True,
    ) -> None:
        self.store = store
        self.locker = locker
        self.index = index
        self.clock = clock
        self.ids = ids
        self.transfer_ids = transfer_ids or IdBlocks(ids.block_size, "transfer")
        self.locations_required = locations_required
        self.outbox = outbox

    async def run(self, batch: Sequence[Pending], *, patient: bool = False) -> BatchResult:
        """Apply ``batch`` in one transaction; see the module docstring.

        ``patient``: wait for rows other transactions hold instead of skipping them (for a
        command that waited too often). Raises the database's errors (nothing committed, or,
        for a lost COMMIT, nothing known to have committed), and ValueError for a batch of
        several orgs.
        """
        org_id = batch[0].org_id
        if any(p.org_id != org_id for p in batch):
            raise ValueError("a batch is one org's")
        index = self.index.of(org_id)
        # Ids first: a claim's leases are kept alive only while the batch is in the database.
        reservation_ids = await self.ids.take(
            self.store, sum(isinstance(p.command, Reserve) for p in batch)
        )
        transfer_ids = await self.transfer_ids.take(
            self.store, sum(isinstance(p.command, TransferStock) for p in batch)
        )
        claim = await self.locker.claim(org_id, [p.keys for p in batch])
        result = BatchResult()
        runnable = []
        claimed_at = time.monotonic()
        for p, granted in zip(batch, claim.granted, strict=True):
            if granted:
                runnable.append(p)
                if claim.names and p.keys:
                    metrics.LOCK_WAIT_SECONDS.observe(claimed_at - p.submitted)
            else:
                p.problem = "busy"
                result.deferred.append(p)
        changes = IndexChanges()
        try:
            if runnable:
                async with self.locker.keep(claim):
                    plan = await self._transaction(
                        org_id, index, runnable, (reservation_ids, transfer_ids), patient
                    )
                result.outcomes += plan.outcomes
                result.deferred += plan.deferred
                changes = plan.index
        finally:
            await self.locker.release_with(claim, index, changes)
        return result

    async def _transaction(
        self,
        org_id: str,
        index: ExpiryIndex,
        batch: list[Pending],
        new_ids: tuple[list[int], list[int]],
        patient: bool,
    ) -> _Plan:
        async with self.store.transaction(org_id) as tx:
            keyed = [p.command.idempotency_key for p in batch if not isinstance(p.command, Expire)]
            found = await tx.find_keys(keyed) if keyed else {}
            stored = {k: (v.operation, v.request_hash) for k, v in found.items()}
            loaded = await self._lock(tx, batch, patient)
            now = self.clock()  # as of the row locks: a call that waited past expiry sees it
            plan = self._plan(batch, loaded, stored, new_ids, now)
            wanted = plan.short - loaded.due_checked
            if wanted and await self._load_due_holds(tx, loaded, wanted, now):
                plan = self._plan(batch, loaded, stored, new_ids, now)
            ws, spans = self._write_set(plan, loaded, now)
            ids = await tx.write(ws)
            if self.outbox:
                events = outbox_rows(org_id, [c for _, c in plan.applied], ids, now)
                if events:
                    await tx.insert_events(events, now)
            lost: Exception | None = None
            try:
                await tx.commit()
            except Exception as exc:
                lost = exc
        if lost is not None and not await self._committed_anyway(org_id, ws):
            # The COMMIT failed before it happened (or cannot be told): the batch runs again.
            # If it did commit after all, the rerun only replays, and these expiries would
            # never reach the index: have the sweeper scan for them.
            index.missed(_index_changes(plan, ws))
            raise lost
        if ids:
            _fill_ledger_ids(plan, spans, ids)
        plan.index = _index_changes(plan, ws)
        return plan

    async def _committed_anyway(self, org_id: str, ws: WriteSet) -> bool:
        """Whether a batch whose COMMIT raised did commit (see ``Store.committed``)."""
        await self.store.discard()
        try:
            return await self.store.committed(org_id, ws)
        except Exception:
            log.warning("could not tell whether a batch committed; it runs again", exc_info=True)
            return False

    async def _lock(self, tx: StoreTransaction, batch: list[Pending], patient: bool) -> _Loaded:
        """Lock what the batch addresses: reservations (by id, and the ACTIVE and CONFIRMED ones
        of each reference), then transfers, then every balance those and the commands touch,
        in key order; then read the locations they name (under a shared lock, or an exclusive
        one when the batch changes locations)."""
        ids = {i for p in batch if (i := addressed_reservation(p.command)) is not None}
        refs = [ref for p in batch if (ref := addressed_reference(p.command)) is not None]
        if refs:
            ids.update(await tx.active_reservation_ids(refs))
        reservations = await tx.lock_reservations(sorted(ids), wait=patient)
        transfer_ids = {i for p in batch if (i := addressed_transfer(p.command)) is not None}
        transfers = await tx.lock_transfers(sorted(transfer_ids), wait=patient)
        keys = {k for p in batch for k in known_balance_keys(p.command)}
        for held in reservations.rows.values():
            keys.update(ln.key for ln in held.lines or ())
        codes = {code for p in batch for code in named_locations(p.command)}
        for moving in transfers.rows.values():
            keys.update(moving.balance_keys())
            codes.update((moving.from_location, moving.to_location))
        balances = await tx.lock_balances(sorted(keys), wait=patient)
        changes_locations = any(isinstance(p.command, LocationCommand) for p in batch)
        locations = await tx.lock_locations(sorted(codes), update=changes_locations)
        return _Loaded(
            dict(reservations.rows),
            dict(balances.rows),
            set(reservations.busy),
            set(balances.busy),
            transfers=dict(transfers.rows),
            busy_transfers=set(transfers.busy),
            locations=locations,
        )

    async def _load_due_holds(
        self, tx: StoreTransaction, loaded: _Loaded, keys: set[BalanceKey], now: datetime
    ) -> bool:
        """Load (and lock, skipping busy rows) the due reservations holding ``keys`` with the
        balances they hold. True when it found any to plan with."""
        loaded.due_checked |= keys
        due = [i for i in await tx.due_holding(sorted(keys), now, MAX_DUE_HOLDS)]
        due = [i for i in due if i not in loaded.reservations]
        if not due:
            return False
        more = await tx.lock_reservations(due, wait=False)
        extra = {
            ln.key
            for r in more.rows.values()
            for ln in r.lines or ()
            if ln.key not in loaded.balances
        }
        balances = await tx.lock_balances(sorted(extra), wait=False) if extra else Locked({})
        loaded.balances.update(balances.rows)
        found = False
        for r in more.rows.values():
            # Expiring it must change every balance it holds: only when all are locked here.
            if all(k in loaded.balances for k in r.holds()):
                loaded.reservations[r.id] = r
                found = True
        return found

    def _plan(
        self,
        batch: list[Pending],
        loaded: _Loaded,
        stored: dict[str, tuple[str, str]],
        new_ids: tuple[list[int], list[int]],
        now: datetime,
    ) -> _Plan:
        """Apply the commands in arrival order to the loaded state (in memory only);
        ``new_ids``: fresh reservation ids and transfer ids, enough for every reserve and
        transfer of the batch."""
        # A reservation with a balance held elsewhere stays out of the state the rules see:
        # the commands addressing it wait (below), and no rule may expire it without that
        # balance's row.
        usable = [
            r
            for r in loaded.reservations.values()
            if not any(ln.key in loaded.busy_balances for ln in r.lines or ())
        ]
        usable_transfers = [
            t
            for t in loaded.transfers.values()
            if not any(k in loaded.busy_balances for k in t.balance_keys())
        ]
        plan = _Plan(
            Stock(
                loaded.balances.values(),
                usable,
                locations=loaded.locations.values(),
                transfers=usable_transfers,
                locations_required=self.locations_required,
            )
        )
        reservation_ids, transfer_ids = iter(new_ids[0]), iter(new_ids[1])
        # Keys that succeeded earlier in this batch: (operation, request hash), as stored.
        done: dict[str, tuple[str, str]] = {}
        for p in batch:
            command = p.command
            if self._touches_busy(command, loaded):
                p.problem = "row"
                plan.deferred.append(p)
                continue
            if not isinstance(command, Expire):
                key = command.idempotency_key
                earlier = stored.get(key) or done.get(key)
                if earlier is not None:
                    reused = key_reused(key, earlier, (command.operation, command.request_hash))
                    if reused is None:
                        committed = _expired_on_replay(plan.stock, command, now)
                        if committed is not None:
                            plan.stock.apply(committed)
                            plan.applied.append((p, committed))
                        plan.outcomes.append((p, Replayed(committed)))
                    else:
                        plan.outcomes.append((p, Refused(Refusal(reused))))
                    continue
            new_id = next(reservation_ids) if isinstance(command, Reserve) else None
            new_transfer = next(transfer_ids) if isinstance(command, TransferStock) else None
            try:
                decision = decide(
                    plan.stock,
                    command,
                    now,
                    new_reservation_id=new_id,
                    new_transfer_id=new_transfer,
                )
            except Exception as exc:  # a bug for this command: it fails alone
                log.exception("applying %s failed", command.operation)
                plan.outcomes.append((p, Crashed(exc)))
                continue
            if isinstance(decision, Changes):
                plan.stock.apply(decision)
                plan.applied.append((p, decision))
                plan.outcomes.append((p, Applied(decision)))
                if not isinstance(command, Expire):
                    done[command.idempotency_key] = (command.operation, command.request_hash)
                continue
            if decision.committed is not None:
                plan.stock.apply(decision.committed)
                plan.applied.append((p, decision.committed))
            plan.outcomes.append((p, Refused(decision)))
            if isinstance(command, Reserve | DeductDirect | TransferStock) and isinstance(
                decision.error, InsufficientStockError
            ):
                plan.short.update((s.location, s.sku) for s in decision.error.shortages)
        return plan

    @staticmethod
    def _touches_busy(command: Command, loaded: _Loaded) -> bool:
        """Whether a command needs a row another transaction holds (it waits for a later
        batch). By reference it touches every ACTIVE or CONFIRMED reservation with it."""
        if not (loaded.busy_reservations or loaded.busy_balances or loaded.busy_transfers):
            return False
        tid = addressed_transfer(command)
        if tid is not None:
            if tid in loaded.busy_transfers:
                return True
            moving = loaded.transfers.get(tid)
            moved = moving.balance_keys() if moving is not None else []
            return any(k in loaded.busy_balances for k in moved)
        rid = addressed_reservation(command)
        ids = [rid] if rid is not None else []
        reference = addressed_reference(command)
        if reference is not None:
            if loaded.busy_reservations:
                return True  # a busy row may be one of this reference's (its status unknown)
            ids += [
                r.id for r in loaded.reservations.values() if r.reference == reference and r.holding
            ]
        if any(i in loaded.busy_reservations for i in ids):
            return True
        keys = set(known_balance_keys(command))
        for i in ids:
            held = loaded.reservations.get(i)
            if held is not None:
                keys.update(ln.key for ln in held.lines or ())
        return any(k in loaded.busy_balances for k in keys)

    def _write_set(
        self, plan: _Plan, loaded: _Loaded, now: datetime
    ) -> tuple[WriteSet, dict[Pending, int]]:
        """The final state's difference from what was loaded, plus entries and key rows.

        Also returns, for each command whose result shows its ledger entries (restock,
        adjust, deduct), the index of its first entry in ``WriteSet.entries``.
        """
        ws = WriteSet(now, all_ids=self.outbox)
        for key, balance in sorted(plan.stock.balances.items()):
            loaded_balance = loaded.balances.get(key)
            if loaded_balance is None:
                ws.new_balances.append(balance)
            elif balance != loaded_balance:
                ws.balances.append(balance)
        for rid, reservation in sorted(plan.stock.reservations.items()):
            before = loaded.reservations.get(rid)
            if before is None:
                ws.new_reservations.append(reservation)
                continue
            if reservation == before:
                continue
            ws.reservations.append(reservation)
            for line, old in zip(reservation.lines or (), before.lines or (), strict=True):
                if line != old:
                    ws.lines.append((rid, line))
        for code, location in sorted(plan.stock.locations.items()):
            before_location = loaded.locations.get(code)
            if before_location is None:
                ws.new_locations.append(location)
            elif location != before_location:
                ws.locations.append(location)
        for tid, moving in sorted(plan.stock.transfers.items()):
            before_transfer = loaded.transfers.get(tid)
            if before_transfer is None:
                ws.new_transfers.append(moving)
            elif moving != before_transfer:
                ws.transfers.append(moving)
                for tline, old_tline in zip(moving.lines, before_transfer.lines, strict=True):
                    if tline != old_tline:
                        ws.transfer_lines.append((tid, tline))
        spans: dict[Pending, int] = {}
        for p, changes in plan.applied:  # arrival order: the ledger's append order
            if changes.key_row is not None:
                ws.keys.append(changes.key_row)
                if isinstance(
                    p.command, Restock | Adjust | Deduct | DeductDirect | TransferCommand
                ):
                    ws.keys_needing_ids.add(changes.key_row.idempotency_key)
                    spans[p] = len(ws.entries)
            ws.entries.extend(changes.entries)
        return ws, spans


def _expired_on_replay(stock: Stock, command: Command, now: datetime) -> Changes | None:
    """What a retry of a done release, deduct, extend or confirm commits anyway: the expiry of
    the reservations it addresses when every one of them is past due (section 11, "Expiry")."""
    if not isinstance(command, Release | Deduct | Extend | Confirm):
        return None
    decision = decide(stock, command, now)
    return decision.committed if isinstance(decision, Refusal) else None


def _fill_ledger_ids(plan: _Plan, spans: dict[Pending, int], ids: dict[int, int]) -> None:
    """Give the applied commands whose results show ledger entries their entries' ids."""
    for n, (p, outcome) in enumerate(plan.outcomes):
        start = spans.get(p)
        if start is None or not isinstance(outcome, Applied):
            continue
        entries = tuple(
            dataclasses.replace(e, id=ids.get(start + i))
            for i, e in enumerate(outcome.changes.entries)
        )
        plan.outcomes[n] = (p, Applied(dataclasses.replace(outcome.changes, entries=entries)))


def _index_changes(plan: _Plan, ws: WriteSet) -> IndexChanges:
    """Expiries to add or move (reservations left ACTIVE) and to forget (no longer ACTIVE:
    a CONFIRMED one leaves the index too, it has no expiry),
    from the final state of what the batch wrote; an expire that found its reservation not
    due puts it back at its expiry (a stale index entry), one that found it gone forgets it."""
    changes = IndexChanges()
    for r in [*ws.new_reservations, *ws.reservations]:
        if r.status == ACTIVE and r.expires_at is not None:
            changes.schedule[r.id] = r.expires_at
        else:
            changes.unschedule.append(r.id)
    for p, outcome in plan.outcomes:
        command = p.command
        if isinstance(command, Expire) and isinstance(outcome, Applied):
            if not outcome.changes.reservations:
                found = plan.stock.reservation(command.reservation_id)
                if found is not None and found.status == ACTIVE and found.expires_at is not None:
                    changes.schedule[found.id] = found.expires_at
                else:
                    changes.unschedule.append(command.reservation_id)
    return changes


def weight(command: Command) -> int:
    """Rows a command adds to a batch (its lines; one for a whole-reservation call)."""
    cart = getattr(command, "cart", None)
    return len(cart.lines) if cart is not None else 1


def sorted_keys(keys: Iterable[BalanceKey]) -> tuple[BalanceKey, ...]:
    return tuple(sorted(set(keys)))
