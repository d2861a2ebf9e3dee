"""Which outputs are current: the chain from an image's present annotations, through the
stage fingerprints of the present configuration, to questions and their traces.

A query layer: it imports no stage; the fingerprints come from the registry.

Older outputs stay in the lineage DB (they are history, and their requests stay cached);
stages and releases work on the current ones only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Connection, text

from lgt_ops import registry
from lgt_ops.annotations import ContextIds, ImageContext
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


# Selectors need only each context's input_id: the ids-only contexts serve as well.
Contexts = Mapping[str, ImageContext] | Mapping[str, ContextIds]
# The question columns that selecting, filtering by a check and ordering need (for stages
# that use no question text: filter, pairs, tag, harden).
KEY_COLUMNS = "question_id, image_id, stage"


def compose_input_id(image_id: str, stage1_ids: list[str]) -> str:
    """Identity of what composition sees for an image: its current parent candidates."""
    return content_id("compose-input", image_id, sorted(stage1_ids))


def mcq_questions(
    conn: Connection, env: StageEnv, contexts: Contexts, columns: str = "*"
) -> list[Any]:
    """Every stage-1 question mcq made for these contexts (what the blind check reads)."""
    return select_in(
        conn,
        f"SELECT {columns} FROM questions WHERE stage = 1 AND fingerprint = :fp"
        " AND item_id IN :ids ORDER BY image_id, question_id",
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


def stage1(conn: Connection, env: StageEnv, contexts: Contexts, columns: str = "*") -> list[Any]:
    """Current stage-1 questions: mcq's, less those answerable without the image (when the
    blind check is on; a question it has not checked yet is not current)."""
    rows = mcq_questions(conn, env, contexts, columns)
    if not registry.get("blind").enabled(env.settings):
        return rows
    return _kept(conn, env, "blind", rows)


def compose_parents(conn: Connection, env: StageEnv, contexts: Contexts) -> list[Any]:
    """Stage-1 questions composition may build on: those the VLM answers (cot pass rate > 0),
    so a wrong answer key is not carried into stage 2."""
    return _answered(conn, env, stage1(conn, env, contexts))


def _answered(conn: Connection, env: StageEnv, rows: list[Any]) -> list[Any]:
    """The stage-1 rows the VLM answers (see compose_parents)."""
    rates = difficulty(conn, env, [r.question_id for r in rows])
    return [r for r in rows if r.question_id in rates and rates[r.question_id].pass_rate > 0]


def by_image(rows: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        out[r.image_id].append(r)
    return out


def composed(conn: Connection, env: StageEnv, contexts: Contexts, columns: str = "*") -> list[Any]:
    """Every stage-2 question compose made from the current parents (before hardening)."""
    parents = _answered(conn, env, stage1(conn, env, contexts, columns))
    return _composed_of(conn, env, parents, columns)


def composed_keys(conn: Connection, env: StageEnv, contexts: Contexts) -> list[Any]:
    """`composed`, KEY_COLUMNS only."""
    return composed(conn, env, contexts, KEY_COLUMNS)


def _composed_of(
    conn: Connection, env: StageEnv, parents: list[Any], columns: str = "*"
) -> list[Any]:
    """The stage-2 questions compose made from these parents (their current set per image)."""
    inputs = [
        compose_input_id(img, [q.question_id for q in qs]) for img, qs in by_image(parents).items()
    ]
    return select_in(
        conn,
        f"SELECT {columns} FROM questions WHERE stage = 2 AND fingerprint = :fp"
        " AND item_id IN :ids ORDER BY image_id, question_id",
        inputs,
        fp=_fp(env, "compose"),
    )


def questions(conn: Connection, env: StageEnv, contexts: Contexts, columns: str = "*") -> list[Any]:
    """Current questions of these images, ordered by image: stage 1, and the composed ones
    the harden stage kept (harder than their parents). Stage 1 is read once: it is also
    what the composed questions' parents come from."""
    first = stage1(conn, env, contexts, columns)
    parents = _answered(conn, env, first)
    second = _kept(conn, env, "harden", _composed_of(conn, env, parents, columns))
    return sorted(first + second, key=lambda q: (q.image_id, q.stage, q.question_id))


def question_keys(conn: Connection, env: StageEnv, contexts: Contexts) -> list[Any]:
    """`questions`, KEY_COLUMNS only (for stages that use no question text)."""
    return questions(conn, env, contexts, KEY_COLUMNS)


