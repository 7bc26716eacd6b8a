"""The one settings class: `IMAGEGEN_*` environment variables over an optional TOML file.

Built once (by the CLI or the server's start-up) and passed down; nothing else reads the
environment. Nested sections use `__` in variable names: IMAGEGEN_COST__USD_PER_GPU_HOUR=0.5.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from models.hosted import HOSTED_KINDS
from models.hosted.config import ProviderConfig, section_input


def default_data_dir() -> Path:
    """XDG data home, as Linux tools expect: ~/.local/share/imagegen."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "imagegen"


class Section(BaseModel):
    """A settings section: a key it does not know is an error (a typo such as
    `[server] api_key = ...` would otherwise be ignored, leaving the server open)."""

    model_config = ConfigDict(extra="forbid")


class CostSettings(Section):
    """Local work is billed as amortized GPU time. Either set `usd_per_gpu_hour` directly or
    let it be derived from the card's price, lifetime, utilisation and power draw.

    Default derivation (an RTX 4090-class workstation card, late 2026 street price):
    $1,800 over 3 years at 50% utilisation = 1800 / (3 * 8760 * 0.5) = $0.137/h, plus
    450 W at $0.15/kWh = $0.0675/h, total about $0.205 per GPU-hour."""

    usd_per_gpu_hour: float | None = Field(default=None, ge=0)
    hardware_usd: float = Field(default=1800.0, ge=0)
    lifetime_years: float = Field(default=3.0, gt=0)
    utilisation: float = Field(default=0.5, gt=0, le=1)
    power_watts: float = Field(default=450.0, ge=0)
    electricity_usd_per_kwh: float = Field(default=0.15, ge=0)

    def gpu_hour_usd(self) -> float:
        if self.usd_per_gpu_hour is not None:
            return self.usd_per_gpu_hour
        hours_used = self.lifetime_years * 8760 * self.utilisation
        return self.hardware_usd / hours_used + self.power_watts / 1000 * (
            self.electricity_usd_per_kwh
        )


class ModelPolicySettings(Section):
    """How one local model is kept on the device (models.local.residency)."""

    # Never evicted, and loaded at start-up.
    pinned: bool = False
    # Unloaded after this long unused (None: kept until room is needed).
    idle_unload_s: float | None = Field(default=None, gt=0)


class LocalSettings(Section):
    """How local diffusers pipelines run."""

    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    # Several devices, one worker each (its own queue, batcher and resident models):
    # ["cuda:0", "cuda:1"]. Unset: every visible GPU where `device` is "auto" (and there are
    # several), else the one `device`. "cpu:0", "cpu:1" split the CPU into
    # several devices (what the tests run placement on without a GPU).
    devices: list[str] | None = Field(default=None, min_length=1)
    # Copies of one model across devices: "auto" (up to one per device, added when every
    # device holding it is a full batch behind) or at most this many.
    replicas: Literal["auto"] | int = "auto"
    attention: Literal["sdpa", "xformers"] = "sdpa"
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    compile: bool = False
    # Largest number of images in one pipeline call, and how long the worker waits to gather
    # compatible requests into one batch. The wait is adaptive: a lone sequential client whose
    # previous batch ran alone, with nothing else queued, does not wait at all, and gathering
    # ends after a quiet half-window with no new arrival.
    max_batch_size: int = Field(default=8, ge=1)
    batch_window_ms: float = Field(default=40.0, ge=0)
    # Bound on queued work, counted in images (n counts n times).
    max_queue_images: int = Field(default=64, ge=1)
    # And in estimated device-seconds of waiting work (images x steps x pixels, priced at each
    # model's measured step rate): a queue that would take longer than this to drain refuses
    # with 429 and an honest Retry-After. None: the images bound only.
    max_queue_seconds: float | None = Field(default=300.0, gt=0)
    # Flux has no native negative prompt: a request with one runs true CFG at this scale.
    flux_true_cfg_scale: float = Field(default=4.0, ge=1)
    # The LoRA library: .safetensors adapters, by file stem (default: DATA_DIR/loras).
    lora_dir: Path | None = None
    # Adapters kept loaded per model; past it the least recently used one is unloaded.
    max_loaded_loras: int = Field(default=8, ge=1)
    # What the device may hold of loaded models, in GB; past it the least recently used ones
    # are evicted (to host RAM on a GPU, then dropped). Default: what the device reports
    # (a GPU's memory, or the host's RAM for the CPU) less memory_reserve_gb, the working
    # room a batch's activations need.
    memory_gb: float | None = Field(default=None, gt=0)
    # Per device, over memory_gb: {"cuda:1": 20}.
    device_memory_gb: dict[str, float] = Field(default_factory=dict)
    memory_reserve_gb: float = Field(default=2.0, ge=0)
    # Host RAM for models evicted from a GPU (fast to bring back), in GB. Default: half the
    # host's RAM. The CPU device has no such tier: its models are already in host RAM.
    host_memory_gb: float | None = Field(default=None, ge=0)
    # Per model: {"sdxl": {"pinned": true}, "flux-dev": {"idle_unload_s": 600}}.
    model_policies: dict[str, ModelPolicySettings] = Field(default_factory=dict)


