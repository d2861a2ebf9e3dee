"""Stage 2's rollouts and the hardness rule: keep a composed question only if it is harder
than its parents.

Every composed question gets cot's k VLM rollouts (same prompt and sampling, under this
stage's fingerprint) and a pass rate. It is kept when

    pass_rate < reference(parents' cot pass rates) - harden_margin

with `harden_reference` `min` (below its hardest parent: the default) or `mean`. A kept
question gets a `question_checks` row with kept = true and is current from then on (expand,
filter, pairs and the release see it); one that is not harder is rejected `not_harder`, its
rollouts stay in the lineage DB as the evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from lgt_ops import current, registry
from lgt_ops.annotations import current as image_contexts
from lgt_ops.config import MethodParams
from lgt_ops.db.repo import select_in
from lgt_ops.llm.outcome import Outcome
from lgt_ops.questions import Question, from_row
from lgt_ops.reasons import HardenReason, Rejected
from lgt_ops.sources import SourceSpec, image_locations, image_set
from lgt_ops.stages import annotate, cot
from lgt_ops.stages.base import Rejecter, Shard, StageEnv, already_done
from lgt_ops.stages.runner import Plan, Rows, StoreImageUrls, WorkItem, runner_for

SPEC = registry.Harden
STAGE = SPEC.name
stage_fingerprint = SPEC.fingerprint


@dataclass(frozen=True)
class Composed:
    """A composed question and its parents' stage-1 pass rates (in parent order)."""

    question: Question
    parent_rates: tuple[float, ...]


def bound(parent_rates: tuple[float, ...], m: MethodParams) -> float:
    """The pass rate a composed question must stay below to be kept."""
    if m.harden_reference == "min":
        reference = min(parent_rates)
    else:
        reference = sum(parent_rates) / len(parent_rates)
    return reference - m.harden_margin


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    c: Composed = item.context
    q = c.question
    rows, rate = cot.rollout_rows(env, STAGE, fp, q, item, outcomes)
    if rate is None:
        return rows  # a request failed: no pass rate, no verdict
    limit = bound(c.parent_rates, env.settings.method)
    kept = rate < limit
    (d,) = rows.tables["difficulty"]
    key = outcomes[0].request.key if outcomes else None
    rows.add(
        "question_checks",
        {
            "question_id": q.question_id,
            "fingerprint": fp,
            "stage": STAGE,
            "n": d["k"],
            "n_correct": d["n_correct"],
            "score": rate,
            "bound": limit,
            "kept": kept,
            "request_key": key,
            "run_id": env.run.run_id,
        },
    )
    if not kept:
        rates = ", ".join(f"{r:.2f}" for r in c.parent_rates)
        why = Rejected(
            HardenReason.NOT_HARDER,
            f"pass rate {rate:.2f} is not below {limit:.2f}"
            f" ({env.settings.method.harden_reference} of parents' {rates}"
            f" - margin {env.settings.method.harden_margin})",
        )
        reject = Rejecter(env, STAGE, fp, q.image_id, key)
        rows.add("rejections", reject("question", q.question_id, why))
    return rows


def parent_rates(
    conn: Connection, env: StageEnv, question_ids: list[str]
) -> dict[str, tuple[float, ...]]:
    """question_id -> its parents' stage-1 pass rates, in parent order (all of them known)."""
    links = select_in(
        conn,
        "SELECT question_id, parent_id FROM question_parents WHERE question_id IN :ids"
        " ORDER BY question_id, position",
        question_ids,
    )
    rates = current.difficulty(conn, env, sorted({r.parent_id for r in links}))
    parents: dict[str, list[str]] = {}
    for r in links:
        parents.setdefault(r.question_id, []).append(r.parent_id)
    return {
        qid: tuple(rates[p].pass_rate for p in ps)
        for qid, ps in parents.items()
        if all(p in rates for p in ps)
    }


def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
    fp = stage_fingerprint(env)
    with env.db.connect() as conn:
        images = image_set(conn, spec, shard, sample_size)
        contexts = image_contexts(conn, images, annotate.stage_fingerprint(env))
        qs = [from_row(r) for r in current.composed(conn, env, contexts)]
        ids = [q.question_id for q in qs]
        rates = parent_rates(conn, env, ids)
        done = already_done(conn, STAGE, fp, ids)
        locations = image_locations(conn, sorted({q.image_id for q in qs}))
    out = Plan(considered=len(qs), images=StoreImageUrls(env, locations))
    for q in qs:
        if q.question_id in done:
            out.skipped += 1
        elif q.question_id in rates:  # parents are current, so their rates are known
            c = Composed(q, rates[q.question_id])
            out.items.append(WorkItem(q.question_id, q.image_id, cot.build_requests(env, q), c))
    return out


# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Harden)
