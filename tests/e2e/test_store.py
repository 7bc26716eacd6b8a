"""The store layer on both of its implementations: SQLite + files (the single-box default) and
a real PostgreSQL (started by the tests) + a real S3-speaking server (moto on loopback). The
same tests run on each: migrations, the ledger's queries, the cache on its blob store,
cross-process locks and claims with their fencing tokens."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cache import ResultCache, object_key
from server.ledger import Ledger, LedgerRow
from server.store import schema
from server.store.blobs import BlobStore, FileBlobs, S3Blobs
from server.store.claims import Claims, FencedError
from server.store.sql import Database, open_database
from tests.s3 import BUCKET, CREDENTIALS

_prefixes = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """The `store.url` of each implementation (None: SQLite in `tmp_path`)."""
    if request.param == "sqlite":
        yield None
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture
def db(engine: str | None, tmp_path: Path) -> Iterator[Database]:
    opened = open_database(engine, path=tmp_path / "imagegen.sqlite3")
    yield opened
    opened.close()


@pytest.fixture
def blobs(engine: str | None, tmp_path: Path, request: pytest.FixtureRequest) -> BlobStore:
    """Files beside SQLite; S3 (a prefix of its own) beside PostgreSQL."""
    if engine is None:
        return FileBlobs(tmp_path / "cache")
    endpoint: str = request.getfixturevalue("s3_endpoint")
    prefix = f"store/t{next(_prefixes)}"
    return S3Blobs(BUCKET, prefix, endpoint_url=endpoint, **CREDENTIALS)


def _row(request_id: str, **fields: object) -> LedgerRow:
    defaults: dict[str, object] = {
        "model": "tiny-sdxl",
        "provider": "local",
        "cached": False,
        "seeds": [1],
        "cost_usd": 0.25,
        "gpu_seconds": 2.0,
    }
    return LedgerRow(request_id=request_id, **{**defaults, **fields})  # type: ignore[arg-type]


# -- migrations ------------------------------------------------------------------------------


def test_a_new_database_has_every_migration_and_a_second_run_does_nothing(
    db: Database,
) -> None:
    assert schema.applied(db) == [m.version for m in schema.MIGRATIONS]
    assert schema.migrate(db) == []


def test_replicas_starting_at_once_migrate_once(engine: str | None, tmp_path: Path) -> None:
    """Six openings of one new database at the same moment (threads here, each with its own
    connection, as replicas would): none fails and each version is recorded once."""
    barrier = threading.Barrier(6)
    failures: list[BaseException] = []
    opened: list[Database] = []

    def start() -> None:
        barrier.wait()
        try:
            opened.append(open_database(engine, path=tmp_path / "shared.sqlite3"))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert not failures, failures
        rows = opened[0].execute("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [m.version for m in schema.MIGRATIONS]
    finally:
        for each in opened:
            each.close()


def test_a_data_directory_from_before_migrations_is_upgraded_in_place(tmp_path: Path) -> None:
    """A ledger as it shipped (no caller, no claim) keeps its rows and gains the columns."""
    path = tmp_path / "imagegen.sqlite3"
    with sqlite3.connect(path) as old:
        old.executescript(
            "CREATE TABLE ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, "
            "request_id TEXT NOT NULL, model TEXT NOT NULL, provider TEXT NOT NULL, "
            "cached INTEGER NOT NULL, images INTEGER NOT NULL, seeds TEXT NOT NULL, "
            "cost_usd REAL NOT NULL, gpu_seconds REAL NOT NULL, saved_usd REAL NOT NULL, "
            "status TEXT NOT NULL, error TEXT, tag TEXT);"
            "INSERT INTO ledger (ts, request_id, model, provider, cached, images, seeds, "
            "cost_usd, gpu_seconds, saved_usd, status) "
            "VALUES (1, 'img_old', 'tiny-sdxl', 'local', 0, 1, '[1]', 0.5, 1.0, 0, 'ok');"
        )
    db = open_database(None, path=path)
    try:
        ledger = Ledger(db)
        assert ledger.stats()["requests"] == 1 and ledger.stats()["cost_usd"] == 0.5
        ledger.record(_row("img_new", caller="key:ci", claim="k#1"))
        assert ledger.usage_since(0, "key:ci") == (1, 0.25)
    finally:
        db.close()


# -- the ledger --------------------------------------------------------------------------------


def test_ledger_queries_agree_on_both_engines(db: Database) -> None:
    ledger = Ledger(db)
    ledger.record(_row("a", caller="key:x"))
    ledger.record(_row("b", cached=True, cost_usd=0.0, gpu_seconds=0.0, saved_usd=0.25))
    ledger.record(_row("c", status="failed", error="quality check", caller="key:x"))
    stats = ledger.stats()
    assert (stats["requests"], stats["cached"], stats["failed"]) == (3, 1, 1)
    assert stats["cost_usd"] == 0.5 and stats["saved_usd"] == 0.25
    assert ledger.usage_since(0, "key:x") == (2, 0.5)
    assert ledger.seconds_per_image("tiny-sdxl") == 2.0
    assert ledger.usd_per_image("tiny-sdxl") == 0.25
    assert [r["request_id"] for r in ledger.rows()] == ["c", "b", "a"]


def test_one_claim_can_be_billed_once(db: Database) -> None:
    """The unique claim id: a second row for one claim is refused by the database itself,
    and the first stays the only one."""
    ledger = Ledger(db)
    ledger.record(_row("first", claim="abc#1"))
    with pytest.raises(Exception, match=r"(?i)unique"):
        ledger.record(_row("second", claim="abc#1"))
    ledger.record(_row("next-claim", claim="abc#2"))
    ledger.record(_row("hit", cached=True, cost_usd=0.0))  # no claim: never collides
    ledger.record(_row("hit-2", cached=True, cost_usd=0.0))
    assert [r["request_id"] for r in ledger.rows()] == ["hit-2", "hit", "next-claim", "first"]


# -- the cache on its blob store ---------------------------------------------------------------


def test_cache_roundtrip_verify_and_evict(db: Database, blobs: BlobStore) -> None:
    cache = ResultCache(blobs, db, max_bytes=1000, memory_bytes=0)
    [sha] = cache.put("a", [(b"a" * 400, 1, 8, 8, "png")], {"cost_usd": 0.1})
    assert blobs.get(object_key(sha)) == b"a" * 400
    entry = cache.get("a")
    assert entry is not None and entry.images[0].data == b"a" * 400
    assert cache.read_object(sha) == (b"a" * 400, "png")
    cache.put("b", [(b"b" * 400, 2, 8, 8, "png")], {})
    assert cache.get("a") is not None  # a is now more recent than b
    cache.put("c", [(b"c" * 400, 3, 8, 8, "png")], {})
    assert cache.get("b") is None and cache.total_bytes() <= 1000
    assert not blobs.exists(object_key(hashlib.sha256(b"b" * 400).hexdigest()))
    # A damaged object is never served: the entry goes, the next request regenerates.
    blobs.put(object_key(sha), b"x" * 400)
    assert cache.get("a") is None


def test_a_cache_hit_from_memory_skips_the_blob_store(db: Database, blobs: BlobStore) -> None:
    cache = ResultCache(blobs, db, max_bytes=10**6)
    [sha] = cache.put("k", [(b"png bytes", 1, 8, 8, "png")], {})
    blobs.delete(object_key(sha))  # gone from the store: only the memory copy has it
    entry = cache.get("k")
    assert entry is not None and entry.images[0].data == b"png bytes"
    fresh = ResultCache(blobs, db, max_bytes=10**6)  # another process: no memory copy
    assert fresh.get("k") is None


def test_the_sweep_removes_only_old_unreferenced_objects(db: Database, blobs: BlobStore) -> None:
    cache = ResultCache(blobs, db, max_bytes=10**6)
    cache.put("kept", [(b"kept", 1, 8, 8, "png")], {})
    orphan = object_key(hashlib.sha256(b"orphan").hexdigest())
    blobs.put(orphan, b"orphan")  # a publish killed between the object and its row
    assert cache.sweep() == 0  # too recent: it may be a live publish's
    assert cache.sweep(grace_s=-1) == 1
    assert not blobs.exists(orphan)
    assert cache.get("kept") is not None


# -- locks and claims ------------------------------------------------------------------------


def test_exclusive_is_held_by_one_at_a_time(engine: str | None, tmp_path: Path) -> None:
    first = open_database(engine, path=tmp_path / "l.sqlite3")
    second = open_database(engine, path=tmp_path / "l.sqlite3")
    try:
        with first.exclusive("evict") as mine:
            assert mine
            with second.exclusive("evict") as theirs:
                assert not theirs
            with second.exclusive("other") as other:
                assert other
        with second.exclusive("evict") as now_theirs:
            assert now_theirs
    finally:
        first.close()
        second.close()


def test_claims_take_fence_and_release(db: Database) -> None:
    a = Claims(db, owner="a", lease_s=30)
    b = Claims(db, owner="b", lease_s=30)
    claim = a.take("key")
    assert claim is not None and claim.token == 1
    assert b.take("key") is None  # held
    assert a.heartbeat(claim)
    with db.transaction() as tx:
        a.fence(tx, claim)  # still the holder
        a.release(claim, tx)
    again = b.take("key")
    assert again is not None and again.token == 2  # tokens only grow
    with pytest.raises(FencedError), db.transaction() as tx:
        a.fence(tx, claim)  # the old holder may not publish
    assert not a.heartbeat(claim)


def test_an_expired_lease_is_taken_over_and_the_old_owner_is_fenced(db: Database) -> None:
    slow = Claims(db, owner="slow", lease_s=-1)  # its lease has run out at once
    other = Claims(db, owner="other", lease_s=30)
    stale = slow.take("key")
    assert stale is not None
    taken = other.take("key")
    assert taken is not None and taken.token == stale.token + 1
    with pytest.raises(FencedError), db.transaction() as tx:
        slow.fence(tx, stale)
    slow.release(stale)  # a no-op: it is not the holder
    assert other.take("key") is None


def test_a_waiter_learns_of_the_release_and_its_failure(db: Database) -> None:
    owner = Claims(db, owner="owner")
    waiter = Claims(db, owner="waiter")
    claim = owner.take("key")
    assert claim is not None

    async def wait_and_release() -> object:
        waiting = asyncio.create_task(waiter.wait("key"))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # still held
        await asyncio.to_thread(owner.release, claim, failure={"kind": "invalid"})
        return await asyncio.wait_for(waiting, 10)

    released = asyncio.run(wait_and_release())
    assert getattr(released, "failure", None) == {"kind": "invalid"}


# -- configuration -----------------------------------------------------------------------------


def test_imagegen_migrate_reports_and_is_idempotent(
    engine: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    monkeypatch.setenv("IMAGEGEN_DATA_DIR", str(tmp_path / "data"))
    if engine is not None:
        monkeypatch.setenv("IMAGEGEN_STORE__URL", engine)
    first = CliRunner().invoke(app, ["migrate"])
    assert first.exit_code == 0, first.output
    assert f"schema version {schema.LATEST} (applied 1, 2)" in first.output
    again = CliRunner().invoke(app, ["migrate"])
    assert "(nothing to apply)" in again.output
    assert "secret" not in first.output + again.output


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://u:secret@127.0.0.1/db", "store.url must be a postgresql://"),
        (
            "postgresql://u:secret@127.0.0.1:1/db",
            "cannot connect to postgresql://u@127.0.0.1:1/db:",
        ),
    ],
)
def test_a_bad_store_url_is_one_clear_line_without_the_password(
    url: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    monkeypatch.setenv("IMAGEGEN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMAGEGEN_STORE__URL", url)
    result = CliRunner().invoke(app, ["migrate"])
    assert result.exit_code == 2
    assert says in result.output
    assert "secret" not in result.output


# -- single flight across processes (server.flight.SharedFlight) -------------------------------


def test_a_shared_failure_reaches_the_waiter_without_a_second_run(db: Database) -> None:
    """The owner fails with the request's own error (a failed quality check): a waiter in
    another process gets that error, and never runs the work itself."""
    from server import errors
    from server.flight import SharedFlight

    owner = SharedFlight(Claims(db, owner="owner"))
    waiter = SharedFlight(Claims(db, owner="waiter"))
    runs: list[str] = []

    async def scenario() -> tuple[BaseException | None, BaseException | None]:
        started = asyncio.Event()

        async def failing(_: object) -> str:
            runs.append("owner")
            started.set()
            await asyncio.sleep(0.3)
            raise errors.GenerationFailedError("the generated image failed the quality check")

        async def should_not_run(_: object) -> str:
            runs.append("waiter")
            return "ran"

        async def nothing() -> str | None:
            return None

        first = asyncio.create_task(owner.run("key", failing, nothing))
        await started.wait()
        second = asyncio.create_task(waiter.run("key", should_not_run, nothing))
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        return tuple(o if isinstance(o, BaseException) else None for o in outcomes)  # type: ignore[return-value]

    first, second = asyncio.run(scenario())
    assert isinstance(first, errors.GenerationFailedError)
    assert isinstance(second, errors.GenerationFailedError)
    assert "quality check" in second.message
    assert runs == ["owner"]


def test_a_fenced_owner_does_not_publish_and_is_answered_by_the_new_one(db: Database) -> None:
    """The owner stalls past its lease; another process takes the key over and publishes.
    The stalled owner's publish is refused (FencedError in its transaction) and it returns
    the new owner's result instead: one publish in all."""
    from server.flight import SharedFlight

    stalled_claims = Claims(db, owner="stalled", lease_s=-1)  # expired from the start
    stalled = SharedFlight(stalled_claims)
    taker = SharedFlight(Claims(db, owner="taker", lease_s=30))
    published: list[str] = []

    async def scenario() -> tuple[str, str]:
        taken_over = asyncio.Event()

        def publish(claims: Claims, claim: object, who: str) -> str:
            with db.transaction() as tx:
                claims.fence(tx, claim)  # type: ignore[arg-type]
                published.append(who)
                claims.release(claim, tx)  # type: ignore[arg-type]
            return who

        async def slow_lead(claim: object) -> str:
            await taken_over.wait()
            return await asyncio.to_thread(publish, stalled_claims, claim, "stalled")

        async def quick_lead(claim: object) -> str:
            result = await asyncio.to_thread(publish, taker.claims, claim, "taker")
            taken_over.set()
            return result

        async def cached() -> str | None:
            return published[0] if published else None

        first = asyncio.create_task(stalled.run("key", slow_lead, cached))
        await asyncio.sleep(0.1)  # the stalled owner holds its (expired) claim
        second = asyncio.create_task(taker.run("key", quick_lead, cached))
        return await asyncio.wait_for(asyncio.gather(first, second), 30)

    assert list(asyncio.run(scenario())) == ["taker", "taker"]
    assert published == ["taker"]
