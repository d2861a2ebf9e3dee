"""Stage 2's rollouts: cot's k VLM rollouts and pass rate on every composed question.

Same prompt, sampling and parsing as cot (stages/cot.py), under this stage's fingerprint;
the harden stage then judges each composed question by its pass rate.
"""

from __future__ import annotations

from lgt_ops import current, registry
from lgt_ops.llm.outcome import Outcome
from lgt_ops.stages import cot
from lgt_ops.stages.base import StageEnv
from lgt_ops.stages.question_plan import question_planner
from lgt_ops.stages.runner import Rows, WorkItem, runner_for

SPEC = registry.Cot2
STAGE = SPEC.name
stage_fingerprint = SPEC.fingerprint


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    rows, _ = cot.rollout_rows(env, STAGE, fp, item.context, item, outcomes)
    return rows


# Current composed questions not done yet, one WorkItem each.
plan = question_planner(SPEC, current.composed, cot.build_requests, with_images=True)

# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Cot2)
