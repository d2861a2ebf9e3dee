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
PlanFn = Callable[[StageEnv, SourceSpec, Shard, int | None], Plan]


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
) -> Plan:
    """One WorkItem per selected question not done yet, in the selector's order (by image:
    requests sharing an image travel together). `with_images`: the requests carry the
    question's image (the plan resolves where each lives). A stage off under the settings
    (`stage.enabled`) has nothing to do; its questions still count as considered."""
    fp = stage.fingerprint(env)
    with env.db.connect() as conn:
        _, rows = current.shard_questions(conn, env, spec, shard, sample_size, select)
        qs = [from_row(r) for r in rows]
        done = already_done(conn, stage.name, fp, [q.question_id for q in qs])
        locations = image_locations(conn, sorted({q.image_id for q in qs})) if with_images else {}
    out = Plan(considered=len(qs), images=StoreImageUrls(env, locations) if with_images else None)
    if not stage.enabled(env.settings):
        return out
    for q in qs:
        if q.question_id in done:
            out.skipped += 1
        else:
            out.items.append(WorkItem(q.question_id, q.image_id, build(env, q), q))
    return out


def question_planner(
    stage: type[Stage], select: current.Selector, build: Builder, *, with_images: bool
) -> PlanFn:
    """A stage module's `plan(env, spec, shard, sample_size=None)`: `question_plan` bound to
    its stage, question selector and request builder."""

    def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
        return question_plan(
            env, stage, spec, shard, sample_size, select=select, build=build,
            with_images=with_images,
        )  # fmt: skip

    return plan
