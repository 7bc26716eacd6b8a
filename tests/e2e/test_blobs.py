"""The blob store contract, the same tests against both implementations: FileBlobs in a
temporary folder and S3Blobs against a real S3-speaking server on loopback (moto in server
mode), plus what is particular to each (the cache's file layout, S3 errors and fallbacks)."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.store.blobs import BlobStore, BlobStoreError, FileBlobs, S3Blobs, blobs_from_url
from tests.conftest import REPO
from tests.s3 import BUCKET, CREDENTIALS

_prefixes = itertools.count()


def sha_key(data: bytes, ext: str = "png") -> str:
    sha = hashlib.sha256(data).hexdigest()
    return f"objects/{sha[:2]}/{sha}.{ext}"


def s3_store(endpoint: str, prefix: str | None = None) -> S3Blobs:
    # A prefix of its own per test: one bucket, no test sees another's objects.
    prefix = prefix if prefix is not None else f"run/t{next(_prefixes)}"
    return S3Blobs(BUCKET, prefix, endpoint_url=endpoint, **CREDENTIALS)


@pytest.fixture(scope="module")
def shared_s3(s3_endpoint: str) -> S3Blobs:
    # One client for the contract tests: making one loads botocore's models (a good part of
    # a second on a busy box), so each test empties this one instead.
    return s3_store(s3_endpoint, "contract")


@pytest.fixture(params=["files", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "files":
        return FileBlobs(tmp_path / "blobs")
    s3: S3Blobs = request.getfixturevalue("shared_s3")
    for key, _ in list(s3.list()):
        s3.delete(key)
    return s3


# -- the contract, on both -------------------------------------------------------------------


def test_put_get_roundtrip(store: BlobStore) -> None:
    data = os.urandom(30_000)
    key = sha_key(data)
    store.put(key, data)
    assert store.get(key) == data
    assert store.exists(key)
    manifest = b'{"images": 2}'
    store.put("batches/b1/manifest.json", manifest)
    assert store.get("batches/b1/manifest.json") == manifest


def test_missing_is_none(store: BlobStore) -> None:
    assert store.get("objects/00/missing.png") is None
    assert not store.exists("objects/00/missing.png")
    store.delete("objects/00/missing.png")  # not an error
    # A "folder" is not an object in either store.
    store.put("objects/ab/x.png", b"x")
    assert store.get("objects/ab") is None
    assert not store.exists("objects/ab")


def test_delete(store: BlobStore) -> None:
    store.put("objects/ab/gone.png", b"bytes")
    store.put("objects/ab/kept.png", b"bytes")
    store.delete("objects/ab/gone.png")
    assert store.get("objects/ab/gone.png") is None
    assert not store.exists("objects/ab/gone.png")
    assert [key for key, _ in store.list()] == ["objects/ab/kept.png"]


def test_list_by_prefix_with_last_modified(store: BlobStore) -> None:
    before = time.time()
    keys = ["objects/ab/one.png", "objects/ac/two.png", "batches/b1/manifest.json"]
    for key in keys:
        store.put(key, key.encode())
    after = time.time()

    def listed(prefix: str) -> set[str]:
        return {key for key, _ in store.list(prefix)}

    assert listed("") == set(keys)
    assert listed("objects/") == {"objects/ab/one.png", "objects/ac/two.png"}
    assert listed("objects/a") == {"objects/ab/one.png", "objects/ac/two.png"}
    assert listed("objects/ab") == {"objects/ab/one.png"}
    assert listed("objects/ab/") == {"objects/ab/one.png"}
    assert listed("objects/ab/one.png") == {"objects/ab/one.png"}
    assert listed("batches/b") == {"batches/b1/manifest.json"}
    assert listed("nothing/") == set()
    # S3 keeps whole seconds (or milliseconds): the slack is the clock's grain, not a timing.
    for _, modified in store.list():
        assert before - 2 <= modified <= after + 2


def test_content_addressed_put_twice_is_a_no_op(store: BlobStore) -> None:
    data = os.urandom(10_000)
    key = sha_key(data)
    store.put(key, data)
    [(_, first)] = store.list("objects/")
    store.put(key, data)
    assert store.get(key) == data
    # Not rewritten: the object keeps its first write's time.
    assert list(store.list("objects/")) == [(key, first)]


def test_other_keys_are_overwritten(store: BlobStore) -> None:
    store.put("batches/b1/manifest.json", b"first")
    store.put("batches/b1/manifest.json", b"second")
    assert store.get("batches/b1/manifest.json") == b"second"


BAD_KEYS = [
    "",
    "../x",
    "/abs",
    "a//b",
    "a/../b",
    "a/./b",
    "a/",
    ".hidden",
    "a/.tmp-123",
    "a\\b",
    "a b",
    "a\x00b",
    "caf\u00e9",
    "x" * 2000,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused(store: BlobStore, key: str, tmp_path: Path) -> None:
    for call in (
        lambda: store.put(key, b"data"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(ValueError, match="blob key must be"):
            call()
    assert list(store.list()) == []
    assert not (tmp_path / "x").exists()  # "../x" did not land beside the root


@pytest.mark.parametrize("prefix", ["../", "/abs", "a//", "..", "a/../"])
def test_invalid_list_prefixes_are_refused(store: BlobStore, prefix: str) -> None:
    with pytest.raises(ValueError, match="blob list prefix must be"):
        list(store.list(prefix))


def test_a_reader_never_sees_a_partial_object(store: BlobStore) -> None:
    """A reader polling a key while large objects are written under it sees nothing, or one
    whole version: a plain write would show it a truncated file."""
    key = "batches/big/images.zip"
    versions = [os.urandom(8 * 1024 * 1024), os.urandom(8 * 1024 * 1024)]
    done = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            for data in versions * 3:
                store.put(key, data)
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=write, name="test-blob-writer")
    writer.start()
    try:
        while not done.is_set():
            got = store.get(key)
            assert got is None or got in versions, f"partial read of {len(got)} bytes"
    finally:
        writer.join(timeout=120)
    assert not failures, failures
    assert store.get(key) == versions[1]


# -- files -------------------------------------------------------------------------------------


def test_file_layout_is_the_result_caches(tmp_path: Path) -> None:
    """FileBlobs over the cache's folder reads and writes exactly the cache's object files,
    so the cache can move onto it without moving a file."""
    from server.cache import ResultCache, object_key
    from server.store.sql import open_database

    root = tmp_path / "cache"
    blobs = FileBlobs(root)
    cache = ResultCache(blobs, open_database(None, path=tmp_path / "index.sqlite"), max_bytes=10**9)
    data = os.urandom(5_000)
    sha = cache.put("k", [(data, 1, 8, 8, "png")], {})[0]
    key = sha_key(data)
    assert key == object_key(sha, "png")
    assert blobs.get(key) == data
    other = os.urandom(5_000)
    blobs.put(sha_key(other, "webp"), other)
    assert cache.read_object(hashlib.sha256(other).hexdigest()) == (other, "webp")


def test_file_list_skips_temp_files(tmp_path: Path) -> None:
    blobs = FileBlobs(tmp_path)
    blobs.put("objects/ab/x.png", b"x")
    (tmp_path / "objects" / "ab" / ".tmp-killed").write_bytes(b"half")
    assert [key for key, _ in blobs.list()] == ["objects/ab/x.png"]


# -- S3 ----------------------------------------------------------------------------------------


def test_s3_prefixes_keep_stores_apart(s3_endpoint: str) -> None:
    one, two = s3_store(s3_endpoint, "apart/one"), s3_store(s3_endpoint, "apart/one-more")
    one.put("objects/ab/x.png", b"one")
    two.put("objects/ab/x.png", b"two")
    assert one.get("objects/ab/x.png") == b"one"
    assert [key for key, _ in one.list()] == ["objects/ab/x.png"]
    assert [key for key, _ in two.list()] == ["objects/ab/x.png"]
    # The prefix is the store's root: the bucket holds the objects under it.
    assert one._client.head_object(Bucket=BUCKET, Key="apart/one/objects/ab/x.png")


def test_s3_content_addressed_put_is_conditional(s3_endpoint: str) -> None:
    store = s3_store(s3_endpoint)
    data = os.urandom(1000)
    store.put(sha_key(data), data)
    sent = _record_puts(store)
    store.put(sha_key(data), data)
    store.put("batches/b/manifest.json", b"{}")
    assert sent == [(sha_key(data), "*"), ("batches/b/manifest.json", None)]


def test_s3_without_conditional_writes_falls_back_to_plain_puts(s3_endpoint: str) -> None:
    """A store that answers If-None-Match with 501 NotImplemented (older S3-compatibles) gets
    plain PUTs from then on."""
    from botocore.awsrequest import AWSResponse

    store = s3_store(s3_endpoint)

    class Raw:
        def stream(self, **_: Any) -> Iterator[bytes]:
            yield b"<Error><Code>NotImplemented</Code><Message>no</Message></Error>"

    def refuse_conditional(request: Any, **_: Any) -> AWSResponse | None:
        if request.headers.get("If-None-Match"):
            return AWSResponse(request.url, 501, {}, Raw())
        return None

    store._client.meta.events.register("before-send.s3.PutObject", refuse_conditional)
    sent = _record_puts(store)
    data = os.urandom(1000)
    store.put(sha_key(data), data)
    store.put(sha_key(data), data)
    assert store.get(sha_key(data)) == data
    assert sent == [(sha_key(data), "*"), (sha_key(data), None), (sha_key(data), None)]


def _record_puts(store: S3Blobs) -> list[tuple[str, str | None]]:
    sent: list[tuple[str, str | None]] = []

    def record(request: Any, **_: Any) -> None:
        key = request.url.split(f"/{BUCKET}/{store.prefix}/", 1)[1]
        value = request.headers.get("If-None-Match")  # bytes once signed
        sent.append((key, value.decode() if isinstance(value, bytes) else value))

    # Registered first, so it runs before any handler that answers in the server's place.
    store._client.meta.events.register_first("before-send.s3.PutObject", record)
    return sent


def test_s3_missing_bucket_is_a_clear_error(s3_endpoint: str) -> None:
    store = S3Blobs("no-such-bucket", "p", endpoint_url=s3_endpoint, **CREDENTIALS)
    calls: list[Callable[[], object]] = [lambda: store.get("a/b"), lambda: store.put("a/b", b"x")]
    for call in calls:
        with pytest.raises(BlobStoreError, match=r"s3://no-such-bucket/p/a/b.*create the bucket"):
            call()
    with pytest.raises(BlobStoreError, match="NoSuchBucket"):
        list(store.list())


def test_s3_unreachable_endpoint_is_a_clear_error() -> None:
    import socket

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    store = S3Blobs(BUCKET, endpoint_url=endpoint, **CREDENTIALS)
    with pytest.raises(BlobStoreError, match=rf"check blobs.endpoint_url \({endpoint}\)"):
        store.get("a/b")


def test_s3_repr_has_no_secrets(s3_endpoint: str) -> None:
    store = S3Blobs(
        BUCKET, "p", endpoint_url=s3_endpoint, access_key_id="AK", secret_access_key="SK-secret"
    )
    assert "SK-secret" not in repr(store) and "AK" not in repr(store)
    assert repr(store) == f"S3Blobs('s3://{BUCKET}/p', endpoint_url='{s3_endpoint}')"


# -- configuration -------------------------------------------------------------------------


def test_blobs_from_url(tmp_path: Path, s3_endpoint: str) -> None:
    files = blobs_from_url(None, root=tmp_path)
    assert isinstance(files, FileBlobs) and files.root == tmp_path
    s3 = blobs_from_url(
        f"s3://{BUCKET}/from/url/", root=tmp_path, endpoint_url=s3_endpoint, **CREDENTIALS
    )
    assert isinstance(s3, S3Blobs) and (s3.bucket, s3.prefix) == (BUCKET, "from/url")
    s3.put("objects/ab/x.png", b"x")
    assert s3.get("objects/ab/x.png") == b"x"
    bare = blobs_from_url(f"s3://{BUCKET}", root=tmp_path, endpoint_url=s3_endpoint, **CREDENTIALS)
    assert isinstance(bare, S3Blobs) and bare.prefix == ""
    assert bare.get("from/url/objects/ab/x.png") == b"x"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000/bucket",
        "file:///data",
        "s3://",
        "s3:///prefix",
        "s3://Bad_Bucket/p",
        "s3://ab",
        "s3://bucket/../x",
        "s3://bucket/a//b",
        "s3://user:pass@bucket/p",
        "s3://bucket:9000/p",
        "s3://bucket/p?versionId=1",
        "s3://bucket/p#frag",
        "bucket/prefix",
    ],
)
def test_blobs_from_url_refuses_bad_urls(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"blobs.url must be s3://BUCKET or s3://BUCKET/PREFIX"):
        blobs_from_url(url, root=tmp_path)


def test_blobs_from_url_refuses_inconsistent_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"blobs\.endpoint_url only apply to S3"):
        blobs_from_url(None, root=tmp_path, endpoint_url="http://127.0.0.1:9000")
    with pytest.raises(ValueError, match="go together"):
        blobs_from_url("s3://bucket", root=tmp_path, access_key_id="AK")
    with pytest.raises(ValueError, match=r"blobs\.endpoint_url must be an http"):
        blobs_from_url("s3://bucket", root=tmp_path, endpoint_url="127.0.0.1:9000")


def test_import_does_not_load_boto3(tmp_path: Path) -> None:
    """A single-box server never pays for boto3 (nor torch): only S3Blobs imports it."""
    code = (
        "import sys; from pathlib import Path; import server.store.blobs as b; "
        f"b.blobs_from_url(None, root=Path({str(tmp_path)!r})).put('a/b', b'x'); "
        "loaded = [m for m in ('boto3', 'botocore', 'torch') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a" / "b").read_bytes() == b"x"