class ApiKeySettings(Section):
    """One API key with its own name and limits, as a table of `server.api_keys`:
    {key = "...", name = "ci", requests_per_minute = 60, images_per_day = 500,
    usd_per_day = 2.0}. Limits are per key and unset means none; a day is the UTC day."""

    # The token itself or "sha256:<64 hex>", as in the plain list form.
    key: SecretStr
    # Shown in the ledger, logs and stats in place of the key's digest; unique among keys.
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[\w.@-]+$")
    # Requests that ask for work (POST) in any sliding minute.
    requests_per_minute: int | None = Field(default=None, ge=1)
    # Images generated per UTC day (cache hits are free and do not count).
    images_per_day: int | None = Field(default=None, ge=1)
    # What the key's requests may cost per UTC day (the ledger's USD: hosted charges and
    # amortized GPU time), the running request's estimate included.
    usd_per_day: float | None = Field(default=None, gt=0)


class StoreSettings(Section):
    """Where the cache index, ledger, jobs and claims live: unset for SQLite in the data
    directory; `postgresql://USER:PASSWORD@HOST:PORT/DATABASE` for one PostgreSQL shared by
    every replica (needs `imagegen[cluster]`)."""

    url: SecretStr | None = None
    # How long a replica's claim on a cache key (it is generating it) holds without its
    # heartbeat (every third of it): how soon waiters take over from a replica that died.
    claim_lease_s: float = Field(default=30.0, ge=1.0, le=3600.0)


class BlobSettings(Section):
    """Where image bytes and batch folders live: unset for the data directory; or
    `s3://BUCKET/PREFIX` on any S3-API store. Credentials unset use the AWS environment
    (AWS_* variables, a profile, the machine's role)."""

    url: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None


