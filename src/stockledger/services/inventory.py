"""The write services: restock, adjust, reserve, release, deduct, extend and expire.

Each public coroutine validates its input (nothing invalid reaches the database), takes the
locker's keys, then runs ONE database transaction through :meth:`Database.run_write`:

1. lock the rows it touches (reservations by id, then balances in (location, sku) order in
   one statement),
2. check every condition of ARCHITECTURE section 3 on the locked rows,
3. update balances and append exactly one ledger entry per balance touched,
4. insert the idempotency key row (plain INSERT; a duplicate means a copy committed first:
   roll back and replay, ARCHITECTURE section 5).

A domain failure rolls everything back, so the key is not consumed; if a copy of the call
committed meanwhile, the failure becomes a replay. Deadlocks and lock wait
timeouts retry the whole transaction (bounded, jittered).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from stockledger.config import Settings
from stockledger.db.engine import CommitThenRaise, Database, RetryTransaction, is_duplicate_key
from stockledger.db.models import idempotency_key as K
from stockledger.db.models import inventory_balance as B
from stockledger.db.models import inventory_ledger as L
from stockledger.db.models import reservation as R
from stockledger.db.models import reservation_line as RL
from stockledger.locks import (
    BalanceKey,
    BalanceLocker,
    ExpiryIndex,
    LocksBusy,
    NoExpiryIndex,
    NoLocks,
)
from stockledger.observability import metrics
from stockledger.observability.logs import get_logger
from stockledger.services.errors import (
    IdempotencyKeyReusedError,
    InsufficientStockError,
    LockTimeoutError,
    NotFoundError,
    ReservationNotActiveError,
    Shortage,
    StockError,
    ValidationError,
    VersionConflictError,
)
from stockledger.services.records import (
    AdjustResult,
    BalanceRecord,
    DeductResult,
    ExtendResult,
    Line,
    Reference,
    ReleaseResult,
    ReservationLineRecord,
    ReservationRecord,
    ReserveResult,
    RestockResult,
)
from stockledger.services.rows import (
    balance_record,
    from_db_time,
    reservation_record,
    select_balances,
    select_ledger_by_key,
    select_lines,
    select_reservations,
    to_db_time,
    utcnow,
)
from stockledger.services.validation import (
    MAX_BALANCE,
    MAX_QUANTITY,
    RESERVED_KEY_PREFIX,
    check_key,
    check_lines,
    check_reference,
    check_reservation_id,
    check_string,
    check_ttl,
    lines_payload,
    parse_reservation_id,
    reference_payload,
    request_hash,
)

T = TypeVar("T")
_Taking = TypeVar("_Taking", ReserveResult, DeductResult)  # results of calls that take stock
Clock = Callable[[], datetime]
_log = get_logger("stockledger.writes")
# The change the current task's transaction made, for the write log line (same task, so the
# value set inside the transaction body is visible to the caller afterwards).
_CURRENT_CHANGE: ContextVar[_Change | None] = ContextVar("stockledger_change", default=None)

ACTIVE, COMMITTED, RELEASED, EXPIRED = "ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"

# Executemany statements with absolute values computed under the row lock.
_UPDATE_BALANCE = (
    update(B)
    .where(
        B.c.org_id == bindparam("b_org"),
        B.c.location == bindparam("b_location"),
        B.c.sku == bindparam("b_sku"),
    )
    .values(
        on_hand=bindparam("b_on_hand"),
        reserved=bindparam("b_reserved"),
        version=bindparam("b_version"),
        updated_at=bindparam("b_updated_at"),
    )
)
_UPDATE_LINE = (
    update(RL)
    .where(
        RL.c.reservation_id == bindparam("l_reservation_id"),
        RL.c.location == bindparam("l_location"),
        RL.c.sku == bindparam("l_sku"),
    )
    .values(deducted=bindparam("l_deducted"), released=bindparam("l_released"))
)
_INSERT_RESERVATION = insert(R)
_INSERT_KEY = insert(K)
_INSERT_LINE = insert(RL)
_INSERT_LEDGER = insert(L)
_INSERT_BALANCE = insert(B)
_UPDATE_RESERVATION = (
    update(R)
    .where(R.c.id == bindparam("r_id"))
    .values(status=bindparam("r_status"), updated_at=bindparam("r_updated_at"))
)


class _KeyTaken(Exception):
    """The idempotency key row already exists (committed by an earlier or concurrent call)."""


@dataclass
class _Balance:
    """A locked balance row being changed inside a transaction."""

    location: str
    sku: str
    on_hand: int
    reserved: int
    version: int
    exists: bool
    touched: bool = False

    def record(self, now: datetime) -> BalanceRecord:
        return BalanceRecord(
            self.sku, self.location, self.on_hand, self.reserved, self.version, now
        )


@dataclass
class _Change:
    """Everything one transaction writes, flushed in a fixed order by :meth:`_flush`."""

    now: datetime
    key: str
    result_ref: str | None = None
    expiry_committed: bool = False  # a CommitThenRaise wrote past-due expiries
    balances: dict[BalanceKey, _Balance] = field(default_factory=dict)
    ledger: list[dict[str, Any]] = field(default_factory=list)

    def move(
        self,
        bal: _Balance,
        event: str,
        on_hand_delta: int,
        reserved_delta: int,
        *,
        reservation_id: int | None = None,
        reference: Reference | None = None,
        reason: str | None = None,
        key: str | None = None,
    ) -> None:
        """Apply a delta to a locked balance and queue its ledger entry."""
        bal.on_hand += on_hand_delta
        bal.reserved += reserved_delta
        bal.version += 1  # "increments by one with every change" (schema.graphql, Balance)
        bal.touched = True
        self.ledger.append(
            {
                "event_type": event,
                "location": bal.location,
                "sku": bal.sku,
                "on_hand_delta": on_hand_delta,
                "reserved_delta": reserved_delta,
                "on_hand_after": bal.on_hand,
                "reserved_after": bal.reserved,
                "reservation_id": reservation_id,
                "ref_type": reference.type if reference else None,
                "ref_id": reference.id if reference else None,
                "reason": reason,
                "idempotency_key": key or self.key,
                "created_at": to_db_time(self.now),
            }
        )

    def touched(self) -> list[_Balance]:
        return [b for _, b in sorted(self.balances.items()) if b.touched]


def _observed(
    movement: str,
) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Count a public write in the metrics of ARCHITECTURE section 10 and log one line for it.

    The line carries operation, idempotency key, reference, outcome, duration (seconds) and,
    per balance touched, sku, location, the deltas and on_hand / reserved before and after.
    """

    def decorate(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(self: InventoryService, *args: Any, **kwargs: Any) -> T:
            start = time.perf_counter()
            token = _CURRENT_CHANGE.set(None)
            outcome = "success"
            error: Exception | None = None
            try:
                result = await fn(self, *args, **kwargs)
                if getattr(result, "replayed", False):
                    outcome = "replayed"
                elif result is None:
                    outcome = "skipped"  # expiry found nothing to do
                return result
            except StockError as exc:
                outcome, error = exc.code.lower(), exc
                raise
            except Exception as exc:
                outcome, error = "error", exc
                raise
            finally:
                change = _CURRENT_CHANGE.get()
                _CURRENT_CHANGE.reset(token)
                self._record(movement, outcome, kwargs, args, change, error, start)

        return wrapper

    return decorate


@contextmanager
def _still_timed_out(timeout: LockTimeoutError) -> Iterator[None]:
    """Around a read that follows a lock wait that ran out: a domain answer (a replay's
    IdempotencyKeyReusedError, InsufficientStockError) passes, but a failure of the read
    itself still answers ``timeout``, which tells the caller to retry."""
    try:
        yield
    except StockError:
        raise
    except Exception:
        _log.warning("read after a lock timeout failed", exc_info=True)
        raise timeout from None


class InventoryService:
    """The stock rules of ARCHITECTURE section 3 over one :class:`Database`.

    ``clock`` returns the current UTC time (tests pass their own to control expiry).
    ``locker`` and ``expiry_index`` default to no-ops (database locks alone, expiry by scan).
    Quantities are units of stock; TTLs are seconds.
    """

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        clock: Clock = utcnow,
        locker: BalanceLocker | None = None,
        expiry_index: ExpiryIndex | None = None,
        org_id: str | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self.locker: BalanceLocker = locker or NoLocks()
        self.expiry_index: ExpiryIndex = expiry_index or NoExpiryIndex()
        self.org_id = org_id or settings.org_id
        # Units available per balance as last seen by this process (a committed write, a
        # refusal or a read). Only decides whether a contended call first reads the balance
        # (see _write_unless_sold_out); a stale value costs time, never correctness.
        self._available_seen: dict[BalanceKey, int] = {}

    # ------------------------------------------------------------------ public writes

    @_observed("restock")
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
        IdempotencyKeyReusedError.
        """
        key = check_key(idempotency_key)
        merged = check_lines(lines)
        reference = check_reference(reference)
        if reason is not None:
            reason = check_string(reason, "reason")
        rhash = request_hash(
            "restock",
            {
                "lines": lines_payload(merged),
                "reference": reference_payload(reference),
                "reason": reason,
            },
        )

        async def body(conn: AsyncConnection) -> RestockResult:
            change = self._begin(key)
            await self._lock(conn, change, [(ln.location, ln.sku) for ln in merged])
            for i, ln in enumerate(merged):
                bal = change.balances[(ln.location, ln.sku)]
                if bal.on_hand + ln.quantity > MAX_BALANCE:
                    raise ValidationError(
                        f"on hand of {ln.location}/{ln.sku} would exceed {MAX_BALANCE}",
                        _input_path(lines, ln, "quantity", i),
                    )
                change.move(bal, "RESTOCK", ln.quantity, 0, reference=reference, reason=reason)
            await self._flush(conn, change)
            entries = await select_ledger_by_key(conn, self.org_id, key)
            return RestockResult([b.record(change.now) for b in change.touched()], entries, False)

        keys = [(ln.location, ln.sku) for ln in merged]
        return await self._write("restock", key, rhash, body, keys)

    @_observed("adjust")
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
        IdempotencyKeyReusedError.
        """
        key = check_key(idempotency_key)
        sku = check_string(sku, "sku")
        location = check_string(location, "location")
        reason = check_string(reason, "reason")
        reference = check_reference(reference)
        if (delta is None) == (set_on_hand is None):
            raise ValidationError("give exactly one of delta and setOnHand", "delta")
        if delta is not None:
            if isinstance(delta, bool) or not isinstance(delta, int):
                raise ValidationError("must be an integer", "delta")
            if abs(delta) > MAX_QUANTITY:
                raise ValidationError(
                    f"must be between -{MAX_QUANTITY} and {MAX_QUANTITY}", "delta"
                )
        if set_on_hand is not None:
            if isinstance(set_on_hand, bool) or not isinstance(set_on_hand, int):
                raise ValidationError("must be an integer", "setOnHand")
            if not 0 <= set_on_hand <= MAX_BALANCE:
                raise ValidationError(f"must be between 0 and {MAX_BALANCE}", "setOnHand")
        if expected_version is not None and (
            isinstance(expected_version, bool)
            or not isinstance(expected_version, int)
            or expected_version < 0
        ):
            raise ValidationError("must be a non-negative integer", "expectedVersion")
        rhash = request_hash(
            "adjust",
            {
                "sku": sku,
                "location": location,
                "delta": delta,
                "setOnHand": set_on_hand,
                "expectedVersion": expected_version,
                "reason": reason,
                "reference": reference_payload(reference),
            },
        )

        async def body(conn: AsyncConnection) -> AdjustResult:
            change = self._begin(key)
            await self._lock(conn, change, [(location, sku)])
            bal = change.balances[(location, sku)]
            if expected_version is not None and expected_version != bal.version:
                raise VersionConflictError(expected_version, bal.version)
            d = delta if delta is not None else set_on_hand - bal.on_hand  # type: ignore[operator]
            if bal.on_hand + d < bal.reserved:
                raise InsufficientStockError(
                    [Shortage(sku, location, requested=-d, available=bal.on_hand - bal.reserved)]
                )
            if bal.on_hand + d > MAX_BALANCE:
                raise ValidationError(f"on hand would exceed {MAX_BALANCE}", "delta")
            change.move(bal, "ADJUST", d, 0, reference=reference, reason=reason)
            await self._flush(conn, change)
            entries = await select_ledger_by_key(conn, self.org_id, key)
            return AdjustResult(bal.record(change.now), entries[0], False)

        return await self._write("adjust", key, rhash, body, [(location, sku)])

    @_observed("reserve")
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
        (listing every short line), IdempotencyKeyReusedError, LockTimeoutError.
        """
        key = check_key(idempotency_key)
        merged = check_lines(lines)
        reference = check_reference(reference)
        s = self.settings
        ttl = s.default_reservation_ttl_seconds if ttl_seconds is None else ttl_seconds
        ttl = check_ttl(ttl, s.max_reservation_ttl_seconds)
        rhash = request_hash(
            "reserve",
            {"lines": lines_payload(merged), "reference": reference_payload(reference), "ttl": ttl},
        )

        async def body(conn: AsyncConnection) -> ReserveResult:
            change = self._begin(key)
            await self._lock(conn, change, [(ln.location, ln.sku) for ln in merged], create=False)
            _check_available(change, merged)
            now = change.now
            expires_at = now + timedelta(seconds=ttl)
            ref_type, ref_id = (reference.type, reference.id) if reference else (None, None)
            res = await conn.execute(
                _INSERT_RESERVATION,
                {
                    "org_id": self.org_id,
                    "status": ACTIVE,
                    "ref_type": ref_type,
                    "ref_id": ref_id,
                    "expires_at": to_db_time(expires_at),
                    "created_at": to_db_time(now),
                    "updated_at": to_db_time(now),
                },
            )
            rid = int(res.inserted_primary_key[0])  # type: ignore[index]
            await conn.execute(
                _INSERT_LINE,
                [
                    {
                        "reservation_id": rid,
                        "org_id": self.org_id,
                        "location": ln.location,
                        "sku": ln.sku,
                        "quantity": ln.quantity,
                        "deducted": 0,
                        "released": 0,
                    }
                    for ln in merged
                ],
            )
            for ln in merged:
                bal = change.balances[(ln.location, ln.sku)]
                change.move(bal, "RESERVE", 0, ln.quantity, reservation_id=rid, reference=reference)
            await self._flush(conn, change)
            record = ReservationRecord(
                id=rid,
                status=ACTIVE,
                reference=reference,
                expires_at=expires_at,
                created_at=now,
                updated_at=now,
                lines=tuple(
                    ReservationLineRecord(ln.sku, ln.location, ln.quantity, 0, 0) for ln in merged
                ),
            )
            return ReserveResult(record, [b.record(now) for b in change.touched()], False)

        result = await self._write_unless_sold_out("reserve", key, rhash, body, merged)
        if not result.replayed:
            await self.expiry_index.schedule(result.reservation.id, result.reservation.expires_at)
        return result

    @_observed("release")
    async def release(
        self,
        idempotency_key: str,
        *,
        reservation_id: str | int | None = None,
        reference: Reference | None = None,
        lines: Sequence[Line] | None = None,
    ) -> ReleaseResult:
        """RELEASE reserved units back to available: ``reserved -= quantity``.

        Address exactly one of ``reservation_id`` or ``reference`` (every ACTIVE reservation
        with it, oldest first). No ``lines``: everything remaining. Raises ValidationError
        (also for more than a line's remaining), NotFoundError, ReservationNotActiveError
        (EXPIRED when found past expiry, which is then expired), IdempotencyKeyReusedError.
        """
        result = await self._consume("release", idempotency_key, reservation_id, reference, lines)
        return ReleaseResult(result.reservations, result.balances, result.replayed)

    @_observed("deduct")
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
        ReservationNotActiveError, IdempotencyKeyReusedError.
        """
        if reservation_id is None and reference is None:
            return await self._deduct_direct(idempotency_key, lines)
        return await self._consume("deduct", idempotency_key, reservation_id, reference, lines)

    @_observed("extend")
    async def extend_reservation(
        self, idempotency_key: str, reservation_id: str | int, ttl_seconds: int
    ) -> ExtendResult:
        """Set an ACTIVE reservation's expiry to now + ``ttl_seconds`` (1 to the maximum).

        Raises ValidationError, NotFoundError, ReservationNotActiveError (EXPIRED when found
        past expiry, which is then expired), IdempotencyKeyReusedError.
        """
        key = check_key(idempotency_key)
        rid_text = check_reservation_id(reservation_id)
        ttl = check_ttl(ttl_seconds, self.settings.max_reservation_ttl_seconds)
        rhash = request_hash("extend", {"reservationId": rid_text, "ttl": ttl})
        rid = parse_reservation_id(rid_text)
        if rid is None:
            raise NotFoundError("Reservation", rid_text)

        async def body(conn: AsyncConnection) -> ExtendResult:
            change = self._begin(key, result_ref=str(rid))
            rows, lines_by_id = await self._lock_reservations(
                conn, change, reservation_id=rid, lock_balances=False
            )
            row = rows[0]
            expires_at = change.now + timedelta(seconds=ttl)
            await conn.execute(
                update(R)
                .where(R.c.id == rid)
                .values(expires_at=to_db_time(expires_at), updated_at=to_db_time(change.now))
            )
            record = reservation_record(row, lines_by_id[rid])
            return ExtendResult(
                dataclasses.replace(record, expires_at=expires_at, updated_at=change.now), False
            )

        keys = await self._reservation_keys(rid, None)
        result = await self._write("extend", key, rhash, body, keys)
        if not result.replayed:
            await self.expiry_index.schedule(rid, result.reservation.expires_at)
        return result

    @_observed("expire")
    async def expire_reservation(self, reservation_id: int) -> ReservationRecord | None:
        """EXPIRE one reservation if it is ACTIVE and due (now >= expires_at).

        Idempotent: returns the expired reservation, or None when it was not ACTIVE, not due,
        or does not exist (e.g. another sweeper got there first).
        """
        keys = await self._reservation_keys(reservation_id, None)

        async def body(conn: AsyncConnection) -> ReservationRecord | None:
            now = self.clock()
            row = (
                await conn.execute(
                    select(R)
                    .where(R.c.id == reservation_id, R.c.org_id == self.org_id)
                    .with_for_update()
                )
            ).first()
            if row is None or row.status != ACTIVE or from_db_time(row.expires_at) > now:
                return None
            change = _Change(now, f"{RESERVED_KEY_PREFIX}{reservation_id}")
            _CURRENT_CHANGE.set(change)
            await self._expire_locked(conn, change, row)
            await self._flush(conn, change)
            return (await select_reservations(conn, self.org_id, [reservation_id]))[0]

        async with self._locks(keys):
            result = await self.db.run_write(body)
        await self.expiry_index.unschedule([reservation_id])
        return result

    async def due_reservation_ids(self, limit: int = 1000) -> list[int]:
        """Ids of ACTIVE reservations whose expiry has passed, soonest first (the DB scan)."""
        now = to_db_time(self.clock())
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(R.c.id)
                .where(R.c.status == ACTIVE, R.c.expires_at <= now, R.c.org_id == self.org_id)
                .order_by(R.c.expires_at)
                .limit(limit)
            )
            return [r.id for r in rows]

    async def expire_due(self, limit: int = 1000) -> list[int]:
        """Expire every due reservation found by the database scan (up to ``limit``).

        Returns the ids this call expired (others may have been expired concurrently).
        """
        expired = []
        for rid in await self.due_reservation_ids(limit):
            if await self.expire_reservation(rid) is not None:
                expired.append(rid)
        return expired

    # ------------------------------------------------------------------ shared machinery

    def _record(
        self,
        movement: str,
        outcome: str,
        kwargs: dict[str, Any],
        args: tuple[Any, ...],
        change: _Change | None,
        error: BaseException | None,
        start: float,
    ) -> None:
        """Metrics and the one log line of a write (see :func:`_observed`)."""
        reason = "none"
        if movement == "adjust":
            reason = "given"  # free text: never a label value
        metrics.STOCK_MOVEMENTS_TOTAL.labels(type=movement, result=outcome, reason=reason).inc()
        if movement == "reserve":
            metrics.RESERVE_TOTAL.labels(status=outcome).inc()
        elif movement == "deduct":
            metrics.DEDUCT_TOTAL.labels(status=outcome).inc()
        if outcome == "replayed":
            metrics.IDEMPOTENT_HIT_TOTAL.inc()
        committed = outcome == "success" or (change is not None and change.expiry_committed)
        if change is not None and committed:
            # Past-due reservations this call expired (committed even when the call failed).
            expired = {e["reservation_id"] for e in change.ledger if e["event_type"] == "EXPIRE"}
            if expired:
                metrics.RESERVATIONS_EXPIRED_TOTAL.inc(len(expired))
        reference = kwargs.get("reference")
        fields: dict[str, Any] = {
            "operation": movement,
            "idempotency_key": (
                change.key if change else args[0] if args else kwargs.get("idempotency_key")
            ),
            "reference": None if reference is None else str(reference),
            "outcome": outcome,
            "duration_s": round(time.perf_counter() - start, 6),
        }
        if change is not None and committed:
            fields["balances"] = [
                {
                    "event_type": e["event_type"],
                    "sku": e["sku"],
                    "location": e["location"],
                    "quantity": abs(e["on_hand_delta"]) or abs(e["reserved_delta"]),
                    "on_hand_before": e["on_hand_after"] - e["on_hand_delta"],
                    "on_hand_after": e["on_hand_after"],
                    "reserved_before": e["reserved_after"] - e["reserved_delta"],
                    "reserved_after": e["reserved_after"],
                    "reservation_id": e["reservation_id"],
                }
                for e in change.ledger
            ]
        if error is not None:
            fields["error"] = str(error)
        if outcome == "error":
            _log.error("stock write failed", **fields, exc_info=error)
        else:
            _log.info("stock write", **fields)

    async def _write(
        self,
        operation: str,
        key: str,
        rhash: str,
        body: Callable[[AsyncConnection], Awaitable[T]],
        lock_keys: Sequence[BalanceKey],
    ) -> T:
        """Hold the locker's keys, run ``body`` as one transaction; replay if the key is taken.

        The key row is inserted after ``body`` succeeded. When ``body`` fails on a domain rule,
        the key is looked up under the row locks ``body`` took: a copy of this call that
        committed while we waited for them makes this call a replay, not a failure. So does a
        completed copy found when the lock wait runs out (else LockTimeoutError).
        """

        async def guarded(conn: AsyncConnection) -> T:
            try:
                result = await body(conn)
            except StockError:
                if await self._key_taken(conn, key):
                    raise _KeyTaken() from None
                raise
            except CommitThenRaise:
                # A past-due reservation was expired on the way; that commits either way,
                # but a call whose key is done still answers with its replay.
                if await self._key_taken(conn, key):
                    raise CommitThenRaise(_KeyTaken()) from None
                raise
            await self._claim(conn, operation, rhash)
            return result

        for _ in range(3):
            try:
                async with self._locks(lock_keys):
                    return await self.db.run_write(guarded)
            except _KeyTaken:
                replay = await self._replay(operation, key, rhash)
                if replay is not None:
                    return replay  # type: ignore[no-any-return]
            except LockTimeoutError as timeout:
                # A retry of a call that already completed has its answer without the locks.
                with _still_timed_out(timeout):
                    replay = await self._replay(operation, key, rhash)
                if replay is not None:
                    return replay  # type: ignore[no-any-return]
                raise
        raise RuntimeError(f"idempotency key {key!r} neither claimable nor replayable")

    async def _write_unless_sold_out(
        self,
        operation: str,
        key: str,
        rhash: str,
        body: Callable[[AsyncConnection], Awaitable[_Taking]],
        merged: Sequence[Line],
    ) -> _Taking:
        """:meth:`_write` for calls that take stock (reserve, direct deduct) on hot SKUs.

        When another task of this process holds or queues for one of the keys, a committed
        read that finds a line short answers InsufficientStockError without queueing. When
        the lock wait runs out (LockTimeoutError), the same read runs again: a waiter queued
        behind the sale of the last unit gets "insufficient stock", the definite answer,
        rather than "retry later". Raises what :meth:`_write` and ``body`` raise.
        """
        keys = [(ln.location, ln.sku) for ln in merged]
        if self.locker.busy(self.org_id, keys) and self._looks_short(merged):
            await self._refuse_if_short(key, merged)
        try:
            result = await self._write(operation, key, rhash, body, keys)
        except InsufficientStockError as refused:
            self._saw_available((s.location, s.sku, s.available) for s in refused.shortages)
            raise
        except LockTimeoutError as timeout:
            with _still_timed_out(timeout):
                await self._refuse_if_short(key, merged)
            raise
        self._saw_available((b.location, b.sku, b.available) for b in result.balances)
        return result

    def _looks_short(self, merged: Sequence[Line]) -> bool:
        """True when this process last saw fewer units available than a line asks for.

        A balance not seen yet counts as sufficient: in a burst on a hot SKU, reading it
        before queueing would only slow the lock holders while units remain.
        """
        seen = self._available_seen
        return any(seen.get((ln.location, ln.sku), ln.quantity) < ln.quantity for ln in merged)

    def _saw_available(self, seen: Iterable[tuple[str, str, int]]) -> None:
        """Remember (location, sku, available) triples; forgets all past 10,000 balances."""
        if len(self._available_seen) > 10_000:
            self._available_seen.clear()
        for location, sku, available in seen:
            self._available_seen[(location, sku)] = available

    async def _refuse_if_short(self, key: str, merged: Sequence[Line]) -> None:
        """Raise InsufficientStockError when a read of committed balances finds a line short.

        That outcome is true of the state at the read, so it is as linearizable as the
        locked check. The key is looked up too, so that a call whose copy already succeeded
        still replays (through the locked path). Returns when stock looks sufficient.
        """
        keys = [(ln.location, ln.sku) for ln in merged]
        async with self.db.read() as conn:
            rows = await select_balances(conn, self.org_id, keys, for_update=False)
            # The key is read after the balances: at READ COMMITTED each statement sees the
            # latest commits, so a copy whose effect the balances show has its key seen too.
            if await self._key_taken(conn, key):
                return  # the locked path replays it
        shortages = []
        for ln in merged:
            row = rows.get((ln.location, ln.sku))
            available = 0 if row is None else row.on_hand - row.reserved
            self._saw_available([(ln.location, ln.sku, available)])
            if available < ln.quantity:
                shortages.append(Shortage(ln.sku, ln.location, ln.quantity, max(available, 0)))
        if shortages:
            raise InsufficientStockError(shortages)

    @asynccontextmanager
    async def _locks(self, keys: Sequence[BalanceKey]) -> AsyncIterator[None]:
        """Hold the locker's keys; a busy lock becomes the contract's LockTimeoutError."""
        try:
            cm = self.locker.hold(self.org_id, sorted(set(keys)))
            await cm.__aenter__()
        except LocksBusy as busy:
            raise LockTimeoutError(busy.retry_after_ms, busy.message) from None
        try:
            yield
        except BaseException as exc:
            if not await cm.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            await cm.__aexit__(None, None, None)

    def _begin(self, key: str, result_ref: str | None = None) -> _Change:
        """Start collecting a transaction's change; the key row is written last (:meth:`_claim`)."""
        change = _Change(self.clock(), key, result_ref=result_ref)
        _CURRENT_CHANGE.set(change)
        return change

    async def _claim(self, conn: AsyncConnection, operation: str, rhash: str) -> None:
        """Insert the idempotency key row as the transaction's last statement.

        A plain INSERT (ARCHITECTURE section 4: no upsert). A duplicate means a call with the
        same key committed first: raise :class:`_KeyTaken` (roll back, then replay). Written
        last so that a call failing on a domain rule never holds a key row that concurrent
        copies of it wait on (they would deadlock on it once it rolled back).
        """
        change = _CURRENT_CHANGE.get()
        assert change is not None
        try:
            await conn.execute(
                _INSERT_KEY,
                {
                    "org_id": self.org_id,
                    "idempotency_key": change.key,
                    "operation": operation,
                    "request_hash": rhash,
                    "result_ref": change.result_ref,
                    "created_at": to_db_time(change.now),
                },
            )
        except IntegrityError as exc:
            if is_duplicate_key(exc):
                raise _KeyTaken() from exc
            raise

    async def _key_taken(self, conn: AsyncConnection, key: str) -> bool:
        """True when a key row exists (committed by an earlier or concurrent call)."""
        row = await conn.execute(
            select(K.c.operation).where(K.c.org_id == self.org_id, K.c.idempotency_key == key)
        )
        return row.first() is not None

    async def _lock(
        self,
        conn: AsyncConnection,
        change: _Change,
        keys: Sequence[BalanceKey],
        *,
        create: bool = True,
    ) -> None:
        """Lock the balances of ``keys`` (sorted, one statement) into ``change.balances``.

        With ``create`` a missing balance is inserted at zero (restock, adjust); two
        transactions creating the same balance collide on its primary key and the loser runs
        again, then finding the row.
        """
        wanted = sorted(set(keys) - set(change.balances))
        rows = await select_balances(conn, self.org_id, wanted, for_update=True)
        missing = []
        for k in wanted:
            row = rows.get(k)
            if row is not None:
                change.balances[k] = _Balance(
                    k[0], k[1], row.on_hand, row.reserved, row.version, True
                )
            else:
                change.balances[k] = _Balance(k[0], k[1], 0, 0, 0, False)
                missing.append(k)
        if missing and create:
            try:
                await conn.execute(
                    _INSERT_BALANCE,
                    [
                        {
                            "org_id": self.org_id,
                            "location": loc,
                            "sku": sku,
                            "on_hand": 0,
                            "reserved": 0,
                            "version": 0,
                            "updated_at": to_db_time(change.now),
                        }
                        for loc, sku in missing
                    ],
                )
            except IntegrityError as exc:
                if is_duplicate_key(exc):
                    raise RetryTransaction("balance_created_concurrently") from exc
                raise
            for k in missing:
                change.balances[k].exists = True

    async def _flush(self, conn: AsyncConnection, change: _Change) -> None:
        """Write the touched balances and append the queued ledger entries."""
        touched = change.touched()
        if touched:
            await conn.execute(
                _UPDATE_BALANCE,
                [
                    {
                        "b_org": self.org_id,
                        "b_location": b.location,
                        "b_sku": b.sku,
                        "b_on_hand": b.on_hand,
                        "b_reserved": b.reserved,
                        "b_version": b.version,
                        "b_updated_at": to_db_time(change.now),
                    }
                    for b in touched
                ],
            )
        if change.ledger:
            await conn.execute(
                _INSERT_LEDGER, [{"org_id": self.org_id, **e} for e in change.ledger]
            )

    async def _lock_reservations(
        self,
        conn: AsyncConnection,
        change: _Change,
        *,
        reservation_id: int | None = None,
        reference: Reference | None = None,
        lock_balances: bool = True,
    ) -> tuple[list[Any], dict[int, list[Any]]]:
        """Lock the ACTIVE reservation(s) addressed by id or by reference, oldest first.

        Returns the locked rows and their lines by reservation id. With ``lock_balances``
        (or when some are past due) the balances they hold are locked too, all in one
        statement in key order. A reservation past its expiry is expired here; if nothing
        ACTIVE is left the expiry commits before the error is raised (section 11, "Expiry").
        """
        if reservation_id is not None:
            row = (
                await conn.execute(
                    select(R)
                    .where(R.c.id == reservation_id, R.c.org_id == self.org_id)
                    .with_for_update()
                )
            ).first()
            if row is None:
                raise NotFoundError("Reservation", str(reservation_id))
            if row.status != ACTIVE:
                raise ReservationNotActiveError(row.id, row.status)
            rows = [row]
        else:
            assert reference is not None
            # Find the ids without locking, then lock by primary key in id order, the same
            # order every other path locks reservations in (locking through the reference
            # index would deadlock against a by-id call on the same reservation).
            ids = [
                r.id
                for r in await conn.execute(
                    select(R.c.id)
                    .where(
                        R.c.org_id == self.org_id,
                        R.c.ref_type == reference.type,
                        R.c.ref_id == reference.id,
                        R.c.status == ACTIVE,
                    )
                    .order_by(R.c.created_at, R.c.id)
                )
            ]
            locked = (
                {
                    r.id: r
                    for r in await conn.execute(
                        select(R).where(R.c.id.in_(ids)).order_by(R.c.id).with_for_update()
                    )
                }
                if ids
                else {}
            )
            # Oldest first (section 11); one that changed state meanwhile is no longer ours.
            rows = [locked[i] for i in ids if i in locked and locked[i].status == ACTIVE]
            if not rows:
                raise NotFoundError("Reservation", str(reference))
        # Time as of the row locks: a call that waited past expires_at must see it expired.
        change.now = self.clock()
        lines = await select_lines(conn, [r.id for r in rows])
        due = [r for r in rows if from_db_time(r.expires_at) <= change.now]
        if lock_balances or due:
            held = {
                (ln.location, ln.sku)
                for r in rows
                for ln in lines[r.id]
                if ln.quantity - ln.deducted - ln.released > 0
            }
            await self._lock(conn, change, sorted(held), create=False)
        for r in due:
            await self._expire_locked(conn, change, r, lines[r.id])
        active = [r for r in rows if r not in due]
        if active or not due:
            if due:  # only the survivors are acted on
                lines = {r.id: lines[r.id] for r in active}
            return active, lines
        # Nothing ACTIVE is left: commit the expiry (the caller's key is not written), then fail.
        await self._flush(conn, change)
        change.expiry_committed = True
        if reservation_id is not None:
            raise CommitThenRaise(ReservationNotActiveError(reservation_id, EXPIRED))
        raise CommitThenRaise(NotFoundError("Reservation", str(reference)))

    async def _expire_locked(
        self, conn: AsyncConnection, change: _Change, row: Any, lines: list[Any] | None = None
    ) -> None:
        """EXPIRE a locked, due, ACTIVE reservation: remaining -> released, status EXPIRED.

        Its ledger entries carry the key ``expire:<id>`` (ARCHITECTURE section 11).
        """
        if lines is None:
            lines = (await select_lines(conn, [row.id]))[row.id]
        held = [ln for ln in lines if ln.quantity - ln.deducted - ln.released > 0]
        await self._lock(conn, change, [(ln.location, ln.sku) for ln in held], create=False)
        reference = None if row.ref_type is None else Reference(row.ref_type, row.ref_id)
        updates = []
        for ln in held:
            remaining = ln.quantity - ln.deducted - ln.released
            bal = change.balances[(ln.location, ln.sku)]
            change.move(
                bal,
                "EXPIRE",
                0,
                -remaining,
                reservation_id=row.id,
                reference=reference,
                key=f"{RESERVED_KEY_PREFIX}{row.id}",  # makes expiry itself idempotent
            )
            updates.append(
                {
                    "l_reservation_id": row.id,
                    "l_location": ln.location,
                    "l_sku": ln.sku,
                    "l_deducted": ln.deducted,
                    "l_released": ln.released + remaining,
                }
            )
        if updates:
            await conn.execute(_UPDATE_LINE, updates)
        await conn.execute(
            _UPDATE_RESERVATION,
            [{"r_id": row.id, "r_status": EXPIRED, "r_updated_at": to_db_time(change.now)}],
        )

    async def _reservation_keys(
        self, reservation_id: int | None, reference: Reference | None
    ) -> list[BalanceKey]:
        """The balance keys a reservation-addressed write will touch, for the locker.

        Read before the transaction (a hint only: the row locks inside stay the guarantee).
        Skipped when no locker is configured.
        """
        if isinstance(self.locker, NoLocks):
            return []
        async with self.db.read() as conn:
            stmt = select(RL.c.location, RL.c.sku).join(R, R.c.id == RL.c.reservation_id)
            if reservation_id is not None:
                stmt = stmt.where(R.c.id == reservation_id)
            else:
                assert reference is not None
                stmt = stmt.where(
                    R.c.org_id == self.org_id,
                    R.c.ref_type == reference.type,
                    R.c.ref_id == reference.id,
                    R.c.status == ACTIVE,
                )
            return sorted({(r.location, r.sku) for r in await conn.execute(stmt)})

    async def _consume(
        self,
        operation: str,
        idempotency_key: str,
        reservation_id: str | int | None,
        reference: Reference | None,
        lines: Sequence[Line] | None,
    ) -> DeductResult:
        """RELEASE or DEDUCT units held by reservations (by id or by reference)."""
        key = check_key(idempotency_key)
        if (reservation_id is None) == (reference is None):
            raise ValidationError(
                "give exactly one of reservationId and reference", "reservationId"
            )
        rid_text = None if reservation_id is None else check_reservation_id(reservation_id)
        reference = check_reference(reference)
        merged = None if lines is None else check_lines(lines)
        rhash = request_hash(
            operation,
            {
                "reservationId": rid_text,
                "reference": reference_payload(reference),
                "lines": lines_payload(merged),
            },
        )
        rid = None
        if rid_text is not None:
            rid = parse_reservation_id(rid_text)
            if rid is None:
                raise NotFoundError("Reservation", rid_text)
        event = "DEDUCT" if operation == "deduct" else "RELEASE"

        async def body(conn: AsyncConnection) -> DeductResult:
            change = self._begin(key)
            rows, line_rows = await self._lock_reservations(
                conn, change, reservation_id=rid, reference=reference
            )
            ids = [r.id for r in rows]
            # remaining[(rid, location, sku)] in reservation order, then key order
            state = {
                (r.id, ln.location, ln.sku): [ln.deducted, ln.released, ln.quantity]
                for r in rows
                for ln in line_rows[r.id]
            }
            take: dict[tuple[int, str, str], int] = {}
            if merged is None:
                for k, (ded, rel, qty) in state.items():
                    if qty - ded - rel > 0:
                        take[k] = qty - ded - rel
            else:
                for ln in merged:
                    need = ln.quantity
                    held = 0
                    for r in rows:
                        st = state.get((r.id, ln.location, ln.sku))
                        if st is None:
                            continue
                        remaining = st[2] - st[0] - st[1]
                        held += remaining
                        t = min(remaining, need)
                        if t > 0:
                            take[(r.id, ln.location, ln.sku)] = t
                            need -= t
                    if need > 0:
                        if held == 0:
                            raise ValidationError(
                                f"the reservation holds nothing of {ln.location}/{ln.sku}",
                                _input_path(lines, ln, "sku"),
                            )
                        raise ValidationError(
                            f"only {held} units of {ln.location}/{ln.sku} remain reserved, "
                            f"{ln.quantity} asked",
                            _input_path(lines, ln, "quantity"),
                        )
            await self._lock(conn, change, [(loc, sku) for _, loc, sku in take], create=False)
            by_res: dict[int, Reference | None] = {
                r.id: (None if r.ref_type is None else Reference(r.ref_type, r.ref_id))
                for r in rows
            }
            line_updates = []
            for (res_id, loc, sku), q in sorted(
                take.items(), key=lambda kv: (ids.index(kv[0][0]), kv[0][1:])
            ):
                bal = change.balances[(loc, sku)]
                st = state[(res_id, loc, sku)]
                if event == "DEDUCT":
                    st[0] += q
                    change.move(bal, event, -q, -q, reservation_id=res_id, reference=by_res[res_id])
                else:
                    st[1] += q
                    change.move(bal, event, 0, -q, reservation_id=res_id, reference=by_res[res_id])
                line_updates.append(
                    {
                        "l_reservation_id": res_id,
                        "l_location": loc,
                        "l_sku": sku,
                        "l_deducted": st[0],
                        "l_released": st[1],
                    }
                )
            if line_updates:
                await conn.execute(_UPDATE_LINE, line_updates)
            touched_ids = sorted({k[0] for k in take}, key=ids.index)
            statuses = {}
            for res_id in touched_ids:
                lines_state = [v for k, v in state.items() if k[0] == res_id]
                if all(qty - ded - rel == 0 for ded, rel, qty in lines_state):
                    statuses[res_id] = (
                        COMMITTED if any(d > 0 for d, _, _ in lines_state) else RELEASED
                    )
                else:
                    statuses[res_id] = ACTIVE
            await conn.execute(
                _UPDATE_RESERVATION,
                [
                    {"r_id": i, "r_status": statuses[i], "r_updated_at": to_db_time(change.now)}
                    for i in touched_ids
                ],
            )
            await self._flush(conn, change)
            reservations = await select_reservations(conn, self.org_id, touched_ids)
            entries = (
                await select_ledger_by_key(conn, self.org_id, key) if event == "DEDUCT" else []
            )
            return DeductResult(
                reservations, [b.record(change.now) for b in change.touched()], entries, False
            )

        keys = await self._reservation_keys(rid, reference)
        result = await self._write(operation, key, rhash, body, keys)
        if not result.replayed:
            done = [r.id for r in result.reservations if r.status != ACTIVE]
            if done:
                await self.expiry_index.unschedule(done)
        return result

    async def _deduct_direct(
        self, idempotency_key: str, lines: Sequence[Line] | None
    ) -> DeductResult:
        """DEDUCT straight from available stock: ``on_hand -= quantity`` on every line or none."""
        key = check_key(idempotency_key)
        merged = check_lines(lines)
        rhash = request_hash(
            "deduct", {"reservationId": None, "reference": None, "lines": lines_payload(merged)}
        )

        async def body(conn: AsyncConnection) -> DeductResult:
            change = self._begin(key)
            await self._lock(conn, change, [(ln.location, ln.sku) for ln in merged], create=False)
            _check_available(change, merged)
            for ln in merged:
                change.move(change.balances[(ln.location, ln.sku)], "DEDUCT", -ln.quantity, 0)
            await self._flush(conn, change)
            entries = await select_ledger_by_key(conn, self.org_id, key)
            return DeductResult(
                [], [b.record(change.now) for b in change.touched()], entries, False
            )

        return await self._write_unless_sold_out("deduct", key, rhash, body, merged)

    async def _replay(self, operation: str, key: str, rhash: str) -> Any:
        """The current state of what a completed key changed, with ``replayed=True``.

        Returns None when the key row is gone (its transaction rolled back): claim again.
        Raises IdempotencyKeyReusedError when the key was used for another request.
        """
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(K).where(K.c.org_id == self.org_id, K.c.idempotency_key == key)
                )
            ).first()
            if row is None:
                return None
            if row.operation != operation or row.request_hash != rhash:
                raise IdempotencyKeyReusedError(key, row.operation)
            entries = await select_ledger_by_key(conn, self.org_id, key)
            res_ids = list(dict.fromkeys(e.reservation_id for e in entries if e.reservation_id))
            if row.result_ref:
                res_ids = [int(row.result_ref)]
            keys = list(dict.fromkeys((e.location, e.sku) for e in entries))
            bal_rows = await select_balances(conn, self.org_id, keys, for_update=False)
            balances = [balance_record(bal_rows[k]) for k in sorted(keys) if k in bal_rows]
            reservations = await select_reservations(conn, self.org_id, res_ids)
        if operation == "restock":
            return RestockResult(balances, entries, True)
        if operation == "adjust":
            return AdjustResult(balances[0], entries[0], True)
        if operation == "reserve":
            return ReserveResult(reservations[0], balances, True)
        if operation == "release":
            return ReleaseResult(reservations, balances, True)
        if operation == "deduct":
            return DeductResult(reservations, balances, entries, True)
        if operation == "extend":
            return ExtendResult(reservations[0], True)
        raise AssertionError(operation)


def _check_available(change: _Change, merged: Sequence[Line]) -> None:
    """Raise InsufficientStockError listing every line whose available is below its quantity."""
    shortages = []
    for ln in merged:
        bal = change.balances[(ln.location, ln.sku)]
        available = bal.on_hand - bal.reserved
        if available < ln.quantity:
            shortages.append(Shortage(ln.sku, ln.location, ln.quantity, max(available, 0)))
    if shortages:
        raise InsufficientStockError(shortages)


def _input_path(lines: Any, merged_line: Line, attr: str, default: int = 0) -> str:
    """The input path (``lines.<i>.<attr>``) of the first raw line for a merged line's key."""
    for i, raw in enumerate(lines or []):
        if raw.location == merged_line.location and raw.sku == merged_line.sku:
            return f"lines.{i}.{attr}"
    return f"lines.{default}.{attr}"
