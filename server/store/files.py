"""Writing a local file so that no reader, and no process killed mid-write, ever sees part of
it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
