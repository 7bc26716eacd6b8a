"""The dated price table of hosted models (`models/data/prices.toml`): images, credits, tokens,
and the output tokens a token-billed model's images take (for an upper bound before running)."""

from __future__ import annotations

import datetime as dt
import functools
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

_FIGURES = ("usd_per_image", "credits", "usd_per_megapixel", "tokens", "configured")
_TOKEN_FIELDS = (
    "text_input_usd_per_1m_tokens",
    "image_input_usd_per_1m_tokens",
    "image_output_usd_per_1m_tokens",
)


class PriceError(ValueError):
    """The price table is malformed, or a model has no price of the kind asked for."""


@dataclass(frozen=True)
class PriceRow:
    """One figure with its source and date. Exactly one pricing unit is set."""

    model: str
    provider: str
    source: str
    as_of: dt.date
    aliases: tuple[str, ...] = ()
    quality: str | None = None
    sizes: tuple[str, ...] = ()
    default: bool = False
    retired: dt.date | None = None
    usd_per_image: float | None = None
    credits: float | None = None
    usd_per_credit: float | None = None
    usd_per_megapixel: float | None = None
    text_input_usd_per_1m_tokens: float | None = None
    image_input_usd_per_1m_tokens: float | None = None
    image_output_usd_per_1m_tokens: float | None = None
    # Settings path of a figure the user supplies (no vendor price exists).
    configured: str | None = None

    @property
    def unit(self) -> str:
        if self.usd_per_image is not None:
            return "usd_per_image"
        if self.credits is not None:
            return "credits"
        if self.usd_per_megapixel is not None:
            return "usd_per_megapixel"
        if self.text_input_usd_per_1m_tokens is not None:
            return "tokens"
        return "configured"

    def flat_usd(self) -> float | None:
        """The per-image USD figure, where the row has one."""
        if self.usd_per_image is not None:
            return self.usd_per_image
        if self.credits is not None and self.usd_per_credit is not None:
            return round(self.credits * self.usd_per_credit, 6)
        return None


@dataclass(frozen=True)
class OutputTokensRow:
    """The image output tokens of one model at one quality, per listed size, with its source."""

    model: str
    quality: str
    tokens: Mapping[str, int]
    source: str
    as_of: dt.date

    def bound(self, width: int, height: int) -> int:
        """The tokens of a listed size; for any other, the largest listed figure, scaled up by
        area past that size's (never down: a smaller image may cost as much)."""
        size = f"{width}x{height}"
        if size in self.tokens:
            return self.tokens[size]
        ref_size, ref_tokens = max(self.tokens.items(), key=lambda item: item[1])
        ref_pixels = _pixels(ref_size) or 1
        return math.ceil(ref_tokens * max(1.0, width * height / ref_pixels))


