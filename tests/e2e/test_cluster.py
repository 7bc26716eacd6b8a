"""Single flight across processes: real `imagegen serve` processes on loopback sharing one real
PostgreSQL and one S3 bucket (moto), sent identical seeded requests at the same moment. Each
key is generated once (counted by each process's own device metrics), billed once (a unique
claim id in the shared ledger), and every other request is a cache hit with the same image,
whichever process it reached; a process killed while it owns a claim hands the key over when
its lease runs out, and is never billed."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import Replica, replicas, store_env

# Device work per request (a fraction of a second on one thread): long enough that identical
# requests sent with jitter overlap it.
STEPS = 4
# A short lease so that the SIGKILL test's waiters take over soon (heartbeats every third).
LEASE_S = 3.0
DEADLINE_S = 120.0
API_KEY = "sk-cluster"
# Daily image quotas of their own for the quota tests (one key each: the ledger is shared).
CAPPED = 6
KEYS = [
    API_KEY,
    {"key": "sk-cap-turns", "name": "cap-turns", "images_per_day": CAPPED},
    {"key": "sk-cap-race", "name": "cap-race", "images_per_day": CAPPED},
]


def _body(seed: int, prompt: str = "a lighthouse at dusk") -> dict[str, Any]:
    return {"prompt": prompt, "size": "64x64", "steps": STEPS, "seed": seed}


def _digest(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def store_url(module_postgres_url: str) -> str:
    return module_postgres_url


@pytest.fixture(scope="module")
def cluster(
    store_url: str,
    s3_endpoint: str,
    tiny_models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[Replica]]:
    env = store_env(store_url, s3_endpoint, f"cluster-{os.urandom(4).hex()}")
    env["IMAGEGEN_STORE__CLAIM_LEASE_S"] = str(LEASE_S)
    env["IMAGEGEN_SERVER__API_KEYS"] = json.dumps(KEYS)
    root = tmp_path_factory.mktemp("cluster")
    with replicas(6, root, tiny_models_dir, env, api_key=API_KEY) as running:
        yield running


def _ledger(store_url: str, seed: int) -> list[dict[str, Any]]:
    """The shared ledger's rows for requests with `seed` (each test's keys have their own)."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(store_url, row_factory=dict_row) as conn:
        return list(conn.execute("SELECT * FROM ledger WHERE seeds = %s", (f"[{seed}]",)))


def _generated(cluster: list[Replica]) -> float:
    return sum(replica.generated_images() for replica in cluster)


def _send(
    cluster: list[Replica], bodies: list[tuple[int, dict[str, Any]]], jitter_s: float
) -> list[httpx.Response]:
    """Each (replica index, body) at about the same moment, each after its own random delay."""

    def post(item: tuple[int, dict[str, Any]]) -> httpx.Response:
        index, body = item
        time.sleep(random.uniform(0, jitter_s))
        with cluster[index].client() as client:
            return client.post("/v1/images/generations", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies, timeout=DEADLINE_S))


def test_32_identical_requests_over_3_processes_generate_and_bill_once(
    cluster: list[Replica], store_url: str
) -> None:
    three = cluster[:3]
    for round_ in range(10):
        seed = 1000 + round_
        before = _generated(three)
        responses = _send(three, [(i % 3, _body(seed)) for i in range(32)], jitter_s=0.05)
        assert len({_digest(r) for r in responses}) == 1, round_
        assert _generated(three) - before == 1, round_  # one image reached a device
        rows = _ledger(store_url, seed)
        billed = [r for r in rows if not r["cached"]]
        hits = [r for r in rows if r["cached"]]
        assert len(billed) == 1 and billed[0]["claim"] is not None, (round_, rows)
        assert len(hits) == 31, round_
        assert all(r["cost_usd"] == 0 and r["saved_usd"] == billed[0]["cost_usd"] for r in hits)


def test_a_storm_over_6_processes_bills_each_key_once(
    cluster: list[Replica], store_url: str
) -> None:
    """6 processes x 60 requests over 20 keys: 20 generations, 20 billed rows."""
    seeds = [2000 + k for k in range(20)]
    before = _generated(cluster)
    work = [
        (p, _body(seeds[(p * 60 + i) % 20], "a storm at sea")) for p in range(6) for i in range(60)
    ]
    random.shuffle(work)
    digests: dict[int, set[str]] = {}
    # 360 at once would be 360 threads: 48 in flight at a time keeps every key contended.
    with ThreadPoolExecutor(48) as pool:

        def post(item: tuple[int, dict[str, Any]]) -> tuple[int, httpx.Response]:
            index, body = item
            with cluster[index].client() as client:
                return body["seed"], client.post("/v1/images/generations", json=body)

        for seed, response in pool.map(post, work, timeout=DEADLINE_S * 3):
            digests.setdefault(seed, set()).add(_digest(response))
    assert all(len(found) == 1 for found in digests.values())
    assert _generated(cluster) - before == 20
    billed = [r for seed in seeds for r in _ledger(store_url, seed) if not r["cached"]]
    assert len(billed) == 20
    assert len({r["claim"] for r in billed}) == 20


