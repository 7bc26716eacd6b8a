"""The PostgreSQL test server (tests/postgres.py) and the primitives the shared store builds on:
committed rows seen across connections, INSERT ... ON CONFLICT ... RETURNING telling a claim's
winner apart, LISTEN/NOTIFY delivered at commit, sync and async psycopg, and the pools."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from tests.postgres import SESSION_DATABASE, PostgresServer

# Deadlines for what must arrive, generous for a loaded host; never a speed claim.
WAIT_S = 30.0

CLAIMS = """
CREATE TABLE claims (
    key text PRIMARY KEY,
    owner text NOT NULL,
    lease_until timestamptz NOT NULL
)
"""
# A claim: inserted when the key is new, taken over only when the lease ran out. RETURNING
# yields a row only for the statement that inserted or updated, so the winner knows it won.
CLAIM = """
INSERT INTO claims (key, owner, lease_until)
VALUES (%(key)s, %(owner)s, now() + %(lease)s * interval '1 second')
ON CONFLICT (key) DO UPDATE
    SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until
    WHERE claims.lease_until < now()
RETURNING owner
"""


def claim(conn: psycopg.Connection, key: str, owner: str, lease_s: float) -> bool:
    row = conn.execute(CLAIM, {"key": key, "owner": owner, "lease": lease_s}).fetchone()
    return row is not None


def test_the_session_server_listens_on_loopback(postgres: PostgresServer) -> None:
    assert postgres.url.startswith("postgresql://imagegen@127.0.0.1:")
    with psycopg.connect(postgres.url) as conn:
        row = conn.execute(
            "SELECT current_database(), current_setting('fsync'), "
            "current_setting('synchronous_commit'), current_setting('full_page_writes'), "
            "current_setting('listen_addresses')"
        ).fetchone()
    assert row == (SESSION_DATABASE, "off", "off", "off", "127.0.0.1")


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_has_a_database_of_its_own(postgres_url: str, run: int) -> None:
    # Both runs create the same table: in a shared database the second would fail.
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE mine (n int)")
        conn.execute("INSERT INTO mine VALUES (%s)", (run,))
        assert conn.execute("SELECT n FROM mine").fetchall() == [(run,)]
        name = conn.execute("SELECT current_database()").fetchone()
    assert name is not None and name[0] != SESSION_DATABASE


def test_committed_rows_are_seen_by_another_connection(postgres_url: str) -> None:
    with (
        psycopg.connect(postgres_url) as writer,
        psycopg.connect(postgres_url, autocommit=True) as reader,
    ):
        writer.execute(CLAIMS)
        writer.commit()
        writer.execute("INSERT INTO claims VALUES ('k', 'a', now())")
        assert reader.execute("SELECT count(*) FROM claims").fetchone() == (0,)
        writer.commit()
        assert reader.execute("SELECT owner FROM claims").fetchall() == [("a",)]


def test_on_conflict_returning_tells_the_winner_apart(postgres_url: str) -> None:
    with (
        psycopg.connect(postgres_url, autocommit=True) as a,
        psycopg.connect(postgres_url, autocommit=True) as b,
    ):
        a.execute(CLAIMS)
        assert claim(a, "k", "a", lease_s=3600)
        assert not claim(b, "k", "b", lease_s=3600)  # the lease holds: no row comes back
        a.execute("UPDATE claims SET lease_until = now() - interval '1 second'")
        assert claim(b, "k", "b", lease_s=3600)  # ran out: b takes over
        assert a.execute("SELECT owner FROM claims").fetchall() == [("b",)]


def test_notify_is_delivered_to_a_listener_at_commit(postgres_url: str) -> None:
    with (
        psycopg.connect(postgres_url, autocommit=True) as listener,
        psycopg.connect(postgres_url) as held,
        psycopg.connect(postgres_url, autocommit=True) as other,
    ):
        listener.execute("LISTEN done")
        held.execute("SELECT pg_notify('done', 'held')")  # inside an open transaction
        other.execute("NOTIFY done, 'other'")
        # Notifications are queued at commit, in commit order: the held one cannot come
        # first, and arrives once its transaction commits.
        first = list(listener.notifies(timeout=WAIT_S, stop_after=1))
        held.commit()
        second = list(listener.notifies(timeout=WAIT_S, stop_after=1))
    assert [(n.channel, n.payload) for n in first + second] == [
        ("done", "other"),
        ("done", "held"),
    ]


def test_async_connections_see_rows_and_notifications(postgres_url: str) -> None:
    async def run() -> tuple[bool, list[str], list[tuple[str, str]]]:
        listener = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
        writer = await psycopg.AsyncConnection.connect(postgres_url)
        async with listener, writer:
            await listener.execute("LISTEN claims")
            await writer.execute(CLAIMS)
            cursor = await writer.execute(CLAIM, {"key": "k", "owner": "w", "lease": 3600})
            won = await cursor.fetchone() is not None
            await writer.execute("SELECT pg_notify('claims', 'k')")
            await writer.commit()
            got = [n async for n in listener.notifies(timeout=WAIT_S, stop_after=1)]
            cursor = await listener.execute("SELECT owner FROM claims")
            owners = [row[0] for row in await cursor.fetchall()]
        return won, owners, [(n.channel, n.payload) for n in got]

    won, owners, notes = asyncio.run(run())
    assert won
    assert owners == ["w"]
    assert notes == [("claims", "k")]


def test_a_connection_pool_lets_exactly_one_thread_win_a_claim(postgres_url: str) -> None:
    racers = 8
    with ConnectionPool(postgres_url, min_size=2, max_size=racers, open=True) as pool:
        with pool.connection() as conn:
            conn.execute(CLAIMS)
        start = threading.Barrier(racers)

        def race(owner: int) -> bool:
            with pool.connection() as conn:
                start.wait(timeout=WAIT_S)
                return claim(conn, "k", f"owner-{owner}", lease_s=3600)

        with ThreadPoolExecutor(racers) as threads:
            won = list(threads.map(race, range(racers)))
        with pool.connection() as conn:
            rows = conn.execute("SELECT owner FROM claims").fetchall()
    assert won.count(True) == 1
    assert rows == [(f"owner-{won.index(True)}",)]


def test_an_async_pool_serves_concurrent_claims(postgres_url: str) -> None:
    async def run() -> list[bool]:
        async with AsyncConnectionPool(postgres_url, min_size=1, max_size=4, open=False) as pool:
            async with pool.connection() as conn:
                await conn.execute(CLAIMS)

            async def one(owner: int) -> bool:
                async with pool.connection() as conn:
                    cursor = await conn.execute(
                        CLAIM, {"key": "k", "owner": f"owner-{owner}", "lease": 3600}
                    )
                    return await cursor.fetchone() is not None

            return list(await asyncio.gather(*(one(i) for i in range(16))))

    assert asyncio.run(run()).count(True) == 1
