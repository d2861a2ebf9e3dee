"""Validate a release: read its rows back and measure its quality figures (release/quality.py).

The rows are read from the release's own Parquet files (the columns a trainer reads, never
the image bytes); parents and object labels of stage-2 questions, and the lineage of every
row, from the lineage DB through the provenance views (sql/migrations/0004) and, for a few
rows of each split, the row walk of sql/queries/release_row_lineage.sql. `measure` runs at
publish time (after the parts are in place, before the card is written); `validate` re-runs
it on a published release (`lgt release validate`). The manifest's figures are stored in
`release_quality` (migration 0010), in the transaction that marks the release published
(`quality.record`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
from sqlalchemy import Connection, text

from lgt_ops.annotations import current as image_contexts
from lgt_ops.db.migrate import sql_dir
from lgt_ops.db.repo import select_in
from lgt_ops.env import StageEnv
from lgt_ops.questions import from_row
from lgt_ops.release import composition_checks, quality
from lgt_ops.release.errors import ReleaseNotFound
from lgt_ops.release.pointers import release_prefix
from lgt_ops.release.quality import Figure, count_figure

# The columns each check reads, per split family (no image column).
_COLUMNS = {
    "questions": [
        "row_id",
        "question_id",
        "image_id",
        "stage",
        "skill",
        "operator",
        "parent_ids",
        "question",
        "options",
        "answer",
        "answer_text",
    ],
    "sft": ["row_id", "question_id", "answer", "trace_id", "messages"],
    "dpo": ["row_id", "question_id", "answer", "chosen_id", "rejected_id", "chosen", "rejected"],
    "rl": ["row_id", "question_id", "answer"],
}
WALKED_PER_SPLIT = 3  # rows per split walked hop by hop with release_row_lineage.sql
_HOPS = {
    "questions": {"question", "image"},
    "rl": {"question", "image"},
    "sft": {"question", "image", "expansion", "rollout"},
    "dpo": {"question", "image", "pair"},
}


@dataclass
class Report:
    release_id: str
    figures: list[Figure]

    @property
    def ok(self) -> bool:
        return quality.passed(self.figures)

    @property
    def failed(self) -> list[Figure]:
        return [f for f in self.figures if not f.passed]

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.ok, "figures": [f.as_dict() for f in self.figures]}


def _family(split: str) -> str:
    return split.split("_", 1)[0]


def read_split(
    env: StageEnv, prefix: str, files: list[dict[str, Any]], split: str
) -> Iterator[dict[str, Any]]:
    """The rows of one split, from its Parquet parts, without images."""
    for f in files:
        table = pq.read_table(
            io.BytesIO(env.store.get(f"{prefix}/{f['path']}")), columns=_COLUMNS[_family(split)]
        )
        yield from table.to_pylist()


def measure(env: StageEnv, release_id: str, prefix: str, manifest: dict[str, Any]) -> Report:
    """Every quality figure of the release whose parts lie under `prefix`."""
    splits = manifest["splits"]
    files = splits.get("questions", {}).get("files", [])
    row_ids: set[str] = set()
    answers: dict[str, str] = {}
    composed: list[dict[str, Any]] = []
    for q in read_split(env, prefix, files, "questions"):  # keep what the checks key on
        row_ids.add(q["row_id"])
        answers[q["question_id"]] = q["answer"]
        if q["stage"] == 2:
            composed.append(q)
    n_options = int((manifest.get("method") or {}).get("mcq_options", 4))
    with env.db.connect() as conn:
        stage2 = _stage2(conn, composed, (manifest.get("fingerprints") or {}).get("annotate"))
    # A second pass, streamed, rather than every question row held at once.
    questions = read_split(env, prefix, files, "questions")
    figures = quality.question_figures(questions, n_options, stage2.ranks)
    ids = {"questions": row_ids}
    trace_checks = quality.TraceChecks(answers)
    for split, v in sorted(splits.items()):
        if split == "questions":
            continue
        feed = {"sft": trace_checks.sft, "dpo": trace_checks.dpo}.get(_family(split))
        ids[split] = set()
        for row in read_split(env, prefix, v["files"], split):  # streamed, part by part
            ids[split].add(row["row_id"])
            if feed is not None:
                feed(row)
    figures += stage2.figures()
    with env.db.connect() as conn:
        figures += lineage_figures(conn, release_id, ids)
    return Report(release_id, figures + trace_checks.figures())


def _stage2(
    conn: Connection, composed: list[dict[str, Any]], annotate_fp: str | None
) -> composition_checks.Stage2Checks:
    """The stage-2 checks on the inputs the compose stage had: the parents as stored and the
    image's current object annotations (`annotations.current` under the release's annotate
    fingerprint, as compose reads them)."""
    parent_ids = sorted({p for r in composed for p in r["parent_ids"] or []})
    parents = {
        r.question_id: from_row(r)
        for r in select_in(conn, "SELECT * FROM questions WHERE question_id IN :ids", parent_ids)
    }
    images = select_in(
        conn,
        "SELECT image_id, width, height FROM images WHERE image_id IN :ids",
        sorted({r["image_id"] for r in composed}),
    )
    objects = {
        image_id: list(ctx.objects or ())
        for image_id, ctx in image_contexts(conn, list(images), annotate_fp).items()
    }
    return composition_checks.stage2_checks(composed, parents, objects)


_UNRESOLVED = """
SELECT v.split, v.row_id FROM v_release_row_lineage v
LEFT JOIN pairs p ON p.pair_id = v.pair_id
LEFT JOIN expansions ce ON ce.expansion_id = p.chosen_id
LEFT JOIN rollouts cr ON cr.rollout_id = p.chosen_id
LEFT JOIN expansions re ON re.expansion_id = p.rejected_id
LEFT JOIN rollouts rr ON rr.rollout_id = p.rejected_id
WHERE v.release_id = :r AND (
    v.question_id IS NULL OR v.image_id IS NULL OR v.model IS NULL
    OR (v.split LIKE 'sft%' AND (v.expansion_model IS NULL OR v.rollout_request_key IS NULL))
    OR (v.split LIKE 'dpo%' AND (p.pair_id IS NULL
        OR (ce.expansion_id IS NULL AND cr.rollout_id IS NULL)
        OR (re.expansion_id IS NULL AND rr.rollout_id IS NULL))))
