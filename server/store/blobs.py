"""The blob store: whole objects (image bytes, batch files) under short validated keys, in a
local folder (`FileBlobs`) or in any S3-API object storage (`S3Blobs`), chosen by `blobs.url`.

Keys look like `objects/ab/<sha256>.png`. A key whose file stem is the sha256 of the data is
content-addressed: writing it twice is a no-op, and a reader can verify what it got."""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from server.store.files import atomic_write

if TYPE_CHECKING:
    from botocore.exceptions import BotoCoreError, ClientError

__all__ = ["BlobStore", "BlobStoreError", "FileBlobs", "S3Blobs", "blobs_from_url"]

log = logging.getLogger(__name__)

# One segment: starts with a letter or digit (so never `.`, `..` or a `.tmp-` temp file of
# atomic_write), then letters, digits, `.`, `_`, `-`. Keys are segments joined by single `/`.
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}"
_KEY = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
# A list prefix is a key, a key cut anywhere (`objects/a`), or a key and a trailing `/`.
_PREFIX = re.compile(rf"(?:{_SEGMENT}/)*(?:[A-Za-z0-9][A-Za-z0-9._-]{{0,254}})?")
# S3 allows 1024 bytes of key, bucket prefix included.
MAX_KEY_LENGTH = 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
# S3 bucket names (the common rules of AWS, R2, Ceph and friends).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

# A temp file older than this is a killed write's: a live one is renamed within milliseconds,
# so another process writing into the same folder is never this old.
STALE_TEMP_S = 10 * 60
CONNECT_TIMEOUT_S = 5.0
# A whole object is read in one response; 30 s covers a large batch zip on a slow link.
READ_TIMEOUT_S = 30.0
# Including the first try: standard mode backs off between them and retries throttling,
# 5xx and dropped connections, so one hiccup is not an error but an outage is, in seconds.
MAX_ATTEMPTS = 3
# Each gateway thread holds one connection while it reads or writes; botocore's default of 10
# would queue a busy gateway behind the pool.
MAX_POOL_CONNECTIONS = 32


class BlobStoreError(Exception):
    """A blob store failed (permissions, disk, network, credentials). The message names the
    object and what to check; it is for the operator's log, not for a client."""


class BlobStore(Protocol):
    """Whole objects under validated keys (see `check_key`). Every method raises ValueError
    for an invalid key and BlobStoreError when the store itself fails."""

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, atomically: a reader sees the previous object, or none,
        or all of `data`. A content-addressed key that already exists is left as it is."""
        ...

    def put_file(self, key: str, path: Path) -> None:
        """`put` of the file at `path`; nothing to do where the object is that very file (a
        batch folder under the data directory, in a FileBlobs rooted there)."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is none."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the object; removing one that is not there is not an error."""
        ...

    def list(self, prefix: str = "") -> Iterator[tuple[str, float]]:
        """(key, last modified as epoch seconds) of every object whose key starts with
        `prefix`, in no particular order: for removing objects that no row references once
        they are older than a grace period."""
        ...


def check_key(key: str) -> str:
    """`key` if it is a valid blob key, else ValueError: keys are built by the code, never
    taken from a request, but a path is only ever made from a key that passed this."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        raise ValueError(
            f"blob key must be segments of letters, digits, '.', '_' and '-' joined by single "
            f"'/', each starting with a letter or digit (no '..', no leading '/'), at most "
            f"{MAX_KEY_LENGTH} characters, got {_shown(key)}"
        )
    return key


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or len(prefix) > MAX_KEY_LENGTH or not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"blob list prefix must be empty or the start of a valid blob key "
            f"(e.g. 'objects/' or 'objects/ab'), got {_shown(prefix)}"
        )
    return prefix


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


def content_addressed(key: str, data: bytes) -> bool:
    """Whether the key's file stem is the sha256 of `data`: then an existing object under it
    already holds these bytes."""
    stem = key.rsplit("/", 1)[-1].split(".", 1)[0]
    return bool(_SHA256.fullmatch(stem)) and hashlib.sha256(data).hexdigest() == stem


# -- local folder ---------------------------------------------------------------------------


