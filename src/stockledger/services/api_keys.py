"""API keys: create, list, revoke, and authenticate a secret (ARCHITECTURE section 13).

A secret is drawn here (``secrets``: the operating system's CSPRNG), shown once to its creator
and stored only as its SHA-256 (:mod:`stockledger.domain.access`). Authentication looks the
hash up; lookups are cached in process for at most ``cache_seconds`` (5 s by default), so a
revocation takes effect within that bound on every instance (at once on the instance that
revoked it: it forgets the key). ``last_used_at`` is written at most once a minute per key.

The GraphQL side (``createApiKey``, ``revokeApiKey``) is idempotent like every write
(ARCHITECTURE section 5): :meth:`ApiKeys.create_once` and :meth:`ApiKeys.revoke_once` keep a row
in ``idempotency_key`` under the caller's org (the operation, the SHA-256 of the normalized
request and, in ``result_ref``, the key's id), written in the same transaction as the key.
A replay answers the key as it is now; the secret is never stored, so a replay has none.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from stockledger.db.engine import Database
from stockledger.db.models import ORG_LENGTH, api_key
from stockledger.domain.access import (
    BASE62,
    SECRET_LENGTH,
    SECRET_PREFIX,
    ApiKey,
    Role,
    Scope,
    display_prefix,
    granted_scopes,
    is_well_formed,
    secret_hash,
    unusable_because,
)
from stockledger.domain.errors import NotFoundError, ValidationError
from stockledger.domain.validation import check_key, check_string, request_hash
from stockledger.services.idempotent_calls import remember_call, retrying
from stockledger.services.lookups import done_call
from stockledger.services.queries import Page, check_first, decode_cursor, encode_cursor
from stockledger.services.rows import utcnow

CACHE_SECONDS = 5.0  # the bound on how late a revocation takes effect (section 13)
LAST_USED_EVERY = timedelta(minutes=1)
# The operations their idempotency rows name (like "restock"; a key used for one is reused
# for any other).
CREATE_OPERATION = "createApiKey"
REVOKE_OPERATION = "revokeApiKey"
_CURSOR_KIND = "k"  # apiKeys cursors (services/queries.py uses b, l and r)
_MAX_ID = 2**63 - 1
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Created:
    """What ``createApiKey`` answers: the ``key``, its ``secret`` (None on a replay: it is
    shown once and never stored) and whether the idempotency key was ``replayed``."""

    key: ApiKey
    secret: str | None
    replayed: bool


@dataclass(frozen=True, slots=True)
class Revoked:
    """What ``revokeApiKey`` answers: the ``key`` as it is now and whether the idempotency
    key was ``replayed``."""

    key: ApiKey
    replayed: bool


def new_secret() -> str:
    """A fresh secret: ``sl_`` and 40 base62 characters from the OS's CSPRNG."""
    return SECRET_PREFIX + "".join(secrets.choice(BASE62) for _ in range(SECRET_LENGTH))


def _row_to_key(row: Any) -> ApiKey:
    return ApiKey(
        id=int(row.id),
        org=row.org_id,
        name=row.name,
        prefix=row.prefix,
        scopes=frozenset(Scope[s] for s in row.scopes.split()),
        created_at=_utc(row.created_at),
        expires_at=_utc(row.expires_at),
        revoked_at=_utc(row.revoked_at),
        last_used_at=_utc(row.last_used_at),
    )


def check_org(org: str) -> str:
    """An org name: a string per ``check_string``, at most 64 characters (the column's).
    Returned unchanged; raises ValidationError (field ``org``)."""
    check_string(org, "org")
    if len(org) > ORG_LENGTH:
        raise ValidationError(f"must be at most {ORG_LENGTH} characters", "org")
    return org


def _checked_new(org: str, name: str, scopes: Iterable[Scope]) -> frozenset[Scope]:
    """The granted scopes of a new key, after checking its ``name`` and ``org`` (1 to 255
    and 64 characters) and that it has a scope. Raises ValidationError."""
    check_string(name, "name")
    check_org(org)
    granted = frozenset(scopes)
    if not granted:
        raise ValidationError("give a role or at least one scope", "scopes")
    return granted


