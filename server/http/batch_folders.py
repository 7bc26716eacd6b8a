"""Batch folders in the blob store, so that any process sharing the store can serve a batch's
manifest, files and archive, whichever process ran it.

A batch runs in a local folder (`data_dir/batches/<id>`: appends are fsync'd lines, which an
object store cannot do), and what it records is published as it goes under the blob keys
`batches/<id>/<name>`: the images a line names before the manifest that names them, so the
published manifest never lists a file that is not there. Readers elsewhere fetch the
manifest afresh and each file once (images never change) into their own `data_dir/batches`.
On a single box the batch blob store is the data directory itself, and both are no-ops."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from server.batch import MANIFEST_NAME, read_manifest
from server.store.blobs import BlobStore
from server.store.files import atomic_write

log = logging.getLogger(__name__)

PREFIX = "batches"


def _key(batch_id: str, name: str) -> str:
    return f"{PREFIX}/{batch_id}/{name}"


class BatchFolders:
    def __init__(self, root: Path, blobs: BlobStore) -> None:
        self.root = root
        self.blobs = blobs
        self._lock = threading.Lock()
        # Per running batch, the files already published (a batch's own lock would do; one
        # for all keeps it simple, and publishing is a few small writes per row).
        self._published: dict[str, set[str]] = {}

    def path(self, batch_id: str) -> Path:
        return self.root / batch_id

    # -- the process running the batch -----------------------------------------------------

    def publish(self, batch_id: str) -> None:
        """Everything the local manifest names and is not yet published, then the manifest.
        Blocking; safe to call from several threads (they take turns)."""
        folder = self.path(batch_id)
        with self._lock:
            done = self._published.setdefault(batch_id, set())
            for entry in read_manifest(folder / MANIFEST_NAME).values():
                for name in entry.images:
                    if name not in done and (folder / name).is_file():
                        self.blobs.put_file(_key(batch_id, name), folder / name)
                        done.add(name)
            if (folder / MANIFEST_NAME).is_file():
                self.blobs.put_file(_key(batch_id, MANIFEST_NAME), folder / MANIFEST_NAME)

    def finished(self, batch_id: str) -> None:
        """The run is over (its last publish done): forget what it published."""
        with self._lock:
            self._published.pop(batch_id, None)

    # -- any process ---------------------------------------------------------------------

    def view(self, batch_id: str, *, local: bool) -> Path:
        """The folder to read `batch_id` from: this process's own while it runs the batch
        (`local`), else one with the published manifest (images come with `fetch`)."""
        folder = self.path(batch_id)
        if local:
            return folder
        published = self.blobs.get(_key(batch_id, MANIFEST_NAME))
        if published is None:
            return folder
        manifest = folder / MANIFEST_NAME
        try:
            same = manifest.read_bytes() == published
        except FileNotFoundError:
            same = False
        if not same:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(manifest, published)
        return folder

    def fetch(self, batch_id: str, name: str) -> Path | None:
        """The local copy of a published file of the batch (fetched once), or None."""
        path = self.path(batch_id) / name
        if path.is_file():
            return path
        data = self.blobs.get(_key(batch_id, name))
        if data is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, durable=False)
        return path

    def fetch_all(self, batch_id: str) -> Path:
        """The folder with every file its manifest names (for the archive)."""
        folder = self.view(batch_id, local=False)
        for entry in read_manifest(folder / MANIFEST_NAME).values():
            for name in entry.images:
                self.fetch(batch_id, name)
        return folder

    def remove(self, batch_id: str) -> None:
        """The batch's published objects and its local folder (its record is gone)."""
        for key, _ in list(self.blobs.list(f"{PREFIX}/{batch_id}/")):
            self.blobs.delete(key)
        shutil.rmtree(self.path(batch_id), ignore_errors=True)

    def published_ids(self) -> set[str]:
        """Ids of every batch with objects in the store or a folder here."""
        ids = {key.split("/")[1] for key, _ in self.blobs.list(f"{PREFIX}/") if key.count("/") >= 2}
        if self.root.is_dir():
            ids |= {p.name for p in self.root.iterdir() if p.is_dir()}
        return ids