class FileBlobs:
    """Objects as files under `root`, key `a/b/c` at `root/a/b/c`: with `root` the result
    cache's folder, `objects/ab/<sha>.png` is exactly the file layout the cache always had."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._remove_stale_temp_files()

    def _remove_stale_temp_files(self) -> None:
        """A process killed inside atomic_write leaves its temp file, which no key names."""
        cutoff = time.time() - STALE_TEMP_S
        for pattern in (".tmp-*", "*/.tmp-*", "*/*/.tmp-*"):
            for path in self.root.glob(pattern):
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                except OSError:
                    pass  # renamed or removed meanwhile by the process that wrote it

    def __repr__(self) -> str:
        return f"FileBlobs({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        addressed = content_addressed(key, data)
        try:
            # Same size is enough, as in the cache: readers of content-addressed objects
            # verify the hash, and the rewrite is what would cost.
            if addressed and path.is_file() and path.stat().st_size == len(data):
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            # A content-addressed object is verified on read, so a power cut can only turn it
            # into a miss: no fsync. Anything else (a batch manifest) is made durable.
            atomic_write(path, data, durable=not addressed)
        except OSError as exc:
            raise self._failure("write", path, exc) from exc

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        if target.resolve() == path.resolve():
            return
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise self._failure("read", path, exc) from exc
        self.put(key, data)

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._failure("read", path, exc) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except (IsADirectoryError, NotADirectoryError):
            return  # a folder is not an object; there is nothing under this key
        except OSError as exc:
            raise self._failure("delete", path, exc) from exc

    def list(self, prefix: str = "") -> Iterator[tuple[str, float]]:
        check_prefix(prefix)
        # Walk only the deepest folder the prefix names in full; filter the rest by string.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        stack = [(start, folder)]
        while stack:
            here, rel = stack.pop()
            try:
                entries = list(os.scandir(here))
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed meanwhile, or never there
            except OSError as exc:
                raise self._failure("list", here, exc) from exc
            for entry in entries:
                # Dot names are atomic_write's temp files (and never a key segment).
                if entry.name.startswith(".") or not re.fullmatch(_SEGMENT, entry.name):
                    continue
                key = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if key.startswith(prefix) or prefix.startswith(key + "/"):
                            stack.append((Path(entry.path), key))
                    elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                        yield key, entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue  # deleted between listing and stat

    def _failure(self, op: str, path: Path, exc: OSError) -> BlobStoreError:
        return BlobStoreError(
            f"blob store could not {op} {path}: {exc.strerror or exc}; check that {self.root} "
            f"exists, is writable by this user and its disk has space"
        )


# -- S3 API -------------------------------------------------------------------------------


class S3Blobs:
    """Objects in an S3-API bucket under `prefix/`: AWS S3, Cloudflare R2, Ceph RGW, Garage,
    SeaweedFS and others through `endpoint_url` (path-style addressing when one is given).
    Without credentials, boto3's usual chain applies (AWS_* environment, config files, an
    instance or pod role). The client is thread-safe; calls block, so async code runs them
    in a thread."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        # boto3 takes ~0.3 s to import and is only needed here: a single-box server never
        # loads it.
        import boto3
        from botocore.config import Config

        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"S3 bucket name must be 3-63 of a-z, 0-9, '.', '-', got {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self._root = prefix + "/" if prefix else ""
        # Until a store answers that it does not support conditional writes.
        self._conditional_put = True
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
            max_pool_connections=MAX_POOL_CONNECTIONS,
            # Virtual-host style needs DNS per bucket, which self-hosted stores rarely have.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)

    def __repr__(self) -> str:
        # Never the credentials.
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Blobs('s3://{self.bucket}/{self.prefix}'{where})"

    def _full(self, key: str) -> str:
        full = self._root + check_key(key)
        if len(full.encode()) > MAX_KEY_LENGTH:
            raise ValueError(f"blob key with the bucket prefix exceeds {MAX_KEY_LENGTH} bytes")
        return full

    def put_file(self, key: str, path: Path) -> None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BlobStoreError(
                f"blob store could not read {path}: {exc.strerror or exc}"
            ) from exc
        self.put(key, data)

    def put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        kwargs = {
            "Bucket": self.bucket,
            "Key": full,
            "Body": data,
            "ContentType": mimetypes.guess_type(full)[0] or "application/octet-stream",
        }
        try:
            if self._conditional_put and content_addressed(key, data):
                try:
                    self._client.put_object(**kwargs, IfNoneMatch="*")
                    return
                except ClientError as exc:
                    code, status = _error_code(exc)
                    if status == 412 or code == "PreconditionFailed":
                        return  # already there, and by its name it holds these bytes
                    if status == 501 or code == "NotImplemented":
                        log.info("%r does not support conditional writes; using plain PUTs", self)
                        self._conditional_put = False
                    elif status != 409:  # 409: a concurrent conditional write; same bytes
                        raise
            self._client.put_object(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._failure("PUT", full, exc) from exc

    def get(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            return bytes(response["Body"].read())
        except ClientError as exc:
            if _error_code(exc)[0] == "NoSuchKey":
                return None
            raise self._failure("GET", full, exc) from exc
        except BotoCoreError as exc:
            raise self._failure("GET", full, exc) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=full)
            return True
        except ClientError as exc:
            # HEAD has no body, so only the status says "no such key" (a missing bucket looks
            # the same here; get and put name it).
            if _error_code(exc)[1] == 404:
                return False
            raise self._failure("HEAD", full, exc) from exc
        except BotoCoreError as exc:
            raise self._failure("HEAD", full, exc) from exc

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            if _error_code(exc)[0] == "NoSuchKey":  # AWS says 204; some stores say 404
                return
            raise self._failure("DELETE", full, exc) from exc
        except BotoCoreError as exc:
            raise self._failure("DELETE", full, exc) from exc

    def list(self, prefix: str = "") -> Iterator[tuple[str, float]]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._root + check_prefix(prefix)
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        )
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"][len(self._root) :]
                    # Something else wrote it: not a key this store could read or delete.
                    if _KEY.fullmatch(key):
                        yield key, item["LastModified"].timestamp()
        except (ClientError, BotoCoreError) as exc:
            raise self._failure("LIST", full, exc) from exc

    def _failure(self, op: str, full_key: str, exc: ClientError | BotoCoreError) -> BlobStoreError:
        from botocore.exceptions import ClientError

        where = f"s3://{self.bucket}/{full_key}"
        endpoint = self.endpoint_url or "AWS S3"
        if isinstance(exc, ClientError):
            code, status = _error_code(exc)
            hint = (
                _HINTS.get(code)
                or _HINTS.get(str(status))
                or (f"check blobs.url, blobs.endpoint_url ({endpoint}) and the store's logs")
            )
            what = f"{code or 'error'} (HTTP {status})"
        else:
            hint = (
                "set blobs.access_key_id and blobs.secret_access_key, or AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, or give the machine a role"
                if "Credential" in type(exc).__name__
                else f"check blobs.endpoint_url ({endpoint}) and that the store is reachable"
            )
            what = type(exc).__name__
        return BlobStoreError(f"S3 {op} {where} failed: {what}: {exc}; {hint}")


