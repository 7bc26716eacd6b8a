"""What every hosted backend shares: provider config, HTTP client, prices, identity, and the
order of `generate` (checks, `events.started()`, then the backend's provider part, given the
prompt without A1111's attention syntax)."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import httpx

from models import prompt_weights
from models.base import (
    NO_EVENTS,
    Backend,
    BackendIdentity,
    BackendResult,
    Events,
    GenerationParams,
    InvalidParamsError,
    ModelSpec,
    PromptTooLongError,
)
from models.hosted.client import HostedHTTP, auth_failure
from models.hosted.config import ProviderConfig
from models.hosted.inputs import TEXT_ONLY, EditSupport
from models.hosted.retry import SleepFn
from models.prices import PriceTable


class HostedBackend(Backend):
    """What every hosted backend shares: its provider config, one HTTP client with the common
    retry policy, the price table, the prompt limit from the catalogue, identity, and the
    order of `generate` (checks, then `events.started()`, then the provider part,
    `_generate`, which is all a backend writes)."""

    # Whether the provider refuses every request without a key. midjourney-proxy's secret and
    # another imagegen server's keys are optional, so those backends send without one.
    needs_key: ClassVar[bool] = True
    # Whether the provider reads A1111's attention syntax itself (another imagegen server
    # does); the others are sent the prompt without it, the weighting reported as dropped.
    reads_prompt_weights: ClassVar[bool] = False

    def __init__(
        self,
        spec: ModelSpec,
        config: ProviderConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: SleepFn | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        self.spec = spec
        self.config = config
        self.prices = prices if prices is not None else PriceTable.load()
        # The test seam, kept for clients that do not send through `http` (the OpenAI SDK).
        self.transport = transport
        self.http = HostedHTTP(config, transport=transport, sleep=sleep)

    @property
    def provider(self) -> str:
        return self.config.provider

    @property
    def provider_model(self) -> str:
        return self.spec.provider_model or self.spec.name

    def edit_support(self) -> EditSupport:
        """Which tasks this model's API takes, and how many input images (text only unless a
        backend says more)."""
        return TEXT_ONLY

    def unsupported(self, params: GenerationParams) -> str | None:
        return self.edit_support().unsupported(self.spec.name, params)

    def identity_extra(self) -> dict[str, Any]:
        """Backend-specific facts that decide the pixels (an endpoint, an API version)."""
        return {}

    def identity(self, params: GenerationParams) -> BackendIdentity:
        # The host is part of the identity: another server behind the same model id may
        # make other pixels. Keys never are.
        return BackendIdentity(
            backend=self.provider,
            model_revision=self.provider_model,
            pipeline=type(self).__name__,
            extra={"host": self.config.host, **self.identity_extra()},
        )

    async def generate(
        self,
        params: GenerationParams,
        events: Events = NO_EVENTS,
        *,
        precise: bool = False,
    ) -> BackendResult:
        del precise  # providers offer no numerically safer mode to ask for
        params = self.resolve(params)
        self.check_prompt(params.prompt)
        reason = self.unsupported(params)
        if reason is not None:
            # The service refuses these before routing; a direct caller must not get a
            # text-to-image picture for an edit either.
            param = "loras" if params.loras else "mask" if params.mask is not None else "image"
            raise InvalidParamsError(reason, provider=self.provider, param=param)
        if self.needs_key and self.config.api_key is None:
            raise auth_failure(self.config)  # before anything is sent
        events.started()
        sent, weighted = self._without_prompt_weights(params)
        result = await self._generate(sent, events)
        if not weighted:
            return result
        return dataclasses.replace(
            result, dropped_params=(*result.dropped_params, "prompt weighting")
        )

    def _without_prompt_weights(self, params: GenerationParams) -> tuple[GenerationParams, bool]:
        """`params` with the prompts as the provider gets them (`sent_text`), and whether that
        lost a weighting."""
        prompt, weighted = self.sent_text(params.prompt)
        negative = params.negative_prompt
        if negative is not None:
            negative, negative_weighted = self.sent_text(negative)
            weighted = weighted or negative_weighted
        return dataclasses.replace(params, prompt=prompt, negative_prompt=negative), weighted

    def sent_text(self, text: str) -> tuple[str, bool]:
        """A prompt as the provider gets it, and whether that lost a weighting (a weight other
        than 1, a BREAK): the text without A1111's attention syntax, as a local model that
        cannot weight gets it (models.prompt_weights), so `(fox:1.3)` never reaches a
        provider as written and `(fox:1.0)` is plainly `fox`."""
        if self.reads_prompt_weights:
            return text, False
        parsed = prompt_weights.parse(text)
        return parsed.text, parsed.weighted

    @abc.abstractmethod
    async def _generate(self, params: GenerationParams, events: Events) -> BackendResult:
        """The provider part: send the checked `params`, report `progress` as the provider
        does (polls) or as the images of an n>1 request complete, and return the images."""

    def check_prompt(self, prompt: str) -> None:
        limit = self.spec.extra.get("max_prompt_chars")
        sent, _ = self.sent_text(prompt)  # the limit is on what the provider gets
        if isinstance(limit, int) and len(sent) > limit:
            raise PromptTooLongError(
                f"prompt is {len(sent)} characters; {self.spec.name} accepts at most {limit}",
                provider=self.provider,
                param="prompt",
            )

    def require_size_and_seeds(self, params: GenerationParams, *, seed_max: int) -> None:
        """Positive sides and every image's seed (seed + i) inside the provider's range."""
        if params.width <= 0 or params.height <= 0:
            raise InvalidParamsError(
                f"size must be WIDTHxHEIGHT with positive sides, got "
                f"'{params.width}x{params.height}'",
                provider=self.provider,
                param="size",
            )
        seeds = params.image_seeds()
        if min(seeds) < 0 or max(seeds) > seed_max:
            raise InvalidParamsError(
                f"seed must be 0..{seed_max} for {self.provider} (image i uses seed + i), "
                f"got {params.seed} with n={params.n}",
                provider=self.provider,
                param="seed",
            )

    def price_key(self) -> str | None:
        """This model's price-table name: the catalogue name, else the provider's model id (a
        user's own entry for a priced model)."""
        for name in (self.spec.name, self.spec.provider_model):
            if name and self.prices.rows_for(name):
                return name
        return None

    async def close(self) -> None:
        await self.http.aclose()