@dataclass(frozen=True)
class PriceTable:
    rows: tuple[PriceRow, ...]
    output_tokens: tuple[OutputTokensRow, ...] = ()

    @classmethod
    def load(cls, path: Path | str | None = None) -> PriceTable:
        """The built-in table, or one read from `path` (same format)."""
        if path is None:
            return _builtin()
        return cls.from_toml(Path(path).read_text(encoding="utf-8"), origin=str(path))

    @classmethod
    def from_toml(cls, text: str, *, origin: str = "prices.toml") -> PriceTable:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PriceError(f"{origin}: not valid TOML: {exc}") from None
        rows = tuple(_row(entry, origin, i) for i, entry in enumerate(raw.get("price", [])))
        _check_names(rows, origin)
        tokens = tuple(
            _tokens_row(entry, origin, i)
            for i, entry in enumerate(raw.get("image_output_tokens", []))
        )
        return cls(rows=rows, output_tokens=tokens)

    def rows_for(self, model_name: str) -> list[PriceRow]:
        return [r for r in self.rows if r.model == model_name or model_name in r.aliases]

    def price_per_image(
        self, model_name: str, quality: str | None = None, size: str | None = None
    ) -> float | None:
        """USD for one image, or None where the table has no per-image figure (token-billed,
        configured, unknown model, or a quality/size it does not list)."""
        rows = self.rows_for(model_name)
        if not rows:
            return None
        if rows[0].unit == "usd_per_megapixel":
            pixels = _pixels(size)
            per_mp = rows[0].usd_per_megapixel
            if pixels is None or per_mp is None:
                return None
            return round(per_mp * pixels / 1_000_000, 6)
        defaults = next((r for r in rows if r.default), rows[0] if len(rows) == 1 else None)
        want_quality = quality or (defaults.quality if defaults else None)
        want_size = size or (defaults.sizes[0] if defaults and defaults.sizes else None)
        for row in rows:
            if row.quality is not None and row.quality != want_quality:
                continue
            if row.sizes and want_size not in row.sizes:
                continue
            return row.flat_usd()
        return None

    def has_token_prices(self, model: str) -> bool:
        return any(r.unit == "tokens" for r in self.rows_for(model))

    def token_cost(self, model: str, usage: Mapping[str, Any]) -> float:
        """USD from a provider's `usage` object ({input_tokens, output_tokens,
        input_tokens_details: {text_tokens, image_tokens}}). All output tokens are image
        tokens at the image-output rate."""
        row = next((r for r in self.rows_for(model) if r.unit == "tokens"), None)
        if row is None:
            raise PriceError(f"no token prices for model '{model}' in the price table")
        details = usage.get("input_tokens_details") or {}
        text_tokens = details.get("text_tokens")
        image_tokens = details.get("image_tokens")
        if text_tokens is None and image_tokens is None:
            text_tokens, image_tokens = usage.get("input_tokens") or 0, 0
        output_tokens = usage.get("output_tokens") or 0
        usd = (
            int(text_tokens or 0) * (row.text_input_usd_per_1m_tokens or 0.0)
            + int(image_tokens or 0) * (row.image_input_usd_per_1m_tokens or 0.0)
            + int(output_tokens) * (row.image_output_usd_per_1m_tokens or 0.0)
        ) / 1_000_000
        return round(usd, 8)

    def max_token_cost(
        self, model: str, *, quality: str | None, width: int, height: int, prompt_bytes: int
    ) -> float | None:
        """An upper bound on one image of a token-billed model before it runs: the output
        tokens for the size and quality (quality None / "auto" counts as the dearest, "high";
        one the table does not list, as the dearest listed) plus the prompt, at the table's
        token prices. None where the table has no token prices or output tokens for it."""
        prices = next((r for r in self.rows_for(model) if r.unit == "tokens"), None)
        if prices is None:
            return None
        rows = [r for r in self.output_tokens if r.model == prices.model]
        if not rows:
            return None
        wanted = "high" if quality in (None, "auto") else quality
        chosen = [r for r in rows if r.quality == wanted] or rows
        output = max(r.bound(width, height) for r in chosen)
        # Every text token covers at least one byte of the prompt, so its UTF-8 length bounds
        # the text input tokens.
        usage = {
            "input_tokens_details": {"text_tokens": prompt_bytes, "image_tokens": 0},
            "output_tokens": output,
        }
        return self.token_cost(prices.model, usage)


@functools.lru_cache(maxsize=1)
def _builtin() -> PriceTable:
    text = (resources.files("models") / "data" / "prices.toml").read_text(encoding="utf-8")
    return PriceTable.from_toml(text, origin="models/data/prices.toml")


def _pixels(size: str | None) -> int | None:
    if size is None:
        return None
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    return int(width) * int(height)


_KNOWN = frozenset(
    {
        "model",
        "provider",
        "source",
        "as_of",
        "aliases",
        "quality",
        "sizes",
        "default",
        "retired",
        "usd_per_image",
        "credits",
        "usd_per_credit",
        "usd_per_megapixel",
        "configured",
        *_TOKEN_FIELDS,
    }
)


def _sourced(
    entry: Mapping[str, Any], where: str, known: frozenset[str], required: tuple[str, ...]
) -> dt.date:
    """What every row of the file shares: no unknown field, the required names (a source
    among them), and its date, which is returned."""
    unknown = sorted(set(entry) - known)
    if unknown:
        raise PriceError(f"{where}: unknown field(s) {unknown}")
    for name in required:
        if not isinstance(entry.get(name), str) or not entry[name]:
            raise PriceError(f"{where}: '{name}' is required (a non-empty string)")
    as_of = entry.get("as_of")
    if not isinstance(as_of, dt.date) or isinstance(as_of, dt.datetime):
        raise PriceError(f"{where}: 'as_of' must be a TOML date such as 2026-11-28")
    return as_of


