"""Client model aliases (no backends): the built-in table, which name wins with and without an
OpenAI key, the user's overrides, the router's plan and notice, and the model listing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from models.catalogue import Catalogue
from server import errors
from server.aliases import AliasTable, listing
from server.ledger import Ledger
from server.router import Router
from server.settings import Settings
from server.store.sql import open_database

CLIENT_NAMES = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
KEYED = {"openai": {"api_key": "k"}}


def make_router(tmp_path: Path, **overrides: Any) -> Router:
    settings = Settings(data_dir=tmp_path, **overrides)
    return Router(
        settings, Catalogue.load(settings.models), Ledger(open_database(None, path=tmp_path / "db"))
    )


def test_the_builtin_table_names_every_client_name_and_who_wins() -> None:
    table = AliasTable.load(alias_model="tiny-sdxl")
    assert set(table.entries) == {*CLIENT_NAMES, "gpt-image-2"}
    assert table.entries["dall-e-2"].wins == "local"
    assert {table.entries[n].wins for n in table.entries if n != "dall-e-2"} == {
        "openai-when-configured"
    }
    assert {a.target for a in table.entries.values()} == {"tiny-sdxl"}


def test_without_an_openai_key_every_client_name_is_served_locally(tmp_path: Path) -> None:
    router = make_router(tmp_path)
    for name in (*CLIENT_NAMES, "gpt-image-2"):
        (first,) = router.plan(name, local_only=False)
        assert first.spec.name == "tiny-sdxl"
        assert first.notice == f"{name} is an alias of tiny-sdxl here (set by alias_model)"


def test_alias_model_chooses_the_target_and_defaults_to_default_model(tmp_path: Path) -> None:
    (first,) = make_router(tmp_path, default_model="tiny-flux").plan("dall-e-3", local_only=False)
    assert first.spec.name == "tiny-flux"
    router = make_router(tmp_path, default_model="tiny-flux", alias_model="tiny-sdxl")
    (first,) = router.plan("dall-e-3", local_only=False)
    assert first.spec.name == "tiny-sdxl"


def test_with_an_openai_key_catalogue_names_go_to_openai_and_the_rest_stay_local(
    tmp_path: Path,
) -> None:
    router = make_router(tmp_path, providers=KEYED)
    (first,) = router.plan("gpt-image-2", local_only=False)
    assert (first.spec.name, first.spec.kind, first.notice) == ("gpt-image-2", "openai", None)
    # Names the hosted catalogue does not hold (OpenAI does not serve them) still map locally.
    for name in ("dall-e-2", "gpt-image-1-mini", "gpt-image-1.5"):
        (local,) = router.plan(name, local_only=False)
        assert local.spec.name == "tiny-sdxl"


def test_with_an_openai_key_the_retired_rule_applies_to_retired_names(tmp_path: Path) -> None:
    router = make_router(tmp_path, providers=KEYED)
    for retired in ("dall-e-3", "gpt-image-1"):
        with pytest.raises(errors.InvalidRequestError, match="map_retired_to_replacement"):
            router.plan(retired, local_only=False)
    mapped = make_router(
        tmp_path, providers={"openai": {"api_key": "k", "map_retired_to_replacement": True}}
    )
    (first,) = mapped.plan("gpt-image-1", local_only=False)
    assert first.spec.name == "gpt-image-2"
    assert first.notice == "gpt-image-1 is retired: served by gpt-image-2"


def test_local_only_serves_aliases_without_a_key_and_refuses_openai_names_with_one(
    tmp_path: Path,
) -> None:
    no_key = make_router(
        tmp_path, providers={"openai": {"map_retired_to_replacement": True}}, local_only=True
    )
    assert no_key.plan("gpt-image-2", local_only=True)[0].spec.name == "tiny-sdxl"
    # With a key the name is OpenAI's: local-only refuses it, never silently replaces it.
    keyed = make_router(tmp_path, providers=KEYED, local_only=True)
    with pytest.raises(errors.LocalOnlyError):
        keyed.plan("gpt-image-2", local_only=True)
    assert keyed.plan("gpt-image-1.5", local_only=True)[0].spec.name == "tiny-sdxl"


def test_the_users_aliases_win_over_the_file_and_over_openai(tmp_path: Path) -> None:
    router = make_router(
        tmp_path,
        providers=KEYED,
        aliases={"gpt-image-2": "tiny-flux", "my-name": "tiny-sdxl", "dall-e-2": ""},
    )
    (first,) = router.plan("gpt-image-2", local_only=False)
    assert first.spec.name == "tiny-flux"
    assert first.notice == "gpt-image-2 is an alias of tiny-flux here (set by aliases.gpt-image-2)"
    assert router.plan("my-name", local_only=False)[0].spec.name == "tiny-sdxl"
    # "" turns a built-in alias off: dall-e-2 is then an unknown model, as before aliases.
    with pytest.raises(errors.ModelNotFoundError, match="'dall-e-2' is not in the catalogue"):
        router.plan("dall-e-2", local_only=False)


def test_the_users_own_catalogue_entry_of_a_client_name_wins(tmp_path: Path) -> None:
    own = [{"name": "dall-e-2", "kind": "sdxl", "source": "hf-internal-testing/tiny"}]
    (first,) = make_router(tmp_path, models=own).plan("dall-e-2", local_only=False)
    assert (first.spec.name, first.notice) == ("dall-e-2", None)


def test_an_alias_to_a_missing_model_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(errors.ModelNotFoundError) as caught:
        make_router(tmp_path, aliases={"dall-e-3": "nope"}).plan("dall-e-3", local_only=False)
    assert "alias of 'nope'" in caught.value.message and "aliases.dall-e-3" in caught.value.message
    with pytest.raises(errors.ModelNotFoundError, match="set alias_model"):
        make_router(tmp_path, alias_model="gone").plan("dall-e-2", local_only=False)


def test_an_alias_takes_its_own_fallbacks_else_its_targets(tmp_path: Path) -> None:
    router = make_router(tmp_path, fallbacks={"tiny-sdxl": ["tiny-flux"]})
    chain = router.plan("dall-e-3", local_only=False)
    assert [c.spec.name for c in chain] == ["tiny-sdxl", "tiny-flux"]
    own = make_router(tmp_path, fallbacks={"dall-e-3": ["tiny-sd3"], "tiny-sdxl": ["tiny-flux"]})
    names = [c.spec.name for c in own.plan("dall-e-3", local_only=False)]
    assert names[0] == "tiny-sdxl" and "tiny-flux" not in names


def test_the_listing_shows_active_aliases_in_place_of_catalogue_rows(tmp_path: Path) -> None:
    router = make_router(tmp_path, providers=KEYED)
    rows = [
        {"name": "tiny-sdxl", "kind": "sdxl", "provider": "local", "source": "s"},
        {"name": "gpt-image-2", "kind": "openai", "provider": "openai", "source": "openai"},
        {"name": "dall-e-3", "kind": "openai", "provider": "openai", "source": "openai"},
    ]
    for row in rows:
        row |= {"loaded": row["name"] == "tiny-sdxl", "available": True}
    listed = {row["name"]: row for row in listing(rows, router.active_aliases())}
    # With a key, gpt-image-2 and the retired dall-e-3 are OpenAI's; the rest are aliases.
    assert "alias_of" not in listed["gpt-image-2"] and "alias_of" not in listed["dall-e-3"]
    for name in ("dall-e-2", "gpt-image-1-mini", "gpt-image-1.5"):
        assert listed[name]["alias_of"] == "tiny-sdxl"
        assert (listed[name]["kind"], listed[name]["loaded"]) == ("sdxl", True)
    bare = {row["name"]: row for row in listing(rows, make_router(tmp_path).active_aliases())}
    assert bare["dall-e-3"]["alias_of"] == "tiny-sdxl" and bare["dall-e-3"]["provider"] == "local"


def test_public_base_url_must_be_absolute() -> None:
    with pytest.raises(ValidationError, match="absolute http"):
        Settings(server={"public_base_url": "images.example.com"})
    settings = Settings(server={"public_base_url": "https://images.example.com/gen/"})
    assert settings.server.public_base_url == "https://images.example.com/gen"
