"""The filter reads a rollout's thinking once for all the traces that repeat it
(lgt_ops/trace_heads.py): its answers must be exactly those of the rules on the whole text.

Two kinds of proof: the rules' patterns cannot match a newline (read off their parse trees),
and the shared reads equal the plain ones over simulated traces, the rule tests' planted
phrases and random texts built from the rules' own fragments, cut at every join."""

from __future__ import annotations

import functools
import random
from re import _constants as c  # the stdlib's regex parser, as tests/regex_cover.py uses it
from re import _parser as parser
from typing import Any

import pytest

from lgt_ops import questions, trace_heads, traces
from lgt_ops.config import MethodParams
from lgt_ops.stages import filter as filter_stage
from lgt_ops.traces import Trace
from tests.sim_traces import simulated
from tests.test_filter_rules import BEHAVIOUR_PHRASES, LEAK_PHRASES

_ZERO_WIDTH_OK = {c.AT_BOUNDARY, c.AT_NON_BOUNDARY}  # same at a string's ends as next to "\n"


def _may_take_newline(items: Any) -> bool:
    """Whether a parsed pattern may consume a newline, or look at one (conservative)."""
    for op, av in items:
        if op in (c.LITERAL, c.NOT_LITERAL) and (av == 10) == (op == c.LITERAL):
            return True
        if op == c.ANY or (op == c.IN and _class_takes_newline(av)):
            return True
        if op == c.AT and av not in _ZERO_WIDTH_OK:
            return True
        if op in (c.ASSERT, c.ASSERT_NOT, c.GROUPREF):
            return True
        if op == c.SUBPATTERN and _may_take_newline(av[-1]):
            return True
        if op == c.BRANCH and any(_may_take_newline(b) for b in av[1]):
            return True
        if op in (c.MAX_REPEAT, c.MIN_REPEAT) and _may_take_newline(av[2]):
            return True
    return False


def _class_takes_newline(items: Any) -> bool:
    negate = any(op == c.NEGATE for op, _ in items)
    hit = any(
        (op == c.LITERAL and av == 10)
        or (op == c.RANGE and av[0] <= 10 <= av[1])
        or (op == c.CATEGORY and av not in (c.CATEGORY_DIGIT, c.CATEGORY_WORD))
        for op, av in items
    )
    return hit != negate


def test_no_shared_rule_reads_across_a_newline():
    patterns = [p for p, _ in traces._BEHAVIOUR_RULES.values()]
    patterns += [rx.pattern for rx, _ in traces._BEHAVIOURS_LOWER.values()]
    patterns.append(questions._WORD.pattern)
    for p in patterns:
        assert not _may_take_newline(parser.parse(p)), p
    # the check sees a newline where one can be taken
    for p in (r"a\sb", r"a.b", r"a[^x]b", r"a\nb", r"(?=\s)", r"a$", r"[\s,]"):
        assert _may_take_newline(parser.parse(p)), p
    assert not any("\n" in lit for lit in traces._LEAK_LITERALS)
    assert traces._ID_SHAPE[ord("\n")] == ord(" ")  # an id shape ("a0") cannot span one


# Fragments of every rule, so random texts hit them and their joins often.
_FRAGMENTS = [
    *BEHAVIOUR_PHRASES,
    *LEAK_PHRASES,
    "no,", "No, ", "wait", "let me", "double", "check", "first,", "step", "2", "[84,", "30]",
    "(1,", "2)", "640", "x", "480", "x =", "5", "c14", "obj_", "7", "the", "text", "given",
    "loop loop loop loop loop loop", "\n", "\n\n", " ", ",", ".", "Answer: B", "\u00e9",
]  # fmt: skip


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_FRAGMENTS) + rng.choice(("", " ", " ", "\n")) for _ in range(n))


def _random_question(rng: random.Random, q: int) -> list[Trace]:
    thinking = _random_text(rng, rng.randint(0, 60)).strip()
    if rng.random() < 0.3:  # a loop that the rest continues
        thinking += " " + " ".join(["it is the red cup"] * rng.randint(1, 12))
    lead = rng.choice(("<think>\n", "<think>\n\n", "<think>"))
    text = traces.canonical_answer(f"{lead}{thinking}\n</think>\n\nAnswer: B", "B")
    out = [Trace(f"r{q}", "rollout", f"q{q}", text, "B", True, None, None, None)]
    for j in range(rng.randint(1, 4)):
        cue = rng.choice(("Wait,", "Hmm,", "12, 30] no,", "= 4 x", "wait no, ", "loop loop"))
        more = _random_text(rng, rng.randint(0, 40))
        if rng.random() < 0.3:
            more += " " + " ".join(["it is the red cup"] * rng.randint(1, 12))
        trace = traces.assemble(thinking, cue, more, "B", "")
        if rng.random() < 0.1:  # a trace that does not start with its rollout's thinking
            trace = trace.replace("<think>\n", "<think>\n ", 1)
        out.append(
            Trace(f"e{q}.{j}", "expansion", f"q{q}", trace, "B", True, None, f"r{q}", None, cue)
        )
    return out


@functools.cache
def _questions() -> list[list[Trace]]:
    rng = random.Random(3)
    return simulated(100, seed=4) + [_random_question(rng, q) for q in range(1000)]


@pytest.fixture
def every_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """Share heads of any length (the texts here are short), so the shared path is tested."""
    monkeypatch.setattr(trace_heads, "MIN_HEAD_CHARS", 0)


def test_short_heads_are_not_shared():
    q = _questions()[0]
    assert len(q[0].text) < trace_heads.MIN_HEAD_CHARS
    assert trace_heads.head_of(q[0].text) is None


def test_shared_reads_equal_the_plain_rules(every_head):
    shared = 0
    for q in _questions():
        heads = filter_stage._heads(q)
        for t in q:
            head = heads.get(t.parent_id or t.trace_id)
            shared += trace_heads._rest(t.text, head) is not None
            assert trace_heads.behaviours(t.text, t.cue, head) == traces.behaviours(t.text, t.cue)
            assert trace_heads.degenerate(t.text, head) == traces.degenerate(t.text), t.text
            assert trace_heads.words(t.text, head) == questions.tokens(t.text), t.text
            assert trace_heads.leaks(t.text, head) == traces.leaks(t.text), t.text
    assert shared > 1500  # the shared path is the one under test, not the fallback


def test_the_random_texts_reach_every_verdict():
    verdicts = [traces.degenerate(t.text) for q in _questions() for t in q]
    leaks = [traces.leaks(t.text) for q in _questions() for t in q]
    assert 0 < sum(verdicts) < len(verdicts)
    assert 0 < sum(leak is not None for leak in leaks) < len(leaks)


def test_judge_is_the_same_with_and_without_heads(every_head, monkeypatch: pytest.MonkeyPatch):
    m = MethodParams()
    qs = _questions()
    with_heads = [filter_stage.judge(q, m) for q in qs]
    monkeypatch.setattr(filter_stage, "_heads", lambda _traces: {})  # every trace read whole
    assert [filter_stage.judge(q, m) for q in qs] == with_heads
