"""API keys: create, list, revoke, and authenticate a secret (ARCHITECTURE section 13).

A secret is drawn here (``secrets``: the operating system's CSPRNG), shown once to its creator
and stored only as its SHA-256 (:mod:`stockledger.domain.access`). Authentication looks the
hash up; lookups are cached in process for at most ``cache_seconds`` (5 s by default), so a
revocation takes effect within that bound on every instance. ``last_used_at`` is written at
most once a minute per key.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update

from stockledger.db.engine import Database
from stockledger.db.models import ORG_LENGTH, api_key
from stockledger.domain.access import (
    BASE62,
    SECRET_LENGTH,
    SECRET_PREFIX,
    ApiKey,
    Scope,
    display_prefix,
    is_well_formed,
    secret_hash,
    unusable_because,
)
from stockledger.domain.errors import NotFoundError, ValidationError
from stockledger.domain.validation import check_string
from stockledger.services.rows import utcnow

CACHE_SECONDS = 5.0  # the bound on how late a revocation takes effect (section 13)
LAST_USED_EVERY = timedelta(minutes=1)


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


def _utc(value: datetime | None) -> Any:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)  # the columns hold UTC without a zone


class ApiKeys:
    """The key store over ``db``. ``clock`` returns the current UTC time; ``monotonic``
    (seconds) times the lookup cache. Raises ValidationError for a bad name, no scopes or an
    expiry in the past, NotFoundError for an unknown key id."""

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
        and its secret, which is never shown again."""
        check_string(name, "name")
        check_string(org, "org")
        if len(org) > ORG_LENGTH:
            raise ValidationError(f"must be at most {ORG_LENGTH} characters", "org")
        granted = frozenset(scopes)
        if not granted:
            raise ValidationError("give a role or at least one scope", "scopes")
        now = self.clock()
        if expires_at is not None and expires_at <= now:
            raise ValidationError("must be in the future", "expiresAt")
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
        async with self.db.engine.begin() as conn:
            result = await conn.execute(insert(api_key).values(**values))
            inserted = result.inserted_primary_key
            assert inserted is not None
            key_id = int(inserted[0])
        key = ApiKey(
            id=key_id,
            org=org,
            name=name,
            prefix=prefix,
            scopes=granted,
            created_at=now,
            expires_at=expires_at,
        )
        return key, secret

    async def bootstrap_admin(self, org: str, path: Path) -> bool:
        """When no key exists at all: create one ADMIN key for ``org`` and write its secret to
        ``path`` (mode 0600, its directory made), so that a fresh install can be reached
        (ARCHITECTURE section 13). True when it made one; False when keys exist."""
        async with self.db.read() as conn:
            existing = (await conn.execute(select(func.count()).select_from(api_key))).scalar()
        if existing:
            return False
        _, secret = await self.create(org, "bootstrap admin", [Scope.ADMIN])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
        os.chmod(path, 0o600)  # also when the file was there before with other bits
        return True

    async def list(self, org: str | None = None) -> Sequence[ApiKey]:
        """Every key (of ``org``, or of all orgs), oldest first, revoked ones included."""
        query = select(api_key).order_by(api_key.c.id)
        if org is not None:
            query = query.where(api_key.c.org_id == org)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [_row_to_key(r) for r in rows]

    async def revoke(self, key_id: int, *, org: str | None = None) -> ApiKey:
        """Revoke a key (of ``org`` when given: another org's key is NOT_FOUND). Idempotent:
        revoking a revoked key keeps its first revocation time."""
        where = [api_key.c.id == key_id]
        if org is not None:
            where.append(api_key.c.org_id == org)
        async with self.db.engine.begin() as conn:
            await conn.execute(
                update(api_key)
                .where(*where, api_key.c.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            )
            row = (await conn.execute(select(api_key).where(*where))).first()
        if row is None:
            raise NotFoundError("ApiKey", str(key_id))
        return _row_to_key(row)

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
