"""A release's goodput, measured at publish time into its manifest and the lineage DB.

For the release's image set and under its stage fingerprints, per stage: the distinct model
requests behind the stage's outputs and behind its rejections (so the cost of rejected work
counts, whichever run paid for it, and a release answered wholly from the ledger shows what
its content cost), their reported tokens, the outputs (accepted) and the rejections. Outputs
made from superseded annotations under the same fingerprints count too: they were paid for.
Each figure is one query joining the image set (no per-chunk round trips), so measuring
costs a few queries whatever the release's size.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

from lgt_ops.env import StageEnv
from lgt_ops.goodput import FIGURES, StageGoodput, total
from lgt_ops.sources import _IMAGE_SET, SourceSpec

# stage -> (its accepted outputs for the images `{images}` under fingerprint `:fp`, the column
# holding an output's request key, or None for stages that call no model).
_BY_QUESTION = "JOIN questions q ON q.question_id = o.question_id WHERE q.image_id IN {images}"
OUTPUTS: dict[str, tuple[str, str | None]] = {
    "annotate": (
        "annotations o WHERE o.image_id IN {images} AND o.source = 'model' AND o.fingerprint = :fp",
        "o.request_key",
    ),
    "mcq": (
        "questions o WHERE o.image_id IN {images} AND o.stage = 1 AND o.fingerprint = :fp",
        "o.request_key",
    ),
    "compose": (
        "questions o WHERE o.image_id IN {images} AND o.stage = 2 AND o.fingerprint = :fp",
        "o.request_key",
    ),
    "blind": (
        f"question_checks o {_BY_QUESTION} AND o.fingerprint = :fp AND o.kept = :yes",
        "o.request_key",
    ),
    "cot": (f"rollouts o {_BY_QUESTION} AND o.fingerprint = :fp", "o.request_key"),
    "cot2": (f"rollouts o {_BY_QUESTION} AND o.fingerprint = :fp", "o.request_key"),
    "harden": (
        f"question_checks o {_BY_QUESTION} AND o.fingerprint = :fp AND o.kept = :yes",
        None,
    ),
    "expand": (f"expansions o {_BY_QUESTION} AND o.fingerprint = :fp", "o.request_key"),
    "filter": (
        f"trace_verdicts o {_BY_QUESTION} AND o.fingerprint = :fp AND o.passed = :yes",
        None,
    ),
    "tag": (f"behaviour_tags o {_BY_QUESTION} AND o.fingerprint = :fp", "o.request_key"),
    "pairs": (f"pairs o {_BY_QUESTION} AND o.fingerprint = :fp", None),
}


def measure(
    env: StageEnv,
    spec: SourceSpec,
    sample_size: int | None,
    fps: dict[str, str],
    counts: dict[str, Any],
    split_rows: int,
) -> dict[str, Any]:
    """The manifest's `counts.goodput`: per stage figures and the whole release's.

    `counts` is the manifest's counts so far (images, rejections by stage and reason);
    `split_rows` the rows of all splits."""
    rejections = counts.get("rejections") or {}
    images, params = _image_set(spec, sample_size)
    stages: list[StageGoodput] = []
    with env.db.connect() as conn:
        for stage, fp in fps.items():
            g = StageGoodput(stage, rejected=sum((rejections.get(stage) or {}).values()))
            if stage == "ingest":
                g.accepted = int(counts.get("images", 0))
            elif stage in OUTPUTS:
                _add_stage(conn, g, images, {**params, "fp": fp, "stage": stage})
            stages.append(g)
    whole = total(stages, split_rows, "release")
    whole.rejected = 0  # rejections are per stage; the release itself rejects nothing
    return {"stages": {g.stage: g.as_dict() for g in [*stages, whole]}}


def _image_set(spec: SourceSpec, sample_size: int | None) -> tuple[str, dict[str, Any]]:
    """The release's image ids as a subquery (the set lgt_ops.sources.image_set reads)."""
    sql = _IMAGE_SET
    params: dict[str, Any] = {"bucket": spec.store_url, "like": spec.like, "yes": True}
    if sample_size:
        sql = f"{sql} ORDER BY i.hbucket, i.image_id LIMIT :sample"
        params["sample"] = int(sample_size)
    return f"(SELECT image_id FROM ({sql}) image_set)", params


def _add_stage(conn: Connection, g: StageGoodput, images: str, params: dict[str, Any]) -> None:
    source, key = OUTPUTS[g.stage]
    source = source.format(images=images)
    g.accepted = int(conn.execute(text(f"SELECT COUNT(*) FROM {source}"), params).scalar_one())
    if key is None:
        return
    sql = (
        "SELECT COUNT(*), SUM(COALESCE(prompt_tokens, 0)), SUM(COALESCE(completion_tokens, 0))"
        f" FROM model_requests WHERE request_key IN (SELECT {key} FROM {source}"
        f" UNION SELECT request_key FROM rejections WHERE image_id IN {images}"
        " AND stage = :stage AND fingerprint = :fp AND request_key IS NOT NULL)"
    )
    n, p, c = conn.execute(text(sql), params).one()
    g.requests, g.prompt_tokens, g.completion_tokens = int(n or 0), int(p or 0), int(c or 0)


def db_rows(release_id: str, manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """release_goodput and release_removals rows from a manifest (none for an old one)."""
    counts = manifest.get("counts") or {}
    stages = (counts.get("goodput") or {}).get("stages") or {}
    goodput = [
        {"release_id": release_id, "stage": stage, **{k: int(v.get(k, 0)) for k in FIGURES}}
        for stage, v in sorted(stages.items())
    ]
    removals = [
        {"release_id": release_id, "stage": stage, "reason": reason, "removed": int(n)}
        for stage, reasons in sorted((counts.get("rejections") or {}).items())
        for reason, n in sorted(reasons.items())
    ]
    return {"release_goodput": goodput, "release_removals": removals if goodput else []}


def record(conn: Connection, release_id: str, manifest: dict[str, Any]) -> None:
    """Store the release's goodput rows (in the caller's transaction; idempotent)."""
    from lgt_ops.db.repo import insert_ignore

    for table, rows in db_rows(release_id, manifest).items():
        if rows:
            insert_ignore(conn, table, rows)
