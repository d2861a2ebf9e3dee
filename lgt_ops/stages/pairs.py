"""Preference pairs (DPO) from one question's traces and their filter verdicts.

The rules of LongPerceptualThoughts (O = correct, X = wrong, "->" = expanded from):

    X->O>X      a wrong simple CoT the reasoner corrected: chosen = the correct expansion,
                rejected = the wrong simple CoT itself (the self-correction pairs);
    X->O>X->X   chosen = a correct expansion of a wrong CoT, rejected = a wrong expansion of it;
    O>O->X      chosen = a correct simple CoT, rejected = a wrong expansion of it;
    O>X         chosen = a correct simple CoT, rejected = a wrong simple CoT of the same question.

"Correct" means passed the filter (right answer, well formed, not a near-duplicate);
"wrong" means well formed but answering wrong, so a pair differs in correctness and never in
format. Pairs are ranked by rule (in the order above), then by a seeded hash, deduplicated by
(chosen text, rejected text), and capped at `pairs_per_question`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lgt_ops import current, registry
from lgt_ops.ids import content_id, sha256_hex
from lgt_ops.sources import SourceSpec
from lgt_ops.stages import filter as trace_filter
from lgt_ops.stages.base import (
    Rows,
    Shard,
    StageEnv,
)
from lgt_ops.stages.runner import Plan, WorkItem, runner_for
from lgt_ops.traces import Trace

SPEC = registry.Pairs  # name, version, role, template, config: declared once, there
STAGE = SPEC.name
RULES = ("X->O>X", "X->O>X->X", "O>O->X", "O>X")
stage_fingerprint = SPEC.fingerprint


@dataclass(frozen=True)
class Pair:
    rule: str
    chosen: Trace
    rejected: Trace


def candidates(ts: list[Trace], passed: set[str], well_formed: set[str]) -> list[Pair]:
    """Every pair the rules allow for one question's traces."""
    good = [t for t in ts if t.trace_id in passed]
    bad = [t for t in ts if t.trace_id in well_formed and not t.correct]
    rollouts = [t for t in ts if t.kind == "rollout"]
    out: list[Pair] = []
    for r in rollouts:
        children = [t for t in ts if t.parent_id == r.trace_id]
        fixed = [c for c in children if c in good]
        broken = [c for c in children if c in bad]
        if r in bad:
            out += [Pair("X->O>X", c, r) for c in fixed]
            out += [Pair("X->O>X->X", c, w) for c in fixed for w in broken]
        if r in good:
            out += [Pair("O>O->X", r, w) for w in broken]
    right = [r for r in rollouts if r in good]
    wrong = [r for r in rollouts if r in bad]
    out += [Pair("O>X", c, w) for c in right for w in wrong]
    return out


def select(pairs: list[Pair], cap: int, seed: int) -> list[Pair]:
    """At most `cap` pairs: by rule, then a seeded order; no repeated (chosen, rejected) text."""

    def rank(p: Pair) -> tuple[int, str]:
        return RULES.index(p.rule), sha256_hex(f"{seed}:{p.chosen.trace_id}:{p.rejected.trace_id}")

    chosen: list[Pair] = []
    seen: set[tuple[str, str]] = set()
    for p in sorted(pairs, key=rank):
        texts = (p.chosen.text, p.rejected.text)
        if texts in seen or p.chosen.text == p.rejected.text:
            continue
        seen.add(texts)
        chosen.append(p)
        if len(chosen) >= cap:
            break
    return chosen


def pair_row(env: StageEnv, fp: str, stage: int, p: Pair) -> dict[str, Any]:
    return {
        "pair_id": content_id(
            "pair", p.chosen.question_id, fp, p.rule, p.chosen.trace_id, p.rejected.trace_id
        ),
        "question_id": p.chosen.question_id,
        "fingerprint": fp,
        "stage": stage,
        "rule": p.rule,
        "chosen_id": p.chosen.trace_id,
        "chosen_kind": p.chosen.kind,
        "rejected_id": p.rejected.trace_id,
        "rejected_kind": p.rejected.kind,
        "length_margin": len(p.chosen.text) - len(p.rejected.text),
        "run_id": env.run.run_id,
    }


@dataclass(frozen=True)
class QuestionTraces:
    """What pairs sees of one question: its traces, which passed, which are well formed."""

    stage: int
    traces: list[Trace]
    passed: set[str]
    formed: set[str]


def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
    """One item per question whose traces all have a verdict (else it stays pending)."""
    fp = stage_fingerprint(env)
    with env.db.connect() as conn:
        _, qs = current.shard_questions(conn, env, spec, shard, sample_size, current.question_keys)
        stage_of = {q.question_id: q.stage for q in qs}
        images = {q.question_id: q.image_id for q in qs}
        work = trace_filter.pending_traces(conn, env, STAGE, fp, list(stage_of))
        verdicts = current.question_verdicts(
            conn, env, list(work.traces), "trace_id, passed, well_formed"
        )
    passed = {t for t, v in verdicts.items() if v.passed}
    formed = {t for t, v in verdicts.items() if v.well_formed}
    out = Plan(considered=work.considered, skipped=work.skipped)
    for qid, ts in work.traces.items():
        if all(t.trace_id in verdicts for t in ts):  # else not filtered yet: pending
            context = QuestionTraces(stage_of[qid], ts, passed, formed)
            out.items.append(WorkItem(work.inputs[qid], images[qid], [], context))
    return out


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Any]) -> Rows:
    q: QuestionTraces = item.context
    m = env.settings.method
    chosen = select(candidates(q.traces, q.passed, q.formed), m.pairs_per_question, m.seed)
    rows = Rows(outputs=len(chosen))
    rows.add("pairs", *(pair_row(env, fp, q.stage, p) for p in chosen))
    return rows


# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Pairs)
