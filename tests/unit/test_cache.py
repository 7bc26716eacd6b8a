"""The cache key (table-driven and property-based) and the content-addressed store."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.base import GenerationParams, InputImage, LoraRef
from server.cache import ResultCache, cache_key, object_key
from server.store.blobs import STALE_TEMP_S, FileBlobs
from server.store.files import atomic_write
from server.store.sql import open_database

BASE: dict[str, Any] = {
    "prompt": "a fox",
    "negative_prompt": None,
    "model": "tiny-sdxl",
    "width": 64,
    "height": 64,
    "n": 1,
    "seed": 7,
    "steps": 4,
    "guidance_scale": 5.0,
    "scheduler": "euler",
    "quality": None,
    "style": None,
    "output_format": "png",
    "background": None,
    "output_compression": None,
}
IDENTITY = {
    "backend": "local:sdxl",
    "model_revision": "sha256:abc",
    "pipeline": "P",
    "dtype": "float32",
    "device": "cpu",
    "scheduler_config": {},
    "extra": {},
}


def test_key_is_full_sha256_hex() -> None:
    key = cache_key(BASE, IDENTITY)
    assert len(key) == 64 and int(key, 16) >= 0


def test_key_ignores_dict_order_and_int_float_spelling() -> None:
    reordered = dict(reversed(list(BASE.items())))
    assert cache_key(reordered, IDENTITY) == cache_key(BASE, IDENTITY)
    assert cache_key({**BASE, "guidance_scale": 5}, IDENTITY) == cache_key(BASE, IDENTITY)


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a fox "},
        {"negative_prompt": ""},
        {"negative_prompt": "fog"},
        {"model": "tiny-flux"},
        {"width": 72},
        {"height": 72},
        {"n": 2},
        {"seed": 8},
        {"steps": 5},
        {"guidance_scale": 5.5},
        {"scheduler": "ddim"},
        {"output_format": "jpeg"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_every_pixel_field_changes_the_key(change: dict[str, Any]) -> None:
    assert cache_key({**BASE, **change}, IDENTITY) != cache_key(BASE, IDENTITY)


@pytest.mark.parametrize(
    "change",
    [
        {"model_revision": "sha256:abd"},
        {"dtype": "float16"},
        {"pipeline": "Q"},
        {"scheduler_config": {"timestep_spacing": "trailing"}},
        {"device": "cuda"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_backend_identity_changes_the_key(change: dict[str, Any]) -> None:
    assert cache_key(BASE, {**IDENTITY, **change}) != cache_key(BASE, IDENTITY)


params = st.fixed_dictionaries(
    {
        "prompt": st.text(max_size=30),
        "negative_prompt": st.none() | st.text(max_size=10),
        "width": st.integers(8, 2048),
        "height": st.integers(8, 2048),
        "n": st.integers(1, 10),
        "seed": st.integers(0, 2**32),
        "steps": st.none() | st.integers(1, 100),
        "guidance_scale": st.none() | st.floats(0, 30, allow_nan=False).map(lambda f: f + 0.25),
        "scheduler": st.sampled_from(["euler", "euler_a", "ddim", None]),
    }
)


@settings(max_examples=300, deadline=None)
@given(a=params, b=params)
def test_different_requests_never_share_a_key(a: dict[str, Any], b: dict[str, Any]) -> None:
    if a == b:
        assert cache_key(a, IDENTITY) == cache_key(b, IDENTITY)
    else:
        assert cache_key(a, IDENTITY) != cache_key(b, IDENTITY)


@settings(max_examples=100, deadline=None)
@given(a=params)
def test_same_request_always_same_key(a: dict[str, Any]) -> None:
    assert cache_key(dict(a), IDENTITY) == cache_key(dict(sorted(a.items())), IDENTITY)


@pytest.fixture
def cache(tmp_path: Path) -> ResultCache:
    # No memory copy: these tests damage the files and check what a read makes of them.
    db = open_database(None, path=tmp_path / "db.sqlite3")
    return ResultCache(FileBlobs(tmp_path / "cache"), db, max_bytes=1000, memory_bytes=0)


def _path(cache: ResultCache, sha256: str) -> Path:
    assert isinstance(cache.blobs, FileBlobs)
    return cache.blobs.root / object_key(sha256)


def _img(data: bytes, seed: int = 1) -> tuple[bytes, int, int, int, str]:
    return (data, seed, 8, 8, "png")


def test_objects_are_content_addressed_and_verified(cache: ResultCache) -> None:
    [sha] = cache.put("k1", [_img(b"hello")], {"cost_usd": 0.1})
    assert sha == hashlib.sha256(b"hello").hexdigest()
    assert _path(cache, sha).read_bytes() == b"hello"
    entry = cache.get("k1")
    assert entry is not None and entry.images[0].data == b"hello"
    assert entry.meta["cost_usd"] == 0.1
    _path(cache, sha).write_bytes(b"jello")
    assert cache.get("k1") is None  # dropped, not served
    assert cache.get("k1") is None
    assert cache.read_object(sha) is None


def test_missing_object_drops_the_entry(cache: ResultCache) -> None:
    [sha] = cache.put("k1", [_img(b"hello")], {})
    _path(cache, sha).unlink()
    assert cache.get("k1") is None


def test_lru_eviction_keeps_under_the_byte_cap(cache: ResultCache) -> None:
    cache.put("a", [_img(b"a" * 400)], {})
    cache.put("b", [_img(b"b" * 400)], {})
    assert cache.get("a") is not None  # a is now more recent than b
    cache.put("c", [_img(b"c" * 400)], {})
    assert cache.total_bytes() <= 1000
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    assert not _path(cache, hashlib.sha256(b"b" * 400).hexdigest()).exists()


def test_shared_object_survives_eviction_of_one_entry(cache: ResultCache) -> None:
    cache.put("a", [_img(b"same" * 50)], {})
    cache.put("b", [_img(b"same" * 50)], {})
    cache.delete("a")
    assert cache.get("b") is not None


def test_interrupted_write_leaves_nothing_servable(
    cache: ResultCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between writing and renaming: no entry, no object under its final name."""

    def boom(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.put("k", [_img(b"partial")], {})
    monkeypatch.undo()
    assert cache.get("k") is None
    sha = hashlib.sha256(b"partial").hexdigest()
    assert not _path(cache, sha).exists()
    assert not list((cache.blobs.root / "objects").rglob(".tmp-*"))  # type: ignore[attr-defined]


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f.png"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def _edit_params(**change: Any) -> GenerationParams:
    fields: dict[str, Any] = {
        "prompt": "a fox",
        "model": "tiny-sdxl",
        "width": 64,
        "height": 64,
        "n": 1,
        "seed": 7,
        "images": (InputImage(data=b"", sha256="a" * 64, width=64, height=64),),
        "mask": InputImage(data=b"", sha256="b" * 64, width=64, height=64),
        "strength": 0.5,
        "loras": (LoraRef("ink", 0.8, "c" * 64),),
    }
    fields.update(change)
    return GenerationParams(**fields)


def test_a_text_to_image_key_is_what_it_was_before_image_inputs() -> None:
    """Caches written before image inputs existed stay valid: the new fields join the key only
    when set."""
    plain = GenerationParams(prompt="a fox", model="tiny-sdxl", width=64, height=64, n=1, seed=7)
    assert set(plain.pixel_fields()) == set(BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"images": ()},
        {"mask": None},
        {"strength": 0.6},
        {"mask_blur": 4},
        {"inpaint_area": "masked"},
        {"loras": ()},
        {"loras": (LoraRef("ink", 0.7, "c" * 64),)},
        {"loras": (LoraRef("ink", 0.8, "d" * 64),)},
    ],
    ids=repr,
)
def test_every_input_and_adapter_field_changes_the_key(change: dict[str, Any]) -> None:
    base_key = cache_key(_edit_params().pixel_fields(), IDENTITY)
    assert cache_key(_edit_params(**change).pixel_fields(), IDENTITY) != base_key


