"""Soak and overload benchmark for a local `imagegen serve` on tiny-sdxl; prints ONE JSON object.

    python scripts/soak.py                            # 5x measured capacity for 120 s
    python scripts/soak.py --multiple 3 --duration 600
    python scripts/soak.py --tiny                     # a few seconds: the test's dry run

Phases, against one fresh server process (scripts/bench.py's LocalServer: its own data dir,
HF_HUB_OFFLINE=1, no IMAGEGEN_* from this environment):

1. Capacity: a closed loop of --clients keep-alive clients for --capacity-s seconds; the
   images/s they get is the capacity.
2. Load: open-loop arrivals at --multiple x capacity for --duration seconds, each request on
   its own thread and connection with a --timeout-s client timeout, whatever the server does
   with the earlier ones (a closed loop would slow down with the server and never overload it).
   Meanwhile /livez is timed every 100 ms on a connection of its own, and the server's RSS is
   read from /proc every second.

Every request has a seed of its own (so none is a cache hit; any hit is counted apart) and asks
for b64_json. Counted: 200, 429 (each must carry an integer Retry-After >= 1), other 4xx, 5xx,
client timeouts, lost (a connection error, or the connection closed without an answer), and
how many 200s decode as a PNG of the asked size. Latencies: p50/p99 of the 200s, p99 of the
429s, p50/p99/max of /livez. RSS growth is the server's RSS after the last answer of the load
phase minus its RSS when the load began (after the capacity phase: warm).

Must hold (the `holds` object): no 5xx, none lost, every 200 a valid PNG, /livez p99 < 100 ms,
RSS growth < 50 MB. As with bench.py, the exit status is 0 whether they hold or not; it is
non-zero only when the benchmark itself could not run.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from urllib.parse import urlsplit

from bench import MODEL, LocalServer, Session, _body, _r
from PIL import Image

LIVEZ_EVERY_S = 0.1
RSS_EVERY_S = 1.0
LIMITS = {"livez_p99_ms": 100.0, "rss_growth_mb": 50.0}
SAMPLES = 5  # error bodies and exceptions kept per kind, to say what went wrong


@dataclass
class Outcome:
    """One request of the load phase: `kind` is 'status' (an HTTP answer), 'timeout' or
    'lost'."""

    kind: str
    latency_s: float
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""


class Workload:
    """The request every phase sends: bench.py's body at this run's size and steps, with a seed
    of its own each time."""

    def __init__(self, size: str, steps: int) -> None:
        self.size, self.steps = size, steps
        self.width, self.height = (int(side) for side in size.split("x"))
        self._seed = secrets.randbelow(2**30) + 1_000_000
        self._lock = threading.Lock()

    def body(self) -> dict[str, Any]:
        with self._lock:
            self._seed += 1
            seed = self._seed
        return {**_body(seed), "size": self.size, "steps": self.steps}


# -- the phases ------------------------------------------------------------------------------


def capacity(url: str, work: Workload, clients: int, seconds: float) -> tuple[float, int]:
    """Images/s of `clients` closed-loop keep-alive clients for `seconds`; (rate, images)."""
    done: list[int] = []
    failures: list[str] = []
    barrier = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def run() -> None:
        count = 0
        try:
            with Session(url, {}) as conn:
                barrier.wait()
                while time.perf_counter() < stop_at[0]:
                    status, _, data = conn.post("/v1/images/generations", work.body())
                    if status != 200:
                        failures.append(f"{status} {data[:300].decode(errors='replace')}")
                        return
                    count += 1
        except Exception as exc:  # reported below, after every client has finished
            failures.append(repr(exc))
        finally:
            done.append(count)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    stop_at.append(time.perf_counter() + seconds)
    started = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"soak: the capacity phase failed: {failures[0]}")
    images = sum(done)
    if images == 0:
        raise SystemExit(f"soak: no image came back in {seconds} s; raise --capacity-s")
    return images / elapsed, images


def warm_up(url: str, work: Workload, count: int) -> None:
    """A few sequential requests first: the connection, the allocator, the first batch."""
    with Session(url, {}) as conn:
        for _ in range(count):
            status, _, data = conn.post("/v1/images/generations", work.body())
            if status != 200:
                detail = data[:300].decode(errors="replace")
                raise SystemExit(f"soak: the warm-up failed: {status} {detail}")


def one_request(url: str, work: Workload, timeout_s: float, into: list[Outcome]) -> None:
    """One open-loop request on a connection of its own; its outcome goes to `into`."""
    started = time.perf_counter()
    try:
        with Session(url, {}) as conn:
            conn.conn.timeout = timeout_s  # read by connect(): every socket operation's limit
            status, headers, data = conn.post("/v1/images/generations", work.body())
        into.append(Outcome("status", time.perf_counter() - started, status, headers, data))
    except TimeoutError as exc:  # socket.timeout is TimeoutError
        into.append(Outcome("timeout", time.perf_counter() - started, error=repr(exc)))
    except (OSError, http.client.HTTPException) as exc:
        # Refused, reset, or closed before an answer (RemoteDisconnected): the request is lost.
        into.append(Outcome("lost", time.perf_counter() - started, error=repr(exc)))


class Sampler:
    """A thread that samples something until stopped (`_run` waits on `_stop`)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError


