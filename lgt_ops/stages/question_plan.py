"""The plan of a stage with one item per question (blind, cot, cot2): the shard's current
questions that `select` picks, less those done under the stage's fingerprint, each with the
requests `build` makes for it.
"""

from __future__ import annotations

from collections.abc import Callable

from lgt_ops import current
from lgt_ops.llm.request import ChatRequest
from lgt_ops.questions import Question, from_row
from lgt_ops.registry import Stage
from lgt_ops.sources import SourceSpec, image_locations
from lgt_ops.stages.base import Shard, StageEnv, already_done
from lgt_ops.stages.runner import Plan, StoreImageUrls, WorkItem

Builder = Callable[[StageEnv, Question], list[ChatRequest]]


def question_plan(
    env: StageEnv,
    stage: type[Stage],
    spec: SourceSpec,
    shard: Shard,
    sample_size: int | None,
    *,
    select: current.Selector,
    build: Builder,
    with_images: bool,
    enabled: bool = True,
) -> Plan:
    """One WorkItem per selected question not done yet, in the selector's order (by image:
    requests sharing an image travel together). `with_images`: the requests carry the
    question's image (the plan resolves where each lives). Not `enabled`: nothing to do,
    the questions are still counted as considered."""
    fp = stage.fingerprint(env)
    with env.db.connect() as conn:
        _, rows = current.shard_questions(conn, env, spec, shard, sample_size, select)
        qs = [from_row(r) for r in rows]
        done = already_done(conn, stage.name, fp, [q.question_id for q in qs])
        locations = image_locations(conn, sorted({q.image_id for q in qs})) if with_images else {}
    out = Plan(considered=len(qs), images=StoreImageUrls(env, locations) if with_images else None)
    if not enabled:
        return out
    for q in qs:
        if q.question_id in done:
            out.skipped += 1
        else:
            out.items.append(WorkItem(q.question_id, q.image_id, build(env, q), q))
    return out
