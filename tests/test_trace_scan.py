"""The filter's batch read of many traces (lgt_ops/trace_scan.py) must give exactly what the
plain rules give: behaviour counts equal to `traces.behaviour_counts`, and "may leak" wherever
`traces.leaks` finds a leak.

Two kinds of proof: the patterns handed to RE2 use only constructs it reads as Python's `re`
does on ASCII text (read off their parse trees), and the answers agree over simulated traces,
the rule tests' planted phrases and random texts glued from the rules' own fragments."""

from __future__ import annotations

import random
import subprocess
import sys
from re import _constants as c  # the stdlib's regex parser, as tests/regex_cover.py uses it
from re import _parser as parser
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lgt_ops import trace_scan, traces
from lgt_ops.config import MethodParams
from lgt_ops.stages import filter as filter_stage
from tests.sim_traces import simulated
from tests.test_filter_rules import BEHAVIOUR_PHRASES, LEAK_PHRASES
from tests.test_trace_heads import _questions

# Constructs RE2 and Python's `re` read alike on ASCII text (RE2 is leftmost-first as `re`).
_SAME = {c.LITERAL, c.NOT_LITERAL, c.IN, c.BRANCH, c.SUBPATTERN, c.MAX_REPEAT, c.MIN_REPEAT}
_SAME_IN_CLASS = {c.LITERAL, c.RANGE, c.NEGATE}
_SAME_CATEGORIES = {c.CATEGORY_DIGIT, c.CATEGORY_WORD}  # ASCII in RE2, the same on ASCII


def _differences(items: Any) -> list[str]:
    """What in a parsed pattern RE2 may read differently (empty: nothing)."""
    out = []
    for op, av in items:
        if op == c.AT:
            if av != c.AT_BOUNDARY:
                out.append(f"anchor {av}")
        elif op == c.IN:
            for cop, cav in av:
                if cop == c.CATEGORY and cav in _SAME_CATEGORIES:
                    continue
                if cop not in _SAME_IN_CLASS:
                    out.append(f"class item {cop} {cav}")
        elif op not in _SAME:
            out.append(f"{op}")  # lookarounds, backreferences, ...
        elif op == c.SUBPATTERN:
            out += _differences(av[-1])
        elif op == c.BRANCH:
            out += [d for b in av[1] for d in _differences(b)]
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT):
            out += _differences(av[2])
    return out


def _alternatives_start_with_a_letter(pattern: str) -> bool:
    """`\\b(?:A|B|...)`: every A, B, ... starts with a letter (RE2's count then only differs
    from `findall` on a match glued to the one before, which trace_scan._GLUED catches)."""
    items = list(parser.parse(pattern))
    return items[0] == (c.AT, c.AT_BOUNDARY) and _starts_with_a_letter(items[1:])


def _starts_with_a_letter(items: Any) -> bool:
    if not items:
        return False
    op, av = items[0]
    if op == c.LITERAL:
        return chr(av).isalpha()
    if op == c.BRANCH:
        return all(_starts_with_a_letter(list(b)) for b in av[1])
    if op == c.SUBPATTERN:
        return _starts_with_a_letter(list(av[-1]))
    if op == c.IN:
        return all(cop == c.LITERAL and chr(cav).isalpha() for cop, cav in av)
    return False


def test_the_patterns_read_alike_in_re2():
    for p in trace_scan._BEHAVIOURS.values():
        assert _differences(parser.parse(p)) == [], p
        assert _alternatives_start_with_a_letter(p), p
    assert _differences(parser.parse(trace_scan._MAY_LEAK)) == []
    assert _differences(parser.parse(trace_scan._GLUED)) == []
    # the check sees what RE2 reads otherwise
    for p in (r"a(?!b)", r"(?<=a)b", r"\s", r"a$", r"(a)\1", r"[\s,]", r"\Ba", r"[^\W]"):
        assert _differences(parser.parse(p)), p
    assert not _alternatives_start_with_a_letter(r"\b(?:a|\d)")


def test_superset_pattern_drops_lookaheads_and_spells_out_whitespace():
    space = trace_scan._ASCII_SPACE
    assert trace_scan.superset_pattern(r"a(?!b)c") == "ac"
    assert trace_scan.superset_pattern(r"a(?! (?:on|in(?!k)))c|d") == "ac|d"
    assert trace_scan.superset_pattern(r"a\sb") == f"a[{space}]b"
    assert trace_scan.superset_pattern(r"[\s,]x") == f"[{space},]x"
    assert trace_scan.superset_pattern(r"\(?!a\)") == r"\(?!a\)"  # escaped: not a group
    assert trace_scan.superset_pattern(r"[(?!]a") == r"[(?!]a"  # in a class: not a group
    assert trace_scan.superset_pattern(r"[]](?!x)") == "[]]"
    # Python's \s on ASCII text is exactly the spelled-out class
    ascii_space = "".join(chr(i) for i in range(128) if chr(i).isspace())
    spelled = pc.match_substring_regex(pa.array(list(ascii_space)), f"^[{space}]$")
    assert all(spelled.to_pylist())
    assert not any(pc.match_substring_regex(pa.array(["a", "_", "\x00"]), f"[{space}]").to_pylist())


