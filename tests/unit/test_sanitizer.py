"""Tests for the prompt sanitizer: the packaged policy, evasive spellings and the allow-list."""

from __future__ import annotations

import re
import string
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.sanitizer import SafetyPolicyError, Sanitizer, Verdict, normalise

# Read straight from the data file, not through the module under test, so that a loader that
# drops a category or a table fails these tests.
POLICY_PATH = Path(__file__).resolve().parents[2] / "server" / "data" / "safety.toml"
POLICY: dict[str, Any] = tomllib.loads(POLICY_PATH.read_text(encoding="utf-8"))
TERMS: list[tuple[str, str]] = [
    (category, term) for category, terms in POLICY["blocklist"].items() for term in terms
]
LOOKALIKES: dict[str, str] = POLICY["lookalikes"]
SUBSTITUTIONS: dict[str, str] = POLICY["substitutions"]

INVISIBLES = "\u200b\u200c\u200d\u2060\u00ad\ufeff\u180e\u200e\u034f\ufe0f"
# Punctuation that may join the letters of a run-together spelling; none stands in for a
# letter in [substitutions].
JOINERS = ".-_*~'\"/:,;·•…–—"
SPACES = " \t\n\u00a0\u3000"


@cache
def sanitizer() -> Sanitizer:
    return Sanitizer.default()


def test_policy_file_says_when_and_where_from() -> None:
    header = POLICY_PATH.read_text(encoding="utf-8").split("[blocklist]")[0]
    assert "2026-11-28" in header
    assert "original imagegen blocklist" in header


def test_policy_has_the_expected_categories() -> None:
    assert {category for category, _ in TERMS} == {"sexual", "violence", "minors"}


@pytest.mark.parametrize(
    ("prompt", "category", "term"),
    [
        ("a nude model on a beach", "sexual", "nude"),
        ("a set of nudes", "sexual", "nudes"),
        ("artistic nudity", "sexual", "nudity"),
        ("a naked man", "sexual", "naked"),
        ("nakedness", "sexual", "nakedness"),
        ("sexually explicit", "sexual", "explicit"),
        ("a scene of graphic violence", "violence", "violence"),
        ("a violent riot", "violence", "violent"),
        ("blood and gore", "violence", "gore"),
        ("a gory battlefield", "violence", "gory"),
        ("the goriest scene", "violence", "goriest"),
        ("an underage girl", "minors", "underage"),
        ("NUDE", "sexual", "nude"),
        ("(Naked).", "sexual", "naked"),
        ("4k,gore,8k", "violence", "gore"),
        ("#violence", "violence", "violence"),
        # Hyphenated compounds are checked part by part.
        ("an explicit-free catalogue", "sexual", "explicit"),
        ("nude-ish", "sexual", "nude"),
    ],
)
def test_blocks_each_category(prompt: str, category: str, term: str) -> None:
    assert sanitizer().check(prompt) == Verdict(blocked=True, category=category, term=term)


@pytest.mark.parametrize(
    ("prompt", "term"),
    [
        # Spaced, dotted, dashed, underscored.
        ("n u d e", "nude"),
        ("a photo, n u d e, 4k", "nude"),
        ("n.u.d.e", "nude"),
        ("n-u-d-e", "nude"),
        ("N_U_D_E", "nude"),
        ("n . u . d . e", "nude"),
        ("n\tu\nd  e", "nude"),
        ("g o r e", "gore"),
        ("na.ked", "naked"),
        ("vio-lence", "violence"),
        ("under-age", "underage"),
        ("under_age", "underage"),
        ("u.n.d.e.r.a.g.e", "underage"),
        # Digits and symbols for letters.
        ("nud3", "nude"),
        ("n4ked", "naked"),
        ("n@ked", "naked"),
        ("g0re", "gore"),
        ("g0ry", "gory"),
        ("9ore", "gore"),
        ("v1olence", "violence"),
        ("v!olence", "violence"),
        ("vi0l3nt", "violent"),
        ("exp1icit", "explicit"),
        ("exp|icit", "explicit"),
        ("expIicit", "explicit"),  # a capital I for the l
        ("nakedne$$", "nakedness"),
        ("nud1+y", "nudity"),
        ("v 1 o l e n c e", "violence"),
        # Invisible characters.
        ("nu\u200bde", "nude"),
        ("nu\u00adde", "nude"),
        ("n\u200du\u2060d\ufeffe", "nude"),
        ("g\u034fo\ufe0fre", "gore"),
        # Accents, compatibility forms and look-alike letters.
        ("nüde", "nude"),
        ("g\u0301ore", "gore"),
        ("ｎｕｄｅ", "nude"),
        ("𝐧𝐮𝐝𝐞", "nude"),
        ("Ⓝⓤⓓⓔ", "nude"),
        ("nud\u0435", "nude"),  # Cyrillic е
        ("n\u0430k\u0435d", "naked"),  # Cyrillic а, е
        ("\u039dUDE", "nude"),  # Greek capital nu
        ("g\u03bfre", "gore"),  # Greek omicron
        ("\u03bdiolence", "violence"),  # Greek small nu
        ("\u0475iolence", "violence"),  # Cyrillic izhitsa
        ("v\u0456olence", "violence"),  # Cyrillic і
        ("\u0435\u0445\u0440licit", "explicit"),  # Cyrillic е х р
        ("\u0433nderage", None),  # Cyrillic г is not a look-alike of u: passes
    ],
)
def test_catches_evasive_spellings(prompt: str, term: str | None) -> None:
    assert sanitizer().check(prompt).term == term


