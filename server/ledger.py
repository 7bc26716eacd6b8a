"""The cost ledger: one row per generated or cache-served request (in the store's database,
server/store/schema.py); the source of `imagegen stats`, GET /v1/stats, budgets and quotas."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.store.sql import Database, Tx


def utc_day_start(ts: float) -> float:
    """The start of the UTC day `ts` falls in: the day daily budgets and quotas count."""
    now = dt.datetime.fromtimestamp(ts, tz=dt.UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


@dataclass(frozen=True)
class LedgerRow:
    request_id: str
    model: str
    provider: str
    cached: bool
    seeds: Sequence[int | None]
    cost_usd: float
    gpu_seconds: float
    saved_usd: float = 0.0
    # "ok", "failed" (device time was spent, nothing returned) or "filtered" (the provider
    # charged for a moderated request).
    status: str = "ok"
    error: str | None = None
    # Free-form grouping (a batch run id), so a batch can be audited from the ledger.
    tag: str | None = None
    # Who asked (server.quotas.Caller.id: "key:<name or digest>", "addr:<host>", "" in-process):
    # what per-key daily quotas sum.
    caller: str = ""
    # The claim a single-flight generation ran under ("<cache key>#<token>"): unique in the
    # table, so one claimed generation can be billed once and only once.
    claim: str | None = None


class Ledger:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, row: LedgerRow, tx: Tx | None = None) -> None:
        """Write `row`, in `tx` where given (committed with whatever else it holds). A row
        that bills nothing (a cache hit) need not wait for the disk (Database.execute)."""
        sql = (
            "INSERT INTO ledger (ts, request_id, model, provider, cached, images, seeds, "
            "cost_usd, gpu_seconds, saved_usd, status, error, tag, caller, claim) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        args = (
            time.time(),
            row.request_id,
            row.model,
            row.provider,
            int(row.cached),
            len(row.seeds),
            json.dumps(list(row.seeds)),
            row.cost_usd,
            row.gpu_seconds,
            row.saved_usd,
            row.status,
            row.error,
            row.tag,
            row.caller,
            row.claim,
        )
        if tx is not None:
            tx.execute(sql, args)
        else:
            self.db.execute(sql, args, durable=not row.cached)

    def spent_since(self, since: float, provider: str | None = None) -> float:
        sql = "SELECT COALESCE(SUM(cost_usd), 0) AS spent FROM ledger WHERE ts >= ?"
        args: list[Any] = [since]
        if provider is not None:
            sql += " AND provider = ?"
            args.append(provider)
        return float(self.db.execute(sql, args)[0]["spent"])

    def usage_since(self, since: float, caller: str) -> tuple[int, float]:
        """What `caller` has had since `since`: images generated (cache hits are free and not
        counted; failed work is, it took the device) and USD booked."""
        row = self.db.execute(
            "SELECT COALESCE(SUM(CASE WHEN cached = 0 THEN images ELSE 0 END), 0) AS images, "
            "COALESCE(SUM(cost_usd), 0) AS spent FROM ledger WHERE caller = ? AND ts >= ?",
            (caller, since),
        )[0]
        return int(row["images"]), float(row["spent"])

    def spent(self, tag: str) -> float:
        """USD booked under `tag` (a batch run id), failed and filtered requests included."""
        rows = self.db.execute(
            "SELECT COALESCE(SUM(cost_usd), 0) AS spent FROM ledger WHERE tag = ?", (tag,)
        )
        return float(rows[0]["spent"])

    def seconds_per_image(self, model: str, *, recent: int = 200) -> float | None:
        """Measured device seconds per image for a local model over its `recent` latest
        generated (not cache-served) requests; None when it has never run here."""
        rows = self.db.execute(
            "SELECT COALESCE(SUM(gpu_seconds), 0) AS seconds, COALESCE(SUM(images), 0) AS images "
            "FROM (SELECT gpu_seconds, images FROM ledger WHERE model = ? AND cached = 0 "
            "AND status = 'ok' AND gpu_seconds > 0 ORDER BY id DESC LIMIT ?) AS recent",
            (model, recent),
        )
        images = int(rows[0]["images"])
        return float(rows[0]["seconds"]) / images if images else None

    def usd_per_image(self, model: str, *, recent: int = 200) -> float | None:
        """What one image of `model` has cost over its `recent` latest generated (not
        cache-served) requests: the estimate for hosted models billed by usage."""
        rows = self.db.execute(
            "SELECT COALESCE(SUM(cost_usd), 0) AS usd, COALESCE(SUM(images), 0) AS images "
            "FROM (SELECT cost_usd, images FROM ledger WHERE model = ? AND cached = 0 "
            "AND status = 'ok' AND images > 0 ORDER BY id DESC LIMIT ?) AS recent",
            (model, recent),
        )
        images = int(rows[0]["images"])
        return float(rows[0]["usd"]) / images if images else None

    def rows(self, tag: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        sql = "SELECT * FROM ledger"
        args: list[Any] = []
        if tag is not None:
            sql += " WHERE tag = ?"
            args.append(tag)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [dict(r) for r in self.db.execute(sql, args)]

    def stats(self) -> dict[str, Any]:
        totals = self.db.execute(
            "SELECT COUNT(*) AS requests, COALESCE(SUM(images), 0) AS images, "
            "COALESCE(SUM(cached), 0) AS cached, COALESCE(SUM(cost_usd), 0) AS cost_usd, "
            "COALESCE(SUM(gpu_seconds), 0) AS gpu_seconds, "
            "COALESCE(SUM(saved_usd), 0) AS saved_usd, "
            "COALESCE(SUM(CASE WHEN status != 'ok' THEN 1 ELSE 0 END), 0) AS failed FROM ledger"
        )[0]
        per_model = self.db.execute(
            "SELECT model, provider, COUNT(*) AS requests, SUM(images) AS images, "
            "SUM(cached) AS cached, SUM(cost_usd) AS cost_usd, "
            "SUM(gpu_seconds) AS gpu_seconds, SUM(saved_usd) AS saved_usd "
            "FROM ledger GROUP BY model, provider ORDER BY model, provider"
        )
        return {
            "requests": int(totals["requests"]),
            "images": int(totals["images"]),
            "cached": int(totals["cached"]),
            "failed": int(totals["failed"]),
            "cost_usd": round(float(totals["cost_usd"]), 12),
            "gpu_seconds": round(float(totals["gpu_seconds"]), 6),
            "saved_usd": round(float(totals["saved_usd"]), 12),
            "models": [
                {
                    "model": r["model"],
                    "provider": r["provider"],
                    "requests": int(r["requests"]),
                    "images": int(r["images"]),
                    "cached": int(r["cached"]),
                    "cost_usd": round(float(r["cost_usd"]), 12),
                    "gpu_seconds": round(float(r["gpu_seconds"]), 6),
                    "saved_usd": round(float(r["saved_usd"]), 12),
                }
                for r in per_model
            ],
        }
