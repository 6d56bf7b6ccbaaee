"""Live events for GraphQL subscriptions (ARCHITECTURE section 15): one Redis pub/sub connection
per process, fanned out to in-process subscribers.

The relay publishes every committed outbox event's payload, unchanged, to the channel
``stockledger:{<org>}:events`` (:func:`channel`). :class:`LiveEvents` pattern-subscribes to
every org's channel (:data:`PATTERN`) on one pub/sub connection, parses each payload once, and
hands it to the subscribers of that org whose filter takes it. Redis pub/sub is at most once:
an event published while the listener is disconnected is not seen here (webhooks are the
at-least-once path; a subscriber re-reads ``balance`` after reconnecting).

A subscriber owns a bounded queue (``queue_size`` events). When it is full, the **oldest**
queued event is dropped to make room, and the subscriber is marked ``lagged`` (counted in
``dropped``): a slow subscriber never blocks the listener or the other subscribers. Dropping
the oldest suits these events: each carries the whole balance after it, with its version, so
the newest one is always the one that matters.

Works with fakeredis (the embedded default): :func:`~stockledger.runtime.create_redis` gives
the whole process one client, whose in-process server carries the relay's publications.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from stockledger.observability import metrics
from stockledger.observability.logs import get_logger

log = get_logger(__name__)

CHANNEL_PREFIX = "stockledger"
# The org in braces: a Redis Cluster hash tag, so one org's channel and keys share a slot.
PATTERN = f"{CHANNEL_PREFIX}:{{*}}:events"
DEFAULT_QUEUE_SIZE = 256
# How long a failing listener waits before it reads again (seconds, doubling up to the max).
RETRY_MIN_SECONDS = 0.1
RETRY_MAX_SECONDS = 5.0
# How long a subscribe waits for the listener's pattern subscription (seconds).
START_TIMEOUT_SECONDS = 5.0


class LiveEventsUnavailable(RuntimeError):
    """The listener cannot take subscribers now (Redis away, or it is closed)."""


def channel(org: str) -> str:
    """The pub/sub channel of ``org``'s events: ``stockledger:{<org>}:events``."""
    return f"{CHANNEL_PREFIX}:{{{org}}}:events"


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """One published event: ``type`` (an EventType name), ``timestamp`` (ISO 8601, as the
    payload has it), ``org`` and ``data`` (the payload's ``data`` object)."""

    type: str
    timestamp: str
    org: str
    data: dict[str, Any]

    @property
    def balance(self) -> dict[str, Any] | None:
        """``data.balance`` (stock events), else None."""
        found = self.data.get("balance")
        return found if isinstance(found, dict) else None


def parse_event(raw: bytes | str) -> LiveEvent | None:
    """A payload (the Standard Webhooks body) as a :class:`LiveEvent`; None when it is not
    JSON or lacks ``type``, ``timestamp`` or ``data.org`` (logged, never raised: one bad
    publication must not stop the listener)."""
    try:
        body = orjson.loads(raw)
        data = body["data"]
        event = LiveEvent(str(body["type"]), str(body["timestamp"]), str(data["org"]), data)
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        log.warning("live events: an unreadable payload was skipped", error=repr(exc))
        return None
    return event


Matcher = Callable[[LiveEvent], bool]


@dataclass(eq=False)
class Subscriber:
    """One subscription's queue: the events of ``org`` that ``matches`` takes, in publication
    order. ``dropped`` counts the events dropped (oldest first) because the queue was full."""

    org: str
    matches: Matcher
    queue: asyncio.Queue[LiveEvent | None]
    dropped: int = 0
    _closed: bool = field(default=False, repr=False)

    def offer(self, event: LiveEvent) -> None:
        """Queue ``event`` without waiting: drop the oldest queued event when full."""
        if self._closed:
            return
        while True:
            try:
                self.queue.put_nowait(event)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self.queue.get_nowait()
                if self.dropped == 0:
                    log.warning("live events: a slow subscriber lost events", org=self.org)
                self.dropped += 1

    def close(self) -> None:
        """End the subscriber's stream (the listener is closing)."""
        if self._closed:
            return
        self._closed = True
        # The end marker must get in even when the queue is full.
        with contextlib.suppress(asyncio.QueueEmpty):
            if self.queue.full():
                self.queue.get_nowait()
        self.queue.put_nowait(None)

    async def events(self) -> AsyncIterator[LiveEvent]:
        """The queued events as they come; ends when the listener closes."""
        while True:
            event = await self.queue.get()
            if event is None:
                return
            yield event


