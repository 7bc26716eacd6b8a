"""The A1111 default model of each caller (POST /sdapi/v1/options) in the store's
database, so that it outlives a restart as it does in A1111 (there it is in config.json)."""

from __future__ import annotations

import time

from server.store.sql import Database


class DefaultModels:
    """Callers are server.http.auth's ids ("key:<digest prefix>", or "addr:<host>" with keys
    off): never a key itself."""

    def __init__(self, db: Database) -> None:
        self.db = db

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
