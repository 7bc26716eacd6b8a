"""Wire schemas of the HTTP API (pydantic): the OpenAI Images request (defined with batch rows in
server/request_schema.py, re-exported here) and response shapes plus imagegen's extensions, the
model list, jobs and batches."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The request schema is shared with batch rows: it lives in server/request_schema.py.
from server.request_schema import ImageGenerationRequest as ImageGenerationRequest
from server.request_schema import Text


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str
    seed: int | None


class ImagegenInfo(BaseModel):
    request_id: str
    model: str
    provider: str
    cached: bool
    cost_usd: float
    gpu_seconds: float
    saved_usd: float = 0.0
    timings: dict[str, float]
    dropped_params: list[str]
    notices: list[str] = Field(default_factory=list)


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    imagegen: ImagegenInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    loaded: bool
    available: bool
    kind: str
    description: str = ""
    # An extension: the model this name is a client alias of (GET /v1/models lists aliases).
    alias_of: str | None = None
    # Local models: where the weights are ("device", "host" RAM after an eviction, or only
    # "disk"), on which device, what they take there once loaded, and whether pinned.
    where: Literal["device", "host", "disk"] | None = None
    device: str | None = None
    footprint_bytes: int | None = None
    pinned: bool | None = None
    # How it runs once loaded: "whole" on the device, or too big for its budget, "offloaded"
    # (CUDA: weights in host RAM, each component on the device only while it runs) or
    # "tiled" (a CPU: the VAE decodes in tiles).
    mode: Literal["whole", "offloaded", "tiled"] | None = None


class DeviceCard(BaseModel):
    """One local device's memory (an extension of the model list): its budget for loaded
    models, what they use and what is free of it, and its host-RAM tier."""

    device: str
    budget_bytes: int | None  # None: no budget (nothing evicted)
    used_bytes: int
    free_bytes: int | None
    host_budget_bytes: int
    host_used_bytes: int
    queued_images: int
    failed: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    # An extension: the local devices, once the first local model has been asked for.
    devices: list[DeviceCard] = []


class LoraCard(BaseModel):
    """One adapter of the LoRA library (GET /v1/loras)."""

    id: str  # the name requests give (`loras: [{"name": ...}]`, `<lora:name:weight>`)
    object: Literal["lora"] = "lora"
    # The model family it fits ("sdxl", "flux", "sd15"); None where its header does not say.
    family: str | None
    format: str  # "diffusers" or "kohya"
    sha256: str
    size_bytes: int


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraCard]


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class JobProgress(BaseModel):
    step: int
    total: int


class Job(BaseModel):
    id: str
    # "batch" for a job made by POST /v1/batches (its progress counts rows, not steps).
    object: Literal["image.job", "batch"] = "image.job"
    created: int
    status: JobStatus
    queue_position: int | None = None
    progress: JobProgress | None = None
    # The /v1/images/generations response, once the job has succeeded; for a batch, its
    # BatchCounts (also once it was cancelled or failed part way).
    result: dict[str, Any] | None = None
    # The OpenAI error object ({"message", "type", "param", "code"}) once it failed.
    error: dict[str, Any] | None = None


# -- batches -----------------------------------------------------------------------------------


class BatchOptionsFields(BaseModel):
    """The options of POST /v1/batches: JSON members (strict), or form fields next to an
    upload (validated with strict=False: form values are strings). `model` and `preset` are
    defaults that a row's own fields win over."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = None
    preset: Text | None = None
    concurrency: int = Field(default=4, ge=1, le=64)
    budget_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    dry_run: bool = False


class BatchCreateRequest(BatchOptionsFields):
    """POST /v1/batches with a JSON body. Each request has the fields of POST
    /v1/images/generations; a bad one fails alone (its index is its line number)."""

    requests: list[Any] = Field(min_length=1)


class BatchRowProblem(BaseModel):
    row: int
    # The line of the uploaded file (for an inline list: the 1-based index) the row came from.
    line: int
    message: str
    param: str | None = None


class BatchCounts(BaseModel):
    """Where a batch stands: outcomes by row, and what it has cost (the ledger: failed
    attempts included)."""

    total: int
    done: int = 0
    failed: int = 0
    # Done rows served from the result cache.
    cached: int = 0
    skipped_budget: int = 0
    # Rows without an outcome: not run yet, or never (the batch was cancelled or interrupted).
    pending: int = 0
    images: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0


class Batch(BatchCounts):
    id: str
    object: Literal["batch"] = "batch"
    created: int
    status: JobStatus
    concurrency: int
    budget_usd: float | None = None
    model: str | None = None
    preset: str | None = None
    # Rows refused when the input was read; they are also in the manifest as failed.
    invalid_rows: list[BatchRowProblem] = Field(default_factory=list)
    manifest_url: str
    archive_url: str
    # The OpenAI error object when the batch as a whole failed (a server restart, say).
    error: dict[str, Any] | None = None


class BatchModelProjection(BaseModel):
    provider: str
    model: str
    rows: int
    images: int
    cached_rows: int
    usd: float
    # Rows without a figure (a local model never run here, a hosted one without a price).
    unpriced_rows: int
    basis: str


class BatchDryRun(BaseModel):
    """POST /v1/batches with dry_run: every row checked and priced, nothing run or spent."""

    object: Literal["batch.dry_run"] = "batch.dry_run"
    total: int
    valid: int
    invalid: int
    problems: list[BatchRowProblem]
    models: list[BatchModelProjection]
    cost_by_provider: dict[str, float]
    projected_usd: float
    unpriced_rows: int
