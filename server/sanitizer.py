"""The prompt sanitizer: normalises a prompt and checks it against the safety policy data."""

from __future__ import annotations

import re
import sys
import tomllib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

_POLICY_FILE = "safety.toml"

# Unicode categories dropped before matching: format characters (zero-width space and
# joiners, word joiner, soft hyphen, bidi controls, tags) and combining marks, so that
# "n\u200bude" and "nüde" read as "nude".
_DROPPED_CATEGORIES = frozenset({"Cf", "Mn", "Me"})
# Blank letters and symbols that render as nothing but are not format characters.
_BLANKS = frozenset("\u115f\u1160\u3164\uffa0\u2800")

# A "letter" for whole-word matching. Digits and symbols are not letters, so "g0re" is one
# word while "4k gore" still has a word boundary before "gore".
_LETTER = r"[^\W\d_]"
_NOT_AFTER_LETTER = rf"(?<!{_LETTER})"
_NOT_BEFORE_LETTER = rf"(?!{_LETTER})"
# Between the words of an allow-listed phrase, and around it: a phrase followed by a hyphen
# is part of a longer compound ("naked eye-catching model") and stays checked.
_PHRASE_GAP = r"[\s_-]*"
_PHRASE_START = r"(?<![\w-])"
_PHRASE_END = r"(?![\w-])"


class SafetyPolicyError(ValueError):
    """The safety policy (the data file or `extra` terms) is malformed."""


@dataclass(frozen=True)
class Verdict:
    blocked: bool
    category: str | None = None
    # The blocklist term that matched, for logs; never shown to the user.
    term: str | None = None


@dataclass(frozen=True)
class _Policy:
    blocklist: Mapping[str, Sequence[str]]
    allowlist: Sequence[str]
    lookalikes: Mapping[str, str]
    substitutions: Mapping[str, str]


def normalise(text: str) -> str:
    """The form prompts and policy terms are matched in: NFKC, without invisible characters
    or accents, casefolded, with look-alike letters folded to Latin."""
    table = _fold_table()
    # Look-alikes are folded before NFKD (which turns the lunate sigma ϲ into σ), after it
    # (which splits accents off, for the table to drop) and after casefolding (Greek capital
    # nu looks like N, but its small form looks like v).
    folded = unicodedata.normalize("NFKD", text.translate(table)).translate(table)
    folded = unicodedata.normalize("NFKD", folded.casefold()).translate(table)
    return unicodedata.normalize("NFKC", folded)


@cache
def _fold_table() -> dict[int, str | None]:
    """str.translate table: invisible characters and combining marks to nothing, look-alike
    letters to Latin. Built once, by scanning every code point (about 0.15 s)."""
    table: dict[int, str | None] = {
        code: None
        for code in range(sys.maxunicode + 1)
        if unicodedata.category(chr(code)) in _DROPPED_CATEGORIES
    }
    table.update(dict.fromkeys(map(ord, _BLANKS)))
    for letter, lookalikes in _packaged_policy().lookalikes.items():
        table.update(dict.fromkeys(map(ord, lookalikes), letter))
    return table


class Sanitizer:
    """Blocks prompts that contain a blocklist term once allow-listed phrases are cut out.

    Build it once (`Sanitizer.default()`) and share it: the patterns are compiled here, and
    `check` only reads them, so it is safe to call from several threads. Look-alike letters
    are folded by `normalise`, from the packaged policy file, whatever the blocklist.
    """

    def __init__(
        self,
        blocklist: Mapping[str, Sequence[str]],
        allowlist: Sequence[str] = (),
        substitutions: Mapping[str, str] | None = None,
    ) -> None:
        subs = {letter: normalise(chars) for letter, chars in (substitutions or {}).items()}
        gaps = _Gaps.excluding("".join(subs.values()))
        self._terms: dict[str, tuple[str, str]] = {}
        alternatives: list[str] = []
        for category, terms in blocklist.items():
            for term in _normalised_terms(category, terms):
                group = f"t{len(self._terms)}"
                self._terms[group] = (category, term)
                alternatives.append(f"(?P<{group}>{_term_pattern(term, subs, gaps)})")
        if not alternatives:
            raise SafetyPolicyError("blocklist has no terms; give at least one category")
        self._blocked = re.compile(
            _NOT_AFTER_LETTER + "(?:" + "|".join(alternatives) + ")" + _NOT_BEFORE_LETTER
        )
        phrases = [_phrase_pattern(phrase) for phrase in allowlist]
        self._allowed = (
            re.compile(_PHRASE_START + "(?:" + "|".join(phrases) + ")" + _PHRASE_END)
            if phrases
            else None
        )

    @classmethod
    def default(cls, extra: Mapping[str, Sequence[str]] | None = None) -> Sanitizer:
        """The packaged policy (server/data/safety.toml); `extra` adds terms per category and
        may name new categories."""
        policy = _packaged_policy()
        blocklist = {category: list(terms) for category, terms in policy.blocklist.items()}
        for category, terms in (extra or {}).items():
            blocklist.setdefault(category, []).extend(_string_list(terms, f"extra[{category!r}]"))
        return cls(blocklist, policy.allowlist, policy.substitutions)

    def check(self, prompt: str) -> Verdict:
        text = normalise(prompt)
        if self._allowed is not None:
            text = self._allowed.sub(" ", text)
        match = self._blocked.search(text)
        if match is None or match.lastgroup is None:
            return Verdict(blocked=False)
        category, term = self._terms[match.lastgroup]
        return Verdict(blocked=True, category=category, term=term)


