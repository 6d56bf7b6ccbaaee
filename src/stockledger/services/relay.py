"""The outbox relay (ARCHITECTURE section 15): committed events to Redis pub/sub and to webhook
deliveries, in id order, never skipping one that commits late.

One relay per org runs at a time, under a lease in ``relay_state`` (taken and renewed by a
conditional UPDATE, or the INSERT of the org's first row; a crashed owner's lease lapses after
``relay_lease_seconds`` and another process takes the org over from its ``last_event_id``).

**Reading.** Ids are one AUTO_INCREMENT sequence for every org and commit out of order (a
transaction holding id 7 may commit after the one holding id 8), so a relay that read "id >
last" and moved on would skip 7 for ever. Each process therefore scans the whole stream's
``(id, org_id)`` in id order (a primary-key range, no payloads) from a position ``G`` kept in
memory. An id missing below the highest one seen is a *gap*: the relay looks for it again on
every pass for up to ``relay_gap_seconds`` (its late commit is then published, out of order but
never lost: payloads carry the balance version, so receivers drop what is stale), and then
passes it (a rolled-back transaction leaves a permanent gap; on SQLite, where writers are
serialised, rolled-back ids are reused and gaps do not arise). Gaps are global: a missing id
is missing for every org, and once it appears its ``org_id`` says whose it is.

**Per org** (the orgs this process holds the lease of), each event is published to
``stockledger:{<org>}:events`` (exactly the stored payload), a PENDING ``webhook_delivery`` row
is made for every active endpoint of the org whose event types include it (idempotent: unique
on endpoint and event), and then ``last_event_id`` advances to the *frontier*: the highest id
below which every id is published or passed (``min(G, smallest gap - 1)``). Publishing happens
before the advance, so a crash republishes (at least once); a Redis outage stops the advance
for that org, and the org is read again from its ``last_event_id`` until Redis answers.
An org taken over (or new) whose ``last_event_id`` is below ``G`` is caught up through the
``(org_id, id)`` index.

**Which orgs.** With ``orgs`` given (tests, or a dedicated relay), only those. Otherwise every
org the scan meets with new events, every org with a lapsed lease in ``relay_state``, and the
orgs held. A new org's row starts at the frontier of the pass that first met it. The scan
starts at the smallest ``last_event_id`` of those rows (all rows without ``orgs``).

**Retention.** Every ``RETENTION_EVERY`` seconds, events older than ``outbox_retention_seconds``
are deleted when every relay has passed them (id <= the smallest ``last_event_id`` of all
orgs: a gap can then never be a pruned event) and no unfinished delivery needs their payload.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from stockledger.config import Settings
from stockledger.db.engine import Database, is_duplicate_key
from stockledger.db.models import outbox_event, relay_state, webhook_delivery, webhook_endpoint
from stockledger.observability import metrics
from stockledger.services.rows import from_db_time, to_db_time, utcnow

log = logging.getLogger(__name__)

RETENTION_EVERY = 60.0  # seconds between retention passes of one process
RETENTION_BATCH = 500  # rows per DELETE statement (short transactions, few parameters)
_IN_CHUNK = 500  # ids per IN (...) list
# The longest run of missing ids tracked as gaps: open writes hold at most a few batches of
# ids each (batch_max_rows, 5000 by default, per writer connection and process).
MAX_GAP_RUN = 100_000
PENDING = "PENDING"
UNFINISHED = ("PENDING", "FAILED")  # deliveries that still need their event's payload


def events_channel(org_id: str) -> str:
    """The Redis pub/sub channel of ``org_id``'s events: ``stockledger:{<org>}:events`` (the
    braces are a Redis Cluster hash tag: one org's keys share a slot)."""
    return f"stockledger:{{{org_id}}}:events"


def default_owner() -> str:
    """A relay owner id, unique per process start: ``host:pid:random`` (at most 64 chars)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class _Held:
    """An org whose lease this process holds: ``start`` is its ``last_event_id`` when taken
    (everything up to it was done by a previous owner), ``catch_up`` the position of its
    catch-up read through ``(start, catch_up_to]`` (None: caught up), ``lease_until`` the
    lease's end (service clock), ``persisted`` the ``last_event_id`` last written."""

    start: int
    catch_up: int | None
    catch_up_to: int
    lease_until: datetime
    persisted: int


