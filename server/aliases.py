"""Client model aliases: the OpenAI names clients send hard-coded (dall-e-2, dall-e-3, gpt-image-*)
served by a local model; built-in entries from `server/data/aliases.toml` plus the user's own."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from models.catalogue import Catalogue

WINS = frozenset({"local", "openai-when-configured"})
# The provider whose key decides an "openai-when-configured" entry.
_OPENAI = "openai"


class AliasError(ValueError):
    """The built-in alias table is malformed."""


@dataclass(frozen=True)
class Alias:
    name: str
    target: str
    wins: str  # "local" | "openai-when-configured" | "user" (the `aliases` setting)
    # The setting that points this alias at its target, named in notices and errors.
    setting: str
    note: str = ""

    @property
    def notice(self) -> str:
        return f"{self.name} is an alias of {self.target} here (set by {self.setting})"


def _builtin_document() -> dict[str, Any]:
    text = (resources.files("server") / "data" / "aliases.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def _builtin_entry(entry: Any) -> tuple[str, str, str]:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise AliasError("built-in aliases: each [[aliases]] entry needs a string `name`")
    name, wins = entry["name"], entry.get("wins")
    if wins not in WINS:
        raise AliasError(
            f"built-in aliases: '{name}' has wins = {wins!r}; use one of {sorted(WINS)}"
        )
    return name, str(wins), str(entry.get("note", ""))


@dataclass(frozen=True)
class AliasTable:
    entries: Mapping[str, Alias]

    @classmethod
    def load(cls, *, alias_model: str, user: Mapping[str, str] | None = None) -> AliasTable:
        """The built-in names, each mapped to `alias_model`, then the user's `aliases`: an entry
        of theirs always applies (it wins over the file and over OpenAI); "" removes a name."""
        entries: dict[str, Alias] = {}
        for raw in _builtin_document().get("aliases", []):
            name, wins, note = _builtin_entry(raw)
            entries[name] = Alias(name, alias_model, wins, setting="alias_model", note=note)
        for name, target in (user or {}).items():
            if not target:
                entries.pop(name, None)
                continue
            entries[name] = Alias(name, target, "user", setting=f"aliases.{name}")
        return cls(entries=entries)

    def resolve(self, name: str, *, catalogue: Catalogue, openai_ready: bool) -> Alias | None:
        """The alias `name` stands for here, or None where the name means itself: a built-in
        alias gives way to the user's own catalogue entry of that name (one that is not
        OpenAI's) and, where it says "openai-when-configured" and OpenAI can be used, to the
        catalogue's OpenAI entry."""
        alias = self.entries.get(name)
        if alias is None or alias.target == name:
            return None
        if alias.wins == "user":
            return alias
        spec = catalogue.get(name)
        if spec is None:
            return alias
        if (spec.source or spec.kind) != _OPENAI:
            return None
        if alias.wins == "openai-when-configured" and openai_ready:
            return None
        return alias

    def active(self, *, catalogue: Catalogue, openai_ready: bool) -> list[Alias]:
        """The aliases that apply now, by name."""
        found = (
            self.resolve(name, catalogue=catalogue, openai_ready=openai_ready)
            for name in sorted(self.entries)
        )
        return [alias for alias in found if alias is not None]


def listing(rows: list[dict[str, Any]], aliases: list[Alias]) -> list[dict[str, Any]]:
    """The model listing with each alias that applies as a row of its own (taking the place of
    a catalogue row of the same name, which it hides): the target's standing, plus `alias_of`."""
    by_name = {row["name"]: row for row in rows}
    shown = {alias.name: alias for alias in aliases}
    out = [row for row in rows if row["name"] not in shown]
    for alias in aliases:
        target = by_name.get(alias.target)
        row: dict[str, Any] = {
            "name": alias.name,
            "kind": target["kind"] if target else "alias",
            "provider": target["provider"] if target else "local",
            "source": target["source"] if target else "",
            "description": f"alias of {alias.target} ({alias.setting})"
            + (f": {alias.note}" if alias.note else ""),
            "loaded": bool(target and target["loaded"]),
            "available": bool(target and target["available"]),
            "builtin": bool(target and target.get("builtin")),
            "on_disk": bool(target and target.get("on_disk")),
            "alias_of": alias.target,
        }
        if target is None:
            row["reason"] = (
                f"its target '{alias.target}' is not in the catalogue; set {alias.setting} "
                "to a model of `imagegen models`"
            )
        elif "reason" in target:
            row["reason"] = target["reason"]
        out.append(row)
    return sorted(out, key=lambda row: str(row["name"]))
