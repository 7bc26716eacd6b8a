"""The A1111 default model of each caller (POST /sdapi/v1/options) in the service's SQLite
database, so that it outlives a restart as it does in A1111 (there it is in config.json)."""

from __future__ import annotations

import time

from server.db import Database

# A table of its own, created where it is missing: databases from before it gain it on open,
# and every other table is untouched.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS a1111_defaults (
    caller TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    updated REAL NOT NULL
);
"""


class DefaultModels:
    """Callers are server.http.auth's ids ("key:<digest prefix>", or "addr:<host>" with keys
    off): never a key itself."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.executescript(_SCHEMA)

    def get(self, caller: str) -> str | None:
        rows = self.db.execute("SELECT model FROM a1111_defaults WHERE caller = ?", (caller,))
        return str(rows[0]["model"]) if rows else None

    def set(self, caller: str, model: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO a1111_defaults (caller, model, updated) VALUES (?, ?, ?) "
                "ON CONFLICT (caller) DO UPDATE SET model = excluded.model, "
                "updated = excluded.updated",
                (caller, model, time.time()),
            )
