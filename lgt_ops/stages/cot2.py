"""Stage 2's rollouts: cot's k VLM rollouts and pass rate on every composed question.

Same prompt, sampling and parsing as cot (stages/cot.py), under this stage's fingerprint;
the harden stage then judges each composed question by its pass rate.
"""

from __future__ import annotations

from lgt_ops import current, registry
from lgt_ops.annotations import current as image_contexts
from lgt_ops.llm.outcome import Outcome
from lgt_ops.questions import from_row
from lgt_ops.sources import SourceSpec, image_locations, image_set
from lgt_ops.stages import annotate, cot
from lgt_ops.stages.base import Shard, StageEnv, already_done
from lgt_ops.stages.runner import Plan, Rows, StoreImageUrls, WorkItem, runner_for

SPEC = registry.Cot2
STAGE = SPEC.name
stage_fingerprint = SPEC.fingerprint


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    rows, _ = cot.rollout_rows(env, STAGE, fp, item.context, item, outcomes)
    return rows


def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
    fp = stage_fingerprint(env)
    with env.db.connect() as conn:
        images = image_set(conn, spec, shard, sample_size)
        contexts = image_contexts(conn, images, annotate.stage_fingerprint(env))
        qs = [from_row(r) for r in current.composed(conn, env, contexts)]
        done = already_done(conn, STAGE, fp, [q.question_id for q in qs])
        locations = image_locations(conn, sorted({q.image_id for q in qs}))
    out = Plan(considered=len(qs), images=StoreImageUrls(env, locations))
    for q in qs:  # ordered by image: requests sharing an image travel together
        if q.question_id in done:
            out.skipped += 1
        else:
            out.items.append(WorkItem(q.question_id, q.image_id, cot.build_requests(env, q), q))
    return out


# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Cot2)