def _error_code(exc: ClientError) -> tuple[str, int]:
    response = exc.response
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return code, status


_HINTS = {
    "NoSuchBucket": "create the bucket, or fix the bucket name in blobs.url",
    "AccessDenied": (
        "check the credentials' permissions on the bucket (s3:GetObject, s3:PutObject, "
        "s3:DeleteObject, s3:ListBucket; without ListBucket a missing key reads as 403)"
    ),
    "403": "check blobs.access_key_id / blobs.secret_access_key and their permissions",
    "InvalidAccessKeyId": "check blobs.access_key_id (or AWS_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "check blobs.secret_access_key (or AWS_SECRET_ACCESS_KEY)",
    "AuthorizationHeaderMalformed": "check blobs.region: it must be the bucket's region",
    "PermanentRedirect": "check blobs.region: the bucket is in another region",
    "301": "check blobs.region: the bucket is in another region",
}


# -- configuration ----------------------------------------------------------------------------


def blobs_from_url(
    url: str | None,
    *,
    root: Path,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> BlobStore:
    """The store `blobs.url` names: unset for files under `root`, `s3://BUCKET[/PREFIX]` for
    S3. The other arguments are the `blobs.*` settings that only S3 uses."""
    if not url:
        given = {
            "blobs.endpoint_url": endpoint_url,
            "blobs.region": region,
            "blobs.access_key_id": access_key_id,
            "blobs.secret_access_key": secret_access_key,
        }
        stray = [name for name, value in given.items() if value]
        if stray:
            raise ValueError(
                f"{', '.join(stray)} only apply to S3, but blobs.url is not set: set "
                f"blobs.url = 's3://BUCKET/PREFIX', or remove them to keep files in {root}"
            )
        return FileBlobs(root)
    usage = (
        "blobs.url must be s3://BUCKET or s3://BUCKET/PREFIX (a bucket name of 3-63 a-z, "
        "0-9, '.', '-'; a prefix of letters, digits, '.', '_', '-' and '/'), or unset to keep "
        f"objects in {root}"
    )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"{usage}; got {url!r}") from None
    bucket = parts.hostname or ""
    prefix = parts.path.strip("/")
    if (
        parts.scheme != "s3"
        or parts.netloc != bucket
        or port is not None
        or parts.query
        or parts.fragment
        or not _BUCKET.fullmatch(bucket)
        or (prefix and (len(prefix) > MAX_KEY_LENGTH // 2 or not _KEY.fullmatch(prefix)))
    ):
        hint = (
            "; the store's address goes in blobs.endpoint_url, not in blobs.url"
            if parts.scheme in ("http", "https")
            else ""
        )
        raise ValueError(f"{usage}; got {url!r}{hint}")
    if bool(access_key_id) != bool(secret_access_key):
        raise ValueError(
            "blobs.access_key_id and blobs.secret_access_key go together: set both, or "
            "neither to use the AWS environment or the machine's role"
        )
    if endpoint_url:
        target = urlsplit(endpoint_url)
        if target.scheme not in ("http", "https") or not target.netloc:
            raise ValueError(
                f"blobs.endpoint_url must be an http:// or https:// address, got {endpoint_url!r}"
            )
    return S3Blobs(
        bucket,
        prefix,
        endpoint_url=endpoint_url or None,
        region=region or None,
        access_key_id=access_key_id or None,
        secret_access_key=secret_access_key or None,
    )
