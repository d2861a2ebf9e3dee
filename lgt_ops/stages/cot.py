"""Simple chains of thought: k VLM rollouts per stage-1 question, and difficulty.

Stage-2 questions get the same rollouts from the cot2 stage (stages/cot2.py), which
reuses `build_requests` and `rollout_rows` here; the harden stage then judges them.

The VLM sees the image and the question; its reply is pre-started with `<think>` (vLLM's
`continue_final_message`), sampled k times in one request (`n=k`) so the server shares the
image encoding and the prompt prefix across samples. Each rollout is parsed strictly;
unparseable counts as wrong and keeps its reason. The pass rate over the k rollouts is the
question's difficulty, committed with the rollouts (they are one fact).
"""

from __future__ import annotations

from typing import Any

from lgt_ops import current, prompts, registry, traces
from lgt_ops.config import MethodParams
from lgt_ops.ids import content_id
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.request import CONTINUE, ChatRequest, image_part
from lgt_ops.questions import Question
from lgt_ops.reasons import Rejected
from lgt_ops.stages.base import Rejecter, StageEnv
from lgt_ops.stages.outcomes import unanswered
from lgt_ops.stages.question_plan import question_planner
from lgt_ops.stages.requests import n_samplings, stage_request
from lgt_ops.stages.runner import Rows, WorkItem, runner_for

SPEC = registry.Cot  # name, version, role, template, config: declared once, there
STAGE = SPEC.name
TEMPLATE = SPEC.template or ""
stage_fingerprint = SPEC.fingerprint


def bucket(pass_rate: float, m: MethodParams) -> str:
    if pass_rate == 0:
        return "unsolved"
    if pass_rate <= m.hard_at_most:
        return "hard"
    if pass_rate >= m.easy_at_least:
        return "easy"
    return "medium"


def messages(q: Question) -> list[dict[str, Any]]:
    """The VLM prompt: system, image + question, and the `<think>` pre-fill."""
    msgs = prompts.load(TEMPLATE).render(question=q.question, options=q.options_block())
    user = msgs[1]
    msgs[1] = {
        "role": "user",
        "content": [image_part(q.image_id), {"type": "text", "text": user["content"]}],
    }
    msgs[2] = {"role": "assistant", "content": msgs[2]["content"] + "\n"}
    return msgs


def build_requests(env: StageEnv, q: Question) -> list[ChatRequest]:
    m = env.settings.method
    seed = (int(q.question_id[:8], 16) + m.seed) % (2**31)
    base = {"temperature": m.cot_temperature, "top_p": m.cot_top_p, "max_tokens": m.cot_max_tokens}
    samplings = n_samplings(env, SPEC, base, m.cot_rollouts, seed)
    return [
        stage_request(env, SPEC, messages(q), s, extra_body=dict(CONTINUE), tag=q)
        for s in samplings
    ]


def samples(outcomes: list[Outcome]) -> list[tuple[str, str | None, str]]:
    """(reply text, finish_reason, request_key) per sample, in a stable order."""
    out = []
    for o in sorted(outcomes, key=lambda o: int(o.request.sampling.get("seed", 0))):
        for c in sorted(o.choices, key=lambda c: c.get("index", 0)):
            out.append(
                (
                    traces.reply_text(c.get("message") or {}),  # reasoning_content too
                    c.get("finish_reason"),
                    o.request.key,
                )
            )
    return out


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    rows, _ = rollout_rows(env, STAGE, fp, item.context, item, outcomes)
    return rows


def rollout_rows(
    env: StageEnv, stage: str, fp: str, q: Question, item: WorkItem, outcomes: list[Outcome]
) -> tuple[Rows, float | None]:
    """A question's rollouts, their parse rejections and its difficulty row, and its pass
    rate (None when a request failed: no estimate without the k samples)."""
    m = env.settings.method
    stopped = unanswered(env, stage, fp, item, outcomes)
    if stopped is not None:
        return stopped, None
    rows = Rows()
    n_correct = n_parsed = 0
    for index, (content, finish, key) in enumerate(samples(outcomes)):
        text = "<think>\n" + content
        parsed = traces.parse(text, len(q.options), truncated=finish == "length")
        correct = parsed.letter == q.answer_letter
        n_correct += correct
        n_parsed += parsed.error is None
        rid = content_id("rollout", q.question_id, fp, index, text)
        rows.add(
            "rollouts",
            {
                "rollout_id": rid,
                "question_id": q.question_id,
                "fingerprint": fp,
                "sample_index": index,
                "text": text,
                "thinking": parsed.thinking,
                "final_letter": parsed.letter,
                "correct": correct,
                "parse_error": parsed.error,
                "finish_reason": finish,
                "request_key": key,
                "run_id": env.run.run_id,
            },
        )
        if parsed.error:
            rows.add(
                "rejections",
                Rejecter(env, stage, fp, q.image_id, key)(
                    "rollout", rid, Rejected(parsed.error, "unparseable rollout counts as wrong")
                ),
            )
        rows.outputs += 1
    k = rows.outputs
    rate = n_correct / k if k else 0.0
    rows.add(
        "difficulty",
        {
            "question_id": q.question_id,
            "fingerprint": fp,
            "k": k,
            "n_correct": n_correct,
            "n_parsed": n_parsed,
            "pass_rate": rate,
            "bucket": bucket(rate, m),
        },
    )
    return rows, rate


# Current stage-1 questions not done yet, one WorkItem each.
plan = question_planner(SPEC, current.stage1, build_requests, with_images=True)

# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Cot)
