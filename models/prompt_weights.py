"""A1111's prompt attention syntax, parsed (torch-free): `(text:1.3)`, `(text)` (x1.1),
`[text]` (/1.1), nesting, the escapes `\\(` `\\)` `\\[` `\\]` `\\\\`, and `BREAK` (a new
75-token chunk). models.local.weighted_embeds turns a parse into text embeddings; a model
that cannot weight (Flux, the hosted APIs) gets `ParsedPrompt.text`, the text without it.

The rules are those of AUTOMATIC1111's `modules/prompt_parser.parse_prompt_attention`:
an unclosed bracket weights everything after it, a closing one without an opener is text,
`(a:b)` where b is not a number is the text "a:b" weighted 1.1, runs of equal weight merge.
Two deliberate differences, both where A1111 misbehaves: a weight that looks numeric but is
not a number (`(a:1.2.3)`) is text instead of an exception, and `BREAK` inside brackets is
still a chunk break (A1111 multiplies its marker weight and then types the word "BREAK").
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_ROUND = 1.1
_SQUARE = 1 / 1.1

_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes, and a lone backslash (dropped, as in A1111)
    \(|\[|
    :\s*([+-]?[.\d]+)\s*\)|       # the end of (text:weight)
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class Segment:
    text: str
    weight: float


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt as chunks (split at BREAK) of weighted segments."""

    chunks: tuple[tuple[Segment, ...], ...]

    @property
    def weighted(self) -> bool:
        """Whether the syntax changes anything: a weight other than 1 or a BREAK."""
        return len(self.chunks) > 1 or any(s.weight != 1.0 for s in self.chunks[0])

    @property
    def text(self) -> str:
        """The prompt without its syntax (chunks joined by a space): what a model that
        cannot weight embeddings gets, and what an unweighted prompt runs as."""
        texts = ("".join(s.text for s in chunk) for chunk in self.chunks)
        return " ".join(t for t in texts if t) if self.weighted else next(texts)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111's flat form: (text, weight) pairs, with ("BREAK", -1.0) marking each BREAK."""
    res: list[list[object]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            if item[0] is not _BREAK_MARK:
                item[1] = float(item[1]) * factor  # type: ignore[arg-type]

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        number = _number(weight)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif number is not None and round_open:
            multiply(round_open.pop(), number)
        elif piece == ")" and round_open:
            multiply(round_open.pop(), _ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append([_BREAK_MARK, -1.0])
                res.append([part, 1.0])
    for pos in round_open:
        multiply(pos, _ROUND)
    for pos in square_open:
        multiply(pos, _SQUARE)
    if not res:
        res = [["", 1.0]]
    merged: list[list[object]] = [res[0]]
    for item in res[1:]:
        last = merged[-1]
        if item[1] == last[1] and _BREAK_MARK not in (item[0], last[0]):
            last[0] = str(last[0]) + str(item[0])
        else:
            merged.append(item)
    return [("BREAK" if t is _BREAK_MARK else str(t), float(w)) for t, w in merged]  # type: ignore[arg-type]


# The BREAK marker while parsing: an object, so that text reading "BREAK" is never taken for it.
_BREAK_MARK = object()


def _number(weight: str | None) -> float | None:
    if weight is None:
        return None
    try:
        return float(weight)
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> ParsedPrompt:
    """The chunks of `text`, as A1111 forms them: each BREAK ends a chunk (an empty one too);
    the text after the last BREAK is a chunk only where it is not blank."""
    chunks: list[tuple[Segment, ...]] = []
    current: list[Segment] = []
    # ("BREAK", -1.0) is only ever the marker: the word itself is split away as text.
    for piece, weight in parse_prompt_attention(text):
        if piece == "BREAK" and weight == -1.0:
            chunks.append(tuple(current))
            current = []
        elif piece:
            current.append(Segment(piece, weight))
    if any(s.text.strip() for s in current) or not chunks:
        chunks.append(tuple(current))
    return ParsedPrompt(tuple(chunk or (Segment("", 1.0),) for chunk in chunks))


def chunk_count(text: str | None) -> int:
    """How many 77-token chunks the prompt's embedding spans (a batch shares one length)."""
    return len(parse(text).chunks) if text else 1
