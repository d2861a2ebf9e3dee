"""Questions answerable without the image: a text-only LLM answers each stage-1 question
from its text and options alone, `blind_samples` times.

A question answered right in at least `blind_reject_at` of the samples is not a vision
question: it is rejected `answerable_without_image` and gets no VLM rollouts (this stage runs
before cot, where it saves the most) nor becomes a composition parent. Every checked question
gets a `question_checks` row (score = share answered right), kept or not. A reply without one
clear letter counts as wrong (it did not answer), so it never rejects a question.
"""

from __future__ import annotations

from lgt_ops import current, prompts, registry, traces
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.request import ChatRequest
from lgt_ops.questions import LETTERS, Question
from lgt_ops.reasons import BlindReason, Rejected
from lgt_ops.stages.base import Rejecter, StageEnv
from lgt_ops.stages.outcomes import unanswered
from lgt_ops.stages.question_plan import question_planner
from lgt_ops.stages.requests import n_samplings, stage_request
from lgt_ops.stages.runner import Rows, WorkItem, runner_for

SPEC = registry.Blind
STAGE = SPEC.name
TEMPLATE = SPEC.template or ""
stage_fingerprint = SPEC.fingerprint


def build_requests(env: StageEnv, q: Question) -> list[ChatRequest]:
    m = env.settings.method
    seed = (int(q.question_id[:8], 16) + m.seed) % (2**31)
    base = {"temperature": m.blind_temperature, "max_tokens": SPEC.reply_tokens}
    samplings = n_samplings(env, SPEC, base, m.blind_samples, seed)
    messages = prompts.load(TEMPLATE).render(question=q.question, options=q.options_block())
    return [stage_request(env, SPEC, messages, s, tag=q) for s in samplings]


def letter(reply: str, n_options: int) -> str | None:
    """The one letter a reply states (within the options), else None."""
    found = set(traces.answer_letters(reply.split("</think>")[-1]))
    if len(found) != 1:
        return None
    (x,) = found
    return x if x in LETTERS[:n_options] else None


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    q: Question = item.context
    m = env.settings.method
    stopped = unanswered(env, STAGE, fp, item, outcomes)
    if stopped is not None:
        return stopped  # no verdict without every sample
    rows = Rows()
    replies = [c for o in outcomes for c in o.contents()]
    n = len(replies)
    n_correct = sum(letter(r, len(q.options)) == q.answer_letter for r in replies)
    score = n_correct / n if n else 0.0
    kept = score < m.blind_reject_at
    key = min(o.request.key for o in outcomes)
    rows.add(
        "question_checks",
        {
            "question_id": q.question_id,
            "fingerprint": fp,
            "stage": STAGE,
            "n": n,
            "n_correct": n_correct,
            "score": score,
            "bound": m.blind_reject_at,
            "kept": kept,
            "request_key": key,
            "run_id": env.run.run_id,
        },
    )
    if kept:
        rows.outputs += 1
    else:
        why = Rejected(
            BlindReason.ANSWERABLE_WITHOUT_IMAGE,
            f"answered right without the image in {n_correct} of {n} samples"
            f" (threshold {m.blind_reject_at})",
        )
        reject = Rejecter(env, STAGE, fp, q.image_id, key)
        rows.add("rejections", reject("question", q.question_id, why))
    return rows


# Every mcq question not checked yet, one WorkItem each (none while the check is off:
# then every mcq question is current as it is).
plan = question_planner(SPEC, current.mcq_questions, build_requests, with_images=False)

# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Blind)