"""


def lineage_figures(conn: Connection, release_id: str, ids: dict[str, set[str]]) -> list[Figure]:
    """Per split: rows that do not resolve to their question, its request, the image and (SFT)
    the expansion and rollout requests or (DPO) the pair and both traces; a row the files
    hold and the DB does not (or the reverse) counts as unresolved."""
    members: dict[str, set[str]] = {}
    for m in conn.execute(
        text("SELECT split, row_id FROM release_members WHERE release_id = :r"), {"r": release_id}
    ):
        members.setdefault(m.split, set()).add(m.row_id)
    unresolved: dict[str, list[str]] = {}
    for u in conn.execute(text(_UNRESOLVED), {"r": release_id}):
        unresolved.setdefault(u.split, []).append(f"row {u.row_id}: missing lineage")
    walk = (sql_dir() / "queries" / "release_row_lineage.sql").read_text()
    out = []
    for split, in_files in sorted(ids.items()):
        held = members.get(split, set())
        problems = list(unresolved.get(split, []))
        problems += [
            f"row {i}: in the files, not in release_members" for i in sorted(in_files - held)
        ]
        problems += [
            f"row {i}: in release_members, not in the files" for i in sorted(held - in_files)
        ]
        for row_id in sorted(in_files & held)[:WALKED_PER_SPLIT]:
            hops = {
                h.hop
                for h in conn.execute(text(walk), {"release_id": release_id, "row_id": row_id})
            }
            missing = _HOPS[_family(split)] - hops
            if missing:
                problems.append(f"row {row_id}: the lineage walk lacks {sorted(missing)}")
        out.append(count_figure("lineage_unresolved", split, len(in_files | held), problems))
    return out


def validate(env: StageEnv, release_id: str) -> Report:
    """Measure a published release again, from its files and the lineage DB."""
    name, _, version = release_id.partition("/")
    prefix = release_prefix(name, version)
    key = f"{prefix}/manifest.json"
    if not version or env.store.head(key) is None:
        raise ReleaseNotFound(
            f"release {release_id}: no manifest at {env.store.uri(key)}"
            " (`lgt release list` shows the published ones)"
        )
    return measure(env, release_id, prefix, json.loads(env.store.get(key)))