def _check_expiry(expires_at: datetime | None, now: datetime) -> None:
    if expires_at is not None and expires_at <= now:
        raise ValidationError("must be in the future", "expiresAt")


def _parse_id(text: str) -> int | None:
    """The numeric id behind an ``ID`` string, or None when it can name no key."""
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    return None


def _utc(value: datetime | None) -> Any:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)  # the columns hold UTC without a zone


class ApiKeys:
    """The key store over ``db``. ``clock`` returns the current UTC time; ``monotonic``
    (seconds) times the lookup cache, which keeps an answer at most ``cache_seconds``.
    Raises ValidationError for a bad name, no scopes or an expiry in the past, NotFoundError
    for an unknown key id (or one of another org)."""

    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        self.db = db
        self.clock = clock
        self.monotonic = monotonic
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}

    async def create(
        self,
        org: str,
        name: str,
        scopes: Iterable[Scope],
        *,
        expires_at: datetime | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key for ``org`` with ``scopes`` (a role's preset, or chosen ones): the key
        and its secret, which is never shown again. Not idempotent (the CLI's); GraphQL's
        is :meth:`create_once`."""
        granted = _checked_new(org, name, scopes)
        now = self.clock()
        _check_expiry(expires_at, now)
        async with self.db.engine.begin() as conn:
            return await self._insert(conn, org, name, granted, expires_at, now)

    async def create_once(
        self,
        caller_org: str,
        key: str,
        *,
        org: str,
        name: str,
        role: Role | None = None,
        scopes: Iterable[Scope] | None = None,
        expires_at: datetime | None = None,
    ) -> Created:
        """``createApiKey``: a new key of ``org`` named ``name`` with exactly one of ``role``
        and ``scopes``, expiring at ``expires_at`` (aware, UTC; None: never), once per
        idempotency ``key`` of ``caller_org`` (idempotency keys are per org; the caller's,
        not the new key's). Whether the caller may make a key of ``org`` is the resolver's
        check (:func:`~stockledger.domain.access.may_create_key_for`), made before this.

        The same ``key`` with the same request replays: the key as it is now, no secret,
        ``replayed``. Raises ValidationError (field ``idempotencyKey``, ``name``, ``org``,
        ``role``, ``scopes`` or ``expiresAt``: not in the future; checked only when nothing
        is replayed), IdempotencyKeyReusedError (the key was used for another request),
        ServiceUnavailableError (the database is away).
        """
        check_key(key)
        granted = _checked_new(org, name, granted_scopes(role, scopes))
        rhash = request_hash(
            CREATE_OPERATION,
            {
                "org": org,
                "name": name,
                "role": None if role is None else role.value,
                "scopes": None if scopes is None else sorted(s.value for s in granted),
                "expiresAt": None if expires_at is None else expires_at.astimezone(UTC),
            },
        )

        async def attempt() -> Created:
            now = self.clock()
            async with self.db.engine.begin() as conn:
                done = await self._done(conn, caller_org, key, CREATE_OPERATION, rhash)
                if done is not None:
                    return Created(done, None, True)
                _check_expiry(expires_at, now)
                made, secret = await self._insert(conn, org, name, granted, expires_at, now)
                await remember_call(conn, caller_org, key, CREATE_OPERATION, rhash, made.id, now)
            return Created(made, secret, False)

        return await retrying(attempt)

    async def _insert(
        self,
        conn: AsyncConnection,
        org: str,
        name: str,
        granted: frozenset[Scope],
        expires_at: datetime | None,
        now: datetime,
    ) -> tuple[ApiKey, str]:
        secret = new_secret()
        prefix = display_prefix(secret)
        values: dict[str, Any] = {
            "org_id": org,
            "name": name,
            "prefix": prefix,
            "secret_sha256": secret_hash(secret),
            "scopes": " ".join(sorted(s.value for s in granted)),
            "created_at": now,
            "expires_at": expires_at,
        }
        result = await conn.execute(insert(api_key).values(**values))
        inserted = result.inserted_primary_key
        assert inserted is not None
        made = ApiKey(
            id=int(inserted[0]),
            org=org,
            name=name,
            prefix=prefix,
            scopes=granted,
            created_at=now,
            expires_at=expires_at,
        )
        return made, secret

    async def bootstrap_admin(self, org: str, path: Path) -> Path | None:
        """When no key exists at all: create one ADMIN key for ``org`` and write its secret to
        ``path`` (mode 0600, its directory made), so that a fresh install can be reached
        (ARCHITECTURE section 13); the file written, or None when keys exist. A file already
        at ``path`` (another database's key, in a shared data directory) is never
        overwritten: the secret goes to the first free ``<stem>-2<suffix>``, ``-3``, ...
        instead."""
        async with self.db.read() as conn:
            existing = (await conn.execute(select(func.count()).select_from(api_key))).scalar()
        if existing:
            return None
        _, secret = await self.create(org, "bootstrap admin", [Scope.ADMIN])
        path.parent.mkdir(parents=True, exist_ok=True)
        target, n = path, 1
        while True:
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                n += 1
                target = path.with_name(f"{path.stem}-{n}{path.suffix}")
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
        os.chmod(target, 0o600)  # whatever the umask left
        return target

    async def list(self, org: str | None = None) -> Sequence[ApiKey]:
        """Every key (of ``org``, or of all orgs), oldest first, revoked ones included."""
        query = select(api_key).order_by(api_key.c.id)
        if org is not None:
            query = query.where(api_key.c.org_id == org)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [_row_to_key(r) for r in rows]

    async def page(self, org: str, first: int = 50, after: str | None = None) -> Page[ApiKey]:
        """``apiKeys``: the keys of ``org`` by id, oldest first (as ``apikey list`` and the
        ``reservations`` connection), revoked and expired ones included; ``first`` (1..500)
        of them after the opaque keyset cursor ``after``, so a page stays valid while keys
        are added. Raises ValidationError (field ``first`` or ``after``)."""
        first = check_first(first)
        conds = [api_key.c.org_id == org]
        if after is not None:
            last = decode_cursor(after, _CURSOR_KIND)
            if isinstance(last, bool) or not isinstance(last, int) or not 0 <= last <= _MAX_ID:
                raise ValidationError("is not a valid cursor", "after")
            conds.append(api_key.c.id > last)
        query = select(api_key).where(*conds).order_by(api_key.c.id).limit(first + 1)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        edges = [(encode_cursor(_CURSOR_KIND, int(r.id)), _row_to_key(r)) for r in rows[:first]]
        return Page(edges, len(rows) > first, after is not None)

    async def revoke(self, key_id: int, *, org: str | None = None) -> ApiKey:
        """Revoke a key (of ``org`` when given: another org's key is NOT_FOUND). Idempotent:
        revoking a revoked key keeps its first revocation time."""
        async with self.db.engine.begin() as conn:
            revoked = await self._revoke(conn, key_id, org)
        self._forget(key_id)
        return revoked

    async def revoke_once(self, caller_org: str, key: str, key_id: str) -> Revoked:
        """``revokeApiKey``: revoke the key ``key_id`` (the ``ID`` string) of ``caller_org``,
        once per idempotency ``key`` of ``caller_org``. A key of another org, and an id that
        is no number, are NOT_FOUND (the contract: nothing leaks about other orgs). Revoking
        a key already revoked (under another idempotency key) keeps its first revocation
        time and is no replay. The key the request itself authenticated with may be revoked:
        the request completes, the next one is refused.

        Takes effect at once on this instance and within ``cache_seconds`` on the others.
        Raises ValidationError (field ``idempotencyKey`` or ``id``), NotFoundError,
        IdempotencyKeyReusedError, ServiceUnavailableError.
        """
        check_key(key)
        text = check_string(key_id, "id")
        number = _parse_id(text)
        rhash = request_hash(REVOKE_OPERATION, {"id": text if number is None else number})

        async def attempt() -> Revoked:
            now = self.clock()
            async with self.db.engine.begin() as conn:
                done = await self._done(conn, caller_org, key, REVOKE_OPERATION, rhash)
                if done is not None:
                    return Revoked(done, True)
                if number is None:
                    raise NotFoundError("ApiKey", text)
                revoked = await self._revoke(conn, number, caller_org)
                await remember_call(conn, caller_org, key, REVOKE_OPERATION, rhash, number, now)
            return Revoked(revoked, False)

        result = await retrying(attempt)
        self._forget(result.key.id)
        return result

    async def _revoke(self, conn: AsyncConnection, key_id: int, org: str | None) -> ApiKey:
        where = [api_key.c.id == key_id]
        if org is not None:
            where.append(api_key.c.org_id == org)
        await conn.execute(
            update(api_key)
            .where(*where, api_key.c.revoked_at.is_(None))
            .values(revoked_at=self.clock())
        )
        row = (await conn.execute(select(api_key).where(*where))).first()
        if row is None:
            raise NotFoundError("ApiKey", str(key_id))
        return _row_to_key(row)

    async def _done(
        self, conn: AsyncConnection, org: str, key: str, operation: str, rhash: str
    ) -> ApiKey | None:
        """The key a done call with idempotency ``key`` (of ``org``) acted on, as it is now,
        or None when no call used ``key``. Raises IdempotencyKeyReusedError when one did for
        another operation or request."""
        row = await done_call(conn, org, key, operation, rhash)
        if row is None:
            return None
        found = (
            await conn.execute(select(api_key).where(api_key.c.id == int(row.result_ref)))
        ).first()
        if found is None:  # keys are never deleted; a hand-made row could still say so
            raise NotFoundError("ApiKey", row.result_ref)
        return _row_to_key(found)

    def _forget(self, key_id: int) -> None:
        """Drop ``key_id`` from this instance's lookup cache: a revocation here takes effect
        here at once (other instances' caches keep it at most ``cache_seconds``)."""
        for digest, (_, cached) in list(self._cache.items()):
            if cached is not None and cached.id == key_id:
                del self._cache[digest]

    async def authenticate(self, secret: str) -> ApiKey | None:
        """The usable key whose secret this is, or None: malformed, unknown, revoked or
        expired. The answer may be up to ``cache_seconds`` old."""
        if not is_well_formed(secret):
            return None
        digest = secret_hash(secret)
        now_mono = self.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now_mono - cached[0] < self.cache_seconds:
            key = cached[1]
        else:
            key = await self._lookup(digest)
            if len(self._cache) > 10_000:
                self._cache.clear()  # bounded: a flood of random secrets cannot grow it
            self._cache[digest] = (now_mono, key)
        if key is None:
            return None
        now = self.clock()
        if unusable_because(key, now) is not None:
            return None
        if key.last_used_at is None or now - key.last_used_at >= LAST_USED_EVERY:
            key = await self._touch(key, now, digest, now_mono)
        return key

    async def _lookup(self, digest: str) -> ApiKey | None:
        async with self.db.read() as conn:
            row = (
                await conn.execute(select(api_key).where(api_key.c.secret_sha256 == digest))
            ).first()
        # The index found the row; compare in constant time all the same (section 13).
        if row is None or not hmac.compare_digest(row.secret_sha256, digest):
            return None
        return _row_to_key(row)

    async def _touch(self, key: ApiKey, now: datetime, digest: str, now_mono: float) -> ApiKey:
        """Write ``last_used_at`` (a short transaction of its own); the key as it is now."""
        statement = update(api_key).where(api_key.c.id == key.id).values(last_used_at=now)
        async with self.db.engine.begin() as conn:
            await conn.execute(statement)
        touched = dataclasses.replace(key, last_used_at=now)
        fetched = self._cache.get(digest, (now_mono, None))[0]
        self._cache[digest] = (fetched, touched)  # keeps its age: the bound still holds
        return touched
