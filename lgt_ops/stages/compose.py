"""Stage 2, complexity: harder multi-hop questions composed from verified stage-1 ones.

The system, not the model, decides what a composed question asks, its answer and its options
(lgt_ops.composition: operators, derived answers, shortcut-free options); the LLM only words
the question. A reply is accepted only if it keeps the laid-out options, marks the derived
answer, and is well posed (lgt_ops.wellposed: a chain asks about the object its first hop
resolves without naming it). Chain-shaped pairs that are not well-posed chains are recorded as
rejected candidates. Caps: at most `compose_per_image` compositions per image, each parent
used at most `compose_per_parent` times. Parents and operator are stored (question_parents).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from lgt_ops import current, decontam, prompts, registry
from lgt_ops.annotations import ImageContext
from lgt_ops.annotations import current as image_contexts
from lgt_ops.composition import Candidate, candidates, select
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.request import ChatRequest
from lgt_ops.llm.schema import parse_json_reply
from lgt_ops.questions import (
    LETTERS,
    Question,
    check,
    from_row,
    jaccard,
    make_question,
    question_row,
    tokens,
)
from lgt_ops.reasons import ComposeReason, Rejected, ReplyReason
from lgt_ops.sources import SourceSpec, image_set
from lgt_ops.stages import annotate
from lgt_ops.stages.base import Rejecter, Shard, StageEnv, already_done
from lgt_ops.stages.outcomes import request_rejection
from lgt_ops.stages.requests import stage_request
from lgt_ops.stages.runner import Plan, Rows, WorkItem, runner_for
from lgt_ops.wellposed import check_well_posed

SPEC = registry.Compose  # name, version, role, template, config: declared once, there
STAGE = SPEC.name
MAX_TOKENS = registry.Compose.reply_tokens
TEMPLATE = SPEC.template or ""
stage_fingerprint = SPEC.fingerprint


@dataclass(frozen=True)
class ImageItem:
    """What handle() gets back for an image: its context and the candidates refused at plan."""

    image: ImageContext
    refused: tuple[Candidate, ...] = ()


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def build_request(env: StageEnv, image_id: str, cand: Candidate) -> ChatRequest:
    m = env.settings.method
    t = prompts.load(TEMPLATE)
    options = list(cand.options)
    random.Random(f"{image_id}:{cand.operator}:{cand.answer}").shuffle(options)
    messages = t.render(
        operator=cand.operator,
        operator_description=cand.description(),
        parents="\n".join(
            f"{i}. {p.question} -> {p.answer_text}" for i, p in enumerate(cand.parents, start=1)
        ),
        answer=cand.answer,
        suggested=" | ".join(options),
        n_options=m.mcq_options,
        letters=", ".join(LETTERS[: m.mcq_options]),
    )
    parent_ids = [p.question_id for p in cand.parents]
    sampling = {
        "temperature": m.compose_temperature,
        "max_tokens": MAX_TOKENS,
        "seed": int(sorted(parent_ids)[0][:8], 16) % (2**31),
    }
    return stage_request(env, SPEC, messages, sampling, tag=cand)


def compose_question(
    cand: Candidate,
    reply: dict[str, Any],
    *,
    image_id: str,
    fingerprint: str,
    n_options: int,
    objects: Sequence[dict[str, Any]],
) -> Question:
    """The composed question a reply makes of a candidate, or Rejected (no I/O: pure)."""
    try:
        text, options, letter = reply["question"], list(reply["options"]), reply["answer"]
    except (KeyError, TypeError) as exc:
        raise Rejected(ReplyReason.UNPARSEABLE_REPLY, str(exc)) from exc
    correct = check(text, options, letter, n_options=n_options)
    if sorted(_key(o) for o in options) != sorted(_key(o) for o in cand.options):
        raise Rejected(
            ComposeReason.OPTIONS_CHANGED, f"options {options}, laid out {list(cand.options)}"
        )
    if _key(correct) != _key(cand.answer):
        raise Rejected(
            ComposeReason.ANSWER_MISMATCH, f"marked {correct!r}, the parents give {cand.answer!r}"
        )
    for p in cand.parents:
        if jaccard(tokens(text), tokens(p.question)) >= 0.9:
            raise Rejected(ComposeReason.NOT_COMPOSED, "the question repeats a parent")
    q = make_question(
        image_id=image_id,
        stage=2,
        fingerprint=fingerprint,
        skill=cand.skill,
        question=text,
        correct=cand.answer,
        distractors=list(cand.distractors),  # the laid-out texts, whatever the reply's case
        grounding=cand.grounding,
        operator=cand.operator,
        parents=[p.question_id for p in cand.parents],
    )
    check_well_posed(q, cand.parents, objects)
    return q


def _accept(env: StageEnv, fp: str, item: WorkItem, outcome: Outcome) -> dict[str, Any]:
    """Validate one composed question; returns rows or raises Rejected."""
    cand: Candidate = outcome.request.tag
    try:
        reply = parse_json_reply(outcome.contents()[0])
    except (ValueError, IndexError) as exc:
        raise Rejected(ReplyReason.UNPARSEABLE_REPLY, str(exc)) from exc
    q = compose_question(
        cand,
        reply,
        image_id=item.image_id or "",
        fingerprint=fp,
        n_options=env.settings.method.mcq_options,
        objects=list(item.context.image.objects or ()),
    )
    decontam.index_for(env).check_question(q.question, list(q.options))  # before any rollout
    row = question_row(
        q,
        fingerprint=fp,
        item_id=item.item_id,
        request_key=outcome.request.key,
        run_id=env.run.run_id,
    )
    return {
        "questions": [row],
        "question_parents": [
            {"question_id": q.question_id, "parent_id": p.question_id, "position": i}
            for i, p in enumerate(cand.parents)
        ],
    }


def _ref(item: WorkItem, cand: Candidate) -> str:
    return f"{item.item_id}#{cand.operator}:{'+'.join(p.question_id[:12] for p in cand.parents)}"


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    rows = Rows()
    refuse = Rejecter(env, STAGE, fp, item.image_id)
    for cand in item.context.refused:
        rows.add("rejections", refuse("candidate", _ref(item, cand), cand.problem))
    for outcome in sorted(outcomes, key=lambda o: o.request.key):
        cand = outcome.request.tag
        if not outcome.ok:
            rows.add("rejections", request_rejection(env, STAGE, fp, item, outcome))
            continue
        try:
            produced = _accept(env, fp, item, outcome)
        except Rejected as exc:
            reject = Rejecter(env, STAGE, fp, item.image_id, outcome.request.key)
            rows.add("rejections", reject("question", _ref(item, cand), exc))
            continue
        for table, table_rows in produced.items():
            rows.add(table, *table_rows)
        rows.outputs += 1
    return rows


def parent_rows(
    conn: Connection, env: StageEnv, contexts: dict[str, ImageContext]
) -> dict[str, list[Any]]:
    """The stage-1 question rows composition may build on (the VLM answers them: cot pass
    rate > 0), by image."""
    return current.by_image(current.compose_parents(conn, env, contexts))


def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
    fp = stage_fingerprint(env)
    m = env.settings.method
    with env.db.connect() as conn:
        images = image_set(conn, spec, shard, sample_size)
        contexts = image_contexts(conn, images, annotate.stage_fingerprint(env))
        per_image = parent_rows(conn, env, contexts)
        inputs = {
            img: current.compose_input_id(img, [q.question_id for q in qs])
            for img, qs in per_image.items()
        }
        done = already_done(conn, STAGE, fp, list(inputs.values()))
    out = Plan(considered=len(inputs))
    for image_id, rows in per_image.items():
        if inputs[image_id] in done:
            out.skipped += 1
            continue
        ctx = contexts[image_id]
        found = list(candidates(ctx, [from_row(r) for r in rows], m.mcq_options, m.seed))
        refused = tuple(
            c for c in found if c.problem is not None and c.operator in m.compose_operators
        )
        chosen = select(
            iter(found),
            m.compose_operators,
            m.compose_per_image,
            m.compose_per_parent,
            m.mcq_options,
        )
        requests = [build_request(env, image_id, c) for c in chosen]
        out.items.append(WorkItem(inputs[image_id], image_id, requests, ImageItem(ctx, refused)))
    return out


# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Compose)
