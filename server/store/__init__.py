"""The store layer: the database (cache index, ledger, jobs, claims; server/store/sql.py) and
the blob store (image bytes, batch folders; server/store/blobs.py), each with a single-box
implementation (SQLite, files in the data directory) and a shared one (PostgreSQL, S3) chosen
by settings. Nothing outside server/store knows which is in use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from server.settings import Settings
from server.store.blobs import BlobStore, blobs_from_url
from server.store.sql import Database, open_database


@dataclass(frozen=True)
class Store:
    db: Database
    # Cache images, keys `objects/ab/<sha256>.png` (files: under data_dir/cache).
    blobs: BlobStore
    # Batch folders, keys `batches/<id>/<name>` (files: data_dir/batches/<id> itself).
    batch_blobs: BlobStore

    def close(self) -> None:
        self.db.close()


def open_store(settings: Settings) -> Store:
    """The store `store.*` and `blobs.*` name, migrated to the current schema. A bad setting
    is a ValueError whose message names it and the fix."""
    section = settings.blobs

    def rooted(root: Path) -> BlobStore:
        # One bucket and prefix for both on S3 (their keys never meet); for files, each
        # where it has always been.
        return blobs_from_url(
            section.url,
            root=root,
            endpoint_url=section.endpoint_url,
            region=section.region,
            access_key_id=_secret(section.access_key_id),
            secret_access_key=_secret(section.secret_access_key),
        )

    blobs, batch_blobs = rooted(settings.cache_dir), rooted(settings.data_dir)
    url = settings.store.url
    db = open_database(url.get_secret_value() if url else None, path=settings.db_path)
    return Store(db=db, blobs=blobs, batch_blobs=batch_blobs)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
