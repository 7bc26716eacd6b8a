"""`imagegen generate`'s --out folder: each image written whole under its name, and a temp
file a killed run left there removed once stale, not while another run may be writing it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from server.generate_cmd import write_images
from server.store.blobs import STALE_TEMP_S


def test_write_images_removes_only_stale_temp_files(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".tmp-killed", tmp_path / ".tmp-being-written"
    for path in (stale, fresh):
        path.write_bytes(b"half a png")
    then = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (then, then))
    image = SimpleNamespace(seed=5, sha256="ab" * 32, format="png", data=b"the png")
    result = SimpleNamespace(model="tiny-sdxl", images=[image])

    (written,) = write_images(cast(Any, result), tmp_path)

    assert written.name == f"tiny-sdxl-5-{'ab' * 6}.png" and written.read_bytes() == b"the png"
    assert not stale.exists() and fresh.exists()
