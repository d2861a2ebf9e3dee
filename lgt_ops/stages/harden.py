"""The hardness rule: a composed question is kept only if it is harder than its parents.

A rule stage (no model): it reads each composed question's pass rate (cot2) and its parents'
stage-1 pass rates (cot), and keeps the question when

    pass_rate < reference(parents' pass rates) - harden_margin

with `harden_reference` `min` (below its hardest parent: the default) or `mean`. Every judged
question gets a `question_checks` row; a kept one is current from then on (expand, filter,
pairs and the release see it), one that is not harder is rejected `not_harder` (its rollouts
stay in the lineage DB as the evidence). The rule is a stage apart from the rollouts, so
changing it re-judges without changing a rollout's identity (nothing is asked again).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from lgt_ops import current, registry
from lgt_ops.config import MethodParams
from lgt_ops.db.repo import select_in
from lgt_ops.llm.outcome import Outcome
from lgt_ops.reasons import HardenReason, Rejected
from lgt_ops.sources import SourceSpec
from lgt_ops.stages.base import Rejecter, Shard, StageEnv, already_done
from lgt_ops.stages.runner import Plan, Rows, WorkItem, runner_for

SPEC = registry.Harden
STAGE = SPEC.name
stage_fingerprint = SPEC.fingerprint


@dataclass(frozen=True)
class Judged:
    """A composed question's pass rate (cot2) and its parents' (cot), in parent order."""

    question_id: str
    k: int
    n_correct: int
    pass_rate: float
    parent_rates: tuple[float, ...]


def bound(parent_rates: tuple[float, ...], m: MethodParams) -> float:
    """The pass rate a composed question must stay below to be kept."""
    if m.harden_reference == "min":
        reference = min(parent_rates)
    else:
        reference = sum(parent_rates) / len(parent_rates)
    return reference - m.harden_margin


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    del outcomes  # a rule stage asks nothing
    j: Judged = item.context
    m = env.settings.method
    limit = bound(j.parent_rates, m)
    kept = j.pass_rate < limit
    rows = Rows()
    rows.add(
        "question_checks",
        {
            "question_id": j.question_id,
            "fingerprint": fp,
            "stage": STAGE,
            "n": j.k,
            "n_correct": j.n_correct,
            "score": j.pass_rate,
            "bound": limit,
            "kept": kept,
            "request_key": None,
            "run_id": env.run.run_id,
        },
    )
    if kept:
        rows.outputs += 1
        return rows
    rates = ", ".join(f"{r:.2f}" for r in j.parent_rates)
    why = Rejected(
        HardenReason.NOT_HARDER,
        f"pass rate {j.pass_rate:.2f} is not below {limit:.2f}"
        f" ({m.harden_reference} of the parents' {rates} - margin {m.harden_margin})",
    )
    rows.add("rejections", Rejecter(env, STAGE, fp, item.image_id)("question", j.question_id, why))
    return rows


def judged(conn: Connection, env: StageEnv, questions: list[str]) -> dict[str, Judged]:
    """question_id -> what the rule needs, for the composed questions whose rates are known."""
    links = select_in(
        conn,
        "SELECT question_id, parent_id FROM question_parents WHERE question_id IN :ids"
        " ORDER BY question_id, position",
        questions,
    )
    parents: dict[str, list[str]] = {}
    for r in links:
        parents.setdefault(r.question_id, []).append(r.parent_id)
    rates = current.difficulty(conn, env, [*questions, *{r.parent_id for r in links}])
    out = {}
    for qid, ps in parents.items():
        if qid in rates and all(p in rates for p in ps):
            d = rates[qid]
            parent_rates = tuple(rates[p].pass_rate for p in ps)
            out[qid] = Judged(qid, d.k, d.n_correct, d.pass_rate, parent_rates)
    return out


def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
    fp = stage_fingerprint(env)
    with env.db.connect() as conn:
        _, composed = current.shard_questions(
            conn, env, spec, shard, sample_size, current.composed_keys
        )
        ready = judged(conn, env, [q.question_id for q in composed])
        done = already_done(conn, STAGE, fp, list(ready))
    out = Plan(considered=len(composed))
    for q in composed:  # a question without its rollouts yet waits for cot2
        if q.question_id in done:
            out.skipped += 1
        elif q.question_id in ready:
            out.items.append(WorkItem(q.question_id, q.image_id, [], ready[q.question_id]))
    return out


# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Harden)
