"""Which outputs are current: the chain from an image's present annotations, through the
stage fingerprints of the present configuration, to questions and their traces.

A query layer: it imports no stage; the fingerprints come from the registry.

Older outputs stay in the lineage DB (they are history, and their requests stay cached);
stages and releases work on the current ones only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection

from lgt_ops import registry
from lgt_ops.annotations import ImageContext
from lgt_ops.db.repo import select_in
from lgt_ops.env import StageEnv
from lgt_ops.ids import content_id
from lgt_ops.registry import stage_fingerprint


def _fp(env: StageEnv, stage: str) -> str:
    """The stage's fingerprint under the run's settings (computed once, by the registry)."""
    return stage_fingerprint(stage, env.settings)


def _rollout_fps(env: StageEnv) -> dict[str, str]:
    """Rollouts and pass rates come from cot (stage 1) and cot2 (stage 2); a question's id
    names its stage, so one query over both fingerprints finds each question's own."""
    return {"fp1": _fp(env, "cot"), "fp2": _fp(env, "cot2")}


def compose_input_id(image_id: str, stage1_ids: list[str]) -> str:
    """Identity of what composition sees for an image: its current parent candidates."""
    return content_id("compose-input", image_id, sorted(stage1_ids))


def mcq_questions(conn: Connection, env: StageEnv, contexts: dict[str, ImageContext]) -> list[Any]:
    """Every stage-1 question mcq made for these contexts (what the blind check reads)."""
    return select_in(
        conn,
        "SELECT * FROM questions WHERE stage = 1 AND fingerprint = :fp AND item_id IN :ids"
        " ORDER BY image_id, question_id",
        [c.input_id for c in contexts.values()],
        fp=_fp(env, "mcq"),
    )


def _kept(conn: Connection, env: StageEnv, stage: str, rows: list[Any]) -> list[Any]:
    """The rows whose question passed `stage`'s check (question_checks) under its fingerprint."""
    kept = {
        r.question_id
        for r in select_in(
            conn,
            "SELECT question_id FROM question_checks WHERE fingerprint = :fp AND kept = :yes"
            " AND question_id IN :ids",
            [r.question_id for r in rows],
            fp=_fp(env, stage),
            yes=True,
        )
    }
    return [r for r in rows if r.question_id in kept]


def stage1(conn: Connection, env: StageEnv, contexts: dict[str, ImageContext]) -> list[Any]:
    """Current stage-1 questions: mcq's, less those answerable without the image (when the
    blind check is on; a question it has not checked yet is not current)."""
    rows = mcq_questions(conn, env, contexts)
    if not registry.get("blind").enabled(env.settings):
        return rows
    return _kept(conn, env, "blind", rows)


def compose_parents(
    conn: Connection, env: StageEnv, contexts: dict[str, ImageContext]
) -> list[Any]:
    """Stage-1 questions composition may build on: those the VLM answers (cot pass rate > 0),
    so a wrong answer key is not carried into stage 2."""
    rows = stage1(conn, env, contexts)
    rates = difficulty(conn, env, [r.question_id for r in rows])
    return [r for r in rows if r.question_id in rates and rates[r.question_id].pass_rate > 0]


