"""Stage-2 quality checks: a composed question's answer follows from its parents' verified
answers and its operator (consistency), and a chain is well posed (hop 2 asks about the one
object hop 1 resolves, and the composed text does not name it).

They read what a release row and the lineage DB show: the composed row, its parent questions
and the image's object labels. `WELL_POSED_CHECKS` maps an operator to its check, so the
compose stage's own check can take a check's place.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from lgt_ops.questions import Question
from lgt_ops.release.quality import Figure, count_figure, number


# -- consistency -----------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def subject(q: Question, labels: dict[str, str]) -> str | None:
    """The one object label a question is about, if its grounding has a single label."""
    found = {labels.get(g) for g in q.grounding}
    return found.pop() if len(found) == 1 and None not in found else None


def _compare(parents: Sequence[Question], labels: dict[str, str]) -> str | None:
    a, b = (number(p.answer_text) for p in parents)
    if a is None or b is None:
        return None
    if a == b:
        return "both equally"
    return subject(parents[0] if a > b else parents[1], labels)


def _count_over(parents: Sequence[Question], labels: dict[str, str]) -> str | None:
    a, b = (number(p.answer_text) for p in parents)
    return None if a is None or b is None else str(int(a + b))


DERIVE: dict[str, Callable[[Sequence[Question], dict[str, str]], str | None]] = {
    "chain": lambda ps, _: ps[1].answer_text,
    "conjunction": lambda ps, _: f"{ps[0].answer_text}; {ps[1].answer_text}",
    "count_over": _count_over,
    "compare": _compare,
}


def consistency_problem(
    row: dict[str, Any], parents: Sequence[Question], labels: dict[str, str]
) -> str | None:
    """Why a composed question's answer is not the one its parents' answers give."""
    if len(parents) != 2 or len(row.get("parent_ids") or []) != 2:
        return f"{len(parents)} parent question(s) found, want 2"
    derive = DERIVE.get(row.get("operator") or "")
    if derive is None:
        return f"unknown operator {row.get('operator')!r}"
    want = derive(parents, labels)
    if want is None or _norm(want) != _norm(row["answer_text"]):
        return f"answer {row['answer_text']!r}, the parents give {want!r}"
    return None


def chain_ill_posed(
    text: str, hop1: Question, hop2: Question, labels: dict[str, str]
) -> str | None:
    """Why a chain is ill-posed, if it is: hop 2 must be grounded on the single object hop 1
    resolves (the one of hop 1's objects whose label is hop 1's answer), and the composed
    question must not name that object. (Swappable for the compose stage's own check.)"""
    entity = _norm(hop1.answer_text)
    grounded = sorted(set(hop2.grounding))
    if len(grounded) != 1:
        return f"hop 2 is grounded on {len(grounded)} objects, not on hop 1's answer alone"
    obj = grounded[0]
    if _norm(labels.get(obj, "")) != entity:
        return f"hop 2 is about {labels.get(obj, obj)!r}, hop 1 resolves {hop1.answer_text!r}"
    if obj not in hop1.grounding:
        return f"hop 2's object {obj} is not among hop 1's objects"
    if re.search(r"\b" + re.escape(entity) + r"(?:e?s)?\b", text, re.I):
        return f"the composed question names hop 1's answer {hop1.answer_text!r}"
    return None


WELL_POSED_CHECKS: dict[str, Callable[[str, Question, Question, dict[str, str]], str | None]] = {
    "chain": chain_ill_posed,
}


def stage2_figures(
    composed: list[dict[str, Any]],
    parents: dict[str, Question],
    labels: dict[str, dict[str, str]],
) -> list[Figure]:
    """Consistency of every composed question, and well-posedness of those whose operator
    has a check (chains). `parents` by question id, `labels` object id -> label per image."""
    inconsistent, ill_posed, checked = [], [], 0
    for row in composed:
        ps = [parents[p] for p in row.get("parent_ids") or [] if p in parents]
        image_labels = labels.get(row["image_id"], {})
        problem = consistency_problem(row, ps, image_labels)
        if problem:
            inconsistent.append(f"question {row['question_id']}: {problem}")
        check = WELL_POSED_CHECKS.get(row.get("operator") or "")
        if check is not None and len(ps) == 2:
            checked += 1
            why = check(row["question"], ps[0], ps[1], image_labels)
            if why:
                ill_posed.append(f"question {row['question_id']}: {why}")
    return [
        count_figure("stage2_inconsistent", "stage2", len(composed), inconsistent),
        count_figure("chain_ill_posed", "op:chain", checked, ill_posed),
    ]
