"""Stage-2 quality checks, judged by the composition module itself (one source of truth: the
validator measures exactly what the compose stage enforces).

- consistency: a composed question's answer is `composition.expected_answer` of its parents'
  verified answers under its operator;
- well-posedness: `wellposed.ill_posed` (a chain's hop 2 asks about the one object hop 1
  resolves, and the composed text does not name it; other operators pass);
- value rank: where the operator's options sort (`composition.option_values`: count_over's
  totals, compare's signed differences), the correct option's rank (`correct_rank`), which
  `quality.question_figures` judges for uniformity.

Inputs are what the compose stage saw: parents as stored (`questions.from_row`, in
`question_parents.position` order, i.e. the release row's `parent_ids`) and the image's
object annotations (dicts with `id`, `label`, optional `synonyms`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lgt_ops.composition import correct_rank, expected_answer, option_values
from lgt_ops.questions import Question
from lgt_ops.release.quality import Figure, Tally
from lgt_ops.wellposed import ill_posed


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def released_question(row: Mapping[str, Any]) -> Question:
    """A composed question as the release row shows it (the row has no grounding; the checks
    read the composed question's text, options, answer and operator only)."""
    return Question(
        question_id=row["question_id"],
        image_id=row["image_id"],
        stage=int(row["stage"]),
        skill=row.get("skill") or "",
        question=row["question"],
        options=tuple(row.get("options") or ()),
        answer_letter=row.get("answer") or "",
        answer_text=row["answer_text"],
        grounding=(),
        operator=row.get("operator"),
    )


def consistency_problem(
    q: Question, parents: Sequence[Question], objects: Sequence[Mapping[str, Any]]
) -> str | None:
    """Why a composed question's answer is not the one its parents' answers give."""
    if len(parents) != 2:
        return f"{len(parents)} parent question(s) found, want 2"
    try:
        want = expected_answer(q.operator or "", parents, objects)
    except ValueError as exc:  # an unknown operator, or a counting parent without a number
        return f"no answer follows from the parents: {exc}"
    if _norm(want) != _norm(q.answer_text):
        return f"answer {q.answer_text!r}, the parents give {want!r}"
    return None


@dataclass
class Stage2Checks:
    """Figures over the composed rows, and each sortable composition's value rank."""

    n: int = 0
    chains: int = 0
    inconsistent: Tally = field(default_factory=Tally)  # how many, and the first few
    ill_posed: Tally = field(default_factory=Tally)
    ranks: dict[str, int] = field(default_factory=dict)  # of the rows added since reset

    def add(
        self, q: Question, parents: Sequence[Question], objects: Sequence[Mapping[str, Any]]
    ) -> None:
        self.n += 1
        problem = consistency_problem(q, parents, objects)
        if problem:
            self.inconsistent.add(f"question {q.question_id}: {problem}")
        if q.operator == "chain":
            self.chains += 1
            why = ill_posed(q, parents, objects)
            if why is not None:
                self.ill_posed.add(f"question {q.question_id}: {why.reason}: {why.detail}")
        if problem is None:
            self._rank(q, parents, objects)

    def unresolved(self, q: Question, missing: list[str]) -> None:
        """A composed question whose parents the lineage DB lacks: neither check can pass."""
        self.n += 1
        why = f"question {q.question_id}: parent question(s) {missing} not found"
        self.inconsistent.add(why)
        if q.operator == "chain":
            self.chains += 1
            self.ill_posed.add(why)

    def _rank(
        self, q: Question, parents: Sequence[Question], objects: Sequence[Mapping[str, Any]]
    ) -> None:
        try:
            values = option_values(q, parents, objects)
        except ValueError as exc:  # an option off the operator's number line
            self.inconsistent.add(f"question {q.question_id}: {exc}")
            return
        if values is not None and len(set(values.values())) == len(values):
            self.ranks[q.question_id] = correct_rank(q, values)

    def figures(self) -> list[Figure]:
        return [
            self.inconsistent.figure("stage2_inconsistent", "stage2", self.n),
            self.ill_posed.figure("chain_ill_posed", "op:chain", self.chains),
        ]


def stage2_checks(
    composed: list[dict[str, Any]],
    parents: Mapping[str, Question],
    objects: Mapping[str, Sequence[Mapping[str, Any]]],
    checks: Stage2Checks | None = None,
) -> Stage2Checks:
    """Every composed release row checked: `parents` by question id (stored rows), `objects`
    the object annotations by image id; added to `checks` when given (a bucket at a time)."""
    checks = checks if checks is not None else Stage2Checks()
    for row in composed:
        ids = list(row.get("parent_ids") or [])
        missing = [p for p in ids if p not in parents]
        q = released_question(row)
        if missing:
            checks.unresolved(q, missing)
        else:
            checks.add(q, [parents[p] for p in ids], objects.get(row["image_id"], ()))
    return checks
