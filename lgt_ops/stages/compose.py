"""Stage 2, complexity: harder multi-hop questions composed from verified stage-1 ones.

The system, not the model, decides what a composed question asks and what its answer is:
it pairs related stage-1 questions of one image under an explicit operator and derives the
answer from the parents' verified answers. The LLM only phrases the question (and may
rephrase distractors); the reply is accepted only if its marked option is the derived answer.

Operators and when two questions relate:
- chain:       p's answer names an object that q is about (p: "which object is left of the
               bowl?" -> "cup"; q: "what colour is the cup?") -> q's answer;
- compare:     two counting questions about different objects -> which is more numerous;
- count_over:  two counting questions about different objects -> the total;
- conjunction: two questions sharing a grounded object -> both answers at once.
Caps: at most `compose_per_image` compositions per image, each parent used at most
`compose_per_parent` times. Parents and operator are stored (question_parents).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import permutations
from typing import Any

from lgt_ops import current, decontam, prompts, registry
from lgt_ops.annotations import ImageContext
from lgt_ops.annotations import current as image_contexts
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
from lgt_ops.stages.runner import Plan, Rows, WorkItem, request_rejection, runner_for

SPEC = registry.Compose  # name, version, role, template, config: declared once, there
STAGE = SPEC.name
MAX_TOKENS = registry.Compose.reply_tokens
TEMPLATE = SPEC.template or ""

DESCRIPTIONS = {
    "chain": "The answer to the first question identifies an object; the composed question "
    "asks the second question about that object without naming it.",
    "compare": "The composed question asks which of two kinds of objects is more numerous.",
    "count_over": "The composed question asks for the total number of two kinds of objects.",
    "conjunction": "The composed question requires both answers at once; each option pairs "
    "one candidate answer to each simple question.",
}
stage_fingerprint = SPEC.fingerprint


@dataclass(frozen=True)
class Candidate:
    operator: str
    parents: tuple[Question, ...]
    answer: str
    distractors: tuple[str, ...]

    @property
    def grounding(self) -> list[str]:
        return sorted({g for p in self.parents for g in p.grounding})

    @property
    def skill(self) -> str:
        return "+".join(sorted({p.skill for p in self.parents}))


def _number(q: Question) -> int | None:
    text = q.answer_text.strip()
    return int(text) if text.isdigit() else None


def _subject(q: Question, labels: dict[str, str]) -> str | None:
    """The one object label a question is about, if its grounding has a single label."""
    found = {labels.get(g) for g in q.grounding}
    return found.pop() if len(found) == 1 and None not in found else None


def _distractor(q: Question, rng: random.Random) -> str:
    return rng.choice([o for o in q.options if o != q.answer_text])


def _numbers_near(total: int, n: int) -> list[str]:
    near = [total + 1, total + 2, total - 1, total + 3, total - 2, total + 4]
    return [str(v) for v in near if v >= 0 and v != total][:n]


def candidates(
    ctx: ImageContext, parents: list[Question], n_options: int, seed: int
) -> Iterator[Candidate]:
    """Every composition the rules allow for this image, in a seeded order."""
    labels = {o["id"]: o["label"] for o in ctx.objects or ()}
    rng = random.Random(f"{ctx.image_id}:{seed}")
    pairs = list(permutations(parents, 2))
    rng.shuffle(pairs)
    for p, q in pairs:
        a, b = _number(p), _number(q)
        sp, sq = _subject(p, labels), _subject(q, labels)
        if (
            p.skill == "counting"
            and q.skill == "counting"
            and a is not None
            and b is not None
            and sp
            and sq
            and sp != sq
            and p.question_id < q.question_id
        ):
            winner = sp if a > b else sq if b > a else "both equally"
            opts = [sp, sq, "both equally", "neither of them"]
            yield Candidate("compare", (p, q), winner, tuple(o for o in opts if o != winner))
            yield Candidate(
                "count_over", (p, q), str(a + b), tuple(_numbers_near(a + b, n_options - 1))
            )
        linked = {g for g in q.grounding if labels.get(g, "").lower() == p.answer_text.lower()}
        if linked & set(p.grounding) and q.skill != "counting" and p.skill != "counting":
            yield Candidate(
                "chain", (p, q), q.answer_text, tuple(o for o in q.options if o != q.answer_text)
            )
        if (
            set(p.grounding) & set(q.grounding)
            and p.question_id < q.question_id
            and p.skill != q.skill
        ):
            pd, qd = _distractor(p, rng), _distractor(q, rng)
            answer = f"{p.answer_text}; {q.answer_text}"
            wrong = (f"{pd}; {q.answer_text}", f"{p.answer_text}; {qd}", f"{pd}; {qd}")
            yield Candidate("conjunction", (p, q), answer, wrong)


def select(
    cands: Iterator[Candidate],
    operators: tuple[str, ...],
    per_image: int,
    per_parent: int,
    n_options: int,
) -> list[Candidate]:
    """Round-robin over operators, within the caps."""
    queues: dict[str, list[Candidate]] = {op: [] for op in operators}
    for c in cands:
        if c.operator in queues and len(c.distractors) >= n_options - 1:
            queues[c.operator].append(c)
    chosen: list[Candidate] = []
    used: dict[str, int] = {}
    while len(chosen) < per_image and any(queues.values()):
        for op in operators:
            while queues[op]:
                c = queues[op].pop(0)
                if all(used.get(p.question_id, 0) < per_parent for p in c.parents):
                    chosen.append(c)
                    for p in c.parents:
                        used[p.question_id] = used.get(p.question_id, 0) + 1
                    break
            if len(chosen) >= per_image:
                break
    return chosen


def build_request(env: StageEnv, image_id: str, cand: Candidate) -> ChatRequest:
    m = env.settings.method
    t = prompts.load(TEMPLATE)
    options = [cand.answer, *cand.distractors[: m.mcq_options - 1]]
    random.Random(f"{image_id}:{cand.operator}:{cand.answer}").shuffle(options)
    messages = t.render(
        operator=cand.operator,
        operator_description=DESCRIPTIONS[cand.operator],
        parents="\n".join(
            f"{i}. {p.question} -> {p.answer_text}" for i, p in enumerate(cand.parents, start=1)
        ),
        answer=cand.answer,
        suggested=" | ".join(options),
        n_options=m.mcq_options,
        letters=", ".join(LETTERS[: m.mcq_options]),
    )
    parent_ids = [p.question_id for p in cand.parents]
    return ChatRequest(
        role="llm",
        model=env.settings.endpoint("llm").model,
        template_id=t.id,
        template_version=t.version,
        messages=messages,
        sampling={
            "temperature": m.compose_temperature,
            "max_tokens": MAX_TOKENS,
            "seed": int(sorted(parent_ids)[0][:8], 16) % (2**31),
        },
        response_schema=t.schema,
        schema_name=t.id,
        tag=cand,
    )


def _accept(env: StageEnv, fp: str, item: WorkItem, outcome: Outcome) -> dict[str, Any]:
    """Validate one composed question; returns rows or raises Rejected."""
    cand: Candidate = outcome.request.tag
    try:
        reply = parse_json_reply(outcome.contents()[0])
        text, options, letter = reply["question"], list(reply["options"]), reply["answer"]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise Rejected(ReplyReason.UNPARSEABLE_REPLY, str(exc)) from exc
    correct = check(text, options, letter, n_options=env.settings.method.mcq_options)
    decontam.index_for(env).check_question(text, options)  # before any rollout
    if " ".join(correct.lower().split()) != " ".join(cand.answer.lower().split()):
        raise Rejected(
            ComposeReason.ANSWER_MISMATCH, f"marked {correct!r}, the parents give {cand.answer!r}"
        )
    for p in cand.parents:
        if jaccard(tokens(text), tokens(p.question)) >= 0.9:
            raise Rejected(ComposeReason.NOT_COMPOSED, "the question repeats a parent")
    q = make_question(
        image_id=item.image_id or "",
        stage=2,
        fingerprint=fp,
        skill=cand.skill,
        question=text,
        correct=cand.answer,
        distractors=[o.strip() for o in options if o.strip() != correct],
        grounding=cand.grounding,
        operator=cand.operator,
        parents=[p.question_id for p in cand.parents],
    )
    return {
        "questions": [
            question_row(
                q,
                fingerprint=fp,
                item_id=item.item_id,
                request_key=outcome.request.key,
                run_id=env.run.run_id,
            )
        ],
        "question_parents": [
            {"question_id": q.question_id, "parent_id": p.question_id, "position": i}
            for i, p in enumerate(cand.parents)
        ],
    }


def handle(env: StageEnv, fp: str, item: WorkItem, outcomes: list[Outcome]) -> Rows:
    rows = Rows()
    for outcome in sorted(outcomes, key=lambda o: o.request.key):
        cand: Candidate = outcome.request.tag
        ref = f"{item.item_id}#{cand.operator}:{'+'.join(p.question_id[:12] for p in cand.parents)}"
        if not outcome.ok:
            rows.add("rejections", request_rejection(env, STAGE, fp, item, outcome))
            continue
        try:
            produced = _accept(env, fp, item, outcome)
        except Rejected as exc:
            rows.add(
                "rejections",
                Rejecter(env, STAGE, fp, item.image_id, outcome.request.key)("question", ref, exc),
            )
            continue
        for table, table_rows in produced.items():
            rows.add(table, *table_rows)
        rows.outputs += 1
    return rows


def plan(env: StageEnv, spec: SourceSpec, shard: Shard, sample_size: int | None = None) -> Plan:
    fp = stage_fingerprint(env)
    m = env.settings.method
    with env.db.connect() as conn:
        images = image_set(conn, spec, shard, sample_size)
        contexts = image_contexts(conn, images, annotate.stage_fingerprint(env))
        per_image = current.by_image(current.compose_parents(conn, env, contexts))
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
        parents = [from_row(r) for r in rows]
        chosen = select(
            candidates(contexts[image_id], parents, m.mcq_options, m.seed),
            m.compose_operators,
            m.compose_per_image,
            m.compose_per_parent,
            m.mcq_options,
        )
        requests = [build_request(env, image_id, c) for c in chosen]
        out.items.append(WorkItem(inputs[image_id], image_id, requests, contexts[image_id]))
    return out


# The shared run loop (stages/runner.run_planned) over this module's plan() and handle().
run = runner_for(registry.Compose)