def test_a_different_init_image_or_mask_is_a_miss() -> None:
    other = InputImage(data=b"", sha256="e" * 64, width=64, height=64)
    base_key = cache_key(_edit_params().pixel_fields(), IDENTITY)
    assert cache_key(_edit_params(images=(other,)).pixel_fields(), IDENTITY) != base_key
    assert cache_key(_edit_params(mask=other).pixel_fields(), IDENTITY) != base_key


def test_start_up_removes_stale_temp_files_of_killed_writes(tmp_path: Path) -> None:
    """A write killed before its rename leaves a temp file; the next start-up removes it once
    it is stale, and keeps one another process may still be writing."""
    db = open_database(None, path=tmp_path / "db.sqlite3")
    cache = ResultCache(FileBlobs(tmp_path / "cache"), db, max_bytes=10**6)
    cache.put("k", [_img(b"whole")], {})
    folder = _path(cache, hashlib.sha256(b"whole").hexdigest()).parent
    stale, fresh = folder / ".tmp-killed", folder / ".tmp-writing"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    then = os.stat(stale).st_mtime - STALE_TEMP_S - 60
    os.utime(stale, (then, then))

    again = ResultCache(FileBlobs(tmp_path / "cache"), db, max_bytes=10**6)

    assert not stale.exists() and fresh.exists()
    entry = again.get("k")
    assert entry is not None and entry.images[0].data == b"whole"
