"""The result cache: a key over every pixel-deciding field, content-addressed image files
written atomically and verified on read, and a byte cap with least-recently-used eviction."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.db import Database

log = logging.getLogger(__name__)

# Bump when what goes into the key, or how images are encoded, changes.
CACHE_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cache_entries (
    key TEXT PRIMARY KEY,
    created REAL NOT NULL,
    last_access REAL NOT NULL,
    bytes INTEGER NOT NULL,
    meta TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cache_images (
    key TEXT NOT NULL,
    idx INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (key, idx)
);
CREATE INDEX IF NOT EXISTS cache_images_sha ON cache_images (sha256);
CREATE INDEX IF NOT EXISTS cache_entries_access ON cache_entries (last_access);
"""

_EXT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
# An object's temp file older than this is a killed write's: a live one is renamed within
# milliseconds, so another process writing into the same cache is never this old.
STALE_TEMP_S = 10 * 60


def canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def cache_key(pixel_fields: Mapping[str, Any], identity: Mapping[str, Any]) -> str:
    """sha256 (64 hex) of canonical JSON over the request's pixel fields, the backend's
    identity (revision, pipeline, dtype, scheduler config) and the schema version."""
    payload = {
        "schema": CACHE_SCHEMA_VERSION,
        "params": {k: _normalise(v) for k, v in pixel_fields.items()},
        "backend": identity,
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def _normalise(value: Any) -> Any:
    # 5 and 5.0 are the same guidance scale: one spelling in the key.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass(frozen=True)
class CachedImage:
    data: bytes
    sha256: str
    seed: int | None
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class CacheEntry:
    key: str
    images: tuple[CachedImage, ...]
    meta: Mapping[str, Any]


class ResultCache:
    def __init__(self, root: Path, db: Database, *, max_bytes: int) -> None:
        self.root = root
        self.objects = root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()
        self.db = db
        self.max_bytes = max_bytes
        db.executescript(_SCHEMA)
        # A running estimate, so a write does not sum the whole index: exact after start-up
        # and after each eviction; writes by other processes are counted at their next check.
        self._bytes_estimate = self.total_bytes()

    # -- objects -------------------------------------------------------------------------

    def _remove_stale_temp_files(self) -> None:
        """A process killed inside atomic_write leaves its temp file; nothing names it."""
        cutoff = time.time() - STALE_TEMP_S
        for path in self.objects.glob("*/.tmp-*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass  # renamed or removed meanwhile by the process that wrote it

    def object_path(self, sha256: str, fmt: str = "png") -> Path:
        return self.objects / sha256[:2] / (sha256 + _EXT.get(fmt, ".bin"))

    def _write_object(self, data: bytes, fmt: str) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha, fmt)
        if path.is_file() and path.stat().st_size == len(data):
            return sha
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not fsynced: every read checks the hash, so the worst a power cut can do is turn an
        # entry into a miss, and the fsync cost about a millisecond of every served image.
        atomic_write(path, data, durable=False)
        return sha

    def read_object(self, sha256: str) -> tuple[bytes, str] | None:
        """An image by its content hash (for GET /v1/files/{id}); verified, None if absent
        or corrupt."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            return None
        for fmt, ext in _EXT.items():
            path = self.objects / sha256[:2] / (sha256 + ext)
            if path.is_file():
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() == sha256:
                    return data, fmt
                log.warning("cache object %s is corrupt; removing it", sha256)
                path.unlink(missing_ok=True)
        return None

    # -- entries -------------------------------------------------------------------------

    def get(self, key: str) -> CacheEntry | None:
        rows = self.db.execute("SELECT meta FROM cache_entries WHERE key = ?", (key,))
        if not rows:
            return None
        meta = json.loads(rows[0]["meta"])
        images = []
        for item in meta["images"]:
            path = self.object_path(item["sha256"], item["format"])
            try:
                data = path.read_bytes()
            except OSError:
                data = b""
            if hashlib.sha256(data).hexdigest() != item["sha256"]:
                # Never serve a damaged file: drop the entry so the request regenerates.
                log.warning("cache entry %s has a missing or corrupt image; dropping it", key)
                path.unlink(missing_ok=True)
                self.delete(key)
                return None
            images.append(
                CachedImage(
                    data=data,
                    sha256=item["sha256"],
                    seed=item["seed"],
                    width=item["width"],
                    height=item["height"],
                    format=item["format"],
                )
            )
        self.db.execute(
            "UPDATE cache_entries SET last_access = ? WHERE key = ?", (time.time(), key)
        )
        return CacheEntry(key=key, images=tuple(images), meta=meta)

    def put(
        self,
        key: str,
        images: Sequence[tuple[bytes, int | None, int, int, str]],
        meta: Mapping[str, Any],
    ) -> list[str]:
        """Store (data, seed, width, height, format) images; returns their sha256s. Image
        files are complete on disk before the entry that names them exists."""
        items = []
        total = 0
        for data, seed, width, height, fmt in images:
            sha = self._write_object(data, fmt)
            items.append(
                {"sha256": sha, "seed": seed, "width": width, "height": height, "format": fmt}
            )
            total += len(data)
        full_meta = {**meta, "images": items}
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO cache_entries (key, created, last_access, bytes, meta) "
                "VALUES (?, ?, ?, ?, ?)",
                (key, now, now, total, canonical_json(full_meta)),
            )
            conn.execute("DELETE FROM cache_images WHERE key = ?", (key,))
            conn.executemany(
                "INSERT INTO cache_images (key, idx, sha256) VALUES (?, ?, ?)",
                [(key, i, item["sha256"]) for i, item in enumerate(items)],
            )
        self._bytes_estimate += total
        if self._bytes_estimate > self.max_bytes:
            self.evict()
        return [str(item["sha256"]) for item in items]

    def delete(self, key: str) -> None:
        with self.db.transaction() as conn:
            shas = [
                r["sha256"]
                for r in conn.execute("SELECT sha256 FROM cache_images WHERE key = ?", (key,))
            ]
            meta_rows = conn.execute(
                "SELECT meta FROM cache_entries WHERE key = ?", (key,)
            ).fetchall()
            conn.execute("DELETE FROM cache_entries WHERE key = ?", (key,))
            conn.execute("DELETE FROM cache_images WHERE key = ?", (key,))
            orphans = [
                sha
                for sha in shas
                if not conn.execute(
                    "SELECT 1 FROM cache_images WHERE sha256 = ? LIMIT 1", (sha,)
                ).fetchone()
            ]
        formats = {}
        for row in meta_rows:
            for item in json.loads(row["meta"]).get("images", []):
                formats[item["sha256"]] = item["format"]
        for sha in orphans:
            self.object_path(sha, formats.get(sha, "png")).unlink(missing_ok=True)

    def total_bytes(self) -> int:
        rows = self.db.execute("SELECT COALESCE(SUM(bytes), 0) AS total FROM cache_entries")
        return int(rows[0]["total"])

    def evict(self) -> int:
        """Drop least recently used entries until the cache fits its byte cap."""
        evicted = 0
        while self.total_bytes() > self.max_bytes:
            rows = self.db.execute("SELECT key FROM cache_entries ORDER BY last_access ASC LIMIT 1")
            if not rows:
                break
            self.delete(rows[0]["key"])
            evicted += 1
        self._bytes_estimate = self.total_bytes()
        return evicted

    def stats(self) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT COUNT(*) AS entries, COALESCE(SUM(bytes), 0) AS bytes FROM cache_entries"
        )
        return {
            "entries": int(rows[0]["entries"]),
            "bytes": int(rows[0]["bytes"]),
            "max_bytes": self.max_bytes,
        }


def _umask() -> int:
    # The only portable way to read the umask is to set it; done once per process.
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """temp file in the same folder + fsync + rename: a reader sees the old file or the whole
    new one, never a partial write, even if the process is killed mid-write. `durable=False`
    skips the fsync: a killed process still leaves whole files (the kernel has the bytes);
    only a power cut can leave the new file empty, which suits data verified on read."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        # mkstemp makes 0600 files; an image a user asked for gets the usual umask mode.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # No fsync of the folder: after a power cut the rename may be lost, leaving the old file
    # or none — never a partial one — and the cache verifies hashes on read anyway. It would
    # cost about a third of a millisecond on every served image.
