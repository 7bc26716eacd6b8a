"""The result cache: a key over every pixel-deciding field, content-addressed images in the
blob store (the data directory's files, or S3 shared by every replica) verified on read, an
index in the store's database, a small in-memory copy of recent images, and a byte cap with
least-recently-used eviction."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.store.blobs import BlobStore
from server.store.sql import Database, Tx

log = logging.getLogger(__name__)

# Bump when what goes into the key, or how images are encoded, changes.
CACHE_SCHEMA_VERSION = 1

_EXT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
# Recent images kept in memory by each process, so that a hit costs no blob read (on S3 a
# round trip): a few hundred 1024x1024 PNGs.
MEMORY_BYTES = 256 * 1024**2
# An object no index row names is removed by the sweep only once it is this old: a replica
# writes an image's object before the row that names it, and may be between the two.
ORPHAN_GRACE_S = 10 * 60


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


class Recent:
    """The images this process served or stored most recently, by sha256, up to a byte cap.
    Only verified bytes go in (a hash checked on read, or the bytes just hashed to name
    them), and bytes are immutable: what comes out needs no second check."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, sha256: str) -> bytes | None:
        with self._lock:
            data = self._items.get(sha256)
            if data is not None:
                self._items.move_to_end(sha256)
            return data

    def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if sha256 in self._items:
                self._items.move_to_end(sha256)
                return
            self._items[sha256] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def discard(self, sha256: str) -> None:
        with self._lock:
            data = self._items.pop(sha256, None)
            if data is not None:
                self._bytes -= len(data)


