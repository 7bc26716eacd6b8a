"""OpenAI Images (`POST /v1/images/generations`, and `/v1/images/edits` for image inputs)
through the official `openai` SDK.

The SDK runs with `max_retries=0`: retries are ours (`models.hosted.retry.with_retries`), so the
wait honours `retry-after-ms` / `Retry-After` up to `retry_cap_s`, goes through the injected
`sleep`, and matches every other hosted backend. GPT image models have no seed and no negative
prompt: those land in `dropped_params` and results are not deterministic.

Edits go as multipart (the SDK's `images.edit`): one `image`, or repeated `image[]` for
several (GPT image models take up to 16, dall-e-2 one square PNG), and the mask converted from
ours (white = repaint) to OpenAI's (transparent = edit area). The edits API has no strength:
it edits by instruction, so a strength is reported dropped rather than refused.
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
from models.hosted.inputs import EditSupport, alpha_mask, png_file
from models.hosted.results import Piece, decode_b64, fan_out, to_image, total_cost
from models.hosted.retry import (
    Retryable,
    is_retryable_status,
    parse_retry_after,
    with_retries,
)

Family = Literal["gpt-image-2", "gpt-image", "dall-e-3", "dall-e-2"]

_MODERATION_CODES = frozenset({"content_policy_violation", "moderation_blocked"})
_GPT_QUALITIES = ("low", "medium", "high", "auto")
_DALLE3_QUALITIES = ("standard", "hd")
_DALLE3_STYLES = ("vivid", "natural")
_DALLE3_SIZES = ("1024x1024", "1792x1024", "1024x1792")
_DALLE2_SIZES = ("256x256", "512x512", "1024x1024")
_GPT_FIXED_SIZES = ("1024x1024", "1536x1024", "1024x1536")
_GPT_MAX_N = 10
# CreateImageEditRequest (OpenAI spec 2026-08-21): "You can provide up to 16 images" for GPT
# image models; dall-e-2 takes one square PNG; dall-e-3 has no edits.
_GPT_EDITS = EditSupport(
    tasks=frozenset({"txt2img", "img2img", "inpaint"}),
    max_images=16,
    why="OpenAI's edits take up to 16 images",
)
_EDITS: Mapping[Family, EditSupport] = {
    "gpt-image-2": _GPT_EDITS,
    "gpt-image": _GPT_EDITS,
    "dall-e-2": EditSupport(
        tasks=frozenset({"txt2img", "img2img", "inpaint"}),
        max_images=1,
        why="dall-e-2 edits one square image",
    ),
    "dall-e-3": EditSupport(why="dall-e-3 has no edits endpoint; gpt-image-2 takes edits"),
}
# input_fidelity: "only supported for gpt-image-1 and gpt-image-1.5 and later models,
# unsupported for gpt-image-1-mini" (the spec's InputFidelity).
_NO_FIDELITY = ("gpt-image-1-mini",)
# DALL-E quality names on a GPT image model (a retired dall-e-3 request the router serves by
# gpt-image-2 keeps its intent).
_DALLE3_TO_GPT_QUALITY = {"standard": "medium", "hd": "high"}


def family_of(provider_model: str) -> Family:
    if provider_model.startswith("dall-e-2"):
        return "dall-e-2"
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
    allowed = {"dall-e-3": _DALLE3_SIZES, "dall-e-2": _DALLE2_SIZES}.get(family, _GPT_FIXED_SIZES)
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

    def edit_support(self) -> EditSupport:
        return _EDITS[self.family]

    def unsupported(self, params: GenerationParams) -> str | None:
        reason = super().unsupported(params)
        if reason is None and self.family == "dall-e-2" and params.images:
            first = params.images[0]
            if first.width != first.height:
                return (
                    f"model '{self.spec.name}' edits square images only (dall-e-2), got "
                    f"{first.width}x{first.height}; crop the image or use gpt-image-2"
                )
        return reason

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

        edit = bool(params.images)
        if edit:
            body |= edit_files(params)

        async def one_call() -> list[Piece]:
            response = await with_retries(
                lambda: self._call(client, body, edit=edit),
                provider=self.provider,
                policy=self.http.policy,
                sleep=self.http.sleep,
                what=f"images.{'edit' if edit else 'generate'} ({model_id})",
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
        """The SDK keyword arguments for one call (the files of an edit excepted), the params
        it cannot honour, and what the result must tell the client about the translation."""
        family = self.family
        check_size(family, params.width, params.height)
        edit = bool(params.images)
        dropped = ["seed"]  # no OpenAI image model takes a seed
        dropped += params.given("negative_prompt", "steps", "guidance_scale", "scheduler")
        dropped += self.edit_support().dropped(params)
        body: dict[str, Any] = {
            "prompt": params.prompt,
            "size": f"{params.width}x{params.height}",
        }
        if family in ("dall-e-3", "dall-e-2"):
            return body | self._dalle_fields(params, dropped), tuple(dropped), ()
        body["n"] = _checked_n(params.n, family)
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
        if params.moderation is not None and edit:
            dropped.append("moderation")  # CreateImageEditRequest has no moderation
        elif params.moderation is not None:
            _check_choice("moderation", params.moderation, ("low", "auto"), family)
            body["moderation"] = params.moderation
        if params.input_fidelity is not None and edit and self.provider_model not in _NO_FIDELITY:
            _check_choice("input_fidelity", params.input_fidelity, ("high", "low"), family)
            body["input_fidelity"] = params.input_fidelity
        elif params.input_fidelity is not None:
            dropped.append("input_fidelity")
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

    def _dalle_fields(self, params: GenerationParams, dropped: list[str]) -> dict[str, Any]:
        """DALL-E's own fields; what they lack goes onto `dropped`."""
        family = self.family
        fields: dict[str, Any] = {"response_format": "b64_json"}
        if family == "dall-e-3":
            fields["n"] = 1  # dall-e-3 takes one image per call; n > 1 makes n calls
            if params.quality is not None:
                _check_choice("quality", params.quality, _DALLE3_QUALITIES, family)
                fields["quality"] = params.quality
            if params.style is not None:
                _check_choice("style", params.style, _DALLE3_STYLES, family)
                fields["style"] = params.style
        else:
            fields["n"] = _checked_n(params.n, family)
            dropped += params.given("quality", "style")
        if params.output_format != "png":
            dropped.append("output_format")
        dropped += params.given("background", "moderation", "output_compression", "input_fidelity")
        return fields

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

    async def _call(self, client: AsyncOpenAI, body: Mapping[str, Any], *, edit: bool) -> Any:
        try:
            if edit:
                return await client.images.edit(**body)
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


