"""The API key store over real databases (SQLite and MariaDB) and the ``stockledger apikey``
command: a secret shown once and stored as its hash, authentication of good and bad secrets,
revocation within the cache bound, expiry (ARCHITECTURE section 13; issue 10), and the
idempotent create and revoke behind GraphQL's ``createApiKey`` and ``revokeApiKey``."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import Clock
from server_process import CLI, base_env
from sqlalchemy import select

from stockledger.db.engine import Database
from stockledger.db.models import api_key
from stockledger.domain.access import ROLE_SCOPES, Role, Scope, secret_hash
from stockledger.domain.errors import IdempotencyKeyReusedError, NotFoundError, ValidationError
from stockledger.services.api_keys import ApiKeys


class Ticks:
    """A monotonic clock the test moves (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_key_authenticates_by_its_secret_only(db: Database, org_id: str) -> None:
    store = ApiKeys(db)
    key, secret = await store.create(org_id, "storefront", ROLE_SCOPES[Role.STOREFRONT])
    assert secret.startswith("sl_") and len(secret) == 43
    assert key.prefix == secret[:11]
    found = await store.authenticate(secret)
    assert found is not None
    assert (found.id, found.org, found.scopes) == (key.id, org_id, ROLE_SCOPES[Role.STOREFRONT])
    # Wrong, malformed and near-miss secrets are not keys.
    assert await store.authenticate(secret[:-1] + ("a" if secret[-1] != "a" else "b")) is None
    assert await store.authenticate("Bearer " + secret) is None
    assert await store.authenticate("") is None
    # Only the hash is stored.
    async with db.read() as conn:
        rows = (await conn.execute(select(api_key).where(api_key.c.org_id == org_id))).all()
    assert [r.secret_sha256 for r in rows] == [secret_hash(secret)]
    assert all(secret not in str(tuple(r)) for r in rows)


async def test_a_revocation_takes_effect_within_the_cache_bound(db: Database, org_id: str) -> None:
    ticks = Ticks()
    store = ApiKeys(db, monotonic=ticks, cache_seconds=5.0)
    other = ApiKeys(db)  # another instance: revokes through the same database
    key, secret = await store.create(org_id, "pos", [Scope.STOCK_READ])
    assert await store.authenticate(secret) is not None
    revoked = await other.revoke(key.id)
    assert revoked.revoked_at is not None
    ticks.now = 4.9
    assert await store.authenticate(secret) is not None  # cached: at most 5 s old
    ticks.now = 5.0
    assert await store.authenticate(secret) is None
    again = await other.revoke(key.id)  # idempotent: the first revocation time stays
    assert again.revoked_at == revoked.revoked_at


async def test_an_expired_key_stops_working(db: Database, org_id: str) -> None:
    clock = Clock()
    store = ApiKeys(db, clock=clock)
    key, secret = await store.create(
        org_id, "temp", [Scope.STOCK_READ], expires_at=clock() + timedelta(hours=1)
    )
    assert await store.authenticate(secret) is not None
    clock.advance(3600)
    assert await store.authenticate(secret) is None
    with pytest.raises(ValidationError, match="future"):
        await store.create(org_id, "late", [Scope.STOCK_READ], expires_at=clock())


async def test_bad_input_and_unknown_ids(db: Database, org_id: str) -> None:
    store = ApiKeys(db)
    with pytest.raises(ValidationError) as no_scope:
        await store.create(org_id, "none", [])
    assert no_scope.value.field == "scopes"
    with pytest.raises(ValidationError) as blank:
        await store.create(org_id, "   ", [Scope.STOCK_READ])
    assert blank.value.field == "name"
    with pytest.raises(ValidationError) as long_org:
        await store.create("o" * 65, "k", [Scope.STOCK_READ])
    assert long_org.value.field == "org"
    key, _ = await store.create(org_id, "mine", [Scope.STOCK_READ])
    with pytest.raises(NotFoundError):
        await store.revoke(key.id, org="another-org")  # another org's key is not found
    with pytest.raises(NotFoundError):
        await store.revoke(10**12)
    assert [k.name for k in await store.list(org_id)] == ["mine"]


async def test_last_used_is_written_at_most_once_a_minute(db: Database, org_id: str) -> None:
    clock = Clock()
    ticks = Ticks()
    store = ApiKeys(db, clock=clock, monotonic=ticks, cache_seconds=0.0)
    key, secret = await store.create(org_id, "pos", [Scope.STOCK_READ])
    first = await store.authenticate(secret)
    assert first is not None and first.last_used_at is not None
    clock.advance(30)
    ticks.now += 1
    assert (await store.authenticate(secret)).last_used_at == first.last_used_at  # type: ignore[union-attr]
    clock.advance(31)
    ticks.now += 1
    later = await store.authenticate(secret)
    assert later is not None and later.last_used_at is not None
    assert later.last_used_at > first.last_used_at


async def test_idempotency_keys_of_key_writes_are_per_org(db: Database, org_id: str) -> None:
    store = ApiKeys(db)
    other = f"{org_id}-b"
    mine = await store.create_once(org_id, "k1", org=org_id, name="n", role=Role.AUDITOR)
    theirs = await store.create_once(other, "k1", org=other, name="n", role=Role.AUDITOR)
    assert not mine.replayed and not theirs.replayed and mine.key.id != theirs.key.id
    again = await store.create_once(org_id, "k1", org=org_id, name="n", role=Role.AUDITOR)
    assert (again.key.id, again.secret, again.replayed) == (mine.key.id, None, True)
    # The same role given as its scopes is another request.
    with pytest.raises(IdempotencyKeyReusedError):
        await store.create_once(
            org_id, "k1", org=org_id, name="n", scopes=ROLE_SCOPES[Role.AUDITOR]
        )
    # A key used for a revoke is reused for a create, and the other way round.
    await store.revoke_once(org_id, "k2", str(mine.key.id))
    with pytest.raises(IdempotencyKeyReusedError):
        await store.create_once(org_id, "k2", org=org_id, name="n", role=Role.AUDITOR)
    with pytest.raises(IdempotencyKeyReusedError):
        await store.revoke_once(org_id, "k1", str(mine.key.id))


async def test_concurrent_creates_with_one_idempotency_key_make_one_key(
    db: Database, org_id: str
) -> None:
    stores = [ApiKeys(db) for _ in range(4)]  # as many instances, racing
    results = await asyncio.gather(
        *(
            s.create_once(org_id, "same", org=org_id, name="race", role=Role.OPERATOR)
            for s in stores
        )
    )
    assert len({r.key.id for r in results}) == 1
    assert sorted(r.replayed for r in results) == [False, True, True, True]
    assert [r.secret is None for r in results].count(False) == 1
    assert [k.name for k in await stores[0].list(org_id)] == ["race"]


async def test_a_revocation_takes_effect_at_once_on_the_instance_that_made_it(
    db: Database, org_id: str
) -> None:
    ticks = Ticks()  # never moves: only the revocation can end the cached answer
    store = ApiKeys(db, monotonic=ticks)
    created = await store.create_once(org_id, "c", org=org_id, name="pos", role=Role.STOREFRONT)
    assert created.secret is not None
    assert await store.authenticate(created.secret) is not None  # now cached
    revoked = await store.revoke_once(org_id, "r", str(created.key.id))
    assert revoked.key.revoked_at is not None and not revoked.replayed
    assert await store.authenticate(created.secret) is None
    replay = await store.revoke_once(org_id, "r", str(created.key.id))
    assert replay.replayed and replay.key.revoked_at == revoked.key.revoked_at
    # Another org's id, and an id that is no number, are not found; nothing is consumed.
    with pytest.raises(NotFoundError):
        await store.revoke_once(f"{org_id}-b", "x", str(created.key.id))
    with pytest.raises(NotFoundError):
        await store.revoke_once(org_id, "x", "abc")


async def test_a_page_of_keys_is_by_id_within_the_org(db: Database, org_id: str) -> None:
    store = ApiKeys(db)
    made = [(await store.create(org_id, f"k{i}", [Scope.STOCK_READ]))[0].id for i in range(3)]
    await store.create(f"{org_id}-b", "theirs", [Scope.STOCK_READ])
    first = await store.page(org_id, 2)
    assert [k.id for _, k in first.edges] == made[:2] and first.has_next_page
    rest = await store.page(org_id, 2, first.end_cursor)
    assert [k.id for _, k in rest.edges] == made[2:] and not rest.has_next_page
    for bad in ("garbage", "eyJrIjoiayIsInYiOi0xfQ"):  # not base64 JSON; {"k":"k","v":-1}
        with pytest.raises(ValidationError) as refused:
            await store.page(org_id, 2, bad)
        assert refused.value.field == "after"


def test_the_apikey_command_creates_lists_and_revokes(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    org = f"org-{uuid.uuid4().hex[:6]}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "apikey", *args], env=env, capture_output=True, text=True, timeout=60
        )

    created = run("create", "--org", org, "--name", "till 3", "--role", "OPERATOR")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("sl_") and len(secret) == 43  # stdout: the secret alone
    assert "shown only now" in created.stderr
    listed = run("list", "--org", org)
    assert listed.returncode == 0
    [row] = listed.stdout.splitlines()
    assert row.split("\t")[:6] == [
        row.split("\t")[0],
        org,
        "till 3",
        f"{secret[:11]}...",
        "LEDGER_READ RESERVATIONS_WRITE STOCK_READ STOCK_WRITE",
        "active",
    ]
    assert secret not in listed.stdout
    key_id = row.split("\t")[0]
    assert run("revoke", key_id).returncode == 0
    assert "\trevoked\t" in run("list", "--org", org).stdout
    assert run("revoke", "987654321").returncode != 0
    both = run("create", "--org", org, "--name", "x", "--role", "ADMIN", "--scope", "ADMIN")
    assert both.returncode != 0 and "exactly one" in both.stderr
    expiring = run(
        "create",
        "--org",
        org,
        "--name",
        "y",
        "--scope",
        "STOCK_READ",
        "--expires",
        (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%d"),
    )
    assert expiring.returncode == 0, expiring.stderr
    assert "expires " in run("list", "--org", org).stdout


def test_a_fresh_install_gets_one_admin_key_in_its_data_dir(tmp_path: Path) -> None:
    """``serve`` on an empty key table writes one ADMIN key to ``<data dir>/admin.key``
    (mode 0600) and says where, never the secret; the key opens /graphql with auth required;
    a restart makes no other key."""
    import stat

    import httpx
    from server_process import running

    env = base_env(tmp_path, auth="required", log_level="WARNING")
    path = tmp_path / "data" / "admin.key"
    with running(tmp_path, env) as server:
        server.wait_ready()
        secret = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert f"created the first API key (ADMIN of org default): {path}" in server.stdout
        assert secret not in server.stdout + server.stderr
        query = {"query": '{ balance(sku: "A") { onHand } }'}
        url = f"{server.url}/graphql"
        assert httpx.post(url, json=query, timeout=10).status_code == 401
        answer = httpx.post(
            url, json=query, headers={"authorization": f"Bearer {secret}"}, timeout=10
        )
        assert answer.json() == {"data": {"balance": None}}
    with running(tmp_path, env) as again:
        again.wait_ready()
        assert "created the first API key" not in again.stdout
    assert path.read_text().strip() == secret
    listed = subprocess.run(
        [*CLI, "apikey", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    assert len(listed.stdout.splitlines()) == 1


def test_the_first_key_never_overwrites_a_key_file_already_there(tmp_path: Path) -> None:
    """A data directory shared by two databases (the embedded one, then `migrate` of a MySQL
    one): the second database's first key goes beside the first's, which stays readable."""
    env = base_env(tmp_path, log_level="WARNING")
    data = tmp_path / "data"
    data.mkdir()
    (data / "admin.key").write_text("sl_the_other_database_s_key\n")
    done = subprocess.run(
        [*CLI, "migrate"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (data / "admin.key").read_text() == "sl_the_other_database_s_key\n"
    written = data / "admin-2.key"
    assert f"created the first API key (ADMIN of org default): {written}" in done.stdout
    listed = subprocess.run(
        [*CLI, "apikey", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    assert written.read_text().strip()[:11] in listed.stdout  # its display prefix
