"""Stage-2 compositions: which stage-1 questions compose, under which operator, into what.

The system, not the model, decides what a composed question asks, its answer (derived from
the parents' verified answers) and its options. Options are laid out so that neither the
correct letter nor the correct value's rank among the options gives the answer away, and no
option is wrong by construction: every choice is seeded by the parents, so a re-run gives
the same compositions.

Operators and when two questions relate:
- chain:       p resolves one object that q is about (p: "which object is left of the bowl?"
               -> "cup"; q: "what colour is the cup?") -> q's answer; checked by
               `wellposed.bridge` (a chain-shaped pair that fails is kept as refused);
- compare:     two counting questions about different objects -> which is more numerous and
               by how many (options: a window of signed differences, the answer at a seeded,
               uniform rank);
- count_over:  two counting questions about different objects -> the total (options: a window
               of totals, the answer at a seeded, uniform rank; only totals for which every
               rank is possible above the smallest possible total, so no option is impossible);
- conjunction: two questions sharing a grounded object -> both answers at once (options: cells
               of a grid of candidate answers, so every option shares as many parts with the
               others as the correct one).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import permutations
from typing import Any

from lgt_ops.annotations import ImageContext
from lgt_ops.questions import Question
from lgt_ops.reasons import Rejected
from lgt_ops.wellposed import bridge, entity_names, names_object, plural

OPERATORS = ("chain", "compare", "count_over", "conjunction")
DESCRIPTIONS = {
    "chain": "The answer to the first question identifies an object; the composed question "
    "asks the second question about that object without naming it.",
    "compare": "The composed question asks which of two kinds of objects is more numerous, "
    "and by how many.",
    "count_over": "The composed question asks for the total number of two kinds of objects.",
    "conjunction": "The composed question requires both answers at once; each option pairs "
    "one candidate answer to each simple question.",
}
SAME = "the same number of each"  # compare's option for equal counts
MIN_COUNT = 1  # a counting parent is grounded on its objects: at least one of each kind


@dataclass(frozen=True)
class Candidate:
    operator: str
    parents: tuple[Question, ...]
    answer: str
    distractors: tuple[str, ...]
    avoid: tuple[str, ...] = ()  # names the composed text must not contain (chain's bridge)
    problem: Rejected | None = None  # a chain-shaped pair that is not a well-posed chain

    @property
    def grounding(self) -> list[str]:
        return sorted({g for p in self.parents for g in p.grounding})

    @property
    def skill(self) -> str:
        return "+".join(sorted({p.skill for p in self.parents}))

    @property
    def options(self) -> tuple[str, ...]:
        return (self.answer, *self.distractors)

    def description(self) -> str:
        """What the model is told about the operator (and, for a chain, what not to name)."""
        text = DESCRIPTIONS[self.operator]
        if self.avoid:
            text += " Never name it: " + ", ".join(self.avoid) + "."
        return text


def compare_text(first: str, second: str, diff: int) -> str:
    """The option for `count(first) - count(second) == diff`."""
    if diff == 0:  # short: as long as the others, so its length is no clue
        return SAME
    more, by = (first, diff) if diff > 0 else (second, -diff)
    return f"more {plural(more)}, by {by}"


def _rng(seed: int, operator: str, parents: Sequence[Question]) -> random.Random:
    """One generator per candidate, so a candidate's choices do not depend on the others."""
    return random.Random(f"{seed}:{operator}:" + ":".join(p.question_id for p in parents))


def _number(q: Question) -> int | None:
    text = q.answer_text.strip()
    return int(text) if text.isdigit() else None


def subject(q: Question, labels: Mapping[str, str]) -> str | None:
    """The one object label a question is about, if its grounding has a single label."""
    found = {labels.get(g) for g in q.grounding}
    return found.pop() if len(found) == 1 and None not in found else None


def window(value: int, n: int, rank: int) -> list[int]:
    """n consecutive integers holding `value` at position `rank` (0 = smallest)."""
    return list(range(value - rank, value - rank + n))


def _counts(
    p: Question, q: Question, labels: Mapping[str, str]
) -> tuple[int, int, str, str] | None:
    if p.skill != "counting" or q.skill != "counting" or p.question_id >= q.question_id:
        return None
    a, b, sp, sq = _number(p), _number(q), subject(p, labels), subject(q, labels)
    if a is None or b is None or not sp or not sq or sp == sq:
        return None
    if a < MIN_COUNT or b < MIN_COUNT:
        return None
    return a, b, sp, sq


def compare(
    p: Question, q: Question, labels: Mapping[str, str], n: int, seed: int
) -> Candidate | None:
    found = _counts(p, q, labels)
    if found is None:
        return None
    a, b, sp, sq = found
    rank = _rng(seed, "compare", (p, q)).randrange(n)
    texts = [compare_text(sp, sq, d) for d in window(a - b, n, rank)]
    answer = compare_text(sp, sq, a - b)
    return Candidate("compare", (p, q), answer, tuple(t for t in texts if t != answer))


def count_over(
    p: Question, q: Question, labels: Mapping[str, str], n: int, seed: int
) -> Candidate | None:
    found = _counts(p, q, labels)
    if found is None:
        return None
    total, floor = found[0] + found[1], 2 * MIN_COUNT
    if total - (n - 1) < floor:  # some rank would need an impossible total: no shortcut-free set
        return None
    rank = _rng(seed, "count_over", (p, q)).randrange(n)
    values = [str(v) for v in window(total, n, rank) if v != total]
    return Candidate("count_over", (p, q), str(total), tuple(values))