def edit_files(params: GenerationParams) -> dict[str, Any]:
    """The files of an edit: `image` (the SDK sends a list as repeated `image[]`) and the mask
    in OpenAI's convention."""
    images = [png_file(image, f"image-{i}") for i, image in enumerate(params.images)]
    files: dict[str, Any] = {"image": images[0] if len(images) == 1 else images}
    if params.mask is not None:
        files["mask"] = ("mask.png", alpha_mask(params.mask), "image/png")
    return files


async def _first(call: Awaitable[list[Piece]]) -> Piece:
    return (await call)[0]


def sdk_base_url(base_url: str) -> str:
    """The SDK's base_url includes the API version: accept settings with or without it."""
    return base_url if base_url.rstrip("/").endswith("/v1") else f"{base_url.rstrip('/')}/v1"


def _checked_n(n: int, family: str) -> int:
    if not 1 <= n <= _GPT_MAX_N:
        raise InvalidParamsError(
            f"n must be between 1 and {_GPT_MAX_N} for {family}, got {n}",
            provider="openai",
            param="n",
        )
    return n


def _check_choice(param: str, value: str, allowed: Sequence[str], family: str) -> None:
    if value not in allowed:
        raise InvalidParamsError(
            f"{param} must be one of {', '.join(allowed)} for {family}, got '{value}'",
            provider="openai",
            param=param,
        )