class Livez(Sampler):
    """/livez timed every LIVEZ_EVERY_S on one keep-alive connection, until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__()
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port
        self.latencies_ms: list[float] = []
        self.failures: list[str] = []

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        while not self._stop.wait(LIVEZ_EVERY_S):
            started = time.perf_counter()
            try:
                conn.request("GET", "/livez")
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    self.failures.append(f"status {response.status}")
                    continue
                self.latencies_ms.append((time.perf_counter() - started) * 1000)
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()  # the next request reconnects
        conn.close()


class Rss(Sampler):
    """The server's resident set, read from /proc every RSS_EVERY_S while running."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.status = Path(f"/proc/{pid}/status")
        self.peak_mb = 0.0

    def read_mb(self) -> float:
        for line in self.status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                mb = int(line.split()[1]) / 1024  # kB
                self.peak_mb = max(self.peak_mb, mb)
                return mb
        raise SystemExit(f"soak: no VmRSS in {self.status} (this needs Linux's /proc)")

    def _run(self) -> None:
        while not self._stop.wait(RSS_EVERY_S):
            try:
                self.read_mb()
            except (OSError, SystemExit):
                return  # the server is gone; the counts will say so


def load(
    url: str, work: Workload, rate: float, seconds: float, timeout_s: float
) -> tuple[list[Outcome], dict[str, Any]]:
    """Open-loop arrivals at `rate`/s for `seconds`, then every answer waited for; (outcomes,
    the dispatcher's figures)."""
    outcomes: list[Outcome] = []
    threads: list[threading.Thread] = []
    worst_lag = 0.0
    started = time.perf_counter()
    while True:
        due = started + len(threads) / rate
        if due >= started + seconds:
            break
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        else:
            worst_lag = max(worst_lag, now - due)
        thread = threading.Thread(
            target=one_request, args=(url, work, timeout_s, outcomes), daemon=True
        )
        thread.start()
        threads.append(thread)
    sent_for = time.perf_counter() - started
    # Every request ends by its own socket timeout; the margin is for a thread still starting.
    deadline = time.monotonic() + timeout_s + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    unfinished = sum(thread.is_alive() for thread in threads)
    return list(outcomes), {
        "sent": len(threads),
        "sent_per_s": _r(len(threads) / sent_for),
        "worst_dispatch_lag_ms": _r(worst_lag * 1000),
        "unfinished": unfinished,
        "drained_after_s": _r(time.perf_counter() - started),
    }


# -- the figures -----------------------------------------------------------------------------


def valid_png(data: bytes, width: int, height: int) -> bool:
    """Whether a 200's body carries one PNG of the asked size."""
    try:
        images = json.loads(data)["data"]
        if len(images) != 1:
            return False
        with Image.open(io.BytesIO(base64.b64decode(images[0]["b64_json"]))) as image:
            if image.format != "PNG" or image.size != (width, height):
                return False
            image.load()  # decodes every pixel: a truncated or corrupt stream raises
        return True
    except (ValueError, KeyError, TypeError, OSError):
        return False


def retry_after_ok(headers: dict[str, str]) -> bool:
    value = headers.get("retry-after", "")
    return value.isascii() and value.isdigit() and int(value) >= 1


def tally(outcomes: list[Outcome], work: Workload) -> dict[str, Any]:
    ok = [o for o in outcomes if o.kind == "status" and o.status == 200]
    refused = [o for o in outcomes if o.kind == "status" and o.status == 429]
    client_errors = [o for o in outcomes if o.kind == "status" and 400 <= o.status < 500]
    server_errors = [o for o in outcomes if o.kind == "status" and o.status >= 500]
    timeouts = [o for o in outcomes if o.kind == "timeout"]
    lost = [o for o in outcomes if o.kind == "lost"]
    other = [o for o in outcomes if o.kind == "status" and not 200 <= o.status < 600]
    statuses: dict[str, int] = {}
    for o in outcomes:
        if o.kind == "status":
            statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    return {
        "requests": len(outcomes),
        "ok_200": len(ok),
        "refused_429": len(refused),
        "other_4xx": len(client_errors) - len(refused),
        "server_5xx": len(server_errors),
        "timeouts": len(timeouts),
        "lost": len(lost),
        "other_status": len(other),
        "statuses": dict(sorted(statuses.items())),
        "valid_png": sum(valid_png(o.body, work.width, work.height) for o in ok),
        "cache_hits": sum(o.headers.get("x-imagegen-cache") == "hit" for o in ok),
        "retry_after_invalid": sum(not retry_after_ok(o.headers) for o in refused),
        "ok_latency_ms": _spread([o.latency_s * 1000 for o in ok]),
        "refused_latency_ms": _spread([o.latency_s * 1000 for o in refused]),
        "samples": {
            "server_5xx": [_sample(o) for o in server_errors[:SAMPLES]],
            "other_4xx": [_sample(o) for o in client_errors if o.status != 429][:SAMPLES],
            "timeouts": [o.error for o in timeouts[:SAMPLES]],
            "lost": [o.error for o in lost[:SAMPLES]],
        },
    }


