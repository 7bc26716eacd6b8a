"""Every table of the store, as numbered migrations run at start-up (and by `imagegen
migrate`): a database records the versions it has, and each start applies the rest.

Version 1 is the schema as it shipped before migrations existed, written so that it is a no-op
on such a data directory (`IF NOT EXISTS`, columns added only where missing); so an old data
directory is upgraded in place, its file layout and rows untouched. Several replicas starting
at once are serialised by a lock taken in the migrating transaction, and the later ones find
nothing left to do."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from server.store.sql import Database, Tx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddColumn:
    """A column added to a table that shipped without it (names are the code's own)."""

    table: str
    column: str
    declaration: str


Step = str | AddColumn


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    steps: Sequence[Step]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "ledger, cache index, jobs, A1111 defaults (as before migrations)",
        (
            """CREATE TABLE IF NOT EXISTS ledger (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                ts REAL NOT NULL,
                request_id TEXT NOT NULL,
                model TEXT NOT NULL,
                provider TEXT NOT NULL,
                cached INTEGER NOT NULL,
                images INTEGER NOT NULL,
                seeds TEXT NOT NULL,
                cost_usd REAL NOT NULL,
                gpu_seconds REAL NOT NULL,
                saved_usd REAL NOT NULL,
                status TEXT NOT NULL,
                error TEXT,
                tag TEXT
            )""",
            "CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts)",
            "CREATE INDEX IF NOT EXISTS ledger_tag ON ledger (tag)",
            # Who asked (server.quotas.Caller.id): what per-key daily quotas sum.
            AddColumn("ledger", "caller", "TEXT"),
            "CREATE INDEX IF NOT EXISTS ledger_caller ON ledger (caller, ts)",
            """CREATE TABLE IF NOT EXISTS cache_entries (
                key TEXT PRIMARY KEY,
                created REAL NOT NULL,
                last_access REAL NOT NULL,
                bytes INTEGER NOT NULL,
                meta TEXT NOT NULL
            )""",
            """CREATE TABLE IF NOT EXISTS cache_images (
                key TEXT NOT NULL,
                idx INTEGER NOT NULL,
                sha256 TEXT NOT NULL,
                PRIMARY KEY (key, idx)
            )""",
            "CREATE INDEX IF NOT EXISTS cache_images_sha ON cache_images (sha256)",
            "CREATE INDEX IF NOT EXISTS cache_entries_access ON cache_entries (last_access)",
            """CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY,
                created REAL NOT NULL,
                updated REAL NOT NULL,
                status TEXT NOT NULL,
                request TEXT NOT NULL,
                step INTEGER NOT NULL DEFAULT 0,
                total INTEGER NOT NULL DEFAULT 0,
                result TEXT,
                error TEXT
            )""",
            "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status)",
            # "image" (POST /v1/jobs) or "batch" (POST /v1/batches).
            AddColumn("jobs", "kind", "TEXT NOT NULL DEFAULT 'image'"),
            """CREATE TABLE IF NOT EXISTS a1111_defaults (
                caller TEXT PRIMARY KEY,
                model TEXT NOT NULL,
                updated REAL NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "claims (single flight across processes), billed once per claim, job owners",
        (
            # One row per cache key ever claimed, kept after release so that `token` only
            # grows: (key, token) names one claim for good, which the ledger's unique index
            # below relies on.
            """CREATE TABLE IF NOT EXISTS claims (
                key TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                token INTEGER NOT NULL,
                expires REAL NOT NULL,
                failure TEXT
            )""",
            # "<cache key>#<token>" on the row that bills a claimed generation; NULL on every
            # other row (NULLs never collide): a second bill for one claim cannot be written.
            AddColumn("ledger", "claim", "TEXT"),
            "CREATE UNIQUE INDEX IF NOT EXISTS ledger_claim ON ledger (claim)",
            # The process running a job, until when its lease holds, and a cancel asked for
            # through another process.
            AddColumn("jobs", "owner", "TEXT"),
            AddColumn("jobs", "lease", "REAL NOT NULL DEFAULT 0"),
            AddColumn("jobs", "cancel", "INTEGER NOT NULL DEFAULT 0"),
        ),
    ),
)

LATEST = MIGRATIONS[-1].version
_TYPES = (
    (
        re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    # PostgreSQL's REAL is 4 bytes: a timestamp would lose its seconds.
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
)


def for_dialect(sql: str, dialect: str) -> str:
    """The DDL as `dialect` wants it: the steps are written in SQLite's terms, which
    PostgreSQL takes with wider types."""
    if dialect == "postgresql":
        for pattern, replacement in _TYPES:
            sql = pattern.sub(replacement, sql)
    return sql


def applied(db: Database) -> list[int]:
    """The versions `db` has (none before its first migration)."""
    try:
        rows = db.execute("SELECT version FROM schema_migrations ORDER BY version")
    except Exception:
        return []
    return [int(r["version"]) for r in rows]


def migrate(db: Database) -> list[int]:
    """Apply what `db` lacks, in one transaction; returns the versions applied now."""
    have = applied(db)
    if have and have[-1] >= LATEST:
        return []  # the common start-up: one query, no write lock
    with db.transaction() as tx:
        if tx.dialect == "postgresql":
            # Replicas starting together queue here; SQLite's BEGIN IMMEDIATE does the same.
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"
        )
        present = {
            int(r["version"]) for r in tx.execute("SELECT version FROM schema_migrations").rows
        }
        done = []
        for migration in MIGRATIONS:
            if migration.version in present:
                continue
            for step in migration.steps:
                _apply(tx, step)
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            done.append(migration.version)
    if done:
        log.info("store %r: applied migrations %s", db, done)
    return done


def _apply(tx: Tx, step: Step) -> None:
    if isinstance(step, str):
        tx.execute(for_dialect(step, tx.dialect))
        return
    declaration = for_dialect(step.declaration, tx.dialect)
    if tx.dialect == "postgresql":
        tx.execute(f"ALTER TABLE {step.table} ADD COLUMN IF NOT EXISTS {step.column} {declaration}")
        return
    columns = tx.execute(f"PRAGMA table_info({step.table})").rows
    if not any(c["name"] == step.column for c in columns):
        tx.execute(f"ALTER TABLE {step.table} ADD COLUMN {step.column} {declaration}")


# pg_advisory_xact_lock's key for migrations (any constant every replica shares).
_MIGRATION_LOCK = 0x696D6167_6567656E  # "imagegen"
