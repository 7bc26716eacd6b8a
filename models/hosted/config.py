"""Per-provider connection settings (`providers.<id>` in the settings file), validated once.

`ProviderConfig` is the only list of provider settings and their checks. Pydantic validates it
(the server's `Settings.providers` holds these, so a bad value fails when the settings are built,
naming `providers.<id>.<field>`); `ProviderConfig.from_mapping` runs the same validation for
callers without a Settings object. Behind that edge the dataclass is trusted as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

# Where each provider lives when the settings name no base_url. A self-hosted bridge
# (midjourney-proxy) and another imagegen server have no public default.
DEFAULT_BASE_URLS: Mapping[str, str] = {
    "openai": "https://api.openai.com",
    "stability": "https://api.stability.ai",
    "bfl": "https://api.bfl.ai",
}


class ProviderConfigError(ValueError):
    """A `providers.<id>` section is malformed. The message names the field, never a key."""


def _base_url(value: str, info: ValidationInfo) -> str:
    provider = str(info.data.get("provider", ""))
    text = value.strip() or DEFAULT_BASE_URLS.get(provider, "")
    if not text:
        raise PydanticCustomError(
            "base_url_required",
            "is required for '{provider}' (it has no public default); set it to the server's "
            "address, e.g. http://127.0.0.1:8080",
            {"provider": provider},
        )
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PydanticCustomError(
            "base_url_shape",
            "must be an http(s) URL such as https://api.example.com, got '{url}'",
            {"url": text},
        )
    return text.rstrip("/")


def _api_key(value: Any) -> SecretStr | None:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return None
    if not isinstance(value, str):
        # The value itself is never echoed: it may be a key pasted into the wrong place.
        raise PydanticCustomError(
            "api_key_type", "must be a string, got a {kind}", {"kind": type(value).__name__}
        )
    value = value.strip()
    return SecretStr(value) if value else None


Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


@dataclass(frozen=True)
class ProviderConfig:
    """How to reach one hosted provider. `api_key` is a SecretStr: it prints as '**********'
    and only `api_key_value()` reveals it, at the moment a request header is built.

    Build it with `from_mapping` or through the server's Settings: the constructor itself
    checks nothing (an empty `base_url` means "not yet filled in from DEFAULT_BASE_URLS")."""

    # validate_default fills in the provider's default base_url; unknown fields are errors
    # (section_input names them first, with the known ones).
    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid", validate_default=True)

    # The settings section's name (`providers.<provider>`); set from it, never written in it.
    provider: str
    base_url: Annotated[str, AfterValidator(_base_url)] = ""
    api_key: Annotated[SecretStr | None, BeforeValidator(_api_key)] = field(
        default=None, repr=False
    )
    # Per request (connect, read, write, pool).
    timeout_s: Seconds = 60.0
    # Retries after the first attempt on 408/429/5xx, timeouts and connection errors.
    max_retries: Annotated[int, Field(ge=0)] = 3
    # The longest server-directed wait (Retry-After / retry-after-ms) we sit through; a longer
    # one fails at once so a fallback backend can serve the request instead.
    retry_cap_s: NonNegative = 30.0
    # Exponential backoff when the server gives no Retry-After: base * 2**attempt (capped).
    backoff_base_s: NonNegative = 0.5
    # Submit-then-poll providers (BFL, midjourney-proxy): first poll delay, and the total time
    # to wait for a task before giving up.
    poll_interval_s: Seconds = 1.0
    poll_timeout_s: Seconds = 600.0
    # Midjourney has no vendor price (the cost is the subscription): the per-image figure to book.
    usd_per_image: NonNegative | None = None
    # A retired model (dall-e-3) is served by its catalogue replacement instead of failing
    # (a rule of the server's router).
    map_retired_to_replacement: bool = False

    @classmethod
    def from_mapping(cls, provider: str, raw: Mapping[str, Any] | None) -> ProviderConfig:
        """Validate the plain settings section `providers.<provider>`."""
        try:
            return _adapter().validate_python(section_input(provider, raw or {}))
        except ValidationError as exc:
            raise ProviderConfigError(describe_errors(exc, f"providers.{provider}")) from None
        except PydanticCustomError as exc:
            raise ProviderConfigError(exc.message()) from None

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None

    @property
    def key_setting(self) -> str:
        """Where the user sets the key: the settings path and its environment variable."""
        return (
            f"providers.{self.provider}.api_key / "
            f"IMAGEGEN_PROVIDERS__{self.provider.upper().replace('-', '_')}__API_KEY"
        )

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc


def setting_names() -> list[str]:
    """What a `providers.<id>` section may set: every field but the provider id."""
    return [f.name for f in fields(ProviderConfig) if f.name != "provider"]


def section_input(provider: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """A settings section as ProviderConfig's validation takes it: the section's name becomes
    `provider`. Raises PydanticCustomError naming the first unknown setting (a typo such as
    `retry_cap` must not be ignored) and the known ones."""
    known = setting_names()
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise PydanticCustomError(
            "unknown_provider_setting",
            "providers.{provider}.{name} is not a setting; known settings are {known}",
            {"provider": provider, "name": unknown[0], "known": ", ".join(known)},
        )
    return {**raw, "provider": provider}


def describe_errors(exc: ValidationError, prefix: str) -> str:
    """One line per problem, each naming its setting (`providers.openai.timeout_s: ...`);
    input values are left out (one may be a key)."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in (prefix, *error["loc"]))
        lines.append(f"{where}: {error['msg']}")
    return "; ".join(lines)


@functools.cache
def _adapter() -> TypeAdapter[ProviderConfig]:
    return TypeAdapter(ProviderConfig)
