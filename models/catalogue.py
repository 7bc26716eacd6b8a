"""The model catalogue: built-in entries from `models/data/catalogue.toml` plus the user's own."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from models.base import LOCAL_KINDS, ModelDefaults, ModelSpec
from models.hosted import HOSTED_KINDS

_KNOWN_KINDS = LOCAL_KINDS | HOSTED_KINDS


class CatalogueError(ValueError):
    """A catalogue entry (built-in or from the user's config) is malformed."""


def spec_from_mapping(entry: Mapping[str, Any], *, origin: str) -> ModelSpec:
    try:
        name = str(entry["name"])
        kind = str(entry["kind"])
        source = str(entry.get("source", ""))
    except KeyError as exc:
        raise CatalogueError(f"{origin}: a model entry needs '{exc.args[0]}'") from None
    if kind not in _KNOWN_KINDS:
        raise CatalogueError(
            f"{origin}: model '{name}' has kind '{kind}'; use one of {sorted(_KNOWN_KINDS)}"
        )
    raw_defaults = dict(entry.get("defaults", {}))
    try:
        defaults = ModelDefaults(**raw_defaults)
    except TypeError as exc:
        raise CatalogueError(f"{origin}: model '{name}' defaults: {exc}") from None
    known = {
        "name",
        "kind",
        "source",
        "defaults",
        "description",
        "provider_model",
        "replacement",
        "revision",
    }
    return ModelSpec(
        name=name,
        kind=kind,
        source=source,
        defaults=defaults,
        description=str(entry.get("description", "")),
        provider_model=entry.get("provider_model"),
        replacement=entry.get("replacement"),
        revision=entry.get("revision"),
        extra={k: v for k, v in entry.items() if k not in known},
    )


def builtin_entries() -> list[dict[str, Any]]:
    """Every data file under models/data whose name starts with `catalogue` (hosted backends
    keep theirs beside the local one)."""
    entries: list[dict[str, Any]] = []
    folder = resources.files("models") / "data"
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.startswith("catalogue") and item.name.endswith(".toml"):
            entries.extend(tomllib.loads(item.read_text(encoding="utf-8")).get("models", []))
    return entries


@dataclass(frozen=True)
class Catalogue:
    specs: Mapping[str, ModelSpec]

    @classmethod
    def load(cls, user_entries: Iterable[Mapping[str, Any]] = ()) -> Catalogue:
        specs: dict[str, ModelSpec] = {}
        for entry in builtin_entries():
            spec = spec_from_mapping(entry, origin="built-in catalogue")
            specs[spec.name] = spec
        # User entries win: a user may point `sdxl` at a local folder.
        for user_entry in user_entries:
            spec = spec_from_mapping(user_entry, origin="config [[models]]")
            specs[spec.name] = spec
        return cls(specs=specs)

    def get(self, name: str) -> ModelSpec | None:
        return self.specs.get(name)

    def names(self) -> list[str]:
        return sorted(self.specs)
