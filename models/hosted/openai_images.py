"""OpenAI Images (`POST /v1/images/generations`) through the official `openai` SDK.

The SDK runs with `max_retries=0`: retries are ours (`models.hosted.retry.with_retries`), so the
wait honours `retry-after-ms` / `Retry-After` up to `retry_cap_s`, goes through the injected
`sleep`, and matches every other hosted backend. GPT image models have no seed and no negative
prompt: those land in `dropped_params` and results are not deterministic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Literal

import httpx
import openai
from openai import AsyncOpenAI

from models.base import (
    BackendError,
    BackendResult,
    ContentFilteredError,
    Events,
    GenerationParams,
    InvalidParamsError,
    TransientBackendError,
)
from models.hosted.backend import HostedBackend
from models.hosted.client import auth_failure, scrub
from models.hosted.results import Piece, decode_b64, fan_out, to_image, total_cost
from models.hosted.retry import (
    Retryable,
    is_retryable_status,
    parse_retry_after,
    with_retries,
)

Family = Literal["gpt-image-2", "gpt-image", "dall-e-3"]

_MODERATION_CODES = frozenset({"content_policy_violation", "moderation_blocked"})
_GPT_QUALITIES = ("low", "medium", "high", "auto")
_DALLE3_QUALITIES = ("standard", "hd")
_DALLE3_STYLES = ("vivid", "natural")
_DALLE3_SIZES = ("1024x1024", "1792x1024", "1024x1792")
_GPT_FIXED_SIZES = ("1024x1024", "1536x1024", "1024x1536")
_GPT_MAX_N = 10
# DALL-E quality names on a GPT image model (a retired dall-e-3 request the router serves by
# gpt-image-2 keeps its intent).
_DALLE3_TO_GPT_QUALITY = {"standard": "medium", "hd": "high"}


def family_of(provider_model: str) -> Family:
    if provider_model.startswith("dall-e"):
        return "dall-e-3"
    if provider_model.startswith("gpt-image-2"):
        return "gpt-image-2"
    return "gpt-image"


def check_size(family: Family, width: int, height: int) -> None:
    """Sizes each model family accepts (PROVIDERS.md, OpenAI spec 2026-08-21)."""
    size = f"{width}x{height}"
    if family == "gpt-image-2":
        long_side, short_side = max(width, height), min(width, height)
        ok = (
            width % 16 == 0
            and height % 16 == 0
            and short_side >= 16
            and long_side <= 3 * short_side
            and long_side <= 3840
            and short_side <= 2160
        )
        if not ok:
            raise InvalidParamsError(
                f"size must be WIDTHxHEIGHT with both sides divisible by 16, an aspect ratio "
                f"between 1:3 and 3:1 and at most 3840x2160 for gpt-image-2, got '{size}'",
                provider="openai",
                param="size",
            )
        return
    allowed = _DALLE3_SIZES if family == "dall-e-3" else _GPT_FIXED_SIZES
    if size not in allowed:
        raise InvalidParamsError(
            f"size must be one of {', '.join(allowed)} for {family}, got '{size}'",
            provider="openai",
            param="size",
        )


class OpenAIImagesBackend(HostedBackend):
    # The SDK client, opened on first use on the running loop (see `_client`).
    _sdk: AsyncOpenAI | None = None
    _sdk_loop: asyncio.AbstractEventLoop | None = None

    @property
    def family(self) -> Family:
        return family_of(self.provider_model)

    # ---------------------------------------------------------------- contract

    def resolve(self, params: GenerationParams) -> GenerationParams:
        self._request(params)  # validates, sends nothing
        return params

    def estimate_cost_usd(self, params: GenerationParams) -> float | None:
        # GPT image models are billed by tokens: there is no per-image figure to estimate
        # with, so this is None for them until `usage` arrives (max_cost_usd bounds them).
        key = self.price_key()
        size = f"{params.width}x{params.height}"
        each = None if key is None else self.prices.price_per_image(key, params.quality, size)
        return None if each is None else each * params.n

    def max_cost_usd(self, params: GenerationParams) -> float | None:
        """For token-billed models: the largest output the size and quality can bill, plus the
        prompt, at the published token prices (what a daily budget reserves)."""
        key = self.price_key()
        if key is None or not self.prices.has_token_prices(key):
            return None
        quality = _DALLE3_TO_GPT_QUALITY.get(params.quality or "", params.quality)
        each = self.prices.max_token_cost(
            key,
            quality=quality,
            width=params.width,
            height=params.height,
            prompt_bytes=len(params.prompt.encode("utf-8")),
        )
        # n images are billed as n separate generations, the prompt included.
        return None if each is None else each * params.n

    async def _generate(self, params: GenerationParams, events: Events) -> BackendResult:
        body, dropped, notices = self._request(params)
        model_id = self.provider_model
        body["model"] = model_id  # always sent: the server's default model is dall-e-2
        client = self._client()
        revised: list[str] = []

        async def one_call() -> list[Piece]:
            response = await with_retries(
                lambda: self._call(client, body),
                provider=self.provider,
                policy=self.http.policy,
                sleep=self.http.sleep,
                what=f"images.generate ({model_id})",
            )
            pieces, revised_prompt = await self._pieces(params, response)
            if revised_prompt:
                revised.append(revised_prompt)
            return pieces

        if self.family == "dall-e-3":  # one image per call
            pieces = await fan_out(params.n, lambda _i, _report: _first(one_call()), events)
        else:
            pieces = await one_call()
            events.progress(100, 100)  # one call makes every image
        return BackendResult(
            images=tuple(p.image for p in pieces),
            provider=self.provider,
            cost_usd=total_cost(pieces),
            revised_prompt=revised[0] if revised else None,
            dropped_params=dropped,
            notices=notices,
            deterministic=False,
        )

    async def close(self) -> None:
        if self._sdk is not None and self._sdk_loop is asyncio.get_running_loop():
            await self._sdk.close()
        self._sdk = None
        await super().close()

    # ---------------------------------------------------------------- request building

    def _request(
        self, params: GenerationParams
    ) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...]]:
        """The SDK keyword arguments for one call, the params it cannot honour, and what the
        result must tell the client about the translation."""
        family = self.family
        check_size(family, params.width, params.height)
        dropped = ["seed"]  # no OpenAI image model takes a seed
        dropped += params.given("negative_prompt", "steps", "guidance_scale", "scheduler")
        body: dict[str, Any] = {
            "prompt": params.prompt,
            "size": f"{params.width}x{params.height}",
        }
        if family == "dall-e-3":
            body["n"] = 1  # dall-e-3 takes one image per call; n > 1 makes n calls
            body["response_format"] = "b64_json"
            if params.quality is not None:
                _check_choice("quality", params.quality, _DALLE3_QUALITIES, family)
                body["quality"] = params.quality
            if params.style is not None:
                _check_choice("style", params.style, _DALLE3_STYLES, family)
                body["style"] = params.style
            if params.output_format != "png":
                dropped.append("output_format")
            dropped += params.given("background", "moderation", "output_compression")
            return body, tuple(dropped), ()
        if not 1 <= params.n <= _GPT_MAX_N:
            raise InvalidParamsError(
                f"n must be between 1 and {_GPT_MAX_N} for {family}, got {params.n}",
                provider="openai",
                param="n",
            )
        body["n"] = params.n
        body["output_format"] = params.output_format
        notices: list[str] = []
        quality = params.quality
        if quality in _DALLE3_TO_GPT_QUALITY:
            quality = _DALLE3_TO_GPT_QUALITY[quality]
            notices.append(
                f"quality '{params.quality}' (a DALL-E quality) was sent as '{quality}' "
                f"to {self.provider_model}"
            )
        if quality is not None:
            _check_choice("quality", quality, _GPT_QUALITIES, family)
            body["quality"] = quality
        if params.background is not None:
            _check_choice(
                "background", params.background, ("transparent", "opaque", "auto"), family
            )
            body["background"] = params.background
        if params.moderation is not None:
            _check_choice("moderation", params.moderation, ("low", "auto"), family)
            body["moderation"] = params.moderation
        if params.output_compression is not None:
            if params.output_format == "png":
                dropped.append("output_compression")
            elif not 0 <= params.output_compression <= 100:
                raise InvalidParamsError(
                    f"output_compression must be 0..100, got {params.output_compression}",
                    provider="openai",
                    param="output_compression",
                )
            else:
                body["output_compression"] = params.output_compression
        if params.style is not None:
            dropped.append("style")
        return body, tuple(dropped), tuple(notices)

    # ---------------------------------------------------------------- calling the SDK

    def _client(self) -> AsyncOpenAI:
        key = self.config.api_key_value() or ""  # HostedBackend.generate checked it is set
        # The SDK's connections belong to the loop that opened them (see HostedHTTP.client).
        loop = asyncio.get_running_loop()
        if self._sdk is None or self._sdk_loop is not loop:
            self._sdk_loop = loop
            http_client = (
                httpx.AsyncClient(transport=self.transport, timeout=self.config.timeout_s)
                if self.transport is not None
                else None
            )
            self._sdk = AsyncOpenAI(
                api_key=key,
                base_url=sdk_base_url(self.config.base_url),
                max_retries=0,
                timeout=self.config.timeout_s,
                http_client=http_client,  # type: ignore[arg-type]  # the SDK accepts httpx too
            )
        return self._sdk

    async def _call(self, client: AsyncOpenAI, body: Mapping[str, Any]) -> Any:
        try:
            return await client.images.generate(**body)
        except openai.APITimeoutError:
            raise Retryable(f"no answer within {self.config.timeout_s:g} s") from None
        except openai.APIConnectionError:
            raise Retryable("connection failed") from None
        except openai.APIStatusError as exc:
            raise self._status_error(exc) from None

    def _status_error(self, exc: openai.APIStatusError) -> Exception:
        status, code, param = exc.status_code, exc.code, exc.param
        body = exc.body if isinstance(exc.body, dict) else {}
        message = scrub(str(body.get("message") or exc.message), self.config)[:300]
        provider = self.provider
        if code in _MODERATION_CODES:
            return ContentFilteredError(
                f"openai: the request was refused by the provider's moderation ({code}): {message}",
                provider=provider,
            )
        if status in (400, 404) and (code == "model_not_found" or param == "model"):
            # Retired models are the router's to refuse or replace (catalogue `replacement`):
            # here the server lacks a model the catalogue thinks it has.
            return InvalidParamsError(
                f"openai: model '{self.provider_model}' is not offered by {self.config.host} "
                f"({status} {code or 'model'}: {message}); check the catalogue entry's "
                f"provider_model and providers.{provider}.base_url",
                provider=provider,
                param="model",
            )
        if status in (401, 403):
            return auth_failure(self.config, status)
        if status == 429 and code == "insufficient_quota":
            # Retrying cannot help; a fallback backend can.
            return TransientBackendError(
                "openai: the account is out of quota (429 insufficient_quota); check billing",
                provider=provider,
            )
        if is_retryable_status(status):
            return Retryable(
                f"{status} {code or ''}: {message}".replace("  ", " "),
                parse_retry_after(exc.response.headers),
            )
        if 400 <= status < 500 and status != 404:
            return InvalidParamsError(
                f"openai rejected the request ({status}): {message}", provider=provider, param=param
            )
        return BackendError(
            f"openai: unexpected answer {status} from {self.config.host}: {message}; "
            f"check providers.{provider}.base_url",
            provider=provider,
        )

    async def _pieces(
        self, params: GenerationParams, response: Any
    ) -> tuple[list[Piece], str | None]:
        items = list(response.data or [])
        if not items:
            raise BackendError("openai: the response carries no images", provider=self.provider)
        images = []
        for item in items:
            if item.b64_json:
                data = decode_b64(item.b64_json, self.provider)
            elif item.url:
                data = await self.http.download(item.url)
            else:
                raise BackendError(
                    "openai: an image in the response has neither b64_json nor url",
                    provider=self.provider,
                )
            images.append(to_image(data, provider=self.provider, seed=None))
        cost = self._cost(params, response, count=len(images))
        each = None if cost is None else cost / len(images)
        return [Piece(img, each) for img in images], items[0].revised_prompt

    def _cost(self, params: GenerationParams, response: Any, *, count: int) -> float | None:
        """From `usage` where the response has it (token-billed models), else the table."""
        key = self.price_key()
        if key is None:
            return None
        usage = getattr(response, "usage", None)
        if usage is not None and self.prices.has_token_prices(key):
            return self.prices.token_cost(key, usage.model_dump())
        each = self.prices.price_per_image(key, params.quality, f"{params.width}x{params.height}")
        return None if each is None else each * count


async def _first(call: Awaitable[list[Piece]]) -> Piece:
    return (await call)[0]


def sdk_base_url(base_url: str) -> str:
    """The SDK's base_url includes the API version: accept settings with or without it."""
    return base_url if base_url.rstrip("/").endswith("/v1") else f"{base_url.rstrip('/')}/v1"


def _check_choice(param: str, value: str, allowed: Sequence[str], family: str) -> None:
    if value not in allowed:
        raise InvalidParamsError(
            f"{param} must be one of {', '.join(allowed)} for {family}, got '{value}'",
            provider="openai",
            param=param,
        )
