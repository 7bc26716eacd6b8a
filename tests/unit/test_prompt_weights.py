"""The A1111 attention-syntax parser (models.prompt_weights): A1111's own documented
examples to the float, escapes, unbalanced brackets, non-numeric weights, BREAK chunks, and
the plain text a prompt without effective syntax runs as."""

from __future__ import annotations

import pytest

from models.prompt_weights import Segment, chunk_count, parse, parse_prompt_attention

# A1111's parse_prompt_attention docstring, verbatim (modules/prompt_parser.py).
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_EXAMPLES)
def test_a1111_documented_examples(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [("", 1.0)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(word:1.5)", [("word", 1.5)]),
        ("(word: 0.25 )", [("word", 0.25)]),
        ("(word:-1)", [("word", -1.0)]),
        # Not a number: the colon and the word are text, and the brackets weigh them 1.1.
        ("(a:b)", [("a:b", 1.1)]),
        # Looks numeric but is not: text (A1111 raises here).
        ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),
        # A closing bracket without an opener is text, and so is a weight without one.
        ("a) b] c", [("a) b] c", 1.0)]),
        ("at 12:30)", [("at 12:30)", 1.0)]),
        ("[unclosed", [("unclosed", 1 / 1.1)]),
        (r"\(word\)", [("(word)", 1.0)]),
        (r"\[x\]", [("[x]", 1.0)]),
        ("a\\\\b", [("a\\b", 1.0)]),
        # A lone backslash is dropped, as in A1111.
        ("a\\b", [("ab", 1.0)]),
        ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        # BREAK is a word: inside another word it is text.
        ("BREAKING news", [("BREAKING news", 1.0)]),
        # Inside brackets it is still a break (A1111 would type the word, weighted -1.1).
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),
    ],
)
def test_table(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_unit_weights_and_escapes_are_plain_text() -> None:
    """What decides that a prompt runs the existing path: `(word:1.0)` is `word`."""
    for text, plain in [
        ("(word:1.0)", "word"),
        ("a (cat:1) on a mat", "a cat on a mat"),
        (r"\(word\)", "(word)"),
        ("a photo BREAK", "a photo"),
        ("no syntax here, at all.", "no syntax here, at all."),
    ]:
        parsed = parse(text)
        assert not parsed.weighted, text
        assert parsed.text == plain
        assert chunk_count(text) == 1


def test_weighted_prompts() -> None:
    for text in ["(word:1.5)", "[word]", "(word)", "a BREAK b", "BREAK a"]:
        assert parse(text).weighted, text


def test_chunks_follow_a1111() -> None:
    """BREAK ends a chunk (an empty one too); text after the last BREAK is a chunk only if
    not blank."""
    assert parse("a BREAK (b:1.2)").chunks == ((Segment("a", 1.0),), (Segment("b", 1.2),))
    assert chunk_count("a BREAK BREAK b") == 3
    assert chunk_count("BREAK a") == 2
    assert chunk_count("a BREAK") == 1
    assert chunk_count(None) == 1
    assert parse("a BREAK BREAK b").text == "a b"


def test_weights_multiply_through_nesting() -> None:
    """Every nesting of round and square brackets multiplies its factors."""
    for depth in range(1, 6):
        for inner in ("(", "["):
            close = ")" if inner == "(" else "]"
            factor = 1.1 if inner == "(" else 1 / 1.1
            text = "x " + "(" * depth + inner + "w" + close + ")" * depth + " y"
            pairs = parse_prompt_attention(text)
            expected = 1.1**depth * factor
            if expected == 1.0:  # ([w]): equal weights merge into one segment
                assert pairs == [("x w y", 1.0)]
            else:
                assert pairs == [("x ", 1.0), ("w", pytest.approx(expected)), (" y", 1.0)]
