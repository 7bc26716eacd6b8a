"""Prompt presets: built-in entries from `server/data/presets.toml` plus the user's own."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

_PLACEHOLDER = "{prompt}"
_FIELDS = frozenset({"template", "negative_prompt", "description"})


class PresetError(ValueError):
    """A preset name or entry (built-in or from the user's config) is unusable."""


@dataclass(frozen=True)
class Preset:
    name: str
    template: str
    negative_prompt: str
    description: str

    def apply(self, prompt: str) -> str:
        # Plain replacement, not str.format: prompts and templates may contain other braces.
        return self.template.replace(_PLACEHOLDER, prompt)


def _preset_from_mapping(
    name: str,
    entry: Mapping[str, Any],
    *,
    origin: str,
    base: Preset | None,
    default_negative_prompt: str,
) -> Preset:
    """Validate one entry. With `base`, the entry overrides only the fields it names."""
    where = f"{origin} presets.{name}"
    if not name.strip():
        raise PresetError(f"{origin}: a preset name must not be empty; name it like 'my-style'")
    if not isinstance(entry, Mapping):
        raise PresetError(
            f"{where}: must be a table of {', '.join(sorted(_FIELDS))}, got {type(entry).__name__}"
        )
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise PresetError(
            f"{where}: unknown field(s) {', '.join(unknown)}; use only {', '.join(sorted(_FIELDS))}"
        )
    for key, value in entry.items():
        if not isinstance(value, str):
            raise PresetError(f"{where}.{key}: must be a string, got {type(value).__name__}")
    if base is None and "template" not in entry:
        raise PresetError(
            f"{where}.template: missing; give a template containing {_PLACEHOLDER}, "
            f"e.g. '{_PLACEHOLDER}, watercolor'"
        )
    template = str(entry.get("template", base.template if base else ""))
    if _PLACEHOLDER not in template:
        raise PresetError(
            f"{where}.template: must contain {_PLACEHOLDER} where the user's prompt goes, "
            f"e.g. '{_PLACEHOLDER}, watercolor'; got {template!r}"
        )
    fallback_negative = base.negative_prompt if base else default_negative_prompt
    return Preset(
        name=name,
        template=template,
        negative_prompt=str(entry.get("negative_prompt", fallback_negative)),
        description=str(entry.get("description", base.description if base else "")),
    )


def _builtin_document() -> dict[str, Any]:
    text = (resources.files("server") / "data" / "presets.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


@dataclass(frozen=True)
class PresetBook:
    presets: Mapping[str, Preset]
    default_negative_prompt: str

    @classmethod
    def load(cls, user_presets: Mapping[str, Mapping[str, str]] | None = None) -> PresetBook:
        document = _builtin_document()
        default_negative = document.get("default_negative_prompt", "")
        if not isinstance(default_negative, str):
            raise PresetError("built-in presets: default_negative_prompt must be a string")
        raw = document.get("presets", {})
        if not isinstance(raw, Mapping):
            raise PresetError("built-in presets: [presets] must be a table of named presets")
        presets: dict[str, Preset] = {}
        for name, entry in raw.items():
            presets[name] = _preset_from_mapping(
                name,
                entry,
                origin="built-in",
                base=None,
                default_negative_prompt=default_negative,
            )
        # User entries win. An entry named like a built-in overrides only the fields it sets,
        # so a user can swap the negative prompt of `photoreal` without restating its template.
        for name, entry in (user_presets or {}).items():
            presets[name] = _preset_from_mapping(
                name,
                entry,
                origin="config",
                base=presets.get(name),
                default_negative_prompt=default_negative,
            )
        return cls(presets=presets, default_negative_prompt=default_negative)

    def names(self) -> list[str]:
        return sorted(self.presets)

    def get(self, name: str) -> Preset:
        try:
            return self.presets[name]
        except KeyError:
            raise PresetError(
                f"preset: unknown preset {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def expand(
        self, name: str | None, prompt: str, negative_prompt: str | None
    ) -> tuple[str, str | None]:
        """The (prompt, negative prompt) to send to a backend once preset `name` is applied."""
        if name is None:
            return prompt, negative_prompt
        preset = self.get(name)
        # The user's own terms go first so CLIP's 77-token truncation cuts the preset's, not theirs.
        parts = [p for p in (negative_prompt, preset.negative_prompt) if p and p.strip()]
        return preset.apply(prompt), ", ".join(parts) if parts else None