class ServerSettings(Section):
    host: str = "127.0.0.1"
    port: int = 8000
    models: list[str] = Field(default_factory=list)
    # API keys as plain tokens (hashed at start-up) or sha256 hex digests prefixed "sha256:";
    # or, for a key with a name and limits of its own, an ApiKeySettings table.
    api_keys: list[ApiKeySettings] = Field(default_factory=list)
    # Failed API-key checks allowed per client address in a minute; past it that address is
    # refused (429 too_many_failed_auth) until the minute has passed, even with a right key,
    # so guessing keys gains nothing from the answers.
    auth_failures_per_minute: int = Field(default=20, ge=1)
    insecure_no_auth: bool = False
    public_base_url: str | None = None
    # The largest request body taken (batch uploads are the big ones); past it, 413 before the
    # body is read any further.
    max_body_mb: float = Field(default=64.0, gt=0)
    # The largest input image (img2img, inpainting, edits) taken, in megapixels: past it, 400
    # before the pixels are decoded (a 20000x20000 PNG is a few kB of header and 1.2 GB of RGB).
    max_input_megapixels: float = Field(default=16.0, gt=0, le=178)
    # Live previews on job events (GET /v1/jobs/{id}/events) and A1111's /sdapi/v1/progress:
    # one every this many denoising steps while someone listens (0: none). A stream's
    # partial_images are spread over the schedule instead.
    preview_every_steps: int = Field(default=5, ge=0)
    # The longest a synchronous generation request may take, queue wait included, in seconds:
    # past it 504 `timeout`, its work cancelled at the next denoising step and nothing cached
    # or booked. None: no server-wide deadline (a request's own `timeout` field or its
    # X-Request-Timeout header still applies; the shortest wins). Jobs take only their own.
    request_timeout_s: float | None = Field(default=None, gt=0)
    # Browser origins allowed to call this server (CORS), e.g. ["https://app.example.com"].
    # Empty (the default): no CORS headers at all, so browsers on other origins cannot read
    # responses. "*" allows any origin, but never together with cors_allow_credentials.
    cors_origins: list[str] = Field(default_factory=list)
    # Whether browsers may send cookies / HTTP auth cross-origin (Access-Control-Allow-Credentials).
    cors_allow_credentials: bool = False

    @field_validator("public_base_url")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """`url` results and batch links are built on it: it must be absolute, or clients
        would get links they cannot fetch."""
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PydanticCustomError(
                "public_base_url",
                "server.public_base_url must be an absolute http(s) URL such as "
                "'https://images.example.com' (a path prefix may follow)",
            )
        return value.rstrip("/")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _tables(cls, value: Any) -> Any:
        """A bare key is a table with only its key: one shape from here on (and one error
        path, naming the table's field, for a bad table)."""
        if not isinstance(value, list):
            return value  # pydantic reports the wrong type
        return [{"key": item} if isinstance(item, str | SecretStr) else item for item in value]

    @field_validator("api_keys")
    @classmethod
    def _unique_names(cls, value: list[ApiKeySettings]) -> list[ApiKeySettings]:
        """A name stands for its key in the ledger (and its daily counts): two keys under one
        name would share, and blur, them."""
        names = [key.name for key in value if key.name]
        for name in names:
            if names.count(name) > 1:
                raise PydanticCustomError(
                    "api_key_name",
                    "server.api_keys: the name '{name}' is given to two keys; give each key "
                    "its own name",
                    {"name": name},
                )
        return value

    @model_validator(mode="after")
    def _cors_wildcard_without_credentials(self) -> ServerSettings:
        """Any origin with credentials would let every web page a user visits call this server
        as that user."""
        if "*" in self.cors_origins and self.cors_allow_credentials:
            raise PydanticCustomError(
                "cors_origins",
                "server.cors_origins contains '*' while server.cors_allow_credentials is true: "
                "list the allowed origins explicitly (e.g. ['https://app.example.com']) or set "
                "cors_allow_credentials = false",
            )
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMAGEGEN_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        # A value in the wrong place may be a key: error texts never repeat input.
        hide_input_in_errors=True,
    )

    data_dir: Path = Field(default_factory=default_data_dir)
    default_model: str = "tiny-sdxl"
    # Byte cap on the result cache; least recently used entries are evicted past it.
    cache_max_bytes: int = Field(default=2 * 1024**3, ge=0)
    # Data residency: when true no prompt or image ever leaves this host.
    local_only: bool = False
    routing_policy: Literal["local-first", "hosted-first", "cheapest", "local-only"] = "local-first"
    cost: CostSettings = Field(default_factory=CostSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    blobs: BlobSettings = Field(default_factory=BlobSettings)
    # The user's own catalogue entries: [[models]] name, kind, source, defaults.
    models: list[dict[str, Any]] = Field(default_factory=list)
    # Hosted providers, by provider id: {api_key, base_url, timeout_s, ...} (see README),
    # validated here, so a bad value fails at start-up naming `providers.<id>.<field>`. The
    # ids are the hosted kinds and the `source` of any hosted [[models]] entry of the user's
    # (a second imagegen server, say). Declared after `models`, which its check reads.
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    # Fallback chains: model name -> models to try next on a transient failure.
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    # Daily USD caps per provider id, and "total".
    budgets: dict[str, float] = Field(default_factory=dict)
    # The user's own presets: name -> {template, negative_prompt, description}.
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Client model aliases (server/data/aliases.toml: dall-e-2, dall-e-3, gpt-image-*): the
    # model they map to (default: default_model), and the user's own name -> model entries,
    # which win over the file ("" turns a built-in alias off).
    alias_model: str | None = None
    aliases: dict[str, str] = Field(default_factory=dict)

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("providers", mode="before")
    @classmethod
    def _provider_sections(cls, value: Any, info: ValidationInfo) -> Any:
        """Reject unknown provider ids; give each section its id (ProviderConfig.provider)."""
        if not isinstance(value, Mapping):
            return value  # pydantic reports the wrong type
        known = provider_ids(info.data.get("models", ()))
        sections: dict[Any, Any] = {}
        for provider, section in value.items():
            if provider not in known:
                raise PydanticCustomError(
                    "unknown_provider",
                    "providers.{provider} is not a hosted provider; use one of {known}, or "
                    "name it as the `source` of a hosted [[models]] entry",
                    {"provider": str(provider), "known": ", ".join(sorted(known))},
                )
            is_section = isinstance(section, Mapping)
            sections[provider] = section_input(provider, section) if is_section else section
        return sections

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _CONFIG_FILE.get("path")
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def db_path(self) -> Path:
        """One SQLite database for the ledger, the cache index and job records."""
        return self.data_dir / "imagegen.sqlite3"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def lora_dir(self) -> Path:
        return self.local.lora_dir or self.data_dir / "loras"

    @property
    def alias_target(self) -> str:
        return self.alias_model or self.default_model


def provider_ids(user_models: Iterable[Any]) -> set[str]:
    """The provider ids a `providers` section may name: every hosted kind (the built-in
    catalogue's sources), and the source of each hosted entry of the user's catalogue."""
    ids = set(HOSTED_KINDS)
    for entry in user_models:
        if isinstance(entry, Mapping) and entry.get("kind") in HOSTED_KINDS:
            ids.add(str(entry.get("source") or entry["kind"]))
    return ids


# The TOML file is chosen per load; pydantic-settings asks for sources on the class, so the
# path travels through this slot for the duration of one `load_settings` call.
_CONFIG_FILE: dict[str, Path | None] = {"path": None}


class ConfigFileError(ValueError):
    pass


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Environment variables win over the TOML file; explicit overrides win over both."""
    if config_file is not None and not config_file.is_file():
        raise ConfigFileError(
            f"--config: no such file '{config_file}'; pass the path of a TOML settings file"
        )
    _CONFIG_FILE["path"] = config_file
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE["path"] = None