def object_key(sha256: str, fmt: str = "png") -> str:
    """An image's blob key: `objects/ab/<sha256>.png`, the file layout the cache has always
    had under the data directory's cache folder."""
    return f"objects/{sha256[:2]}/{sha256}{_EXT.get(fmt, '.bin')}"


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class ResultCache:
    def __init__(
        self,
        blobs: BlobStore,
        db: Database,
        *,
        max_bytes: int,
        memory_bytes: int = MEMORY_BYTES,
    ) -> None:
        self.blobs = blobs
        self.db = db
        self.max_bytes = max_bytes
        self.recent = Recent(memory_bytes)
        # A running estimate, so a write does not sum the whole index: exact after start-up
        # and after each eviction; writes by other processes are counted at their next check.
        self._bytes_estimate = self.total_bytes()

    # -- objects -------------------------------------------------------------------------

    def _read_verified(self, sha256: str, fmt: str) -> bytes | None:
        """The image's bytes if the store holds them whole; a damaged object is removed."""
        data = self.recent.get(sha256)
        if data is not None:
            return data
        key = object_key(sha256, fmt)
        data = self.blobs.get(key)
        if data is None:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            log.warning("cache object %s is corrupt; removing it", key)
            self.blobs.delete(key)
            return None
        self.recent.put(sha256, data)
        return data

    def read_object(self, sha256: str) -> tuple[bytes, str] | None:
        """An image by its content hash (for GET /v1/files/{id}); verified, None if absent
        or corrupt."""
        if not _is_sha256(sha256):
            return None
        rows = self.db.execute(
            "SELECT meta FROM cache_entries WHERE key IN "
            "(SELECT key FROM cache_images WHERE sha256 = ? LIMIT 1)",
            (sha256,),
        )
        formats = [
            item["format"]
            for row in rows
            for item in json.loads(row["meta"]).get("images", [])
            if item["sha256"] == sha256
        ]
        # No row (an entry evicted, its object not yet swept): try each format's key.
        for fmt in formats[:1] or list(_EXT):
            data = self._read_verified(sha256, fmt)
            if data is not None:
                return data, fmt
        return None

    def has_object(self, sha256: str, fmt: str) -> bool:
        return self.recent.get(sha256) is not None or self.blobs.exists(object_key(sha256, fmt))

    # -- entries -------------------------------------------------------------------------

    def get(self, key: str) -> CacheEntry | None:
        # The lookup and the access time in one statement (one round trip to a shared
        # database), whose commit need not wait for the disk: an access time is worth no
        # money. A miss changes nothing.
        rows = self.db.execute(
            "UPDATE cache_entries SET last_access = ? WHERE key = ? RETURNING meta",
            (time.time(), key),
            durable=False,
        )
        if not rows:
            return None
        meta = json.loads(rows[0]["meta"])
        images = []
        for item in meta["images"]:
            data = self._read_verified(item["sha256"], item["format"])
            if data is None:
                # Never serve a damaged or missing image: drop the entry so the request
                # regenerates.
                log.warning("cache entry %s has a missing or corrupt image; dropping it", key)
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
        return CacheEntry(key=key, images=tuple(images), meta=meta)

    def put(
        self,
        key: str,
        images: Sequence[tuple[bytes, int | None, int, int, str]],
        meta: Mapping[str, Any],
    ) -> list[str]:
        """Store (data, seed, width, height, format) images; returns their sha256s."""
        stored = self.write_objects(images)
        self.publish(key, stored, meta)
        return [item.sha256 for item in stored]

    def write_objects(
        self, images: Sequence[tuple[bytes, int | None, int, int, str]]
    ) -> list[CachedImage]:
        """The first half of a put: (data, seed, width, height, format) images into the blob
        store, each whole before `publish` can name it."""
        stored = []
        for data, seed, width, height, fmt in images:
            sha = hashlib.sha256(data).hexdigest()
            self.blobs.put(object_key(sha, fmt), data)
            self.recent.put(sha, data)
            stored.append(CachedImage(data, sha, seed, width, height, fmt))
        return stored

    def publish(
        self,
        key: str,
        stored: Sequence[CachedImage],
        meta: Mapping[str, Any],
        *,
        also: Callable[[Tx], None] | None = None,
    ) -> None:
        """The second half: the entry naming `stored`, visible all at once. `also` runs first
        in the entry's transaction (a claim's fence check and its ledger row): if it raises,
        nothing of the entry is written."""
        items = [
            {
                "sha256": s.sha256,
                "seed": s.seed,
                "width": s.width,
                "height": s.height,
                "format": s.format,
            }
            for s in stored
        ]
        total = sum(len(s.data) for s in stored)
        now = time.time()
        with self.db.transaction() as tx:
            if also is not None:
                also(tx)
            tx.execute(
                "INSERT INTO cache_entries (key, created, last_access, bytes, meta) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "created = excluded.created, last_access = excluded.last_access, "
                "bytes = excluded.bytes, meta = excluded.meta",
                (key, now, now, total, canonical_json({**meta, "images": items})),
            )
            tx.execute("DELETE FROM cache_images WHERE key = ?", (key,))
            tx.executemany(
                "INSERT INTO cache_images (key, idx, sha256) VALUES (?, ?, ?)",
                [(key, i, s.sha256) for i, s in enumerate(stored)],
            )
        # An object that was already there (so not rewritten) may have been removed by another
        # process's delete between its write and this commit, as unreferenced: put it back.
        for s in stored:
            if not self.blobs.exists(object_key(s.sha256, s.format)):
                self.blobs.put(object_key(s.sha256, s.format), s.data)
        self._bytes_estimate += total
        if self._bytes_estimate > self.max_bytes:
            self.evict()

    def delete(self, key: str) -> None:
        with self.db.transaction() as tx:
            shas = [
                r["sha256"]
                for r in tx.execute("SELECT sha256 FROM cache_images WHERE key = ?", (key,)).rows
            ]
            meta_rows = tx.execute("SELECT meta FROM cache_entries WHERE key = ?", (key,)).rows
            tx.execute("DELETE FROM cache_entries WHERE key = ?", (key,))
            tx.execute("DELETE FROM cache_images WHERE key = ?", (key,))
            orphans = [sha for sha in shas if not self._referenced(tx, sha)]
        formats = {}
        for row in meta_rows:
            for item in json.loads(row["meta"]).get("images", []):
                formats[item["sha256"]] = item["format"]
        for sha in orphans:
            self.recent.discard(sha)
            self.blobs.delete(object_key(sha, formats.get(sha, "png")))

    @staticmethod
    def _referenced(tx: Tx, sha256: str) -> bool:
        found = tx.execute("SELECT 1 FROM cache_images WHERE sha256 = ? LIMIT 1", (sha256,))
        return bool(found.rows)

    def total_bytes(self) -> int:
        rows = self.db.execute("SELECT COALESCE(SUM(bytes), 0) AS total FROM cache_entries")
        return int(rows[0]["total"])

    def evict(self) -> int:
        """Drop least recently used entries until the cache fits its byte cap. One process
        at a time evicts (the others' writes are over the cap a moment longer)."""
        evicted = 0
        with self.db.exclusive("cache-evict") as mine:
            while mine and self.total_bytes() > self.max_bytes:
                rows = self.db.execute(
                    "SELECT key FROM cache_entries ORDER BY last_access ASC LIMIT 1"
                )
                if not rows:
                    break
                self.delete(rows[0]["key"])
                evicted += 1
        self._bytes_estimate = self.total_bytes()
        return evicted

    def sweep(self, *, grace_s: float = ORPHAN_GRACE_S) -> int:
        """Remove image objects no entry names and older than `grace_s` (left by a process
        killed between writing an object and its entry). One process at a time; returns how
        many were removed."""
        removed = 0
        cutoff = time.time() - grace_s
        with self.db.exclusive("cache-sweep") as mine:
            if not mine:
                return 0
            # Names first, then the listing: an object written after this read is younger
            # than the grace period, so it is never a candidate.
            named = {
                r["sha256"] for r in self.db.execute("SELECT DISTINCT sha256 FROM cache_images")
            }
            for name, modified in self.blobs.list("objects/"):
                sha = name.rsplit("/", 1)[-1].split(".", 1)[0]
                if modified >= cutoff or not _is_sha256(sha) or sha in named:
                    continue
                self.blobs.delete(name)
                removed += 1
        return removed

    def stats(self) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT COUNT(*) AS entries, COALESCE(SUM(bytes), 0) AS bytes FROM cache_entries"
        )
        return {
            "entries": int(rows[0]["entries"]),
            "bytes": int(rows[0]["bytes"]),
            "max_bytes": self.max_bytes,
        }
