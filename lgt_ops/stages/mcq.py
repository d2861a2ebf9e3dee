"""Stage 1, scale: grounded multiple-choice questions written from captions and boxes.

A text LLM reads the image's dense caption and annotated objects (not the pixels) and writes
questions grounded on specific objects. Every question is validated (see
`lgt_ops.questions.check`), near-duplicates on the same image are dropped with a reason, and
the options are shuffled with a seed derived from the question id so the correct letter is
balanced and reproducible. A counting question's options (all integers) are laid out by code,
not taken from the model: writers put the true count at the bottom of the range.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from lgt_ops import decontam, prompts, registry
from lgt_ops.annotations import ImageContext, current
from lgt_ops.composition import window
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.request import ChatRequest
from lgt_ops.llm.schema import parse_json_reply
from lgt_ops.questions import (
    LETTERS,
    SKILLS,
    NearDuplicates,
    Question,
    check,
    make_question,
    normalise_skill,
    question_row,
)
from lgt_ops.reasons import McqReason, Rejected, ReplyReason
from lgt_ops.sources import SourceSpec, image_set
from lgt_ops.stages import annotate
from lgt_ops.stages.base import (
    Shard,
    StageEnv,
    already_done,
    rejection,
)
from lgt_ops.stages.outcomes import one_answer
from lgt_ops.stages.requests import stage_request
from lgt_ops.stages.runner import (
    Plan,
    Rows,
    WorkItem,
    runner_for,
)

SPEC = registry.Mcq  # name, version, role, template, config: declared once, there
STAGE = SPEC.name
TEMPLATE = SPEC.template or ""
stage_fingerprint = SPEC.fingerprint
_COUNT = re.compile(r"[0-9]+")


def image_seed(image_id: str, seed: int) -> int:
    return (seed * 1_000_003 + int(image_id[:8], 16)) % (2**31)


def build_request(env: StageEnv, ctx: ImageContext) -> ChatRequest:
    m = env.settings.method
    t = prompts.load(TEMPLATE)
    messages = t.render(
        width=ctx.width,
        height=ctx.height,
        caption=ctx.caption or "(no caption)",
        objects=ctx.objects_text(),
        count=m.mcq_per_image,
        skills=", ".join(SKILLS),
        n_options=m.mcq_options,
        letters=", ".join(LETTERS[: m.mcq_options]),
    )
    sampling = {
        "temperature": m.mcq_temperature,
        "max_tokens": m.mcq_max_tokens,
        "seed": image_seed(ctx.image_id, m.seed),
    }
    return stage_request(env, SPEC, messages, sampling)


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    """Questions and rejections from one reply."""
    ctx: ImageContext = item.context
    outcome, rows, reject = one_answer(env, STAGE, fp, item, outcomes)
    if not outcome.ok:
        return rows
    try:
        raw = parse_json_reply(outcome.contents()[0])["questions"]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        rows.add(
            "rejections",
            reject("request", item.item_id, Rejected(ReplyReason.UNPARSEABLE_REPLY, str(exc))),
        )
        return rows
    if not raw:
        rows.add(
            "rejections",
            reject(
                "request",
                item.item_id,
                Rejected(McqReason.NO_QUESTIONS, "the reply holds no question"),
            ),
        )
        return rows
    dedup = NearDuplicates(env.settings.method.mcq_dedup_threshold)
    for n, q in enumerate(raw):
        try:
            question = accept(env, fp, ctx, q, dedup)
        except Rejected as exc:
            rows.add("rejections", reject("question", f"{item.item_id}#{n}", exc))
            continue
        row = question_row(
            question,
            fingerprint=fp,
            item_id=item.item_id,
            request_key=outcome.request.key,
            run_id=env.run.run_id,
        )
        rows.add("questions", row)
        rows.outputs += 1
    return rows


def accept(env: StageEnv, fp: str, ctx: ImageContext, q: Any, dedup: NearDuplicates) -> Question:
    """One question of the reply, checked (rules, benchmarks, near-duplicates) or Rejected."""
    if not isinstance(q, dict):
        raise Rejected(McqReason.MALFORMED_QUESTION, f"{q!r}"[:200])
    grounding = [str(g) for g in q.get("grounding") or []]
    correct = check(
        q.get("question", ""),
        q.get("options") or [],
        q.get("answer", ""),
        n_options=env.settings.method.mcq_options,
        grounding=grounding,
        known_objects=ctx.object_ids(),
    )
    seed = f"{env.settings.method.seed}:{ctx.image_id}:{q['question']}"
    correct, distractors = laid_out(correct, [str(o).strip() for o in q["options"]], seed)
    decontam.index_for(env).check_question(q["question"], [correct, *distractors])
    dedup.check(f"{q['question']} {correct}")
    return make_question(
        image_id=ctx.image_id,
        stage=1,
        fingerprint=fp,
        skill=normalise_skill(q.get("skill", "")),
        question=q["question"],
        correct=correct,
        distractors=distractors,
        grounding=sorted(set(grounding)),
    )


def laid_out(correct: str, options: Sequence[str], seed: str) -> tuple[str, list[str]]:
    """(correct, distractors). Options that are all non-negative integers (a count) are
    replaced by consecutive ones holding the correct value at a rank drawn, seeded per
    question, uniformly among those it can take (a count of 1 can only be 1st or 2nd), so
    the correct count's place in the range is no clue; other options are kept."""
    if not all(_COUNT.fullmatch(o) for o in options):
        return correct, [o for o in options if o != correct]
    value, n = int(correct), len(options)
    rank = random.Random(f"{seed}:{value}").randrange(min(value, n - 1) + 1)
    return str(value), [str(v) for v in window(value, n, rank) if v != value]


def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
    fp = stage_fingerprint(env)
    with env.db.connect() as conn:
        images = image_set(conn, spec, shard, sample_size)
        contexts = current(conn, images, annotate.stage_fingerprint(env))
        done = already_done(conn, STAGE, fp, [c.input_id for c in contexts.values()])
    out = Plan(considered=len(contexts))
    for ctx in contexts.values():
        if ctx.input_id in done:
            out.skipped += 1
        elif not ctx.objects:
            # Nothing to ground on: the annotate stage has not filled this image (yet).
            out.early.add(
                "rejections",
                rejection(
                    env,
                    STAGE,
                    fp,
                    "image",
                    ctx.input_id,
                    McqReason.MISSING_OBJECTS,
                    "no object annotations",
                    image_id=ctx.image_id,
                ),
            )
        else:
            out.items.append(WorkItem(ctx.input_id, ctx.image_id, [build_request(env, ctx)], ctx))
    return out


# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Mcq)
