"""The database every store table lives in, behind one small interface with two engines:
SQLite in the data directory (the single-box default) and PostgreSQL (`store.url`, shared by
every replica).

The tables' SQL is written once, in the subset both engines speak (`?` placeholders, `ON
CONFLICT ... DO UPDATE`, `RETURNING`, partial unique indexes), so the cache index, ledger,
jobs and claims are one implementation each rather than two copies of every query to keep
in step; what differs (placeholders, column types, transactions, locks across processes,
notifications) is the engine's, here and in server/store/postgres.py."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

Row = Mapping[str, Any]
Dialect = Literal["sqlite", "postgresql"]


@dataclass(frozen=True)
class Result:
    """A statement's rows (those of a SELECT or a RETURNING clause) and how many rows it
    changed."""

    rows: list[Row]
    rowcount: int

    def fetchone(self) -> Row | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Row]:
        return self.rows


class Tx(Protocol):
    """One open transaction: statements in it commit together or not at all."""

    dialect: Dialect

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def notify(self, channel: str, payload: str) -> None:
        """Tell `Database.subscribe` listeners in every process, once this commits."""


class Database(Protocol):
    dialect: Dialect
    # Whether a query runs in this process (no network round trip): cheap enough to make on
    # an event loop. A server's queries are made in threads.
    in_process: bool

    def execute(self, sql: str, args: Sequence[Any] = (), *, durable: bool = True) -> list[Row]:
        """One statement in a transaction of its own; its rows. `durable=False`: as for
        `transaction`, and one round trip where a transaction would take four."""

    def transaction(self, *, durable: bool = True) -> Any:
        """A context manager yielding a `Tx`; commits on exit, rolls back on an exception.
        `durable=False` may return before the commit is on disk (PostgreSQL: asynchronous
        commit): a database crash may lose the last fraction of a second of such writes,
        never corrupt them. For writes worth no money (a cache hit's row, an access time)."""

    def exclusive(self, name: str) -> Any:
        """A context manager yielding whether this process now holds the lock `name` across
        every process using the database (never blocks: False means another holds it)."""

    def subscribe(self, channel: str, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call `listener(payload)` for each `Tx.notify` on `channel` from any process (a
        best effort: callers also poll); returns the unsubscribe function."""

    def close(self) -> None: ...


class SqliteTx:
    dialect: Dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        cursor = self._conn.execute(sql, args)
        rows: list[Row] = list(cursor.fetchall())
        return Result(rows, cursor.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def notify(self, channel: str, payload: str) -> None:
        # Nothing to send: SQLite's other processes are on this host and poll (see subscribe).
        pass


class SqliteDatabase:
    """The data directory's SQLite file, safe for threads and for several processes (the CLI
    and a server may share a data directory)."""

    dialect: Dialect = "sqlite"
    in_process = True

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One connection guarded by a lock: the service's writes are small and serialised,
        # and SQLite's own locking (WAL, busy timeout) handles other processes.
        self._conn = sqlite3.connect(
            path, check_same_thread=False, timeout=30.0, isolation_level=None
        )
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._locks_dir = path.parent / "locks"
        with self._lock:
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._wal()
            self._conn.execute("PRAGMA synchronous=NORMAL")

    def _wal(self) -> None:
        """Switch the file to WAL (it stays so). On a new file that several processes open at
        once the switch can fail with "database is locked" without SQLite's busy handler ever
        waiting (found by test_replicas_starting_at_once_migrate_once): retried briefly."""
        deadline = time.monotonic() + 30.0
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def __repr__(self) -> str:
        return f"SqliteDatabase({str(self.path)!r})"

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[SqliteTx]:
        # `durable` changes nothing: in WAL mode with synchronous=NORMAL no commit waits for
        # the disk (a power cut may lose the last ones; a crash of the process loses none).
        with self._lock:
            # IMMEDIATE takes the write lock up front: two processes' read-then-write
            # transactions serialise instead of one failing to upgrade its lock.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteTx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def execute(self, sql: str, args: Sequence[Any] = (), *, durable: bool = True) -> list[Row]:
        with self._lock:
            return list(self._conn.execute(sql, args).fetchall())

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        # An flock on a file beside the database: every process sharing the database is on
        # this host, and the kernel drops the lock with a process that dies holding it.
        self._locks_dir.mkdir(exist_ok=True)
        fd = os.open(self._locks_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def subscribe(self, channel: str, listener: Callable[[str], None]) -> Callable[[], None]:
        # SQLite has no notifications: waiters poll, which on one host costs little.
        return lambda: None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_database(url: str | None, *, path: Path | None = None, migrate: bool = True) -> Database:
    """The database `store.url` names: unset for SQLite at `path`, `postgresql://...` for a
    shared PostgreSQL (psycopg is imported only then). Migrations run before it is returned
    (unless `migrate` is false: `imagegen migrate` runs them itself, to report them)."""
    from server.store import schema

    db: Database
    if not url:
        if path is None:
            raise ValueError("an SQLite store needs the path of its file")
        db = SqliteDatabase(path)
    else:
        from server.store.postgres import PostgresDatabase

        db = PostgresDatabase(url)
    try:
        if migrate:
            schema.migrate(db)
    except BaseException:
        db.close()
        raise
    return db