def _string_list(value: object, name: str) -> list[str]:
    if isinstance(value, str):
        raise SafetyPolicyError(
            f'{name} must be a list of strings, got {value!r}; write ["{value}"]'
        )
    if not isinstance(value, Sequence) or not all(isinstance(item, str) for item in value):
        raise SafetyPolicyError(f"{name} must be a list of strings, got {value!r}")
    return list(value)


def _normalised_terms(category: str, terms: Sequence[str]) -> list[str]:
    if not category.strip():
        raise SafetyPolicyError(f"blocklist category names must not be blank, got {category!r}")
    normalised = []
    for term in _string_list(terms, f"blocklist[{category!r}]"):
        words = _words(normalise(term))
        if not words:
            raise SafetyPolicyError(
                f"blocklist[{category!r}] terms must contain letters or digits, got {term!r}"
            )
        normalised.append(" ".join(words))
    return normalised


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text)


def _letter_pattern(letter: str, substitutions: Mapping[str, str]) -> str:
    stand_ins = substitutions.get(letter, "")
    if not stand_ins:
        return re.escape(letter)
    return "[" + "".join(re.escape(ch) for ch in letter + stand_ins) + "]"


@dataclass(frozen=True)
class _Gaps:
    """What may come between the letters of a blocked term.

    Run together ("n.u.d.e", "under-age"): punctuation, but no spaces, so that two real words
    never join up ("go re-examine" is not "gore"). Spelled out one letter at a time ("n u d e",
    "N_U_D_E"): anything but letters and digits. Between the words of a phrase ("blood bath"):
    the same, or nothing ("bloodbath"). None includes a character that stands in for a letter
    ("!" for i): if "|" could be a gap and an l and an i at once, "exp|||..." would backtrack
    in cubic time.
    """

    joined: str
    spelled: str
    words: str

    @classmethod
    def excluding(cls, stand_ins: str) -> _Gaps:
        excluded = "".join(re.escape(ch) for ch in sorted(set(stand_ins)))
        underscore = "" if "_" in stand_ins else "|_"
        return cls(
            joined=f"(?:[^\\w\\s{excluded}]{underscore})*",
            spelled=f"(?:[^\\w{excluded}]{underscore})+",
            words=f"(?:[^\\w{excluded}]{underscore})*",
        )


def _term_pattern(term: str, substitutions: Mapping[str, str], gaps: _Gaps) -> str:
    """The term run together or spelled out one letter at a time, words of a phrase apart;
    every letter may be one of its substitutions."""
    words = [[_letter_pattern(ch, substitutions) for ch in word] for word in term.split()]
    joined = gaps.words.join(gaps.joined.join(letters) for letters in words)
    spelled = gaps.spelled.join(letter for letters in words for letter in letters)
    return f"{joined}|{spelled}"


def _phrase_pattern(phrase: str) -> str:
    words = _words(normalise(phrase))
    if not words:
        raise SafetyPolicyError(f"allowlist phrases must contain letters, got {phrase!r}")
    return _PHRASE_GAP.join(re.escape(word) for word in words)


@cache
def _packaged_policy() -> _Policy:
    raw = (resources.files("server") / "data" / _POLICY_FILE).read_text(encoding="utf-8")
    return _policy_from_mapping(tomllib.loads(raw), origin=_POLICY_FILE)


def _policy_from_mapping(data: Mapping[str, Any], *, origin: str) -> _Policy:
    blocklist = data.get("blocklist")
    if not isinstance(blocklist, Mapping) or not blocklist:
        raise SafetyPolicyError(f"{origin}: needs a [blocklist] table of category = [terms]")
    allowlist = data.get("allowlist", {})
    if not isinstance(allowlist, Mapping):
        raise SafetyPolicyError(f"{origin}: [allowlist] must be a table with phrases = [...]")
    return _Policy(
        blocklist={
            category: _string_list(terms, f"{origin} [blocklist] {category}")
            for category, terms in blocklist.items()
        },
        allowlist=_string_list(allowlist.get("phrases", []), f"{origin} [allowlist] phrases"),
        # One look-alike folds to exactly one letter; one substitution may stand for several
        # ("1" for i or l), which the patterns allow as alternatives.
        lookalikes=_letter_table(data.get("lookalikes", {}), f"{origin} [lookalikes]", True),
        substitutions=_letter_table(
            data.get("substitutions", {}), f"{origin} [substitutions]", False
        ),
    )


def _letter_table(table: Mapping[str, Any], origin: str, exclusive: bool) -> dict[str, str]:
    """Check a `letter = "characters"` table; keys are one letter a-z."""
    owner: dict[str, str] = {}
    for letter, chars in table.items():
        if len(letter) != 1 or not ("a" <= letter <= "z"):
            raise SafetyPolicyError(f"{origin}: keys must be one letter a-z, got {letter!r}")
        if not isinstance(chars, str) or not chars:
            raise SafetyPolicyError(f"{origin}: {letter} must be a non-empty string")
        for ch in chars:
            if exclusive and owner.get(ch, letter) != letter:
                raise SafetyPolicyError(
                    f"{origin}: {ch!r} is listed for both {owner[ch]} and {letter}; keep one"
                )
            owner[ch] = letter
    return dict(table)
