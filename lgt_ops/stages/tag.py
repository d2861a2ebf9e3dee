"""Optional LLM tagger of cognitive behaviours (method param `behaviour_tagger = "llm"`).

The filter always counts the four behaviours with lexical heuristics. With the flag on, this
stage also asks the LLM endpoint to count them in every trace that passed the filter (the
SFT candidates), and the release reports those counts instead. Off (the default), it does
nothing and calls nothing.
"""

from __future__ import annotations

from typing import Any

from lgt_ops import current, prompts, registry
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.request import ChatRequest
from lgt_ops.llm.schema import parse_json_reply
from lgt_ops.reasons import Rejected, ReplyReason
from lgt_ops.sources import SourceSpec
from lgt_ops.stages.base import (
    Shard,
    StageEnv,
    already_done,
)
from lgt_ops.stages.outcomes import one_answer
from lgt_ops.stages.requests import stage_request
from lgt_ops.stages.runner import Plan, Rows, WorkItem, runner_for
from lgt_ops.traces import BEHAVIOURS, Trace

SPEC = registry.Tag  # name, version, role, template, config: declared once, there
STAGE = SPEC.name
MAX_TOKENS = registry.Tag.reply_tokens
TEMPLATE = SPEC.template or ""


def enabled(env: StageEnv) -> bool:
    return env.settings.method.behaviour_tagger == "llm"


def tagger_name(env: StageEnv) -> str:
    return f"llm:{env.settings.endpoint('llm').model}"


stage_fingerprint = SPEC.fingerprint


def build_request(env: StageEnv, t: Trace) -> ChatRequest:
    messages = prompts.load(TEMPLATE).render(trace=t.text)
    sampling = {"temperature": 0.0, "max_tokens": MAX_TOKENS, "seed": env.settings.method.seed}
    return stage_request(env, SPEC, messages, sampling, tag=t)


def counts(reply: str) -> dict[str, int]:
    """The four counts from a reply, or ValueError naming what is wrong."""
    data = parse_json_reply(reply)
    out = {}
    for name in BEHAVIOURS:
        value = data.get(name) if isinstance(data, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected a count, got {value!r}")
        out[name] = value
    return out


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    t: Trace = item.context
    outcome, rows, reject = one_answer(env, STAGE, fp, item, outcomes)
    if not outcome.ok:
        return rows
    try:
        found = counts(outcome.contents()[0])
    except ValueError as exc:
        rows.add(
            "rejections",
            reject(t.kind, t.trace_id, Rejected(ReplyReason.UNPARSEABLE_REPLY, str(exc))),
        )
        return rows
    rows.add(
        "behaviour_tags",
        {
            "trace_id": t.trace_id,
            "fingerprint": fp,
            "question_id": t.question_id,
            **found,
            "tagger": tagger_name(env),
            "request_key": outcome.request.key,
            "run_id": env.run.run_id,
        },
    )
    rows.outputs = 1
    return rows


def passed_traces(conn: Any, env: StageEnv, qs: list[Any]) -> list[tuple[Trace, str]]:
    """(trace, image_id) for every current trace that passed the filter."""
    images = {q.question_id: q.image_id for q in qs}
    by_question = current.traces_of(conn, env, list(images))
    all_traces = [t for ts in by_question.values() for t in ts]
    verdicts = current.verdicts(conn, env, [t.trace_id for t in all_traces])
    return [
        (t, images[t.question_id])
        for t in all_traces
        if (v := verdicts.get(t.trace_id)) is not None and v.passed
    ]


def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
    if not enabled(env):
        return Plan()
    fp = stage_fingerprint(env)
    with env.db.connect() as conn:
        _, qs = current.shard_questions(conn, env, spec, shard, sample_size, current.question_keys)
        chosen = passed_traces(conn, env, qs)
        done = already_done(conn, STAGE, fp, [t.trace_id for t, _ in chosen])
    out = Plan(considered=len(chosen))
    for t, image_id in chosen:
        if t.trace_id in done:
            out.skipped += 1
        else:
            out.items.append(WorkItem(t.trace_id, image_id, [build_request(env, t)], t))
    return out


# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Tag)