def chain(p: Question, q: Question, objects: Sequence[Mapping[str, Any]]) -> Candidate | None:
    """A chain when q is about an object named like p's answer; refused if not well posed."""
    if "counting" in (p.skill, q.skill):
        return None
    by_id = {o["id"]: o for o in objects}
    if not any(names_object(p.answer_text, by_id.get(g)) for g in q.grounding):
        return None
    wrong = tuple(o for o in q.options if o != q.answer_text)
    try:
        obj = bridge(p, q, objects)
    except Rejected as exc:
        return Candidate("chain", (p, q), q.answer_text, wrong, problem=exc)
    return Candidate("chain", (p, q), q.answer_text, wrong, avoid=entity_names(obj, p))


def conjunction(p: Question, q: Question, n: int, seed: int) -> Candidate | None:
    """Options: n cells of a k x k grid of (p answer, q answer), the correct cell one of them;
    the cells left out are seeded, so the correct cell's place in the grid is no clue."""
    if not set(p.grounding) & set(q.grounding) or p.question_id >= q.question_id:
        return None
    if p.skill == q.skill:
        return None
    k = math.isqrt(n - 1) + 1  # the smallest k with k * k >= n
    rng = _rng(seed, "conjunction", (p, q))
    p_wrong = sorted(o for o in p.options if o != p.answer_text)
    q_wrong = sorted(o for o in q.options if o != q.answer_text)
    if len(p_wrong) < k - 1 or len(q_wrong) < k - 1:
        return None
    rows = [p.answer_text, *rng.sample(p_wrong, k - 1)]
    cols = [q.answer_text, *rng.sample(q_wrong, k - 1)]
    answer = f"{p.answer_text}; {q.answer_text}"
    cells = [f"{r}; {c}" for r in rows for c in cols if f"{r}; {c}" != answer]
    return Candidate("conjunction", (p, q), answer, tuple(rng.sample(cells, n - 1)))


def candidates(
    ctx: ImageContext, parents: list[Question], n_options: int, seed: int
) -> Iterator[Candidate]:
    """Every composition the rules allow for this image, in a seeded order (chain-shaped pairs
    that are not well-posed chains too, with their `problem`)."""
    objects = list(ctx.objects or ())
    labels = {o["id"]: o["label"] for o in objects}
    pairs = list(permutations(parents, 2))
    random.Random(f"{ctx.image_id}:{seed}").shuffle(pairs)
    for p, q in pairs:
        made = (
            compare(p, q, labels, n_options, seed),
            count_over(p, q, labels, n_options, seed),
            chain(p, q, objects),
            conjunction(p, q, n_options, seed),
        )
        yield from (c for c in made if c is not None)


def select(
    cands: Iterator[Candidate],
    operators: tuple[str, ...],
    per_image: int,
    per_parent: int,
    n_options: int,
) -> list[Candidate]:
    """Round-robin over operators, within the caps (refused candidates never chosen)."""
    queues: dict[str, list[Candidate]] = {op: [] for op in operators}
    for c in cands:
        if c.problem is None and c.operator in queues and len(c.distractors) == n_options - 1:
            queues[c.operator].append(c)
    chosen: list[Candidate] = []
    used: dict[str, int] = {}
    while len(chosen) < per_image and any(queues.values()):
        for op in operators:
            while queues[op]:
                c = queues[op].pop(0)
                if all(used.get(p.question_id, 0) < per_parent for p in c.parents):
                    chosen.append(c)
                    for p in c.parents:
                        used[p.question_id] = used.get(p.question_id, 0) + 1
                    break
            if len(chosen) >= per_image:
                break
    return chosen


def expected_answer(
    operator: str, parents: Sequence[Question], objects: Sequence[Mapping[str, Any]]
) -> str:
    """The answer a composition's parents give under its operator."""
    p, q = parents
    labels = {o["id"]: o["label"] for o in objects}
    if operator == "chain":
        return q.answer_text
    if operator == "conjunction":
        return f"{p.answer_text}; {q.answer_text}"
    a, b = int(p.answer_text), int(q.answer_text)
    if operator == "count_over":
        return str(a + b)
    if operator == "compare":
        return compare_text(subject(p, labels) or "", subject(q, labels) or "", a - b)
    raise ValueError(f"unknown operator {operator!r}")


def option_values(
    composed: Question, parents: Sequence[Question], objects: Sequence[Mapping[str, Any]]
) -> dict[str, int] | None:
    """Each option's place on the operator's number line (count_over: the total; compare:
    the signed difference), or None for an operator whose options do not sort."""
    if composed.operator == "count_over":
        return {o: int(o) for o in composed.options}
    if composed.operator != "compare":
        return None
    labels = {o["id"]: o["label"] for o in objects}
    sp, sq = (subject(p, labels) or "" for p in parents)
    return {o: compare_value(o, sp, sq) for o in composed.options}


def compare_value(text: str, first: str, second: str) -> int:
    """The signed difference a compare option states (the inverse of `compare_text`)."""
    if text == compare_text(first, second, 0):
        return 0
    m = re.fullmatch(r"more (.+), by (\d+)", text)
    if m and m.group(1) in (plural(first), plural(second)):
        return int(m.group(2)) * (1 if m.group(1) == plural(first) else -1)
    raise ValueError(f"{text!r} is not a comparison of {first!r} and {second!r}")


def correct_rank(composed: Question, values: Mapping[str, int]) -> int:
    """The correct option's rank among the options by value (0 = smallest)."""
    return sorted(values.values()).index(values[composed.answer_text])