def test_a_daily_quota_holds_across_processes(cluster: list[Replica], store_url: str) -> None:
    """Requests taking turns over three processes: the key's 6 images a day are 6 in all,
    not 6 on each (each process reads the shared ledger), and then every process refuses."""
    codes = []
    for i in range(CAPPED + 3):
        with cluster[i % 3].client("sk-cap-turns") as client:
            body = {**_body(4000 + i, "turns"), "steps": 1}
            response = client.post("/v1/images/generations", json=body)
        codes.append(response.status_code)
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "quota_images"
    assert codes == [200] * CAPPED + [429] * 3


def test_racing_requests_pass_a_daily_quota_by_at_most_the_documented_bound(
    cluster: list[Replica], store_url: str
) -> None:
    """18 requests of a 6-a-day key at once over three processes. Each process counts the
    shared ledger and its own running work, not the other processes' running work: racing
    requests can pass the quota by what the others were running, at most the quota on each
    other process (README, "More than one process"). Once the work is booked the cap holds
    everywhere."""
    three = cluster[:3]

    def post(i: int) -> int:
        with three[i % 3].client("sk-cap-race") as client:
            body = {**_body(5000 + i, "a race"), "steps": 1}
            return client.post("/v1/images/generations", json=body).status_code

    with ThreadPoolExecutor(18) as pool:
        codes = list(pool.map(post, range(18), timeout=DEADLINE_S))
    served = codes.count(200)
    assert codes.count(200) + codes.count(429) == 18
    assert CAPPED <= served <= CAPPED * len(three), codes
    for replica in three:
        assert post_status(replica, "sk-cap-race", _body(5999, "after the race")) == 429
    print(f"quota race: {served} served against a quota of {CAPPED} over {len(three)} processes")


def post_status(replica: Replica, key: str, body: dict[str, Any]) -> int:
    with replica.client(key) as client:
        return client.post("/v1/images/generations", json=body).status_code


def test_a_batch_run_on_one_process_is_served_by_another(cluster: list[Replica]) -> None:
    """The batch's folder is published to the shared bucket as it runs: another process
    serves its counts, manifest, every file (the very bytes) and the archive."""
    runner, reader = cluster[0], cluster[1]
    rows = [
        {"prompt": "a pier at night", "seed": 6000 + i, "size": "64x64", "steps": 2}
        for i in range(3)
    ]
    with runner.client() as client:
        created = client.post("/v1/batches", json={"requests": rows})
        assert created.status_code == 202, created.text
        batch_id = created.json()["id"]
    with reader.client() as client:
        deadline = time.monotonic() + DEADLINE_S
        while (batch := client.get(f"/v1/batches/{batch_id}").json())["status"] != "succeeded":
            assert batch["status"] in ("queued", "running"), batch
            assert time.monotonic() < deadline, batch
            time.sleep(0.1)
        assert (batch["done"], batch["images"]) == (3, 3)
        lines = [
            json.loads(x) for x in client.get(f"/v1/batches/{batch_id}/manifest").text.splitlines()
        ]
        assert [line["seeds"] for line in lines] == [[6000], [6001], [6002]]
        for line in lines:
            image = client.get(line["urls"][0].replace(runner.url, reader.url))
            assert image.status_code == 200, image.text
            assert hashlib.sha256(image.content).hexdigest() == line["sha256"][0]
        archive = client.get(f"/v1/batches/{batch_id}/archive")
        assert archive.status_code == 200
        with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
            names = sorted(zipped.namelist())
            assert names == sorted(["manifest.jsonl", *(line["images"][0] for line in lines)])
            for line in lines:
                digest = hashlib.sha256(zipped.read(line["images"][0])).hexdigest()
                assert digest == line["sha256"][0]


def test_killing_the_owner_mid_generation_hands_the_key_over(
    cluster: list[Replica], store_url: str
) -> None:
    """The owner is SIGKILLed while it generates; its waiters on other processes take the key
    over once its lease runs out, and the key is billed once, by the one that finished."""
    import psycopg

    owner, waiters = cluster[-1], cluster[-3:-1]
    # Long enough to be killed mid-way (the waiters are let in first), short enough to rerun.
    slow = {**_body(3000, "a slow fog"), "steps": 60}
    with ThreadPoolExecutor(3) as pool:
        owned = pool.submit(lambda: owner.client().post("/v1/images/generations", json=slow))
        deadline = time.monotonic() + DEADLINE_S
        pid = f":{owner.proc.pid}:"
        with psycopg.connect(store_url) as conn:
            while not conn.execute(
                "SELECT 1 FROM claims WHERE owner LIKE %s AND expires > 0", (f"%{pid}%",)
            ).fetchall():
                assert time.monotonic() < deadline, "the owner never claimed the key"
                time.sleep(0.05)
        waiting = [
            pool.submit(lambda r=r: r.client().post("/v1/images/generations", json=slow))
            for r in waiters
        ]
        time.sleep(0.5)  # the waiters are waiting on the claim (each sees it held)
        assert not any(w.done() for w in waiting)
        owner.kill()
        with pytest.raises(httpx.TransportError):
            owned.result(timeout=DEADLINE_S)
        responses = [w.result(timeout=LEASE_S + DEADLINE_S) for w in waiting]
    assert len({_digest(r) for r in responses}) == 1
    rows = _ledger(store_url, 3000)
    assert len([r for r in rows if not r["cached"]]) == 1
    assert len([r for r in rows if r["cached"]]) == 1
