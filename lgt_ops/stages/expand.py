"""Thought expansion: a text-only reasoning LLM continues the VLM's simple chain of thought.

The reasoner gets the question, the options and the image's dense caption and objects in
place of the pixels. The VLM's thinking is placed, unchanged (no re-casing), as the start of
the reasoner's own thinking, followed by a reflection cue ("Wait,", "Hmm,", ...) sampled per
expansion; the reasoner continues from there (vLLM `continue_final_message`). The trace is
simple CoT + cue + continuation, closed with `</think>` and the answer. When the server
separates the thinking (a reasoning parser: `reasoning_content`, or `reasoning` in newer
vLLM), it is kept and used; without a parser it comes inline, before `</think>`. The
preflight records which of the two the reasoner does (lgt_ops/llm/preflight.py).

Which rollouts are expanded: per question up to `expand_rollouts_per_question`, alternating
right and wrong ones (so both self-verification and self-correction traces exist), each
`expand_per_rollout` times with different cues.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from lgt_ops import current, prompts, registry, scene, traces
from lgt_ops.annotations import ImageContext
from lgt_ops.annotations import current as image_contexts
from lgt_ops.ids import content_id
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.request import CONTINUE, ChatRequest
from lgt_ops.questions import Question, from_row
from lgt_ops.reasons import Rejected
from lgt_ops.sources import SourceSpec, image_set
from lgt_ops.stages import annotate
from lgt_ops.stages.base import Rejecter, Shard, StageEnv, already_done
from lgt_ops.stages.outcomes import request_rejection
from lgt_ops.stages.requests import stage_request
from lgt_ops.stages.runner import Plan, Rows, WorkItem, runner_for

SPEC = registry.Expand  # name, version, role, template, config: declared once, there
STAGE = SPEC.name
TEMPLATE = SPEC.template or ""
stage_fingerprint = SPEC.fingerprint


def choose_rollouts(rows: list[Any], limit: int) -> list[Any]:
    """Up to `limit` readable rollouts, alternating right and wrong, lowest index first."""
    readable = [r for r in rows if r.thinking]
    right = [r for r in readable if r.correct]
    wrong = [r for r in readable if not r.correct]
    out: list[Any] = []
    while len(out) < limit and (right or wrong):
        for group in (right, wrong):
            if group and len(out) < limit:
                out.append(group.pop(0))
    return out


def cue_for(rollout_id: str, j: int, cues: tuple[str, ...]) -> str:
    return traces.pick_cue(rollout_id, j, cues)  # siblings get different cues


class ExpansionTag(NamedTuple):
    """What one expansion request answers: the rollout it continues, its cue, the question."""

    rollout: Any
    cue: str
    question: Question


def build_request(
    env: StageEnv, q: Question, ctx: ImageContext, rollout: Any, j: int
) -> ChatRequest:
    m = env.settings.method
    t = prompts.load(TEMPLATE)
    cue = cue_for(rollout.rollout_id, j, m.expand_cues)
    msgs = t.render(
        description=scene.prose(ctx),  # words, not ids and boxes (leaks)
        question=q.question,
        options=q.options_block(),
        thinking=rollout.thinking,
        cue=cue,
    )
    sampling = {
        "temperature": m.expand_temperature,
        "top_p": m.expand_top_p,
        "max_tokens": m.expand_max_tokens,
        "seed": (int(rollout.rollout_id[:8], 16) + 7919 * j) % (2**31),
    }
    return stage_request(
        env,
        SPEC,
        msgs,
        sampling,
        extra_body={
            **CONTINUE,
            **({"bad_words": list(m.expand_bad_words)} if m.expand_bad_words else {}),
        },
        # A cut-off trace is the filter's to reject, not a reason to pay again.
        allow_truncated=True,
        tag=ExpansionTag(rollout, cue, q),
    )


def continuation(outcome: Outcome) -> tuple[str, str | None, str | None]:
    """(continuation text incl. `</think>` and answer, reasoning_content, finish_reason)."""
    choice = outcome.choices[0] if outcome.choices else {}
    msg = choice.get("message") or {}
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    content = traces.reply_text(msg)  # a reasoning parser's split joined again
    return content, reasoning, choice.get("finish_reason")


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    rows = Rows()
    for outcome in sorted(outcomes, key=lambda o: o.request.key):
        tag: ExpansionTag = outcome.request.tag
        rollout, cue, q = tag
        if not outcome.ok:
            rows.add("rejections", request_rejection(env, STAGE, fp, item, outcome))
            continue
        cont, reasoning, finish = continuation(outcome)
        head = f"<think>\n{rollout.thinking}\n\n{cue}"
        parsed = traces.parse(head + cont, len(q.options), truncated=finish == "length")
        thinking_more, answer_part = traces.split_continuation(cont, parsed)
        trace = traces.assemble(rollout.thinking, cue, thinking_more, parsed.letter, answer_part)
        eid = content_id("expansion", rollout.rollout_id, fp, cue, cont)
        rows.add(
            "expansions",
            {
                "expansion_id": eid,
                "rollout_id": rollout.rollout_id,
                "question_id": q.question_id,
                "fingerprint": fp,
                "cue": cue,
                "continuation": cont,
                "reasoning_content": reasoning,
                "trace": trace,
                "final_letter": parsed.letter,
                "correct": parsed.letter == q.answer_letter,
                "parse_error": parsed.error,
                "finish_reason": finish,
                "request_key": outcome.request.key,
                "run_id": env.run.run_id,
            },
        )
        if parsed.error:
            rows.add(
                "rejections",
                Rejecter(env, STAGE, fp, q.image_id, outcome.request.key)(
                    "expansion", eid, Rejected(parsed.error, "unparseable expansion")
                ),
            )
        rows.outputs += 1
    return rows


def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
    fp = stage_fingerprint(env)
    m = env.settings.method
    with env.db.connect() as conn:
        images = image_set(conn, spec, shard, sample_size)
        contexts = image_contexts(conn, images, annotate.stage_fingerprint(env))
        qs = {r.question_id: from_row(r) for r in current.questions(conn, env, contexts)}
        rollouts = current.rollouts(conn, env, list(qs))
        by_question: dict[str, list[Any]] = {}
        for r in rollouts:
            by_question.setdefault(r.question_id, []).append(r)
        chosen = [
            r
            for rs in by_question.values()
            for r in choose_rollouts(rs, m.expand_rollouts_per_question)
        ]
        done = already_done(conn, STAGE, fp, [r.rollout_id for r in chosen])
    out = Plan(considered=len(chosen))
    for r in chosen:
        if r.rollout_id in done:
            out.skipped += 1
            continue
        q = qs[r.question_id]
        requests = [
            build_request(env, q, contexts[q.image_id], r, j) for j in range(m.expand_per_rollout)
        ]
        out.items.append(WorkItem(r.rollout_id, q.image_id, requests, r))
    return out


# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Expand)
