"""Brace expansion as bash and braceexpand do it, the way open_clip users write shard lists.

`shard-{000000..000159}.tar` is a zero-padded range, `{train,extra}` a list, `x{0..8..2}`
a range with a step; braces nest, and `{x}` alone stays literal.
"""

from __future__ import annotations

import re

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


def _matching_brace(text: str, start: int) -> int:
    """Index of the `}` closing the `{` at `start`, or -1."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top_level_commas(body: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in body:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += char == "{"
        depth -= char == "}"
        current.append(char)
    parts.append("".join(current))
    return parts


def _range_items(match: re.Match) -> list[str]:
    """`000..159` keeps the zero padding of its ends, as braceexpand (and so open_clip) does."""
    first, last, step = match.group(1), match.group(2), match.group(3)
    lo, hi = int(first), int(last)
    stride = abs(int(step)) if step else 1
    if stride == 0:
        raise ValueError(f"brace range {match.group(0)!r} has a zero step")
    numbers = range(lo, hi + 1, stride) if lo <= hi else range(lo, hi - 1, -stride)
    padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-").startswith("0") for t in (first, last))
    width = max(len(first), len(last)) if padded else 0
    return [str(n).zfill(width) for n in numbers]


def expand_braces(pattern: str) -> list[str]:
    """`a{0..2}b` -> a0b a1b a2b; `{x,y}` -> x y; nested braces expand inside out."""
    start = pattern.find("{")
    while start != -1:
        end = _matching_brace(pattern, start)
        if end == -1:
            raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")
        body = pattern[start + 1 : end]
        match = _RANGE.match(body)
        alternatives = _split_top_level_commas(body)
        if match or len(alternatives) > 1:
            items = _range_items(match) if match else alternatives
            prefix, suffixes = pattern[:start], expand_braces(pattern[end + 1 :])
            return [prefix + head + tail for item in items for head in expand_braces(item) for tail in suffixes]
        start = pattern.find("{", end + 1)  # `{x}` alone is literal, like in bash
    return [pattern]