def _sample(outcome: Outcome) -> str:
    return f"{outcome.status} {outcome.body[:300].decode(errors='replace')}"


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest rank, as bench.py's cache-hit figure."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _spread(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": _r(_percentile(values, 0.5)),
        "p99": _r(_percentile(values, 0.99)),
        "max": _r(max(values) if values else None),
    }


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--multiple", type=float, default=5.0, help="offered load / capacity")
    parser.add_argument("--duration", type=float, default=120.0, help="load phase, seconds")
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT of every request")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of every request")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="client timeout, each")
    parser.add_argument("--clients", type=int, default=8, help="capacity phase's clients")
    parser.add_argument("--capacity-s", type=float, default=15.0, help="capacity phase, seconds")
    parser.add_argument(
        "--tiny", action="store_true", help="a dry run of a few seconds (5 s of load)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.duration = min(args.duration, 5.0)
        args.capacity_s = min(args.capacity_s, 3.0)
    if args.multiple <= 0 or args.duration <= 0 or args.timeout_s <= 0:
        raise SystemExit("soak: --multiple, --duration and --timeout-s must be above 0")
    try:
        work = Workload(args.size, args.steps)
    except ValueError:
        raise SystemExit(f"soak: --size must be WIDTHxHEIGHT, got {args.size!r}") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    started = time.perf_counter()
    with TemporaryDirectory(prefix="imagegen-soak-") as scratch:
        server = LocalServer(Path(scratch) / "data", {})
        try:
            server.wait_ready()
            warm_up(server.url, work, 3)
            rate, capacity_images = capacity(server.url, work, args.clients, args.capacity_s)
            rss = Rss(server.proc.pid)
            livez = Livez(server.url)
            rss_start = rss.read_mb()
            rss.start()
            livez.start()
            outcomes, dispatch = load(
                server.url, work, rate * args.multiple, args.duration, args.timeout_s
            )
            livez.stop()
            rss.stop()
            alive = server.proc.poll() is None
            rss_end = rss.read_mb() if alive else None
        finally:
            server.stop()
    counts = tally(outcomes, work)
    livez_ms = _spread(livez.latencies_ms)
    growth = None if rss_end is None else rss_end - rss_start
    holds = {
        "no_5xx": counts["server_5xx"] == 0,
        "none_lost": counts["lost"] == 0,
        "every_200_valid_png": counts["ok_200"] > 0 and counts["valid_png"] == counts["ok_200"],
        "livez_p99_under_100ms": livez_ms["p99"] is not None
        and livez_ms["p99"] < LIMITS["livez_p99_ms"]
        and not livez.failures,
        "rss_growth_under_50mb": growth is not None and growth < LIMITS["rss_growth_mb"],
    }
    result: dict[str, Any] = {
        "workload": {
            "model": MODEL,
            "size": work.size,
            "steps": work.steps,
            "response_format": "b64_json",
            "seeds": "one per request (never a cache hit)",
        },
        "capacity": {
            "images_per_s": _r(rate),
            "clients": args.clients,
            "seconds": args.capacity_s,
            "images": capacity_images,
        },
        "multiple": args.multiple,
        "offered_per_s": _r(rate * args.multiple),
        "duration_s": args.duration,
        "timeout_s": args.timeout_s,
        **dispatch,
        # Over the whole phase, to the last answer: admitted requests still run after the
        # last arrival.
        "served_images_per_s": _r(counts["ok_200"] / dispatch["drained_after_s"]),
        **counts,
        "livez": {
            "samples": len(livez.latencies_ms),
            "failures": len(livez.failures),
            "failure_samples": livez.failures[:SAMPLES],
            "ms": livez_ms,
        },
        "rss_mb": {
            "start": _r(rss_start),
            "end": _r(rss_end),
            "peak": _r(rss.peak_mb),
            "growth": _r(growth),
        },
        "server_alive_after_load": alive,
        "server_exit_code": server.proc.returncode,
        "limits": LIMITS,
        "holds": {**holds, "all": all(holds.values())},
        "elapsed_s": _r(time.perf_counter() - started),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
