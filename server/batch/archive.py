"""What a finished (or running) batch folder gives back: its manifest in row order with the
digest of every image, and a zip of that manifest with the images it names."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from server.batch.manifest import MANIFEST_NAME, json_line, read_manifest


def rendered_manifest(folder: Path, files_url: str | None = None) -> list[dict[str, Any]]:
    """The manifest's outcomes in row order, each with the `sha256` of its images (and, given
    the file route's URL prefix, their `urls`). Only complete lines are read: a run in progress
    may be writing the last one."""
    objects = []
    for entry in sorted(read_manifest(folder / MANIFEST_NAME).values(), key=lambda e: e.row):
        obj = entry.to_json()
        # Lines from before digests were recorded are hashed from the files.
        obj["sha256"] = list(entry.sha256) or [_sha256_or_none(folder / n) for n in entry.images]
        if files_url is not None:
            obj["urls"] = [files_url + name for name in entry.images]
        objects.append(obj)
    return objects


def write_archive(folder: Path) -> Path:
    """A zip of the rendered manifest and the images it names, in a temporary file that the
    caller removes."""
    objects = rendered_manifest(folder)
    fd, name = tempfile.mkstemp(prefix="imagegen-batch-", suffix=".zip")
    os.close(fd)
    target = Path(name)
    try:
        with zipfile.ZipFile(target, "w") as archive:
            manifest = b"".join(json_line(obj) for obj in objects)
            archive.writestr(MANIFEST_NAME, manifest, compress_type=zipfile.ZIP_DEFLATED)
            for obj in objects:
                for image in obj["images"]:
                    if not (folder / image).is_file():
                        continue  # removed from the folder by hand
                    # Images are compressed already: stored as they are.
                    archive.write(folder / image, image, compress_type=zipfile.ZIP_STORED)
    except BaseException:
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    return target


def _sha256_or_none(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None  # removed from the folder by hand
    return digest.hexdigest()