def by_image(rows: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        out[r.image_id].append(r)
    return out


def composed(conn: Connection, env: StageEnv, contexts: dict[str, ImageContext]) -> list[Any]:
    """Every stage-2 question compose made from the current parents (before hardening)."""
    inputs = [
        compose_input_id(img, [q.question_id for q in qs])
        for img, qs in by_image(compose_parents(conn, env, contexts)).items()
    ]
    return select_in(
        conn,
        "SELECT * FROM questions WHERE stage = 2 AND fingerprint = :fp AND item_id IN :ids"
        " ORDER BY image_id, question_id",
        inputs,
        fp=_fp(env, "compose"),
    )


def questions(conn: Connection, env: StageEnv, contexts: dict[str, ImageContext]) -> list[Any]:
    """Current questions of these images, ordered by image: stage 1, and the composed ones
    the harden stage kept (harder than their parents)."""
    first = stage1(conn, env, contexts)
    second = _kept(conn, env, "harden", composed(conn, env, contexts))
    return sorted(first + second, key=lambda q: (q.image_id, q.stage, q.question_id))


def rollouts(conn: Connection, env: StageEnv, question_ids: list[str]) -> list[Any]:
    return select_in(
        conn,
        "SELECT * FROM rollouts WHERE fingerprint IN (:fp1, :fp2) AND question_id IN :ids"
        " ORDER BY question_id, sample_index",
        question_ids,
        **_rollout_fps(env),
    )


def expansions(conn: Connection, env: StageEnv, rollout_ids: list[str]) -> list[Any]:
    return select_in(
        conn,
        "SELECT * FROM expansions WHERE fingerprint = :fp AND rollout_id IN :ids"
        " ORDER BY question_id, rollout_id, expansion_id",
        rollout_ids,
        fp=_fp(env, "expand"),
    )


def difficulty(conn: Connection, env: StageEnv, question_ids: list[str]) -> dict[str, Any]:
    rows = select_in(
        conn,
        "SELECT * FROM difficulty WHERE fingerprint IN (:fp1, :fp2) AND question_id IN :ids",
        question_ids,
        **_rollout_fps(env),
    )
    return {r.question_id: r for r in rows}


def verdicts(
    conn: Connection, env: StageEnv, trace_ids: list[str], columns: str = "*"
) -> dict[str, Any]:
    """trace_id -> its current verdict row (`columns`, which must include trace_id)."""
    rows = select_in(
        conn,
        f"SELECT {columns} FROM trace_verdicts WHERE fingerprint = :fp AND trace_id IN :ids",
        trace_ids,
        fp=_fp(env, "filter"),
    )
    return {r.trace_id: r for r in rows}


def pairs(conn: Connection, env: StageEnv, question_ids: list[str]) -> list[Any]:
    return select_in(
        conn,
        "SELECT * FROM pairs WHERE fingerprint = :fp AND question_id IN :ids"
        " ORDER BY question_id, pair_id",
        question_ids,
        fp=_fp(env, "pairs"),
    )


Selector = Callable[[Connection, StageEnv, dict[str, ImageContext]], list[Any]]


def shard_questions(
    conn: Connection,
    env: StageEnv,
    spec: Any,
    shard: Any,
    sample_size: int | None,
    select: Selector = questions,
) -> tuple[dict[str, ImageContext], list[Any]]:
    """The image contexts of a shard and the questions `select` picks from them (by default
    the current questions of both stages)."""
    from lgt_ops.annotations import current as image_contexts
    from lgt_ops.sources import image_set

    images = image_set(conn, spec, shard, sample_size)
    contexts = image_contexts(conn, images, _fp(env, "annotate"))
    return contexts, select(conn, env, contexts)


def traces_of(conn: Connection, env: StageEnv, question_ids: list[str]) -> dict[str, list[Any]]:
    """question_id -> its current rollouts and their expansions, as `Trace`s, stable order."""
    from lgt_ops.traces import Trace

    out: dict[str, list[Any]] = defaultdict(list)
    rolls = rollouts(conn, env, question_ids)
    for r in rolls:
        out[r.question_id].append(Trace.from_rollout(r))
    for e in expansions(conn, env, [r.rollout_id for r in rolls]):
        out[e.question_id].append(Trace.from_expansion(e))
    return out


def behaviour_tags(conn: Connection, env: StageEnv, trace_ids: list[str]) -> dict[str, Any]:
    """trace_id -> LLM behaviour counts under the present configuration (empty when off)."""
    if not registry.get("tag").enabled(env.settings):
        return {}
    rows = select_in(
        conn,
        "SELECT * FROM behaviour_tags WHERE fingerprint = :fp AND trace_id IN :ids",
        trace_ids,
        fp=_fp(env, "tag"),
    )
    return {r.trace_id: r for r in rows}