# Fragments glued with and without separators: matches right after matches ("waitwait",
# "step 1step 2"), phrasings inside words, ASCII whitespace RE2 does not call `\s` (\v, \x1c).
_PIECES = [
    *BEHAVIOUR_PHRASES, *LEAK_PHRASES,
    "wait", "Wait", "actually", "check", "verify", "no, ", "step 2", "step ", "1", "next,",
    "first,", "then i will", "rule out", "eliminat", "let me re", "think", "ing", "un", "_",
    "[84,", "30]", "(1,", "2)", "640", "x", "480", "x =", "y", "c14", "obj_", "7", "the text",
    "given", "\x0b", "\x1c", "\t", "\n", " ", " ", ", ", ". ", "'", "-", "</think>", "\u00d7",
]  # fmt: skip


def _random_texts() -> list[str]:
    rng = random.Random(5)
    return ["".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 30))) for _ in range(6000)]


def _simulated_texts() -> list[str]:
    return [t.text for q in simulated(500, seed=9) for t in q]


def test_scans_equal_the_plain_rules():
    texts = _simulated_texts() + [t.text for q in _questions() for t in q] + _random_texts()
    found = trace_scan.scan(texts)
    read = leaky = maybe = 0
    for text, s in zip(texts, found, strict=True):
        if s is None:
            continue
        read += 1
        assert s.behaviours == traces.behaviour_counts(text.split("</think>", 1)[0]), text
        leak = traces.leaks(text)
        assert s.may_leak or leak is None, text
        leaky += leak is not None
        maybe += s.may_leak
    # the checks covered many texts, and the prefilter passes few that do not leak
    assert read > 0.6 * len(texts), read
    assert leaky and maybe < 1.3 * leaky + 0.1 * read, (leaky, maybe, read)


def test_every_simulated_trace_takes_the_batch_path():
    assert None not in trace_scan.scan(_simulated_texts())


def test_texts_the_batch_count_may_get_wrong_are_left_to_the_plain_rules():
    glued = ["waitwait", "Step 1step 2", "actuallyactually it is", "x wait" + "wait" * 3]
    counts = pc.count_substring_regex(
        pa.array([t.lower() for t in glued]), "|".join(trace_scan._BEHAVIOURS.values())
    ).to_pylist()
    plain = [sum(traces.behaviour_counts(t).values()) for t in glued]
    assert counts != plain  # what Arrow alone would count
    assert trace_scan.scan(glued) == [None] * len(glued)
    assert trace_scan.scan(["caf\u00e9 wait", "wait wait"])[0] is None  # not ASCII
    assert trace_scan.scan(["wait wait"])[0] == trace_scan.Scanned(
        {"verification": 0, "backtracking": 2, "subgoal": 0, "backward": 0}, False
    )
    random_scans = trace_scan.scan(_random_texts())
    assert 0 < random_scans.count(None) < len(random_scans) // 2


def test_scans_in_chunks_equal_one_scan(monkeypatch):
    texts = _random_texts()[:500]
    whole = trace_scan.scan(texts)
    monkeypatch.setattr(trace_scan, "CHUNK_CHARS", 100)
    assert trace_scan.scan(texts) == whole
    monkeypatch.setattr(trace_scan, "CHUNK_CHARS", 1)  # one text a chunk
    assert trace_scan.scan(texts) == whole
    assert trace_scan.scan([]) == []


def test_judge_is_the_same_with_and_without_scans():
    m = MethodParams()
    qs = simulated(300, seed=2) + _questions()
    for q in qs:
        scans = trace_scan.scan([t.text for t in q])
        assert filter_stage.judge(q, m, scans) == filter_stage.judge(q, m), q[0].question_id


def test_a_scan_does_not_import_pandas():
    """`pa.array` of a list would (a third of a second in every process that filters)."""
    code = (
        "import sys; from lgt_ops import trace_scan; trace_scan.scan(['wait, x = 1', 'a'] * 9);"
        "assert 'pandas' not in sys.modules, 'pandas imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
