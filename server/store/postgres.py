"""The PostgreSQL engine (`store.url = "postgresql://..."`): the database every replica shares.
psycopg 3 with a connection pool; imported only when configured (`imagegen[cluster]`)."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from server.store.sql import Dialect, Result, Row

log = logging.getLogger(__name__)

# Threads that talk to the database at once: the event loop's light lookups, the service's
# worker threads and the claim heartbeats. Past it a caller waits for a connection.
POOL_MAX = 16
QUICK_POOL_MAX = 8
CONNECT_TIMEOUT_S = 10.0
INSTALL_HINT = "pip install 'imagegen[cluster]' (psycopg and psycopg-pool)"


def translate(sql: str) -> str:
    """The common SQL as psycopg wants it: `%s` placeholders (so a literal `%` doubles)."""
    return sql.replace("%", "%%").replace("?", "%s")


def lock_id(name: str) -> int:
    """A stable signed 64-bit advisory-lock id for `name` (the same in every process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def shown(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"postgresql://{parts.username + '@' if parts.username else ''}{host}{port}{parts.path}"


class PostgresTx:
    dialect: Dialect = "postgresql"

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Result:
        cursor = self._conn.execute(translate(sql), tuple(args))
        rows: list[Row] = list(cursor.fetchall()) if cursor.description else []
        return Result(rows, cursor.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(translate(sql), [tuple(r) for r in rows])

    def notify(self, channel: str, payload: str) -> None:
        self._conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


class PostgresDatabase:
    dialect: Dialect = "postgresql"
    in_process = False

    def __init__(self, url: str) -> None:
        if not re.match(r"postgres(ql)?://", url):
            raise ValueError(
                f"store.url must be a postgresql://USER:PASSWORD@HOST:PORT/DATABASE address "
                f"(or unset for SQLite in the data directory); got {url.split(':', 1)[0]}://..."
            )
        try:
            import psycopg
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise ValueError(
                f"store.url names PostgreSQL, but psycopg is missing: {INSTALL_HINT}"
            ) from None
        self._url = url
        self._psycopg = psycopg
        # One plain connection first: a wrong address or password fails now, with the
        # server's own reason, rather than as the pool's timeout after retries.
        try:
            psycopg.connect(url, connect_timeout=int(CONNECT_TIMEOUT_S)).close()
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"cannot connect to {shown(url)}: {reason}; check store.url and that the "
                "server is running and reachable"
            ) from None
        # Any: the pool is typed for tuple rows; its connections make dict rows (kwargs).
        self.pool: Any = ConnectionPool(
            url,
            min_size=1,
            max_size=POOL_MAX,
            kwargs={"autocommit": True, "row_factory": dict_row},
            open=False,
            name="imagegen",
        )
        # Connections whose commits do not wait for the WAL flush, for single statements worth
        # no money (a cache hit's row, an access time): one round trip, no disk sync.
        self.quick_pool: Any = ConnectionPool(
            url,
            min_size=1,
            max_size=QUICK_POOL_MAX,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "options": "-c synchronous_commit=off",
            },
            open=False,
            name="imagegen-quick",
        )
        try:
            self.pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
            self.quick_pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except Exception as exc:
            self.pool.close()
            self.quick_pool.close()
            raise ValueError(
                f"cannot connect to {shown(url)} ({type(exc).__name__}); check store.url and "
                "that the server is running and reachable"
            ) from None
        self._listeners: dict[str, list[Callable[[str], None]]] = {}
        self._listen_lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"PostgresDatabase({shown(self._url)!r})"

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[PostgresTx]:
        with self.pool.connection() as conn, conn.transaction():
            if not durable:
                # This transaction only: its commit does not wait for the WAL flush (about
                # a disk sync, milliseconds, per cache hit otherwise).
                conn.execute("SET LOCAL synchronous_commit TO OFF")
            yield PostgresTx(conn)

    def execute(self, sql: str, args: Sequence[Any] = (), *, durable: bool = True) -> list[Row]:
        with (self.pool if durable else self.quick_pool).connection() as conn:
            cursor = conn.execute(translate(sql), tuple(args))
            return list(cursor.fetchall()) if cursor.description else []

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        # A session advisory lock on a connection held for the block: PostgreSQL drops it
        # when that connection ends, so a replica that dies holding it frees it.
        with self.pool.connection() as conn:
            key = lock_id(name)
            got = conn.execute("SELECT pg_try_advisory_lock(%s) AS got", (key,)).fetchone()
            if not got["got"]:
                yield False
                return
            try:
                yield True
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def subscribe(self, channel: str, listener: Callable[[str], None]) -> Callable[[], None]:
        with self._listen_lock:
            self._listeners.setdefault(channel, []).append(listener)
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._listen, name="imagegen-pg-listen", daemon=True
                )
                self._listener.start()

        def unsubscribe() -> None:
            with self._listen_lock:
                registered = self._listeners.get(channel, [])
                if listener in registered:
                    registered.remove(listener)

        return unsubscribe

    def _listen(self) -> None:
        """One connection LISTENs for the process; a lost connection is reopened, and the
        notifications missed meanwhile are what the callers' polls are for."""
        listening: set[str] = set()
        while not self._closed.is_set():
            try:
                with self._psycopg.connect(self._url, autocommit=True) as conn:
                    listening.clear()
                    while not self._closed.is_set():
                        with self._listen_lock:
                            wanted = set(self._listeners)
                        for channel in wanted - listening:
                            conn.execute(
                                self._psycopg.sql.SQL("LISTEN {}").format(
                                    self._psycopg.sql.Identifier(channel)
                                )
                            )
                            listening.add(channel)
                        for note in conn.notifies(timeout=0.5):
                            with self._listen_lock:
                                targets = list(self._listeners.get(note.channel, ()))
                            for target in targets:
                                target(note.payload)
            except Exception as exc:
                if self._closed.is_set():
                    return
                log.warning("PostgreSQL listener lost its connection (%s); reconnecting", exc)
                self._closed.wait(1.0)

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.join(timeout=2.0)
        self.pool.close()
        self.quick_pool.close()