@pytest.mark.parametrize(
    "prompt",
    [
        "a gorgeous sunset over the sea",
        "the gorge of the Verdon",
        "in the style of Edward Gorey",
        "violet flowers and a violin",
        "explicitly labelled jars",
        "the denuded hillside",
        "a nudge",
        # Allow-listed phrases.
        "galaxies visible to the naked eye",
        "a naked-eye view of the moon",
        "Naked Eye astronomy",
        "a naked mole rat in its burrow",
        "a naked mole-rat",
        "a non-violence march",
        "nonviolence",
        "Non Violence",
        "a non-violent protest",
        "nonviolent resistance",
        "Al Gore giving a speech",
        "Al Gore's slideshow",
        "a Gore-Tex jacket",
        "a gore tex jacket",
        # Spaces never join two words into one term.
        "go re-enact the scene",
        "a cat asleep under age-old oaks",
        "nu de",
        # Incomplete spellings.
        "n u d",
        "n.u.d",
        "",
        "   ",
        "4k, highly detailed, 35mm, f/1.8",
    ],
)
def test_benign_prompts_pass(prompt: str) -> None:
    assert sanitizer().check(prompt) == Verdict(blocked=False)


@pytest.mark.parametrize(
    ("prompt", "term"),
    [
        ("naked eye and a nude model", "nude"),
        ("Al Gore covered in gore", "gore"),
        ("non-violence, then violence", "violence"),
        ("a gore-tex jacket soaked in gore", "gore"),
        # A hyphen after the phrase makes it part of a longer word, which is checked.
        ("a naked eye-catching model", "naked"),
        ("naked eyes", "naked"),
        # Phrases are matched literally, not through substitutions.
        ("n4ked eye", "naked"),
        ("naked. eye", "naked"),
    ],
)
def test_allow_list_does_not_shield_the_rest_of_the_prompt(prompt: str, term: str) -> None:
    assert sanitizer().check(prompt).term == term


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ＮＵＤＥ", "nude"),
        ("n\u200bu\u00adde", "nude"),
        ("\u039dUDE", "nude"),
        ("\u03bd", "v"),
        ("Straße", "strasse"),
        ("café", "cafe"),
        ("İstanbul", "istanbul"),
        ("ﬁne", "fine"),
        ("a\u3164b", "ab"),
        ("N_U_D_E", "n_u_d_e"),
        ("日本語", "日本語"),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    assert normalise(text) == expected


@pytest.mark.parametrize(
    ("letter", "char"),
    [(letter, char) for letter, chars in LOOKALIKES.items() for char in chars],
)
def test_every_lookalike_folds_to_its_letter(letter: str, char: str) -> None:
    assert normalise(char) == letter


def test_extra_terms_extend_and_add_categories() -> None:
    plain = Sanitizer.default()
    extended = Sanitizer.default(extra={"violence": ["Blood Bath"], "drugs": ["cocaine"]})
    assert not plain.check("a bloodbath").blocked
    assert extended.check("a bloodbath") == Verdict(True, "violence", "blood bath")
    for spelling in ("a blood bath", "BLOOD-BATH", "b l o o d b a t h", "bl00d  b4th"):
        assert extended.check(spelling).term == "blood bath", spelling
    assert extended.check("c0caine") == Verdict(True, "drugs", "cocaine")
    assert extended.check("a nude") == Verdict(True, "sexual", "nude")
    assert not extended.check("blood on the bathroom floor").blocked


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"drugs": "cocaine"}, "extra['drugs'] must be a list of strings"),
        ({"drugs": [42]}, "extra['drugs'] must be a list of strings"),
        ({"drugs": ["  ...  "]}, "terms must contain letters or digits"),
        ({" ": ["cocaine"]}, "category names must not be blank"),
    ],
)
def test_bad_extra_terms_are_refused(extra: Any, message: str) -> None:
    with pytest.raises(SafetyPolicyError, match=re.escape(message)):
        Sanitizer.default(extra=extra)


