"""Does every match of a regex contain one of some literals? Read off the pattern's parse tree
(the stdlib's own regex parser), for the prefilters of lgt_ops/traces.py: a phrasing is only
searched in a text holding one of its literals, so a phrasing that can match without any
of them would silently never be searched there.

The answer is sound, not complete: True is a proof (every string the pattern can match,
lower-cased, contains a literal; characters that only fold to ASCII ignoring case, like the
Kelvin sign, are left to `traces`, which skips its prefilters on such texts), False means no
proof was found, to be fixed by naming a literal the pattern really needs. The proof: one
element of a sequence that is always matched and covered (a group, each branch of an
alternation, a repeat taken at least once), or a run of consecutive elements whose finitely
many strings each contain a literal.
"""

from __future__ import annotations

from re import _constants as c  # the parser ships with `re` (sre_parse, deprecated, aliases it)
from re import _parser as parser
from typing import Any

from lgt_ops.trace_scan import regex_tokens

CAP = 4096  # a run's strings are enumerated up to this many
REPEATS = (c.MAX_REPEAT, c.MIN_REPEAT)
Items = list[tuple[Any, Any]]


def alternatives(pattern: str) -> list[str]:
    """The top-level alternatives of a pattern (split at `|` outside groups and classes)."""
    out, start = [], 0
    for i, tok, in_class, depth in regex_tokens(pattern):
        if tok == "|" and not in_class and depth == 0:
            out.append(pattern[start:i])
            start = i + 1
    return [*out, pattern[start:]]


def covered(pattern: str, literals: tuple[str, ...], *, digit: str | None = None) -> bool:
    """Every match of `pattern` contains one of `literals` (matched lower-cased; "" is in
    every text). `digit`: the string `\\d` stands for (to prove a digit is needed, with the
    ten digits as the literals); by default `\\d` is any string."""
    return _covers(list(parser.parse(pattern)), tuple(x.lower() for x in literals), digit)


def _covers(items: Items, lits: tuple[str, ...], digit: str | None) -> bool:
    for i in range(len(items)):  # a run of elements all of whose strings hold a literal
        run: set[str] | None = {""}
        for op, av in items[i:]:
            run = _join(run, _strings(op, av, digit))
            if run is None:
                break
            if all(any(x in s for x in lits) for s in run):
                return True
    return any(_covers_node(op, av, lits, digit) for op, av in items)


def _covers_node(op: Any, av: Any, lits: tuple[str, ...], digit: str | None) -> bool:
    if op is c.SUBPATTERN:
        return _covers(list(av[-1]), lits, digit)
    if op is c.BRANCH:
        return all(_covers(list(b), lits, digit) for b in av[1])
    if op in REPEATS:
        return av[0] >= 1 and _covers(list(av[2]), lits, digit)
    return False


def _join(run: set[str] | None, more: set[str] | None) -> set[str] | None:
    if run is None or more is None or len(run) * len(more) > CAP:
        return None
    return {a + b for a in run for b in more}


def _strings(op: Any, av: Any, digit: str | None) -> set[str] | None:
    """Every string (lower-cased) one element can match, if finitely many; else None."""
    if op is c.LITERAL:
        return {chr(av).lower()}
    if op is c.IN:
        return _class(av, digit)
    if op in (c.AT, c.ASSERT, c.ASSERT_NOT):  # zero-width
        return {""}
    if op is c.SUBPATTERN:
        return _sequence(list(av[-1]), digit)
    if op is c.BRANCH:
        parts = [_sequence(list(b), digit) for b in av[1]]
        return None if None in parts else set().union(*parts)  # type: ignore[arg-type]
    if op in REPEATS and av[1] <= 4:  # a bounded repeat: each count of the item
        one, run = _sequence(list(av[2]), digit), {""}
        out = {""} if av[0] == 0 else set()
        for n in range(1, av[1] + 1):
            run = _join(run, one)
            if run is None:
                return None
            if n >= av[0]:
                out |= run
        return out
    return None


def _sequence(items: Items, digit: str | None) -> set[str] | None:
    run: set[str] | None = {""}
    for op, av in items:
        run = _join(run, _strings(op, av, digit))
    return run


def _class(av: Any, digit: str | None) -> set[str] | None:
    out: set[str] = set()
    for op, a in av:
        if op is c.LITERAL:
            out.add(chr(a).lower())
        elif op is c.RANGE and a[1] - a[0] < 64:
            out |= {chr(x).lower() for x in range(a[0], a[1] + 1)}
        elif op is c.CATEGORY and a is c.CATEGORY_DIGIT and digit is not None:
            out.add(digit)
        else:  # a negated class, \s, \w, a wide range: too many to list
            return None
    return out