class LiveEvents:
    """The per-process listener: one pub/sub connection on ``redis``, started on the first
    :meth:`subscribe` (or by :meth:`start`), closed by :meth:`aclose`.

    ``queue_size``: events each subscriber may have waiting (at least 1).
    ``inventory_subscriptions_active`` counts the subscribers open.
    """

    def __init__(self, redis: Redis, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.redis = redis
        self.queue_size = queue_size
        self._by_org: dict[str, set[Subscriber]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._closed = False

    @property
    def subscribers(self) -> int:
        """Subscribers open now, all orgs."""
        return sum(len(s) for s in self._by_org.values())

    async def start(self) -> None:
        """Start the listener if not running; return once its pattern subscription is in
        place (so that an event published after this returns is seen).

        Raises :class:`LiveEventsUnavailable` when it is not in place within
        :data:`START_TIMEOUT_SECONDS` (Redis is away; the listener keeps trying) or the
        listener is closed.
        """
        if self._closed:
            raise LiveEventsUnavailable("the live events listener is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="stockledger-live-events")
        if self._subscribed.is_set():
            return
        try:
            await asyncio.wait_for(self._subscribed.wait(), START_TIMEOUT_SECONDS)
        except TimeoutError:
            raise LiveEventsUnavailable(
                "live events are unavailable now: Redis pub/sub does not answer"
            ) from None

    @contextlib.asynccontextmanager
    async def subscribe(self, org: str, matches: Matcher) -> AsyncIterator[Subscriber]:
        """A :class:`Subscriber` of ``org``'s events that ``matches`` takes, from now until
        the block exits. Starts the listener if needed (see :meth:`start`)."""
        await self.start()
        subscriber = Subscriber(org, matches, asyncio.Queue(self.queue_size))
        self._by_org.setdefault(org, set()).add(subscriber)
        metrics.SUBSCRIPTIONS_ACTIVE.inc()
        try:
            yield subscriber
        finally:
            metrics.SUBSCRIPTIONS_ACTIVE.dec()
            of_org = self._by_org.get(org)
            if of_org is not None:
                of_org.discard(subscriber)
                if not of_org:
                    del self._by_org[org]

    def dispatch(self, event: LiveEvent) -> int:
        """Offer ``event`` to its org's subscribers that take it; how many took it."""
        taken = 0
        for subscriber in tuple(self._by_org.get(event.org, ())):
            try:
                wanted = subscriber.matches(event)
            except Exception:  # a filter's bug must not stop the others' events
                log.exception("live events: a subscriber's filter failed")
                continue
            if wanted:
                subscriber.offer(event)
                taken += 1
        return taken

    async def aclose(self) -> None:
        """Stop the listener and end every subscriber's stream."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for subscribers in self._by_org.values():
            for subscriber in subscribers:
                subscriber.close()

    async def _listen(self) -> None:
        """Read the pattern subscription until cancelled; on a Redis error wait (backing
        off) and read again (redis-py reconnects and subscribes the pattern again)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        delay = RETRY_MIN_SECONDS
        try:
            while True:
                try:
                    if not self._subscribed.is_set():
                        await pubsub.psubscribe(PATTERN)
                        self._subscribed.set()
                    message = await pubsub.get_message(timeout=1.0)
                    delay = RETRY_MIN_SECONDS
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("live events: Redis pub/sub failed", error=repr(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_SECONDS)
                    continue
                if message is None or message.get("type") != "pmessage":
                    continue
                event = parse_event(message["data"])
                if event is not None:
                    self.dispatch(event)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