@dataclass
class _Event:
    id: int
    org_id: str
    event_type: str
    payload: str
    created_at: datetime


@dataclass
class PassReport:
    """What one :meth:`Relay.run_once` did: events ``published``, gaps ``passed`` (given up),
    whether more is waiting (``more``: run again at once)."""

    published: int = 0
    passed: int = 0
    more: bool = False
    orgs: list[str] = field(default_factory=list)


class Relay:
    """The relay of one process over ``db`` and ``redis``; :meth:`run_once` is one pass,
    :meth:`run_forever` the loop (every ``relay_interval_seconds``, at once while a backlog
    remains), :meth:`stop` ends it and :meth:`release` gives the leases back.

    ``orgs``: relay only these orgs (default: every org). ``owner``: the lease owner id
    (default :func:`default_owner`). ``clock`` (aware UTC) times leases and retention,
    ``monotonic`` (seconds) times gaps. ``batch``: ids per scan (and per catch-up read).
    Database or Redis failures in a pass are logged and the pass is tried again later.
    """

    def __init__(
        self,
        db: Database,
        redis: Redis,
        settings: Settings,
        *,
        orgs: Iterable[str] | None = None,
        owner: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        batch: int = 500,
    ) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings
        self.orgs = None if orgs is None else frozenset(orgs)
        self.owner = owner or default_owner()
        self.clock = clock
        self.monotonic = monotonic
        self.batch = batch
        self.lease = timedelta(seconds=settings.relay_lease_seconds)
        self._position: int | None = None  # G: every id <= it was seen or is a gap
        self._gaps: dict[int, float] = {}  # missing id -> monotonic time first missed
        self._held: dict[str, _Held] = {}
        self._last_retention: float | None = None
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ the loop

    async def run_forever(self) -> None:
        """Pass after pass until :meth:`stop`; a failed pass is logged and retried after
        the interval (a Redis or database outage loses nothing: nothing advanced)."""
        self._stopping.clear()
        try:
            while not self._stopping.is_set():
                more = False
                try:
                    more = (await self.run_once()).more
                except Exception:  # keep relaying: the next pass starts from what is stored
                    log.warning("relay pass failed; retrying", exc_info=True)
                if more:
                    await asyncio.sleep(0)  # a backlog: go on, but let others run
                    continue
                try:
                    await asyncio.wait_for(
                        self._stopping.wait(), self.settings.relay_interval_seconds
                    )
                except TimeoutError:
                    pass
        finally:
            await self.release()

    def stop(self) -> None:
        """Ask :meth:`run_forever` to return after the current pass."""
        self._stopping.set()

    async def release(self) -> None:
        """Give back this process's leases, so that another relay takes over at once."""
        if not self._held:
            return
        try:
            async with self.db.engine.begin() as conn:
                await conn.execute(
                    update(relay_state)
                    .where(relay_state.c.owner == self.owner)
                    .values(owner=None, lease_expires_at=None)
                )
        except Exception:  # the leases lapse by themselves
            log.warning("relay could not release its leases", exc_info=True)
        self._held.clear()

    @property
    def held_orgs(self) -> frozenset[str]:
        """The orgs whose lease this relay holds now."""
        return frozenset(self._held)

    # ------------------------------------------------------------------ one pass

    async def run_once(self) -> PassReport:
        """One pass: scan new ids, look for gaps again, take or renew leases, publish and
        record deliveries for the held orgs, advance their ``last_event_id``; then retention
        when due. Raises what the database raises; a failed publish is logged and its orgs are
        read again from their stored ``last_event_id`` on the next pass."""
        report = PassReport()
        now = self.clock()
        if self._position is None:
            self._position = await self._scan_start()
        frontier_before = self._frontier()
        scanned, full = await self._scan()
        resolved, report.passed = await self._resolve_gaps()
        by_org: dict[str, list[int]] = {}
        for event_id, org_id in [*scanned, *resolved]:
            if self.orgs is None or org_id in self.orgs:
                by_org.setdefault(org_id, []).append(event_id)
        await self._take_leases(set(by_org), now, frontier_before)
        frontier = self._frontier()
        pending = await self._count_after(self._position) if full else 0
        # Every held org's events of this pass, then one delivery insert, one Redis round
        # trip and one UPDATE per distinct new last_event_id: the cost of a pass hardly grows
        # with the number of orgs.
        found: dict[str, list[_Event]] = {}
        plain: list[int] = []
        for org_id, held in list(self._held.items()):
            ids = sorted(i for i in by_org.get(org_id, ()) if i > held.start)
            if held.catch_up is None:
                plain += ids
                continue
            events, backlog = await self._catching_up(org_id, held, ids)
            found[org_id] = events
            pending += backlog
            report.more = report.more or backlog > 0
        for event in await self._load(plain):
            found.setdefault(event.org_id, []).append(event)
        found = {org: evs for org, evs in found.items() if evs}
        failed: set[str] = set()
        if found:
            try:
                await self._record_deliveries(found)
                await self._publish(found)
                report.published = sum(len(evs) for evs in found.values())
            except Exception:
                # Redis (or the database) failed: read these orgs again from their stored
                # last_event_id once it answers (nothing past it is assumed done).
                log.warning("relay could not publish; retrying", exc_info=True)
                failed = set(found)
                for org_id in failed:
                    self._held[org_id].catch_up = self._held[org_id].persisted
        report.orgs = sorted(set(found) - failed)
        await self._advance(frontier, failed)
        report.more = report.more or full
        metrics.OUTBOX_PENDING.set(pending)
        await self._retention_if_due()
        return report

    def _frontier(self) -> int:
        """The highest id below which every id was seen or passed."""
        assert self._position is not None
        if self._gaps:
            return min(self._position, min(self._gaps) - 1)
        return self._position

    async def _scan_start(self) -> int:
        """Where the scan starts: the smallest ``last_event_id`` of the orgs relayed (every
        org's without ``orgs``); with no row at all, the stream's end when ``orgs`` is given
        (their events start now), else 0 (the whole stream)."""
        query = select(func.min(relay_state.c.last_event_id))
        if self.orgs is not None:
            query = query.where(relay_state.c.org_id.in_(sorted(self.orgs)))
        async with self.db.read() as conn:
            smallest = (await conn.execute(query)).scalar()
            if smallest is not None:
                return int(smallest)
            if self.orgs is None:
                return 0
            end = (await conn.execute(select(func.max(outbox_event.c.id)))).scalar()
        return int(end or 0)

    async def _scan(self) -> tuple[list[tuple[int, str]], bool]:
        """The next ``batch`` ids (and their orgs) after the position, in id order; every id
        skipped between them becomes a gap. Also whether the batch was full."""
        assert self._position is not None
        query = (
            select(outbox_event.c.id, outbox_event.c.org_id)
            .where(outbox_event.c.id > self._position)
            .order_by(outbox_event.c.id)
            .limit(self.batch)
        )
        async with self.db.read() as conn:
            rows = [(int(r.id), str(r.org_id)) for r in (await conn.execute(query)).all()]
        seen = self.monotonic()
        expected = self._position + 1
        for event_id, _ in rows:
            if event_id - expected > MAX_GAP_RUN:
                # No set of open transactions holds that many ids: a jump of the counter
                # (set by hand, or ids deleted), not late commits. Not tracked.
                log.warning("relay skipped an id jump from %d to %d", expected, event_id)
            else:
                for missing in range(expected, event_id):
                    self._gaps[missing] = seen
            expected = event_id + 1
        if rows:
            self._position = rows[-1][0]
        return rows, len(rows) == self.batch

    async def _resolve_gaps(self) -> tuple[list[tuple[int, str]], int]:
        """The gaps that committed since (id, org), removed from the gaps; then the gaps
        older than ``relay_gap_seconds`` are passed. Returns (found, passed count)."""
        if not self._gaps:
            return [], 0
        found: list[tuple[int, str]] = []
        gap_ids = sorted(self._gaps)
        async with self.db.read() as conn:
            for start in range(0, len(gap_ids), _IN_CHUNK):
                chunk = gap_ids[start : start + _IN_CHUNK]
                query = select(outbox_event.c.id, outbox_event.c.org_id).where(
                    outbox_event.c.id.in_(chunk)
                )
                found += [(int(r.id), str(r.org_id)) for r in (await conn.execute(query)).all()]
        for event_id, _ in found:
            self._gaps.pop(event_id, None)
        limit = self.monotonic() - self.settings.relay_gap_seconds
        expired = [i for i, first in self._gaps.items() if first <= limit]
        for event_id in expired:
            del self._gaps[event_id]
        if expired:
            log.info("relay passed %d id gap(s) (no commit within the gap time)", len(expired))
        return sorted(found), len(expired)

    # ------------------------------------------------------------------ leases

    async def _take_leases(self, seen: set[str], now: datetime, frontier: int) -> None:
        """Renew the held leases and take those of ``seen`` orgs and of lapsed ones; an org
        whose lease is another's is left to it (and dropped when this process lost it)."""
        wanted = set(seen) | set(self._held)
        async with self.db.read() as conn:
            lapsed = select(relay_state.c.org_id).where(
                (relay_state.c.owner.is_(None))
                | (relay_state.c.lease_expires_at.is_(None))
                | (relay_state.c.lease_expires_at < to_db_time(now))
            )
            if self.orgs is not None:
                lapsed = lapsed.where(relay_state.c.org_id.in_(sorted(self.orgs)))
                wanted |= set(self.orgs)
            wanted |= {str(r.org_id) for r in (await conn.execute(lapsed)).all()}
            # Orgs another live relay holds are not tried (one read, not a write each).
            others: set[str] = set()
            candidates = sorted(wanted - set(self._held))
            for start in range(0, len(candidates), _IN_CHUNK):
                chunk = candidates[start : start + _IN_CHUNK]
                taken = select(relay_state.c.org_id).where(
                    relay_state.c.org_id.in_(chunk),
                    relay_state.c.owner != self.owner,
                    relay_state.c.lease_expires_at >= to_db_time(now),
                )
                others |= {str(r.org_id) for r in (await conn.execute(taken)).all()}
        for org_id in sorted(wanted - others):
            held = self._held.get(org_id)
            if held is not None and held.lease_until - now > self.lease * 2 / 3:
                continue  # renewed with the next advance (or when a third has gone)
            last = await self._acquire(org_id, now, frontier)
            if last is None:
                if held is not None:
                    log.warning("relay lost the lease of org %s", org_id)
                self._held.pop(org_id, None)
                continue
            if held is not None:
                held.lease_until = now + self.lease
                continue
            assert self._position is not None
            behind = last < self._position
            self._held[org_id] = _Held(
                start=last,
                catch_up=last if behind else None,
                catch_up_to=self._position,
                lease_until=now + self.lease,
                persisted=last,
            )

    async def _acquire(self, org_id: str, now: datetime, initial: int) -> int | None:
        """Take or renew ``org_id``'s lease: its ``last_event_id``, or None when another
        relay holds it. A missing row is inserted at ``initial``; a concurrent insert wins."""
        until = to_db_time(now + self.lease)
        at = to_db_time(now)
        c = relay_state.c
        try:
            async with self.db.engine.begin() as conn:
                result = await conn.execute(
                    update(relay_state)
                    .where(
                        c.org_id == org_id,
                        (c.owner == self.owner)
                        | c.owner.is_(None)
                        | c.lease_expires_at.is_(None)
                        | (c.lease_expires_at < at),
                    )
                    .values(owner=self.owner, lease_expires_at=until, updated_at=at)
                )
                if result.rowcount:
                    row = (
                        await conn.execute(select(c.last_event_id).where(c.org_id == org_id))
                    ).scalar_one()
                    return int(row)
                exists = (await conn.execute(select(c.org_id).where(c.org_id == org_id))).first()
                if exists is not None:
                    return None
                await conn.execute(
                    insert(relay_state).values(
                        org_id=org_id,
                        owner=self.owner,
                        lease_expires_at=until,
                        last_event_id=initial,
                        updated_at=at,
                    )
                )
                return initial
        except DBAPIError as exc:
            if is_duplicate_key(exc):
                return None  # another relay inserted the row first: its lease
            raise

    async def _advance(self, frontier: int, failed: set[str]) -> None:
        """Store each held org's new ``last_event_id`` (the frontier, or its catch-up read's
        position; never below its start) and renew its lease, while this relay still holds
        it: one UPDATE per distinct value. An org whose lease was lost is dropped."""
        now = self.clock()
        groups: dict[int, list[str]] = {}
        for org_id, held in self._held.items():
            if org_id in failed:
                continue
            last = frontier if held.catch_up is None else min(frontier, held.catch_up)
            last = max(last, held.start)  # the previous owner did everything up to its start
            if last != held.persisted or held.lease_until - now < self.lease * 2 / 3:
                groups.setdefault(last, []).append(org_id)
        c = relay_state.c
        for last, orgs in sorted(groups.items()):
            async with self.db.engine.begin() as conn:
                result = await conn.execute(
                    update(relay_state)
                    .where(c.org_id.in_(orgs), c.owner == self.owner)
                    .values(
                        last_event_id=last,
                        lease_expires_at=to_db_time(now + self.lease),
                        updated_at=to_db_time(now),
                    )
                )
                kept = set(orgs)
                if result.rowcount != len(orgs):
                    query = select(c.org_id).where(c.org_id.in_(orgs), c.owner == self.owner)
                    kept = {str(r.org_id) for r in (await conn.execute(query)).all()}
            for org_id in orgs:
                if org_id not in kept:
                    log.warning("relay lost the lease of org %s", org_id)
                    self._held.pop(org_id, None)
                    continue
                self._held[org_id].persisted = last
                self._held[org_id].lease_until = now + self.lease

    # ------------------------------------------------------------------ one org

    async def _catching_up(
        self, org_id: str, held: _Held, ids: Sequence[int]
    ) -> tuple[list[_Event], int]:
        """The events of an org being caught up: the next read through its index up to the
        scan's position (in id order), plus the late commits behind that read. Returns
        (events, backlog: events its read has still to read)."""
        assert self._position is not None and held.catch_up is not None
        held.catch_up_to = self._position
        behind = held.catch_up
        events = await self._load([i for i in ids if i <= behind])
        more, done = await self._catch_up(org_id, held)
        events = sorted({e.id: e for e in [*events, *more]}.values(), key=lambda e: e.id)
        backlog = 0 if done else await self._count_org(org_id, held)
        return events, backlog

    async def _load(self, ids: Sequence[int]) -> list[_Event]:
        """The events ``ids``, in id order."""
        if not ids:
            return []
        events: list[_Event] = []
        async with self.db.read() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = list(ids[start : start + _IN_CHUNK])
                query = select(outbox_event).where(outbox_event.c.id.in_(chunk))
                events += [_event(r) for r in (await conn.execute(query)).all()]
        return sorted(events, key=lambda e: e.id)

    async def _catch_up(self, org_id: str, held: _Held) -> tuple[list[_Event], bool]:
        """The next ``batch`` events of ``org_id`` in ``(catch_up, catch_up_to]`` (through
        the org's index); moves ``held.catch_up``, None once done. Returns (events, done)."""
        assert held.catch_up is not None
        query = (
            select(outbox_event)
            .where(
                outbox_event.c.org_id == org_id,
                outbox_event.c.id > held.catch_up,
                outbox_event.c.id <= held.catch_up_to,
            )
            .order_by(outbox_event.c.id)
            .limit(self.batch)
        )
        async with self.db.read() as conn:
            events = [_event(r) for r in (await conn.execute(query)).all()]
        if len(events) < self.batch:
            held.catch_up = None
            return events, True
        held.catch_up = events[-1].id
        return events, False

    async def _record_deliveries(self, found: dict[str, list[_Event]]) -> None:
        """A PENDING delivery per (active endpoint of the event's org subscribed to its type,
        event); one that exists already (a republish) is left as it is."""
        async with self.db.read() as conn:
            endpoints = (
                await conn.execute(
                    select(
                        webhook_endpoint.c.id,
                        webhook_endpoint.c.org_id,
                        webhook_endpoint.c.event_types,
                    ).where(
                        webhook_endpoint.c.org_id.in_(sorted(found)),
                        webhook_endpoint.c.active.is_(True),
                    )
                )
            ).all()
        if not endpoints:
            return
        now = to_db_time(self.clock())
        rows: list[dict[str, Any]] = []
        for endpoint in endpoints:
            types = set(str(endpoint.event_types).split())
            rows += [
                {
                    "org_id": e.org_id,
                    "endpoint_id": int(endpoint.id),
                    "event_id": e.id,
                    "event_type": e.event_type,
                    "status": PENDING,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for e in found[str(endpoint.org_id)]
                if e.event_type in types
            ]
        if not rows:
            return
        async with self.db.engine.begin() as conn:
            for start in range(0, len(rows), _IN_CHUNK):
                await conn.execute(_insert_ignore(conn, rows[start : start + _IN_CHUNK]))

    async def _publish(self, found: dict[str, list[_Event]]) -> None:
        """Each payload on its org's channel, each org's in id order, in one round trip;
        observes the lag from each event's creation. Raises what Redis raises."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for org_id, events in found.items():
                channel = events_channel(org_id)
                for e in events:
                    pipe.publish(channel, e.payload)
            await pipe.execute()
        now = self.clock()
        for events in found.values():
            for e in events:
                metrics.OUTBOX_LAG_SECONDS.observe(max(0.0, (now - e.created_at).total_seconds()))

    async def _count_org(self, org_id: str, held: _Held) -> int:
        """Events of ``org_id`` its catch-up read has still to read."""
        assert held.catch_up is not None
        c = outbox_event.c
        query = select(func.count()).where(
            c.org_id == org_id, c.id > held.catch_up, c.id <= held.catch_up_to
        )
        async with self.db.read() as conn:
            return int((await conn.execute(query)).scalar() or 0)

    async def _count_after(self, position: int) -> int:
        async with self.db.read() as conn:
            query = select(func.count()).where(outbox_event.c.id > position)
            return int((await conn.execute(query)).scalar() or 0)

    # ------------------------------------------------------------------ retention

    async def _retention_if_due(self) -> None:
        mono = self.monotonic()
        if self._last_retention is not None and mono - self._last_retention < RETENTION_EVERY:
            return
        self._last_retention = mono
        await self.prune()

    async def prune(self) -> int:
        """Delete the events older than ``outbox_retention_seconds`` that every relay has
        passed (id <= the smallest ``last_event_id`` of every org) and that no unfinished
        delivery (PENDING, FAILED) names. Returns how many were deleted."""
        cutoff = to_db_time(
            self.clock() - timedelta(seconds=self.settings.outbox_retention_seconds)
        )
        async with self.db.read() as conn:
            passed = (await conn.execute(select(func.min(relay_state.c.last_event_id)))).scalar()
            needed = (
                await conn.execute(
                    select(func.min(webhook_delivery.c.event_id)).where(
                        webhook_delivery.c.status.in_(UNFINISHED)
                    )
                )
            ).scalar()
        if passed is None:
            return 0
        upto = int(passed) if needed is None else min(int(passed), int(needed) - 1)
        deleted = 0
        while True:
            async with self.db.engine.begin() as conn:
                # Ids first, then a delete by id: bounded on both dialects (SQLite has no
                # DELETE ... LIMIT by default).
                ids = (
                    await conn.execute(
                        select(outbox_event.c.id)
                        .where(outbox_event.c.id <= upto, outbox_event.c.created_at < cutoff)
                        .order_by(outbox_event.c.id)
                        .limit(RETENTION_BATCH)
                    )
                ).scalars()
                chunk = [int(i) for i in ids]
                if chunk:
                    await conn.execute(delete(outbox_event).where(outbox_event.c.id.in_(chunk)))
            deleted += len(chunk)
            if len(chunk) < RETENTION_BATCH:
                return deleted


def _event(row: Any) -> _Event:
    return _Event(
        int(row.id),
        str(row.org_id),
        str(row.event_type),
        str(row.payload),
        from_db_time(row.created_at),
    )


def _insert_ignore(conn: AsyncConnection, rows: list[dict[str, Any]]) -> Any:
    """INSERT of delivery ``rows`` that leaves an existing (endpoint, event) row alone."""
    if conn.dialect.name == "sqlite":
        return sqlite.insert(webhook_delivery).values(rows).on_conflict_do_nothing()
    statement = mysql.insert(webhook_delivery).values(rows)
    return statement.on_duplicate_key_update(status=statement.table.c.status)