def _row(entry: Mapping[str, Any], origin: str, index: int) -> PriceRow:
    where = f"{origin}: price row {index + 1} ({entry.get('model', '?')})"
    as_of = _sourced(entry, where, _KNOWN, ("model", "provider", "source"))
    units = [
        u
        for u, present in (
            ("usd_per_image", "usd_per_image" in entry),
            ("credits", "credits" in entry),
            ("usd_per_megapixel", "usd_per_megapixel" in entry),
            ("tokens", any(f in entry for f in _TOKEN_FIELDS)),
            ("configured", "configured" in entry),
        )
        if present
    ]
    if len(units) != 1:
        raise PriceError(f"{where}: give exactly one of {list(_FIGURES)}, got {units}")
    if units == ["credits"] and "usd_per_credit" not in entry:
        raise PriceError(f"{where}: 'credits' needs 'usd_per_credit'")
    if units == ["tokens"] and not all(f in entry for f in _TOKEN_FIELDS):
        raise PriceError(f"{where}: token pricing needs all of {list(_TOKEN_FIELDS)}")
    numbers: dict[str, float | None] = {}
    for name in ("usd_per_image", "credits", "usd_per_credit", "usd_per_megapixel", *_TOKEN_FIELDS):
        value = entry.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise PriceError(f"{where}: '{name}' must be a number, got {value!r}")
        if value is not None and value < 0:
            raise PriceError(f"{where}: '{name}' must be 0 or more, got {value!r}")
        numbers[name] = float(value) if value is not None else None
    retired = entry.get("retired")
    if retired is not None and not isinstance(retired, dt.date):
        raise PriceError(f"{where}: 'retired' must be a TOML date")
    return PriceRow(
        model=entry["model"],
        provider=entry["provider"],
        source=entry["source"],
        as_of=as_of,
        aliases=tuple(str(a) for a in entry.get("aliases", ())),
        quality=entry.get("quality"),
        sizes=tuple(str(s) for s in entry.get("sizes", ())),
        default=bool(entry.get("default", False)),
        retired=retired,
        usd_per_image=numbers["usd_per_image"],
        credits=numbers["credits"],
        usd_per_credit=numbers["usd_per_credit"],
        usd_per_megapixel=numbers["usd_per_megapixel"],
        text_input_usd_per_1m_tokens=numbers["text_input_usd_per_1m_tokens"],
        image_input_usd_per_1m_tokens=numbers["image_input_usd_per_1m_tokens"],
        image_output_usd_per_1m_tokens=numbers["image_output_usd_per_1m_tokens"],
        configured=entry.get("configured"),
    )


_TOKENS_KNOWN = frozenset({"model", "quality", "tokens", "source", "as_of"})


def _tokens_row(entry: Mapping[str, Any], origin: str, index: int) -> OutputTokensRow:
    where = f"{origin}: image_output_tokens row {index + 1} ({entry.get('model', '?')})"
    as_of = _sourced(entry, where, _TOKENS_KNOWN, ("model", "quality", "source"))
    tokens = entry.get("tokens")
    if not isinstance(tokens, dict) or not tokens:
        raise PriceError(f"{where}: 'tokens' must be a table such as {{ \"1024x1024\" = 196 }}")
    for size, count in tokens.items():
        if _pixels(size) is None:
            raise PriceError(f"{where}: size '{size}' is not WIDTHxHEIGHT")
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise PriceError(f"{where}: tokens for {size} must be a whole number over 0")
    return OutputTokensRow(
        model=entry["model"],
        quality=entry["quality"],
        tokens={str(k): int(v) for k, v in tokens.items()},
        source=entry["source"],
        as_of=as_of,
    )


def _check_names(rows: tuple[PriceRow, ...], origin: str) -> None:
    """An alias must never also name a different model (local `flux-dev` vs BFL's)."""
    owner: dict[str, str] = {}
    for row in rows:
        for name in (row.model, *row.aliases):
            if owner.setdefault(name, row.model) != row.model:
                raise PriceError(f"{origin}: '{name}' names both '{owner[name]}' and '{row.model}'")
    for model in {r.model for r in rows}:
        units = {r.unit for r in rows if r.model == model}
        if len(units) > 1:
            raise PriceError(f"{origin}: model '{model}' mixes pricing units {sorted(units)}")