def rollouts(
    conn: Connection, env: StageEnv, question_ids: list[str], columns: str = "*"
) -> list[Any]:
    return select_in(
        conn,
        f"SELECT {columns} FROM rollouts WHERE fingerprint IN (:fp1, :fp2)"
        " AND question_id IN :ids ORDER BY question_id, sample_index",
        question_ids,
        **_rollout_fps(env),
    )


def expansions(
    conn: Connection, env: StageEnv, rollout_ids: list[str], columns: str = "*"
) -> list[Any]:
    return select_in(
        conn,
        f"SELECT {columns} FROM expansions WHERE fingerprint = :fp AND rollout_id IN :ids"
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
    return _verdicts_by(conn, env, "trace_id", trace_ids, columns)


def question_verdicts(
    conn: Connection, env: StageEnv, question_ids: list[str], columns: str
) -> dict[str, Any]:
    """trace_id -> current verdict row (`columns`, with trace_id) of these questions' traces:
    one lookup per question (the trace_verdicts_question index) rather than per trace. It
    may hold verdicts of traces that are no longer current; callers look their traces up."""
    return _verdicts_by(conn, env, "question_id", question_ids, columns)


def _verdicts_by(
    conn: Connection, env: StageEnv, key: str, ids: list[str], columns: str
) -> dict[str, Any]:
    """trace_id -> current verdict row (`columns`) of the verdicts whose `key` is in `ids`."""
    rows = select_in(
        conn,
        f"SELECT {columns} FROM trace_verdicts WHERE fingerprint = :fp AND {key} IN :ids",
        ids,
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


Selector = Callable[[Connection, StageEnv, Contexts], list[Any]]


def shard_questions(
    conn: Connection,
    env: StageEnv,
    spec: Any,
    shard: Any,
    sample_size: int | None,
    select: Selector = questions,
) -> tuple[dict[str, ContextIds], list[Any]]:
    """The image contexts of a shard, by their annotation ids (a question's item id is all
    a selector looks up, so no annotation is read or parsed), and the questions `select`
    picks from them (by default the current questions of both stages)."""
    from lgt_ops.annotations import current_ids
    from lgt_ops.sources import image_set

    images = image_set(conn, spec, shard, sample_size)
    contexts = current_ids(conn, images, _fp(env, "annotate"))
    return contexts, select(conn, env, contexts)


def traces_of(conn: Connection, env: StageEnv, question_ids: list[str]) -> dict[str, list[Any]]:
    """question_id -> its current rollouts and their expansions, as `Trace`s, stable order."""
    from lgt_ops.traces import Trace

    out: dict[str, list[Any]] = defaultdict(list)
    rolls = [
        Trace.from_rollout(r) for r in rollouts(conn, env, question_ids, Trace.ROLLOUT_COLUMNS)
    ]
    for t in rolls:
        out[t.question_id].append(t)
    ids = [t.trace_id for t in rolls]
    for e in expansions(conn, env, ids, Trace.EXPANSION_COLUMNS):
        t = Trace.from_expansion(e)
        out[t.question_id].append(t)
    return out


def trace_ids_of(conn: Connection, env: StageEnv, question_ids: list[str]) -> dict[str, list[str]]:
    """question_id -> the ids of its current traces (those `traces_of` reads), without texts."""
    out: dict[str, list[str]] = defaultdict(list)
    rolls = rollouts(conn, env, question_ids, "rollout_id, question_id")
    for rollout_id, question_id in rolls:
        out[question_id].append(rollout_id)
    for expansion_id, question_id in expansions(
        conn, env, [r[0] for r in rolls], "expansion_id, question_id"
    ):
        out[question_id].append(expansion_id)
    return out


def worked_before(conn: Connection, env: StageEnv, stage: str, fingerprint: str) -> bool:
    """Whether an earlier run finished a shard of `stage` under `fingerprint` (a refresh, where
    most of a shard is usually done already)."""
    row = conn.execute(
        text(
            "SELECT 1 FROM stage_runs WHERE stage = :s AND fingerprint = :f AND run_id <> :r"
            " AND status = 'success' LIMIT 1"
        ),
        {"s": stage, "f": fingerprint, "r": env.run.run_id},
    ).first()
    return row is not None


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
