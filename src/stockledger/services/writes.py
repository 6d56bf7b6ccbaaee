"""The write services: restock, adjust, reserve, release, deduct, extend, confirm and expire.

Each public coroutine builds its validated command (``domain/commands.py``: nothing invalid
reaches a store), hands it to the batcher (``services/batcher.py``), which applies it with
others in one transaction (``services/unit_of_work.py``, rules in ``domain/rules.py``), and
turns the outcome into the call's result or error. Then it counts the call in the metrics of
ARCHITECTURE section 10 and writes its one log line.

A call that waited past its lock wait (keys held elsewhere) answers, in this order: its replay
if its key is already done, InsufficientStockError when a read of the committed balance finds a
line short (reserve, direct deduct), else LockTimeoutError.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from stockledger.config import Settings
from stockledger.db.engine import Database, is_connection_lost
from stockledger.db.store import SqlStore
from stockledger.domain.commands import (
    Adjust,
    CancelTransfer,
    ClearReorderPoint,
    Command,
    Confirm,
    CreateLocation,
    Deduct,
    DeductDirect,
    Expire,
    Extend,
    ReceiveTransfer,
    Release,
    Reserve,
    Restock,
    SetReorderPoint,
    TransferStock,
    UpdateLocation,
    addressed_reference,
    addressed_reservation,
    addressed_transfer,
    known_balance_keys,
)
from stockledger.domain.errors import (
    InsufficientStockError,
    LockTimeoutError,
    StockError,
)
from stockledger.domain.ids import reservation_global_id, transfer_global_id
from stockledger.domain.model import RECEIVED, BalanceKey, Line, Reference, Reservation
from stockledger.domain.rules import shortages
from stockledger.domain.state import Changes
from stockledger.domain.validation import Cart, check_batch
from stockledger.locks import BalanceLocker, ExpiryIndex, NoExpiryIndex, NoLocks
from stockledger.observability import metrics
from stockledger.observability.logs import get_logger
from stockledger.services.batcher import Batcher
from stockledger.services.errors import ServiceUnavailableError
from stockledger.services.lookups import (
    SqlLookups,
    due_reservations_of_every_org,
    transfer_result_keys,
)
from stockledger.services.ports import Lookups, Store
from stockledger.services.records import (
    AdjustResult,
    ConfirmResult,
    ConsumeRequest,
    DeductResult,
    ExtendResult,
    LocationResult,
    ReleaseResult,
    ReorderPointResult,
    ReserveRequest,
    ReserveResult,
    RestockResult,
    TransferLineRequest,
    TransferResult,
)
from stockledger.services.rows import utcnow
from stockledger.services.unit_of_work import (
    Applied,
    Busy,
    Crashed,
    Outcome,
    Refused,
    Replayed,
    Unavailable,
)

Clock = Callable[[], datetime]
Hints = dict[int | Reference | tuple[str, int], list[BalanceKey]]
"""Balances of addressed reservations (by id or reference) and transfers (``("transfer", id)``)."""
_log = get_logger("stockledger.writes")

# How long the sweeper's expiries wait for busy rows (seconds) before it tries them again on a
# later pass: long enough for a concurrent batch on the same balances, short enough that one
# row held by another session does not hold up the rest of the sweep.
EXPIRE_PATIENCE_SECONDS = 1.0
# Balances remembered as last seen available (a hint: see _looks_short).
_SEEN_CAP = 10_000


@dataclass(frozen=True, slots=True)
class Expiry:
    """What one expire did: ``expired`` is the reservation it expired (None: nothing to do:
    not ACTIVE, not due, or missing); ``busy``: its rows stayed held, try again later."""

    reservation_id: int
    expired: Reservation | None
    busy: bool = False


# The outcome labels a call's metrics and log line may carry besides the codes of its domain
# errors (lowercased): kept beside _Answer, whose outcomes they are, for the series the app
# declares at 0 (resolvers/mutation.py: declare_outcome_series).
CALL_OUTCOMES = ("success", "replayed", "unavailable", "lock_timeout", "error")
EXPIRY_OUTCOMES = ("success", "skipped", "error")


@dataclass
class _Answer:
    """A call's end: its result or error, the outcome label of the metrics and the log line,
    and what it committed (for the log line)."""

    outcome: str
    result: Any = None
    error: BaseException | None = None
    committed: Changes | None = None


class InventoryService:
    """The stock rules of ARCHITECTURE section 3 over one :class:`Database`, for one org
    (``org_id``, default ``settings.org_id``); :meth:`for_org` gives the same service for
    another org, sharing the write batches.

    ``clock`` returns the current UTC time (tests pass their own to control expiry).
    ``locker`` and ``expiry_index`` default to no-ops (database locks alone, expiry by scan).
    ``stores`` and ``lookups`` default to SQL over ``db`` (``tests/unit/fakes.py`` passes
    in-memory ones; ``db`` is then unused, and the service has no other org). Quantities are
    units of stock; TTLs are seconds.
    """

    def __init__(
        self,
        db: Database | None,
        settings: Settings,
        *,
        clock: Clock = utcnow,
        locker: BalanceLocker | None = None,
        expiry_index: ExpiryIndex | None = None,
        org_id: str | None = None,
        stores: Callable[[], Store] | None = None,
        lookups: Lookups | None = None,
        writers: int | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self.locker: BalanceLocker = locker or NoLocks(settings.lock_wait_seconds)
        self.expiry_index: ExpiryIndex = expiry_index or NoExpiryIndex()
        self.org_id = org_id = org_id or settings.org_id
        if stores is None or lookups is None:
            if db is None:
                raise ValueError("give a database, or both stores and lookups")
            sql = db
            stores = stores or (lambda: SqlStore(sql))
            lookups = lookups or SqlLookups(db, org_id)
            writers = writers or (1 if db.is_sqlite else settings.write_connections)
        self.lookups: Lookups = lookups
        self.batcher = Batcher(
            settings,
            stores=stores,
            writers=writers or 1,
            locker=self.locker,
            index=self.expiry_index,
            clock=clock,
        )
        # Units available per balance as last seen by this process. Only decides whether a
        # call on busy keys reads the balance first; a stale value costs time, never
        # correctness.
        self._available_seen: dict[BalanceKey, int] = {}
        self._orgs: dict[str, InventoryService] = {org_id: self}

    def for_org(self, org_id: str) -> InventoryService:
        """This service acting for ``org_id`` (ARCHITECTURE section 13: another org's
        balances, reservations, ledger and idempotency keys are separate): the same write
        batches, locker, clock and settings; reads and the expiry index of that org. Made
        once per org and kept (one small object per org this process serves). Raises
        ValueError for a service without a database (its lookups are one org's)."""
        known = self._orgs.get(org_id)
        if known is not None:
            return known
        if self.db is None:
            raise ValueError("a service without a database serves one org")
        view = copy.copy(self)  # shallow: the batcher, locker and the org map are shared
        view.org_id = org_id
        view.lookups = SqlLookups(self.db, org_id)
        view.expiry_index = self.expiry_index.of(org_id)
        view._available_seen = {}  # (location, sku) means another balance in another org
        self._orgs[org_id] = view  # shared by every view: one per org
        return view

    async def close(self) -> None:
        """Stop the batcher's writers once the queued batches ran (for at most a quarter of
        ``shutdown_timeout_seconds``) and give their connections back."""
        await self.batcher.close(grace=self.settings.shutdown_timeout_seconds / 4)

    # ------------------------------------------------------------------ public writes

    async def restock(
        self,
        idempotency_key: str,
        lines: Sequence[Line],
        *,
        reference: Reference | None = None,
        reason: str | None = None,
    ) -> RestockResult:
        """RESTOCK: ``on_hand += quantity`` per line, creating balances on first restock.

        Raises ValidationError (bad input, or on_hand would pass 2**31-1),
        IdempotencyKeyReusedError, LockTimeoutError, ServiceUnavailableError.
        """
        return cast(
            RestockResult,
            await self._write(
                "restock",
                idempotency_key,
                reference,
                lambda: Restock.validated(
                    idempotency_key, lines, reference=reference, reason=reason
                ),
            ),
        )

    async def adjust(
        self,
        idempotency_key: str,
        sku: str,
        location: str = "default",
        *,
        delta: int | None = None,
        set_on_hand: int | None = None,
        expected_version: int | None = None,
        reason: str,
        reference: Reference | None = None,
    ) -> AdjustResult:
        """ADJUST: ``on_hand += delta`` or ``on_hand = set_on_hand`` (exactly one), with a reason.

        A balance that does not exist is created (version 0 before). A zero change is still
        recorded. ``expected_version`` makes it a compare-and-set. Raises ValidationError,
        InsufficientStockError (on_hand would fall below reserved), VersionConflictError,
        IdempotencyKeyReusedError, LockTimeoutError, ServiceUnavailableError.
        """
        return cast(
            AdjustResult,
            await self._write(
                "adjust",
                idempotency_key,
                reference,
                lambda: Adjust.validated(
                    idempotency_key,
                    sku,
                    location,
                    delta=delta,
                    set_on_hand=set_on_hand,
                    expected_version=expected_version,
                    reason=reason,
                    reference=reference,
                ),
            ),
        )

    async def reserve(
        self,
        idempotency_key: str,
        lines: Sequence[Line],
        *,
        reference: Reference | None = None,
        ttl_seconds: int | None = None,
    ) -> ReserveResult:
        """RESERVE a cart: ``reserved += quantity`` on every line, or nothing at all.

        ``ttl_seconds`` defaults to the setting (1800 s) and may not pass the maximum. A
        never-stocked balance has 0 available. Raises ValidationError, InsufficientStockError
        (listing every short line), IdempotencyKeyReusedError, LockTimeoutError,
        ServiceUnavailableError.
        """
        s = self.settings
        return cast(
            ReserveResult,
            await self._write(
                "reserve",
                idempotency_key,
                reference,
                lambda: Reserve.validated(
                    idempotency_key,
                    lines,
                    reference=reference,
                    ttl_seconds=ttl_seconds,
                    default_ttl_seconds=s.default_reservation_ttl_seconds,
                    max_ttl_seconds=s.max_reservation_ttl_seconds,
                ),
            ),
        )

    async def release(
        self,
        idempotency_key: str,
        *,
        reservation_id: str | int | None = None,
        reference: Reference | None = None,
        lines: Sequence[Line] | None = None,
    ) -> ReleaseResult:
        """RELEASE reserved units back to available: ``reserved -= quantity``.

        Address exactly one of ``reservation_id`` or ``reference`` (every ACTIVE or CONFIRMED
        reservation with it, oldest first). No ``lines``: everything remaining. Raises
        ValidationError (also for more than a line's remaining), NotFoundError,
        ReservationNotActiveError (EXPIRED when found past expiry, which is then expired),
        IdempotencyKeyReusedError, LockTimeoutError, ServiceUnavailableError.
        """
        return cast(
            ReleaseResult,
            await self._write(
                "release",
                idempotency_key,
                reference,
                lambda: Release.validated(
                    idempotency_key, reservation_id=reservation_id, reference=reference, lines=lines
                ),
            ),
        )

    async def deduct(
        self,
        idempotency_key: str,
        *,
        reservation_id: str | int | None = None,
        reference: Reference | None = None,
        lines: Sequence[Line] | None = None,
    ) -> DeductResult:
        """DEDUCT: commit reserved units (``reserved -= q, on_hand -= q``), or, with neither
        ``reservation_id`` nor ``reference``, deduct ``lines`` directly from available stock.

        Raises ValidationError, InsufficientStockError (direct only), NotFoundError,
        ReservationNotActiveError, IdempotencyKeyReusedError, LockTimeoutError,
        ServiceUnavailableError.
        """
        return cast(
            DeductResult,
            await self._write(
                "deduct",
                idempotency_key,
                reference,
                lambda: Deduct.validated(
                    idempotency_key, reservation_id=reservation_id, reference=reference, lines=lines
                ),
            ),
        )

    async def extend_reservation(
        self, idempotency_key: str, reservation_id: str | int, ttl_seconds: int
    ) -> ExtendResult:
        """Set an ACTIVE reservation's expiry to now + ``ttl_seconds`` (1 to the maximum).

        Raises ValidationError, NotFoundError, ReservationNotActiveError (EXPIRED when found
        past expiry, which is then expired), IdempotencyKeyReusedError, LockTimeoutError,
        ServiceUnavailableError.
        """
        max_ttl = self.settings.max_reservation_ttl_seconds
        return cast(
            ExtendResult,
            await self._write(
                "extend",
                idempotency_key,
                None,
                lambda: Extend.validated(
                    idempotency_key, reservation_id, ttl_seconds, max_ttl_seconds=max_ttl
                ),
            ),
        )

    async def confirm_reservation(
        self,
        idempotency_key: str,
        *,
        reservation_id: str | int | None = None,
        reference: Reference | None = None,
    ) -> ConfirmResult:
        """CONFIRM an ACTIVE reservation, or every ACTIVE one with ``reference`` (exactly one
        of the two): it keeps its lines, loses its expiry and is never swept; deduct and
        release end it as before (ARCHITECTURE section 14). No ledger entry, no version change.

        Raises ValidationError, NotFoundError, ReservationNotActiveError (its status; EXPIRED
        when found past expiry, which is then expired), IdempotencyKeyReusedError,
        LockTimeoutError, ServiceUnavailableError.
        """
        return cast(
            ConfirmResult,
            await self._write(
                "confirm",
                idempotency_key,
                reference,
                lambda: Confirm.validated(
                    idempotency_key, reservation_id=reservation_id, reference=reference
                ),
            ),
        )

    # ------------------------------------------------------------------ locations, transfers

    async def create_location(
        self, idempotency_key: str, code: str, name: str, type: str = "WAREHOUSE"
    ) -> LocationResult:
        """Register location ``code`` (unique per org), active, of ``type`` (WAREHOUSE, STORE
        or VIRTUAL). Raises ValidationError (bad input, or the code exists),
        IdempotencyKeyReusedError, LockTimeoutError, ServiceUnavailableError."""
        return cast(
            LocationResult,
            await self._write(
                "createLocation",
                idempotency_key,
                None,
                lambda: CreateLocation.validated(idempotency_key, code, name, type),
            ),
        )

    async def update_location(
        self,
        idempotency_key: str,
        code: str,
        *,
        name: str | None = None,
        active: bool | None = None,
    ) -> LocationResult:
        """Rename, deactivate (``active=False``) or reactivate a location (ARCHITECTURE section
        14: an inactive one takes no restock, transfer in or reserve). Raises ValidationError,
        NotFoundError, IdempotencyKeyReusedError, LockTimeoutError, ServiceUnavailableError."""
        return cast(
            LocationResult,
            await self._write(
                "updateLocation",
                idempotency_key,
                None,
                lambda: UpdateLocation.validated(idempotency_key, code, name=name, active=active),
            ),
        )

    async def transfer(
        self,
        idempotency_key: str,
        from_location: str,
        to_location: str,
        lines: Sequence[TransferLineRequest],
        *,
        in_transit: bool = False,
        reference: Reference | None = None,
        reason: str | None = None,
    ) -> TransferResult:
        """TRANSFER on-hand units (each line needs available >= quantity at the source), in
        one transaction: TRANSFER_OUT at the source, and TRANSFER_IN at the destination unless
        ``in_transit`` (then the units are incoming there until :meth:`receive_transfer`).

        Raises ValidationError (also for the same location twice), InsufficientStockError,
        LocationUnavailableError, IdempotencyKeyReusedError, LockTimeoutError,
        ServiceUnavailableError.
        """
        return cast(
            TransferResult,
            await self._write(
                "transfer",
                idempotency_key,
                reference,
                lambda: TransferStock.validated(
                    idempotency_key,
                    from_location,
                    to_location,
                    lines,
                    in_transit=in_transit,
                    reference=reference,
                    reason=reason,
                ),
            ),
        )

    async def receive_transfer(
        self,
        idempotency_key: str,
        transfer_id: str,
        lines: Sequence[TransferLineRequest] | None = None,
    ) -> TransferResult:
        """RECEIVE in-transit units at the destination (no ``lines``: all remaining).
        ``transfer_id`` is the transfer's opaque id.

        Raises ValidationError (more than remains, a SKU it does not move), NotFoundError,
        TransferNotOpenError, LocationUnavailableError (inactive destination),
        IdempotencyKeyReusedError, LockTimeoutError, ServiceUnavailableError.
        """
        return cast(
            TransferResult,
            await self._write(
                "receiveTransfer",
                idempotency_key,
                None,
                lambda: ReceiveTransfer.validated(idempotency_key, transfer_id, lines),
            ),
        )

    async def cancel_transfer(
        self, idempotency_key: str, transfer_id: str, reason: str
    ) -> TransferResult:
        """CANCEL a transfer: every unit still in transit goes back to the source
        (TRANSFER_IN there). Raises ValidationError, NotFoundError, TransferNotOpenError,
        IdempotencyKeyReusedError, LockTimeoutError, ServiceUnavailableError."""
        return cast(
            TransferResult,
            await self._write(
                "cancelTransfer",
                idempotency_key,
                None,
                lambda: CancelTransfer.validated(idempotency_key, transfer_id, reason),
            ),
        )

    # ------------------------------------------------------------------ reorder points

    async def set_reorder_point(
        self,
        idempotency_key: str,
        sku: str,
        location: str = "default",
        *,
        minimum_level: int,
        reorder_quantity: int,
        maximum_level: int | None = None,
    ) -> ReorderPointResult:
        """Set a balance's reorder point (part EVENTS): low when available <= ``minimum_level``
        (units); a suggestion orders ``reorder_quantity``, or fills up to ``maximum_level``
        when set. Creates a missing balance, empty. No entry, no event.

        Raises ValidationError (section 15's bounds), LocationUnavailableError (an unknown
        location where they must be registered), IdempotencyKeyReusedError,
        LockTimeoutError, ServiceUnavailableError.
        """
        return cast(
            ReorderPointResult,
            await self._write(
                "setReorderPoint",
                idempotency_key,
                None,
                lambda: SetReorderPoint.validated(
                    idempotency_key,
                    sku,
                    location,
                    minimum_level=minimum_level,
                    reorder_quantity=reorder_quantity,
                    maximum_level=maximum_level,
                ),
            ),
        )

    async def clear_reorder_point(
        self, idempotency_key: str, sku: str, location: str = "default"
    ) -> ReorderPointResult:
        """Remove a balance's reorder point (none set: unchanged). Raises ValidationError (no
        such balance), IdempotencyKeyReusedError, LockTimeoutError, ServiceUnavailableError."""
        return cast(
            ReorderPointResult,
            await self._write(
                "clearReorderPoint",
                idempotency_key,
                None,
                lambda: ClearReorderPoint.validated(idempotency_key, sku, location),
            ),
        )

    # ------------------------------------------------------------------ many at once

    async def reserve_many(
        self, carts: Sequence[ReserveRequest]
    ) -> list[ReserveResult | StockError]:
        """Reserve many carts at once (part BATCH): each is its own reserve, with its own key,
        all-or-nothing rule and result (or error, returned, not raised), in input order.
        All reach the batcher together, in input order: an earlier cart wins the last units.

        Raises ValidationError (field ``carts``) for more than 500 carts or 5,000 lines in
        all, before any work; ServiceUnavailableError when the database did not answer for
        some cart (others may have committed: a retry with the same keys replays them).
        """
        s = self.settings
        return await self._write_many(
            "reserve",
            "carts",
            carts,
            lambda c: Reserve.validated(
                c.idempotency_key,
                c.lines,
                reference=c.reference,
                ttl_seconds=c.ttl_seconds,
                default_ttl_seconds=s.default_reservation_ttl_seconds,
                max_ttl_seconds=s.max_reservation_ttl_seconds,
            ),
        )

    async def deduct_many(self, items: Sequence[ConsumeRequest]) -> list[DeductResult | StockError]:
        """Deduct many at once, each item as :meth:`deduct` (see :meth:`reserve_many`)."""
        return await self._write_many(
            "deduct",
            "items",
            items,
            lambda i: Deduct.validated(
                i.idempotency_key,
                reservation_id=i.reservation_id,
                reference=i.reference,
                lines=i.lines,
            ),
        )

    async def release_many(
        self, items: Sequence[ConsumeRequest]
    ) -> list[ReleaseResult | StockError]:
        """Release many at once, each item as :meth:`release` (see :meth:`reserve_many`)."""
        return await self._write_many(
            "release",
            "items",
            items,
            lambda i: Release.validated(
                i.idempotency_key,
                reservation_id=i.reservation_id,
                reference=i.reference,
                lines=i.lines,
            ),
        )

    async def _write_many(
        self,
        operation: str,
        field: str,
        requests: Sequence[Any],
        build: Callable[[Any], Command],
    ) -> list[Any]:
        """Build each request's command (an invalid one fails alone), submit the valid ones
        together, and answer and record each as its single call would."""
        start = time.perf_counter()
        check_batch(len(requests), sum(len(r.lines or ()) for r in requests), field)
        built: list[Command | StockError] = []
        for request in requests:
            try:
                built.append(build(request))
            except StockError as error:
                built.append(error)
        commands = [c for c in built if not isinstance(c, StockError)]
        try:
            hints = await self._reservation_hints(commands)
            outcomes = iter(
                await self.batcher.submit_many(
                    self.org_id, [(c, self._keys(c, hints)) for c in commands], together=True
                )
            )
        except ServiceUnavailableError as error:
            outcomes = iter([Unavailable(error.retry_after_ms, str(error))] * len(commands))
        # Answered concurrently: a replayed item's answer is a read of its own.
        answers = iter(await asyncio.gather(*(self._answer(c, next(outcomes)) for c in commands)))
        out: list[Any] = []
        unavailable: ServiceUnavailableError | None = None
        for request, item in zip(requests, built, strict=True):
            reference = getattr(request, "reference", None)
            if isinstance(item, StockError):
                answer = _Answer(item.code.lower(), error=item)
                self._record(operation, request.idempotency_key, reference, answer, start, None)
                out.append(item)
                continue
            answer = next(answers)
            self._record(operation, item.idempotency_key, reference, answer, start, item)
            if isinstance(answer.error, ServiceUnavailableError):
                unavailable = answer.error
            elif answer.error is not None and not isinstance(answer.error, StockError):
                raise answer.error  # unexpected: the whole call fails, masked
            out.append(answer.error if answer.error is not None else answer.result)
        if unavailable is not None:
            raise unavailable
        return out

    # ------------------------------------------------------------------ expiry

    async def expire_reservation(self, reservation_id: int) -> Reservation | None:
        """EXPIRE one reservation if it is ACTIVE and due (now >= expires_at).

        Idempotent: returns the expired reservation, or None when it was not ACTIVE, not due,
        does not exist (e.g. another sweeper got there first), or stayed busy.
        """
        [expiry] = await self.expire_many([reservation_id], patience=self.locker.wait)
        return expiry.expired

    async def expire_many(
        self, reservation_ids: Sequence[int], *, patience: float = EXPIRE_PATIENCE_SECONDS
    ) -> list[Expiry]:
        """EXPIRE each of ``reservation_ids`` that is ACTIVE and due, in batches; ``patience``
        (seconds) bounds the wait for rows held elsewhere (then ``busy``)."""
        ids = list(dict.fromkeys(reservation_ids))
        if not ids:
            return []
        start = time.perf_counter()
        commands = [Expire(i) for i in ids]
        hints = await self._reservation_hints(commands)
        outcomes = await self.batcher.submit_many(
            self.org_id, [(c, self._keys(c, hints)) for c in commands], patience=patience
        )
        out = []
        for command, outcome in zip(commands, outcomes, strict=True):
            answer = await self._answer(command, outcome)
            self._record(command.operation, command.idempotency_key, None, answer, start, command)
            # Busy, or failed (logged): the sweeper tries it again on a later pass.
            busy = answer.outcome in ("lock_timeout", "unavailable", "error")
            out.append(Expiry(command.reservation_id, answer.result, busy))
        return out

    async def due_reservation_ids(self, limit: int = 1000) -> list[int]:
        """Ids of ACTIVE reservations whose expiry has passed, soonest first (the DB scan)."""
        return await self.lookups.due_reservation_ids(self.clock(), limit)

    async def due_reservations_of_every_org(self, limit: int = 1000) -> list[tuple[str, int]]:
        """(org, id) of due ACTIVE reservations of every org, soonest first (the sweeper's
        scan when it serves every org). Raises ValueError for a service without a database."""
        if self.db is None:
            raise ValueError("a service without a database serves one org")
        return await due_reservations_of_every_org(self.db, self.clock(), limit)

    def served_orgs(self) -> list[str]:
        """The orgs this service has acted for since it was made (its own first)."""
        return list(self._orgs)

    async def expire_due(self, limit: int = 1000) -> list[int]:
        """Expire every due reservation found by the database scan (up to ``limit``).

        Returns the ids this call expired (others may have been expired concurrently).
        """
        expiries = await self.expire_many(
            await self.due_reservation_ids(limit), patience=self.locker.wait
        )
        return [e.reservation_id for e in expiries if e.expired is not None]

    # ------------------------------------------------------------------ one call

    async def _write(
        self, operation: str, raw_key: Any, reference: Any, build: Callable[[], Command]
    ) -> Any:
        """Build, run and record one call; returns its result (the type of ``operation``'s)."""
        start = time.perf_counter()
        try:
            command = build()
        except StockError as error:
            answer = _Answer(error.code.lower(), error=error)
            self._record(operation, raw_key, reference, answer, start, None)
            raise
        try:
            answer = await self._execute(command)
        except ServiceUnavailableError as error:
            answer = _Answer("unavailable", error=error)
        self._record(operation, command.idempotency_key, reference, answer, start, command)
        if answer.error is not None:
            raise answer.error
        return answer.result

    async def _execute(self, command: Command) -> _Answer:
        """Submit ``command`` and settle its outcome (see the module docstring)."""
        hints = await self._reservation_hints([command])
        keys = self._keys(command, hints)
        early = isinstance(command, Reserve | DeductDirect) and self._looks_short(command.cart)
        deadline = time.monotonic() + self.locker.wait
        while True:
            patience = max(0.0, deadline - time.monotonic())
            outcome = await self.batcher.submit(
                self.org_id, command, keys, early=early, patience=patience
            )
            if isinstance(outcome, Busy) and outcome.early:
                # Busy in this process, and last seen short here: read before waiting on.
                assert isinstance(command, Reserve | DeductDirect)
                refused = await self._refuse_if_short(command)
                if refused is not None:
                    return refused
                early = False
                continue
            return await self._answer(command, outcome)

    async def _answer(self, command: Command, outcome: Outcome) -> _Answer:
        if isinstance(outcome, Applied):
            changes = outcome.changes
            if isinstance(command, Expire) and not changes.reservations:
                return _Answer("skipped")
            self._saw_available((b.key, b.available) for b in changes.balances)
            return _Answer("success", _result(command, changes), committed=changes)
        if isinstance(outcome, Refused):
            error = outcome.refusal.error
            if isinstance(error, InsufficientStockError):
                self._saw_available(((s.location, s.sku), s.available) for s in error.shortages)
            return _Answer(error.code.lower(), error=error, committed=outcome.refusal.committed)
        if isinstance(outcome, Replayed):
            answer = await self._replayed(command)
            answer.committed = outcome.committed
            return answer
        if isinstance(outcome, Busy):
            if isinstance(command, Expire):
                return _Answer("lock_timeout")
            metrics.LOCK_TIMEOUTS_TOTAL.inc()
            return await self._timed_out(command, outcome.retry_after_ms)
        if isinstance(outcome, Unavailable):
            return _Answer("unavailable", error=ServiceUnavailableError(outcome.retry_after_ms))
        assert isinstance(outcome, Crashed)
        return _Answer("error", error=outcome.error)

    async def _replayed(self, command: Command) -> _Answer:
        try:
            result = await self.lookups.replay(
                command.operation,
                command.idempotency_key,
                command.request_hash,
            )
        except StockError as error:
            return _Answer(error.code.lower(), error=error)
        except Exception as exc:
            if is_connection_lost(exc):
                return _Answer("unavailable", error=ServiceUnavailableError(100))
            raise
        if result is None:  # cannot happen: the batch saw the key row committed
            raise RuntimeError(f"idempotency key {command.idempotency_key!r} vanished")
        return _Answer("replayed", result)

    async def _timed_out(self, command: Command, retry_after_ms: int) -> _Answer:
        """A call whose keys stayed busy: its replay if done, InsufficientStockError if a read
        finds a line short (reserve, direct deduct), else LockTimeoutError. A failure of those
        reads still answers LockTimeoutError, which tells the caller to retry."""
        timeout = LockTimeoutError(
            retry_after_ms,
            f"stock is busy: its balances were not free within {self.locker.wait:g} s; retry "
            f"with the same idempotency key in {retry_after_ms} ms",
        )
        try:
            result = await self.lookups.replay(
                command.operation,
                command.idempotency_key,
                command.request_hash,
            )
            if result is not None:
                return _Answer("replayed", result)
            if isinstance(command, Reserve | DeductDirect):
                refused = await self._refuse_if_short(command)
                if refused is not None:
                    return refused
        except StockError as error:  # the key was used for another request
            return _Answer(error.code.lower(), error=error)
        except Exception:
            _log.warning("read after a lock timeout failed", exc_info=True)
        return _Answer("lock_timeout", error=timeout)

    async def _refuse_if_short(self, command: Reserve | DeductDirect) -> _Answer | None:
        """InsufficientStockError when a read of the committed balances finds a line short.

        That answer is true of the state at the read, so it is as linearizable as the locked
        check. None when stock looks sufficient, or when the key is done (the batch then
        replays it).
        """
        keys = command.cart.keys()
        balances, done = await self.lookups.balances_and_key(keys, command.idempotency_key)
        if done:
            return None
        available = {k: b.available for k, b in balances.items()}
        self._saw_available((k, available.get(k, 0)) for k in keys)
        short = shortages(command.cart, lambda k: available.get(k, 0))
        if not short:
            return None
        # Expired holds never refuse a cart: with due ones on a short balance, the batch
        # (which expires them first) decides.
        keys_short = [(s.location, s.sku) for s in short]
        if await self.lookups.any_due_holding(keys_short, self.clock()):
            return None
        return _Answer("insufficient_stock", error=InsufficientStockError(short))

    # ------------------------------------------------------------------ hints

    def _needs_hints(self) -> bool:
        """Reservation-addressed calls learn their balances first when those decide which
        Redis locks to claim or which writer takes them."""
        return not isinstance(self.locker, NoLocks) or self.batcher.writers > 1

    async def _reservation_hints(self, commands: Sequence[Command]) -> Hints:
        """The balances of the reservations and transfers ``commands`` address (reads, no
        lock): reservations by id or reference, transfers by ``("transfer", id)``."""
        ids = [i for c in commands if (i := addressed_reservation(c)) is not None]
        refs = [r for c in commands if (r := addressed_reference(c)) is not None]
        transfers = [i for c in commands if (i := addressed_transfer(c)) is not None]
        if not (ids or refs or transfers) or not self._needs_hints():
            return {}
        try:
            hints: Hints = {}
            if ids or refs:
                for held, keys in (await self.lookups.reservation_keys(ids, refs)).items():
                    hints[held] = keys
            if transfers:
                moved = await self.lookups.transfer_keys(transfers)
                hints.update({("transfer", i): keys for i, keys in moved.items()})
            return hints
        except Exception as exc:
            if is_connection_lost(exc):
                raise ServiceUnavailableError(100) from exc
            raise

    @staticmethod
    def _keys(command: Command, hints: Hints) -> list[BalanceKey]:
        known = known_balance_keys(command)
        if known:
            return known
        rid = addressed_reservation(command)
        if rid is not None:
            return hints.get(rid, [])
        tid = addressed_transfer(command)
        if tid is not None:
            return hints.get(("transfer", tid), [])
        reference = addressed_reference(command)
        return hints.get(reference, []) if reference is not None else []

    def _looks_short(self, cart: Cart) -> bool:
        """True when this process last saw fewer units available than a line asks for.

        A balance not seen yet counts as sufficient: in a burst on a hot SKU, reading it
        first would only slow the batches while units remain.
        """
        seen = self._available_seen
        return any(seen.get(ln.key, ln.quantity) < ln.quantity for ln in cart.lines)

    def _saw_available(self, seen: Iterable[tuple[BalanceKey, int]]) -> None:
        """Remember (key, available) pairs; forgets all past 10,000 balances."""
        if len(self._available_seen) > _SEEN_CAP:
            self._available_seen.clear()
        for key, available in seen:
            self._available_seen[key] = available

    # ------------------------------------------------------------------ metrics and log

    def _record(
        self,
        operation: str,
        key: Any,
        reference: Any,
        answer: _Answer,
        start: float,
        command: Command | None,
    ) -> None:
        """Count one call in the metrics of ARCHITECTURE section 10 and write its log line:
        operation, idempotency key, reference, outcome, duration (seconds) and, per ledger
        entry it committed, sku, location, quantity and on hand / reserved before and after.
        Reservation and transfer ids are the opaque ones the API shows."""
        outcome = answer.outcome
        reason = "given" if operation == "adjust" else "none"  # free text: never a label value
        metrics.STOCK_MOVEMENTS_TOTAL.labels(type=operation, result=outcome, reason=reason).inc()
        if operation == "reserve":
            metrics.RESERVE_TOTAL.labels(status=outcome).inc()
        elif operation == "deduct":
            metrics.DEDUCT_TOTAL.labels(status=outcome).inc()
        if outcome == "replayed":
            metrics.IDEMPOTENT_HIT_TOTAL.inc()
        committed = answer.committed
        if committed is not None:
            expired = committed.expired()
            if expired:
                metrics.RESERVATIONS_EXPIRED_TOTAL.inc(len(expired))
            if isinstance(command, ReceiveTransfer) and committed.transfers:
                moved = committed.transfers[0]
                if moved.status == RECEIVED:  # the last receipt of an in-transit transfer
                    took = (moved.updated_at - moved.created_at).total_seconds()
                    metrics.TRANSFER_DURATION_SECONDS.observe(took)
        fields: dict[str, Any] = {
            "operation": operation,
            "org": self.org_id,  # also on the sweeper's expiries, which no key made
            "idempotency_key": key if isinstance(key, str) else repr(key),
            "reference": None if reference is None else str(reference),
            "outcome": outcome,
            "duration_s": round(time.perf_counter() - start, 6),
        }
        if isinstance(command, Expire):
            fields["reservation_id"] = reservation_global_id(command.reservation_id)
        if isinstance(command, TransferStock):
            fields["from_location"] = command.from_location
            fields["to_location"] = command.to_location
        if committed is not None and committed.transfers:
            moved = committed.transfers[0]
            fields["transfer_id"] = transfer_global_id(moved.id)
            fields["from_location"] = moved.from_location
            fields["to_location"] = moved.to_location
        if isinstance(command, Confirm) and committed is not None:
            # A confirm writes no entry: the line names the reservations it confirmed.
            fields["reservation_ids"] = [reservation_global_id(i) for i in committed.answer]
        if committed is not None:
            fields["balances"] = [
                {
                    "event_type": e.event_type,
                    "sku": e.sku,
                    "location": e.location,
                    "quantity": abs(e.on_hand_delta) or abs(e.reserved_delta),
                    "on_hand_before": e.on_hand_after - e.on_hand_delta,
                    "on_hand_after": e.on_hand_after,
                    "reserved_before": e.reserved_after - e.reserved_delta,
                    "reserved_after": e.reserved_after,
                    "reservation_id": _maybe(reservation_global_id, e.reservation_id),
                }
                | ({"transfer_id": transfer_global_id(e.transfer_id)} if e.transfer_id else {})
                for e in committed.entries
            ]
        if answer.error is not None:
            fields["error"] = str(answer.error)
        if outcome == "error":
            _log.error("stock write failed", **fields, exc_info=answer.error)
        else:
            _log.info("stock write", **fields)


def _maybe(render: Callable[[int], str], number: int | None) -> str | None:
    return None if number is None else render(number)


def _result(command: Command, changes: Changes) -> Any:
    """A successful command's result, from its committed changes."""
    if isinstance(command, CreateLocation | UpdateLocation):
        [location] = changes.locations
        return LocationResult(location, False)
    if isinstance(command, SetReorderPoint | ClearReorderPoint):
        [configured] = [b for b in changes.balances if b.key == (command.location, command.sku)]
        return ReorderPointResult(configured, False)
    if isinstance(command, TransferStock | ReceiveTransfer | CancelTransfer):
        [moved] = [t for t in changes.transfers if t.id == changes.answer[0]]
        # Its own entries and balances, not those of holds it expired on the way (as a replay).
        own = [e for e in changes.entries if e.idempotency_key == command.idempotency_key]
        keys = set(transfer_result_keys(moved, own))
        shown = [b for b in changes.balances if b.key in keys]
        return TransferResult(moved, shown, own, False)
    by_id = {r.id: r for r in changes.reservations}
    answered = [by_id[i] for i in changes.answer]
    balances = list(changes.balances)
    if isinstance(command, Restock):
        return RestockResult(balances, list(changes.entries), False)
    if isinstance(command, Adjust):
        return AdjustResult(balances[0], changes.entries[0], False)
    if isinstance(command, Reserve | DeductDirect):
        # The cart's own balances (a replay shows the same), not those of holds it expired.
        balances = [b for b in balances if b.key in command.cart.first_index]
    if isinstance(command, Reserve):
        return ReserveResult(answered[0], balances, False)
    if isinstance(command, Release):
        return ReleaseResult(answered, balances, False)
    if isinstance(command, Deduct | DeductDirect):
        own = [e for e in changes.entries if e.idempotency_key == command.idempotency_key]
        return DeductResult(answered, balances, own, False)
    if isinstance(command, Extend):
        return ExtendResult(answered[0], False)
    if isinstance(command, Confirm):
        return ConfirmResult(answered, balances, False)
    return answered[0]  # Expire: the expired reservation
