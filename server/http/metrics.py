"""Prometheus metrics on a registry of the app's own (several apps may share a process in
tests); implements the device worker's observer hooks (queue depth, batches)."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from server.service import GenerationResult

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """Everything /metrics shows. Worker hooks run on the worker thread; prometheus_client's
    metrics are thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "imagegen_requests",
            "Generation requests by endpoint, model and HTTP status.",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.images = Counter(
            "imagegen_images", "Images returned, by model.", ["model"], registry=r
        )
        self._depth = Gauge(
            "imagegen_queue_depth_images",
            "Images waiting in each device's queue.",
            ["device"],
            registry=r,
        )
        self.batch_size = Histogram(
            "imagegen_batch_size_images",
            "Images per pipeline call.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.pipeline_calls = Counter(
            "imagegen_pipeline_calls",
            "Pipeline calls (micro-batches) run on the device.",
            ["model"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "imagegen_queue_wait_seconds",
            "Time a request waited in the device queue.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generation = Histogram(
            "imagegen_generation_seconds",
            "Time to serve a generation request (cache hits included), by model and cache.",
            ["model", "cache"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.device_seconds = Counter(
            "imagegen_gpu_seconds",
            "Device seconds spent in pipeline calls.",
            ["model"],
            registry=r,
        )
        self.cost = Counter(
            "imagegen_cost_usd",
            "USD booked for served requests.",
            ["model", "provider"],
            registry=r,
        )
        self.cache_hits = Counter(
            "imagegen_cache_hits",
            "Requests served from the result cache.",
            ["model"],
            registry=r,
        )
        self.cache_misses = Counter(
            "imagegen_cache_misses", "Requests that ran a backend.", ["model"], registry=r
        )
        self.ready = Gauge("imagegen_ready", "1 once the named models are loaded.", registry=r)
        self.device_memory = Gauge(
            "imagegen_device_memory_bytes",
            "Each device's budget for loaded models, what they use and what is free of it, "
            "and its host-RAM tier (kind: budget, used, free, host_budget, host_used).",
            ["device", "kind"],
            registry=r,
        )
        self.model_memory = Gauge(
            "imagegen_model_memory_bytes",
            "What each loaded local model takes, by where it is (device or host RAM).",
            ["model", "device", "where"],
            registry=r,
        )

    # -- models.local.worker.WorkerObserver ----------------------------------------------

    def batch_done(
        self, model: str, images: int, device_seconds: float, queue_waits: list[float]
    ) -> None:
        self.pipeline_calls.labels(model).inc()
        self.batch_size.labels(model).observe(images)
        self.device_seconds.labels(model).inc(device_seconds)
        for wait in queue_waits:
            self.queue_wait.labels(model).observe(wait)

    def queue_depth(self, device: str, images: int) -> None:
        self._depth.labels(device).set(images)

    # -- the HTTP layer ------------------------------------------------------------------

    def served(self, endpoint: str, result: GenerationResult, seconds: float) -> None:
        model = result.model
        self.requests.labels(endpoint, model, "200").inc()
        self.images.labels(model).inc(len(result.images))
        self.generation.labels(model, "hit" if result.cached else "miss").observe(seconds)
        self.cost.labels(model, result.provider).inc(result.cost_usd)
        if result.cached:
            self.cache_hits.labels(model).inc()
        else:
            self.cache_misses.labels(model).inc()

    def failed(self, endpoint: str, model: str, status: int) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()

    def residency(self, devices: list[dict[str, Any]], models: list[dict[str, Any]]) -> None:
        """Set the memory gauges from the registry's view (asked when /metrics is read)."""
        for row in devices:
            for kind in ("budget", "used", "free", "host_budget", "host_used"):
                value = row.get(f"{kind}_bytes")
                if value is not None:
                    self.device_memory.labels(row["device"], kind).set(value)
        # Models move between places: only where each is now is a sample.
        self.model_memory.clear()
        for row in models:
            if row.get("where") in ("device", "host") and row.get("footprint_bytes"):
                self.model_memory.labels(row["name"], row["device"], row["where"]).set(
                    row["footprint_bytes"]
                )

    def render(self) -> bytes:
        return generate_latest(self.registry)
