"""A real S3-speaking server for tests: moto in server mode on a free loopback port, with one
bucket; tests keep apart by prefix."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

BUCKET = "imagegen-test"
CREDENTIALS = {"region": "us-east-1", "access_key_id": "testing", "secret_access_key": "testing"}


@contextmanager
def running_s3() -> Iterator[str]:
    """The endpoint URL of a running moto server whose bucket BUCKET exists."""
    from moto.server import ThreadedMotoServer

    from server.store.blobs import S3Blobs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        S3Blobs(BUCKET, endpoint_url=endpoint, **CREDENTIALS)._client.create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()
