"""Wire schemas of the HTTP API (pydantic): the OpenAI Images request and response shapes plus
imagegen's extensions, the model list, jobs, batches, and the mapping onto the service's
ImageRequest."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server import errors
from server.service import MAX_N, ImageRequest

# The OpenAI fields a local diffusion model has nothing to map onto; when set they are
# accepted and reported back in `imagegen.dropped_params` (the backend decides which).
OPENAI_ONLY_FIELDS = ("quality", "style", "background", "moderation", "user")


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations and POST /v1/jobs. Unknown fields are refused by name, so
    a typo (`negative` for `negative_prompt`) fails instead of being silently ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    size: str | None = None
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    # b64_json by default: the image comes back in the response, no second request needed.
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    user: str | None = None
    # OpenAI streams partial images; this server reports progress through the jobs API.
    stream: bool | None = None
    # imagegen extensions (send them through the OpenAI SDK's `extra_body`).
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    preset: str | None = None

    def to_image_request(self, *, request_id: str | None = None) -> ImageRequest:
        """The service's request: sizes parsed, OpenAI spellings mapped, once, here."""
        if self.stream:
            raise errors.InvalidRequestError(
                "stream is not supported by /v1/images/generations; create a job with "
                "POST /v1/jobs and follow GET /v1/jobs/{id}/events for progress",
                param="stream",
            )
        width, height = parse_size(self.size)
        output_format = self.output_format or "png"
        return ImageRequest(
            prompt=self.prompt,
            model=self.model,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            n=self.n if self.n is not None else 1,
            seed=self.seed,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            quality=self.quality,
            style=self.style,
            preset=self.preset,
            output_format=output_format,
            background=self.background,
            moderation=self.moderation,
            # PNG is lossless: a compression level would only split the cache and the batch.
            output_compression=None if output_format == "png" else self.output_compression,
            user=self.user,
            request_id=request_id,
        )

    def edge_dropped_params(self) -> tuple[str, ...]:
        """Fields dropped here rather than by the service or the backend."""
        if self.output_compression is not None and (self.output_format or "png") == "png":
            return ("output_compression",)
        return ()


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """ "WIDTHxHEIGHT" or "auto" (the model's default size)."""
    if size is None or size == "auto":
        return None, None
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 5 for p in parts):
        raise errors.InvalidRequestError(
            f"size must be WIDTHxHEIGHT (for example 1024x1024) or 'auto', got '{size}'",
            param="size",
        )
    width, height = int(parts[0]), int(parts[1])
    if width <= 0 or height <= 0:
        raise errors.InvalidRequestError(
            f"size must have both sides above zero, got '{size}'", param="size"
        )
    return width, height


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


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
    """The options of POST /v1/batches: JSON members, or form fields next to an upload. `model`
    and `preset` are defaults that a row's own fields win over."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    preset: str | None = None
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