def test_a_blocklist_needs_a_term() -> None:
    with pytest.raises(SafetyPolicyError, match="blocklist has no terms"):
        Sanitizer({})


# Separators that could also stand in for letters once made the check cubic (seconds).
HOSTILE_PROMPTS = ["exp" + "|" * 5000, "v" + "!" * 5000, "e x p " + "| " * 2500, "n" + "." * 5000]


# How fast the check is (a long prompt, and hostile ones that once made it cubic) is measured
# by scripts/bench_sanitizer.py, not asserted here: timings on a shared machine are noise.
@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS)
def test_hostile_prompts_get_a_verdict(prompt: str) -> None:
    verdict = sanitizer().check(prompt)
    assert not verdict.blocked  # separators alone spell no blocked word


# Property-based tests.

terms = st.sampled_from(TERMS)


def _spell(term: str, gaps: list[str]) -> str:
    return term[0] + "".join(gap + letter for gap, letter in zip(gaps, term[1:], strict=True))


@given(terms, st.data())
def test_invisible_characters_anywhere_still_block(entry: tuple[str, str], data: Any) -> None:
    category, term = entry
    gaps = data.draw(
        st.lists(st.text(INVISIBLES, max_size=3), min_size=len(term) - 1, max_size=len(term) - 1)
    )
    prompt = data.draw(st.text(INVISIBLES, max_size=2)) + _spell(term, gaps)
    assert sanitizer().check(prompt) == Verdict(True, category, term)


@given(terms, st.data())
def test_punctuation_between_any_letters_still_blocks(entry: tuple[str, str], data: Any) -> None:
    category, term = entry
    gaps = data.draw(
        st.lists(st.text(JOINERS, max_size=3), min_size=len(term) - 1, max_size=len(term) - 1)
    )
    assert sanitizer().check(f"a {_spell(term, gaps)} photo").category == category


@given(terms, st.text(JOINERS + SPACES, min_size=1, max_size=3))
def test_spelled_out_letters_still_block(entry: tuple[str, str], gap: str) -> None:
    category, term = entry
    assert sanitizer().check(f"a {gap.join(term)} photo").category == category


@given(terms, st.data())
def test_any_casing_still_blocks(entry: tuple[str, str], data: Any) -> None:
    category, term = entry
    upper = data.draw(st.lists(st.booleans(), min_size=len(term), max_size=len(term)))
    cased = "".join(ch.upper() if up else ch for ch, up in zip(term, upper, strict=True))
    assert sanitizer().check(cased).category == category


@given(terms, st.data())
def test_lookalikes_and_substitutions_still_block(entry: tuple[str, str], data: Any) -> None:
    category, term = entry
    spelled = "".join(
        data.draw(
            st.sampled_from(ch + LOOKALIKES.get(ch, "") + SUBSTITUTIONS.get(ch, "")),
            label=f"for {ch}",
        )
        for ch in term
    )
    assert sanitizer().check(spelled).category == category


@given(st.text(max_size=40), terms, st.text(max_size=40))
def test_a_blocked_term_blocks_whatever_surrounds_it(
    before: str, entry: tuple[str, str], after: str
) -> None:
    # " . " keeps the term a word of its own and cannot be part of an allow-listed phrase.
    assert sanitizer().check(f"{before} . {entry[1]} . {after}").blocked


@given(terms, st.sampled_from(POLICY["allowlist"]["phrases"]))
def test_allow_listed_phrases_pass_alone_but_not_with_a_term(
    entry: tuple[str, str], phrase: str
) -> None:
    assert not sanitizer().check(f"a photo: {phrase}").blocked
    assert sanitizer().check(f"{phrase} and {entry[1]}").term == entry[1]


# Every term has an e or a y, so text without them (and without "3", which stands in for e,
# and without letters that fold to e or y) cannot spell one.
SAFE_ALPHABET = (
    "".join(ch for ch in string.printable if ch not in "eEyY3") + "日本語のあいうアイウ中文한국어"
)


def test_every_term_has_an_e_or_a_y() -> None:
    assert all("e" in term or "y" in term for _, term in TERMS)
    assert SUBSTITUTIONS.get("e") == "3"
    assert "y" not in SUBSTITUTIONS


@given(st.text(SAFE_ALPHABET, max_size=200))
def test_text_that_cannot_spell_a_term_never_blocks(prompt: str) -> None:
    assert sanitizer().check(prompt) == Verdict(blocked=False)


@given(st.text())
def test_normalise_is_idempotent(text: str) -> None:
    once = normalise(text)
    assert normalise(once) == once


@given(st.text())
def test_check_gives_a_known_category_and_term_for_any_text(prompt: str) -> None:
    verdict = sanitizer().check(prompt)
    if verdict.blocked:
        assert (verdict.category, verdict.term) in TERMS
    else:
        assert verdict == Verdict(blocked=False)
