"""The filter's regex rules over many traces at once, in Arrow's compute kernels (RE2).

Read one trace at a time, the behaviour counts and the leak prefilter are some sixty
Python-level substring and regex calls a trace, and they were half of the filter's CPU.
Over a shard's traces joined into one Arrow array, each rule is one pass in C++:

- behaviours: `traces.behaviour_counts` of each trace's thinking, exactly (the patterns
  use only what RE2 and Python's `re` read alike on ASCII text: literals, classes, `\\b`,
  `\\d`, alternation and repeats, leftmost-first; tests/test_trace_scan.py checks both the
  parse trees and the counts);
- leaks: whether a text may leak at all. The RE2 pattern is `traces._LEAKS` with its
  negative lookaheads dropped and `\\s` spelled as Python's ASCII whitespace, so it
  matches wherever the Python one does (a superset); a text it does not match has no leak,
  and the few it does match are searched by `traces.leaks` as before.

Only ASCII texts take this path (Python's `re` and RE2 then agree on case, word characters
and digits); any other text, or one where Arrow's count could differ (`_GLUED`), gets None
and is read by the plain functions.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from lgt_ops import traces

# Characters per Arrow array: a chunk's text is held a few times over (joined, lower-cased,
# encoded), so memory stays some megabytes whatever the shard; the calls stay few.
CHUNK_CHARS = 1 << 20
# Python's `\s` on ASCII text; RE2's own `\s` leaves out \v and \x1c-\x1f.
_ASCII_SPACE = "\\t\\n\\v\\f\\r\\x1c-\\x1f "


@dataclass(frozen=True)
class Scanned:
    """What the batch read of one trace found."""

    behaviours: dict[str, int]  # traces.behaviour_counts of its thinking (cue not taken off)
    may_leak: bool  # False: traces.leaks(text) is None


def regex_tokens(pattern: str) -> Iterator[tuple[int, str, bool, int]]:
    """(index, token, in_class, depth) of each token of a regex: an escape (the backslash and
    the next character) or one character. `in_class`: inside a `[...]` class (not its own
    brackets; a `]` right after the `[` is a member); `depth`: the groups around the token (a
    group's own parentheses get the depth outside it)."""
    i, depth, in_class = 0, 0, False
    while i < len(pattern):
        tok = pattern[i : i + 2] if pattern[i] == "\\" else pattern[i]
        if in_class and tok == "]" and pattern[i - 1] != "[":
            in_class = False
        elif not in_class and tok == ")":
            depth -= 1
        yield i, tok, in_class, depth
        if not in_class and tok == "[":
            in_class = True
        elif not in_class and tok == "(":
            depth += 1
        i += len(tok)


def superset_pattern(pattern: str) -> str:
    """An RE2 pattern matching wherever the Python `pattern` matches in an ASCII text: its
    negative lookaheads dropped (each only forbids matches), `\\s` spelled out."""
    out: list[str] = []
    dropping: int | None = None  # the depth of the lookahead being dropped
    for i, tok, in_class, depth in regex_tokens(pattern):
        if dropping is not None:
            if tok == ")" and not in_class and depth == dropping:
                dropping = None
            continue
        if tok == "(" and not in_class and pattern.startswith("(?!", i):
            dropping = depth
            continue
        if tok == "\\s":
            tok = _ASCII_SPACE if in_class else f"[{_ASCII_SPACE}]"
        out.append(tok)
    if dropping is not None:
        raise ValueError(f"unbalanced group in {pattern!r}")
    return "".join(out)


_BEHAVIOURS = {name: p for name, (p, _) in traces._BEHAVIOUR_RULES.items()}
# Arrow counts by consuming each match and searching the rest as a new text, where a leading
# `\b` sees no character before it: after "wait" it would count the "wait" of "waitwait",
# which Python's `findall` does not. Only a match glued to the next one can differ, so a text
# where one may be (some phrasing right after a match of the same behaviour) is left to the
# plain count.
_GLUED = "|".join(f"(?:{p})(?:{p.removeprefix(chr(92) + 'b')})" for p in _BEHAVIOURS.values())
_MAY_LEAK = superset_pattern(traces._LEAKS.pattern)


def scan(texts: Sequence[str]) -> list[Scanned | None]:
    """Per text, what the batch read found, or None for a text it does not read."""
    out: list[Scanned | None] = [None] * len(texts)
    for chunk in _chunks([i for i, t in enumerate(texts) if t.isascii()], texts):
        for i, found in zip(chunk, _scan_ascii([texts[i] for i in chunk]), strict=True):
            out[i] = found
    return out


def _chunks(indices: list[int], texts: Sequence[str]) -> Iterator[list[int]]:
    """`indices` in runs of about CHUNK_CHARS characters of text (at least one text each)."""
    chunk: list[int] = []
    size = 0
    for i in indices:
        chunk.append(i)
        size += len(texts[i])
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _scan_ascii(texts: list[str]) -> list[Scanned | None]:
    thinking = _ascii_array([t.split("</think>", 1)[0] for t in texts], lower=True)
    counts = {
        name: pc.count_substring_regex(thinking, p).to_pylist() for name, p in _BEHAVIOURS.items()
    }
    glued = pc.match_substring_regex(thinking, _GLUED).to_pylist()
    may_leak = pc.match_substring_regex(_ascii_array(texts), _MAY_LEAK).to_pylist()
    return [
        None if glued[j] else Scanned({name: n[j] for name, n in counts.items()}, may_leak[j])
        for j in range(len(texts))
    ]


def _ascii_array(texts: list[str], *, lower: bool = False) -> pa.Array:
    """ASCII texts as one large_string array, built from its buffers (a character is a
    byte; `pa.array` of a list would import pandas, a third of a second per process)."""
    data = "".join(texts)
    offsets = array("q", itertools.accumulate(map(len, texts), initial=0))
    body = (data.lower() if lower else data).encode("ascii")
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(body)]
    return pa.Array.from_buffers(pa.large_string(), len(texts), buffers)
