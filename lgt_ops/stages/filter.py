"""Trace filter: a verdict on every rollout and expansion, with a reason and behaviour counts.

No model is called. Per question, each trace is checked in this order and the first rule it
fails is its reason (a rejections row as well):

    unparseable            no `</think>`, no answer line, conflicting answers, ...
    too_short / too_long   outside [trace_min_chars, trace_max_chars]
    leaks_metadata         cites the text-only context ("according to the description")
    degenerate_repetition  one n-gram makes up a large share of the trace
    wrong_answer           parsed, but not the verified answer
    near_duplicate         word overlap with an earlier kept trace of the same question

`well_formed` (the first four pass) decides whether a wrong trace may serve as a DPO
"rejected"; `passed` (all pass) whether a trace may be an SFT target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from lgt_ops import current, registry, trace_heads, trace_scan, traces
from lgt_ops.config import MethodParams
from lgt_ops.ids import content_id
from lgt_ops.questions import jaccard
from lgt_ops.reasons import FilterReason as FR
from lgt_ops.sources import SourceSpec
from lgt_ops.stages.base import (
    Rows,
    Shard,
    StageEnv,
    already_done,
    rejection,
)
from lgt_ops.stages.runner import Plan, WorkItem, runner_for
from lgt_ops.traces import Trace

SPEC = registry.Filter  # name, version, role, template, config: declared once, there
STAGE = SPEC.name
TAGGER = "heuristic"
stage_fingerprint = SPEC.fingerprint


@dataclass(frozen=True)
class Verdict:
    trace: Trace
    well_formed: bool
    passed: bool
    reason: str | None
    detail: str | None
    behaviours: dict[str, int]


def _form_problem(
    t: Trace, m: MethodParams, head: trace_heads.Head | None, scanned: trace_scan.Scanned | None
) -> tuple[str, str] | None:
    if t.parse_error:
        return FR.UNPARSEABLE, t.parse_error
    if fmt := traces.format_problem(t.text):  # an answer that counts, not a training text
        return FR.UNPARSEABLE, fmt
    n = len(t.text)
    if n < m.trace_min_chars:
        return FR.TOO_SHORT, f"{n} characters < {m.trace_min_chars}"
    if n > m.trace_max_chars:
        return FR.TOO_LONG, f"{n} characters > {m.trace_max_chars}"
    leak = trace_heads.leaks(t.text, head) if scanned is None or scanned.may_leak else None
    if leak:
        return FR.LEAKS_METADATA, f"mentions {leak!r}"
    if trace_heads.degenerate(t.text, head):
        return FR.DEGENERATE_REPETITION, "one phrase repeats through the trace"
    return None


def judge(
    question_traces: list[Trace],
    m: MethodParams,
    scans: Sequence[trace_scan.Scanned | None] | None = None,
) -> list[Verdict]:
    """Verdicts for one question's traces, in the given (stable) order. `scans`, one per
    trace (trace_scan.scan of their texts), spares the rules it already read."""
    kept: list[set[str]] = []
    out: list[Verdict] = []
    heads = _heads(question_traces)
    scans = scans or [None] * len(question_traces)
    for t, scanned in zip(question_traces, scans, strict=True):
        head = heads.get(t.parent_id or t.trace_id)
        problem = _form_problem(t, m, head, scanned)
        well_formed = problem is None
        if problem is None and not t.correct:
            problem = (FR.WRONG_ANSWER, f"answered {t.letter}")
        if problem is None:
            words = trace_heads.words(t.text, head)
            if any(jaccard(words, k) >= m.trace_dedup_threshold for k in kept):
                problem = (FR.NEAR_DUPLICATE, "overlaps a kept trace of the same question")
            else:
                kept.append(words)
        reason, detail = problem if problem else (None, None)
        behaviours = (
            trace_heads.behaviours(t.text, t.cue, head)
            if scanned is None
            else traces.less_cue(dict(scanned.behaviours), t.cue)
        )
        out.append(Verdict(t, well_formed, problem is None, reason, detail, behaviours))
    return out


def _heads(question_traces: list[Trace]) -> dict[str, trace_heads.Head]:
    """rollout id -> the thinking it shares with its expansions (see lgt_ops.trace_heads)."""
    heads = {}
    for t in question_traces:
        if t.kind == "rollout" and (head := trace_heads.head_of(t.text)) is not None:
            heads[t.trace_id] = head
    return heads


def input_id(question_id: str, trace_ids: list[str]) -> str:
    """What the filter saw for a question: its traces (new expansions mean new work)."""
    return content_id("filter-input", question_id, sorted(trace_ids))


def verdict_row(env: StageEnv, fp: str, v: Verdict) -> dict[str, Any]:
    return {
        "trace_id": v.trace.trace_id,
        "fingerprint": fp,
        "trace_kind": v.trace.kind,
        "question_id": v.trace.question_id,
        "correct": v.trace.correct,
        "well_formed": v.well_formed,
        "passed": v.passed,
        "reason": v.reason,
        "n_chars": len(v.trace.text),
        **v.behaviours,  # verification, backtracking, subgoal, backward
        "tagger": TAGGER,
        "run_id": env.run.run_id,
    }


@dataclass
class PendingTraces:
    """A rule stage's questions with traces: how many, and the traces and input ids of those
    not done under its fingerprint (a question's input id: `input_id` of its traces)."""

    considered: int
    traces: dict[str, list[Trace]]
    inputs: dict[str, str]

    @property
    def skipped(self) -> int:
        """The questions done already under the fingerprint."""
        return self.considered - len(self.traces)


def pending_traces(
    conn: Connection, env: StageEnv, stage: str, fp: str, question_ids: list[str]
) -> PendingTraces:
    """The current traces of the questions `stage` has not done under `fp`. In a refresh (an
    earlier run worked this stage and fingerprint) only ids are read to find them, then the
    texts of the pending ones; a first run reads the texts at once (nearly all are pending)."""
    if current.worked_before(conn, env, stage, fp):
        ids = current.trace_ids_of(conn, env, question_ids)
        inputs = {qid: input_id(qid, tids) for qid, tids in ids.items()}
        done = already_done(conn, stage, fp, list(inputs.values()))
        todo = [qid for qid, item in inputs.items() if item not in done]
        traces = current.traces_of(conn, env, todo) if todo else {}
        # the item ids of what was read: a trace written since the ids is judged with the rest
        items = {qid: input_id(qid, [t.trace_id for t in ts]) for qid, ts in traces.items()}
        return PendingTraces(len(ids), traces, items)
    traces = current.traces_of(conn, env, question_ids)
    inputs = {qid: input_id(qid, [t.trace_id for t in ts]) for qid, ts in traces.items()}
    done = already_done(conn, stage, fp, list(inputs.values()))
    pending = {qid: ts for qid, ts in traces.items() if inputs[qid] not in done}
    return PendingTraces(len(traces), pending, {qid: inputs[qid] for qid in pending})


def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
    """One item per question: its current traces (the item id is their set)."""
    fp = stage_fingerprint(env)
    with env.db.connect() as conn:
        _, qs = current.shard_questions(conn, env, spec, shard, sample_size, current.question_keys)
        work = pending_traces(conn, env, STAGE, fp, [q.question_id for q in qs])
    images = {q.question_id: q.image_id for q in qs}
    out = Plan(considered=work.considered, skipped=work.skipped)
    # The batch-readable rules over all the shard's pending traces at once (one pass each)
    scans = iter(trace_scan.scan([t.text for ts in work.traces.values() for t in ts]))
    for qid, ts in work.traces.items():
        read = [next(scans) for _ in ts]
        out.items.append(WorkItem(work.inputs[qid], images[qid], [], (ts, read)))
    return out


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Any]) -> Rows:
    """Verdicts (and rejections) for one question's traces."""
    question_traces, scans = item.context
    verdicts = judge(question_traces, env.settings.method, scans)
    rows = Rows(outputs=sum(v.passed for v in verdicts))
    rows.tables["trace_verdicts"] = [verdict_row(env, fp, v) for v in verdicts]
    rejected = [v for v in verdicts if v.reason]
    if rejected:  # one row per failed trace (a plain call: no Rejecter per trace)
        rows.tables["rejections"] = [
            rejection(
                env,
                STAGE,
                fp,
                v.trace.kind,
                v.trace.trace_id,
                v.reason,
                v.detail,
                image_id=item.image_id,
                request_key=v.trace.request_key,
            )
            for v in rejected
        ]
    return rows


# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Filter)
