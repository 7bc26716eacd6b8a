"""Per-provider connection settings (`providers.<id>` in the settings file), validated once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

# Where each provider lives when the settings name no base_url. A self-hosted bridge
# (midjourney-proxy) and another imagegen server have no public default.
DEFAULT_BASE_URLS: Mapping[str, str] = {
    "openai": "https://api.openai.com",
    "stability": "https://api.stability.ai",
    "bfl": "https://api.bfl.ai",
}


class ProviderConfigError(ValueError):
    """A `providers.<id>` section is malformed. The message names the field, never a key."""


@dataclass(frozen=True)
class ProviderConfig:
    """How to reach one hosted provider. `api_key` is a SecretStr: it prints as '**********'
    and only `api_key_value()` reveals it, at the moment a request header is built."""

    provider: str
    base_url: str
    api_key: SecretStr | None = field(default=None, repr=False)
    # Per request (connect, read, write, pool).
    timeout_s: float = 60.0
    # Retries after the first attempt on 408/429/5xx, timeouts and connection errors.
    max_retries: int = 3
    # The longest server-directed wait (Retry-After / retry-after-ms) we sit through; a longer
    # one fails at once so a fallback backend can serve the request instead.
    retry_cap_s: float = 30.0
    # Exponential backoff when the server gives no Retry-After: base * 2**attempt (capped).
    backoff_base_s: float = 0.5
    # Submit-then-poll providers (BFL, midjourney-proxy): first poll delay, and the total time
    # to wait for a task before giving up.
    poll_interval_s: float = 1.0
    poll_timeout_s: float = 600.0
    # Midjourney has no vendor price (the cost is the subscription): the per-image figure to book.
    usd_per_image: float | None = None
    # A retired model (dall-e-3) is served by its catalogue replacement instead of failing.
    map_retired_to_replacement: bool = False

    @classmethod
    def from_mapping(cls, provider: str, raw: Mapping[str, Any] | None) -> ProviderConfig:
        """Build from the plain settings section `providers.<provider>`."""
        section = f"providers.{provider}"
        raw = dict(raw or {})
        unknown = sorted(set(raw) - _FIELDS)
        if unknown:
            raise ProviderConfigError(
                f"{section}: unknown setting(s) {unknown}; known settings are {sorted(_FIELDS)}"
            )
        base_url = raw.get("base_url") or DEFAULT_BASE_URLS.get(provider)
        if base_url is None:
            raise ProviderConfigError(
                f"{section}.base_url is required for '{provider}' (it has no public default); "
                f"set it to the server's address, e.g. http://127.0.0.1:8080"
            )
        return cls(
            provider=provider,
            base_url=_url(section, base_url),
            api_key=_secret(section, raw.get("api_key")),
            timeout_s=_positive(section, raw, "timeout_s", cls.timeout_s),
            max_retries=_count(section, raw, "max_retries", cls.max_retries),
            retry_cap_s=_non_negative(section, raw, "retry_cap_s", cls.retry_cap_s),
            backoff_base_s=_non_negative(section, raw, "backoff_base_s", cls.backoff_base_s),
            poll_interval_s=_positive(section, raw, "poll_interval_s", cls.poll_interval_s),
            poll_timeout_s=_positive(section, raw, "poll_timeout_s", cls.poll_timeout_s),
            usd_per_image=_optional_price(section, raw.get("usd_per_image")),
            map_retired_to_replacement=_flag(
                section, raw, "map_retired_to_replacement", cls.map_retired_to_replacement
            ),
        )

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


_FIELDS = frozenset(
    {
        "api_key",
        "base_url",
        "timeout_s",
        "max_retries",
        "retry_cap_s",
        "backoff_base_s",
        "poll_interval_s",
        "poll_timeout_s",
        "usd_per_image",
        "map_retired_to_replacement",
    }
)


def _url(section: str, value: Any) -> str:
    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ProviderConfigError(
            f"{section}.base_url must be an http(s) URL such as https://api.example.com, "
            f"got {text!r}"
        )
    return text.rstrip("/")


def _secret(section: str, value: Any) -> SecretStr | None:
    if value is None:
        return None
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        # The value itself is never echoed: it may be a key pasted into the wrong place.
        raise ProviderConfigError(
            f"{section}.api_key must be a string, got a {type(value).__name__}"
        )
    value = value.strip()
    return SecretStr(value) if value else None


def _number(section: str, raw: Mapping[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ProviderConfigError(f"{section}.{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ProviderConfigError(f"{section}.{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ProviderConfigError(f"{section}.{name} must be finite, got {value!r}")
    return number


def _positive(section: str, raw: Mapping[str, Any], name: str, default: float) -> float:
    number = _number(section, raw, name, default)
    if number <= 0:
        raise ProviderConfigError(f"{section}.{name} must be greater than 0, got {number:g}")
    return number


def _non_negative(section: str, raw: Mapping[str, Any], name: str, default: float) -> float:
    number = _number(section, raw, name, default)
    if number < 0:
        raise ProviderConfigError(f"{section}.{name} must be 0 or more, got {number:g}")
    return number


def _count(section: str, raw: Mapping[str, Any], name: str, default: int) -> int:
    number = _non_negative(section, raw, name, default)
    if number != int(number):
        raise ProviderConfigError(f"{section}.{name} must be a whole number, got {number:g}")
    return int(number)


def _optional_price(section: str, value: Any) -> float | None:
    if value is None:
        return None
    return _non_negative(section, {"usd_per_image": value}, "usd_per_image", 0.0)


def _flag(section: str, raw: Mapping[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ProviderConfigError(f"{section}.{name} must be true or false, got {value!r}")
