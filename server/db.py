"""The one SQLite database (ledger, cache index, job records): opening it safely for threads
and for several processes (the CLI and a server may share a data directory)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Database:
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
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=30000")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, args).fetchall())

    def executescript(self, sql: str) -> None:
        with self._lock:
            self._conn.executescript(sql)

    def add_column(self, table: str, column: str, declaration: str) -> None:
        """Give an older database a column added since `table` first shipped (idempotent;
        another process sharing the data directory may add it first). Names are the code's
        own, never input."""
        if self._has_column(table, column):
            return
        try:
            self.executescript(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        except sqlite3.OperationalError:
            if not self._has_column(table, column):
                raise

    def _has_column(self, table: str, column: str) -> bool:
        return any(row["name"] == column for row in self.execute(f"PRAGMA table_info({table})"))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
