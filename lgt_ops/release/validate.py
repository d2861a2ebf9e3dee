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

import heapq
import io
import json
import re
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
from lgt_ops.release import composition_checks, incremental, quality
from lgt_ops.release.errors import ReleaseNotFound
from lgt_ops.release.parquet import system_pool
from lgt_ops.release.pointers import release_prefix
from lgt_ops.release.quality import Figure

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
    """Every quality figure of the release whose parts lie under `prefix`, measured a bucket
    at a time (a row's question, traces and pairs share its image's bucket), so what is held
    is one bucket's rows and running counts, whatever the release's size."""
    splits = manifest["splits"]
    n_options = int((manifest.get("method") or {}).get("mcq_options", 4))
    annotate_fp = (manifest.get("fingerprints") or {}).get("annotate")
    run = _Measure(env, prefix, annotate_fp, n_options, sorted({"questions", *splits}))
    with env.db.connect() as conn:
        for bucket, files in _groups(conn, release_id, splits):
            run.bucket(conn, files, _members(conn, release_id, bucket))
        lineage = run.lineage.figures(conn, release_id)
    figures = run.questions.figures() + run.stage2.figures() + lineage
    return Report(release_id, figures + run.traces.figures())


_PART = re.compile(r"/part-(\d+)-\d+-[0-9a-f]+\.parquet$")  # publish's part names


def _groups(
    conn: Connection, release_id: str, splits: dict[str, Any]
) -> list[tuple[int | None, dict[str, list[dict[str, Any]]]]]:
    """The release's parts by bucket (a part's name carries it), buckets in order, each one's
    parts in path order, and every bucket holding member rows. One group (None) when a part's
    name carries no bucket or the members are kept per release (older layouts)."""
    whole = [(None, {s: v["files"] for s, v in splits.items()})]
    if not incremental.shares_members(conn, release_id):
        return whole
    by: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for split, v in splits.items():
        for f in v["files"]:
            if f.get("rows") == 0:  # an empty split's schema-only part
                continue
            m = _PART.search("/" + f["path"])
            if m is None:
                return whole
            by.setdefault(int(m.group(1)), {}).setdefault(split, []).append(f)
    sets = text("SELECT bucket FROM release_member_sets WHERE release_id = :r")
    for (b,) in conn.execute(sets, {"r": release_id}):
        by.setdefault(int(b), {})
    return sorted(by.items())


_BUCKET_MEMBERS = (
    "SELECT m.split, m.row_id FROM release_member_sets s JOIN member_rows m"
    " ON m.owner_release_id = s.owner_release_id AND m.bucket = s.bucket"
    " WHERE s.release_id = :r AND s.bucket = :b"
)


def _members(conn: Connection, release_id: str, bucket: int | None) -> dict[str, set[str]]:
    """split -> the row ids release_members lists for the release (one bucket's, if given)."""
    if bucket is None:
        sql, params = "SELECT split, row_id FROM release_members WHERE release_id = :r", {}
    else:
        sql, params = _BUCKET_MEMBERS, {"b": bucket}
    out: dict[str, set[str]] = {}
    for m in conn.execute(text(sql), {"r": release_id, **params}):
        out.setdefault(m.split, set()).add(m.row_id)
    return out


class _Measure:
    """The checks of one release, fed a bucket at a time."""

    def __init__(
        self,
        env: StageEnv,
        prefix: str,
        annotate_fp: str | None,
        n_options: int,
        split_names: list[str],
    ) -> None:
        self.env, self.prefix, self.annotate_fp = env, prefix, annotate_fp
        self.questions = quality.QuestionChecks(n_options)
        self.stage2 = composition_checks.Stage2Checks()
        self.traces = quality.TraceChecks()
        self.lineage = _Lineage(split_names)

    def bucket(
        self, conn: Connection, files: dict[str, list[dict[str, Any]]], held: dict[str, set[str]]
    ) -> None:
        """One bucket's rows: its questions (with the stage-2 checks their value ranks come
        from), then its traces and pairs against those questions' answers."""
        rows = list(read_split(self.env, self.prefix, files.get("questions", []), "questions"))
        self.stage2.ranks = {}
        composed = [q for q in rows if q["stage"] == 2]
        if composed:
            _stage2(conn, composed, self.annotate_fp, self.stage2)
        for q in rows:
            self.questions.add(q, self.stage2.ranks.get(q["question_id"]))
        self.traces.next_bucket({q["question_id"]: q["answer"] for q in rows})
        ids = {"questions": {q["row_id"] for q in rows}}
        for split, parts in sorted(files.items()):
            if split == "questions":
                continue
            check = {"sft": self.traces.sft, "dpo": self.traces.dpo}.get(_family(split))
            ids[split] = set()
            for row in read_split(self.env, self.prefix, parts, split):  # part by part
                ids[split].add(row["row_id"])
                if check is not None:
                    check(row, split)
        self.lineage.add(ids, held)


def _stage2(
    conn: Connection,
    composed: list[dict[str, Any]],
    annotate_fp: str | None,
    checks: composition_checks.Stage2Checks,
) -> None:
    """The stage-2 checks on the inputs the compose stage had: the parents as stored and the
    image's current object annotations (`annotations.current` under the release's annotate
    fingerprint, as compose reads them); added to `checks`."""
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
    composition_checks.stage2_checks(composed, parents, objects, checks)


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


class _Lineage:
    """Per split, the files' row ids against release_members', a bucket at a time: the rows
    seen, the rows on one side only (how many, the smallest id) and the smallest rows on both
    sides (walked hop by hop at the end)."""

    def __init__(self, split_names: list[str]) -> None:
        self.rows = {s: 0 for s in split_names}
        self.files_only = {s: quality.Tally(keep=1, least=True) for s in split_names}
        self.held_only = {s: quality.Tally(keep=1, least=True) for s in split_names}
        self.both: dict[str, list[str]] = {s: [] for s in split_names}

    def add(self, in_files: dict[str, set[str]], held: dict[str, set[str]]) -> None:
        for split in self.rows:
            f, h = in_files.get(split, set()), held.get(split, set())
            self.rows[split] += len(f | h)
            for i in f - h:
                self.files_only[split].add(i)
            for i in h - f:
                self.held_only[split].add(i)
            smallest = heapq.nsmallest(WALKED_PER_SPLIT, f & h)
            self.both[split] = sorted(self.both[split] + smallest)[:WALKED_PER_SPLIT]

    def figures(self, conn: Connection, release_id: str) -> list[Figure]:
        """Per split: rows that do not resolve to their question, its request, the image and
        (SFT) the expansion and rollout requests or (DPO) the pair and both traces; a row the
        files hold and the DB does not (or the reverse) counts as unresolved."""
        unresolved: dict[str, quality.Tally] = {}
        for u in conn.execute(text(_UNRESOLVED), {"r": release_id}):
            unresolved.setdefault(u.split, quality.Tally(keep=1)).add(
                f"row {u.row_id}: missing lineage"
            )
        walk = (sql_dir() / "queries" / "release_row_lineage.sql").read_text()
        out = []
        for split in sorted(self.rows):
            sides = (self.files_only[split], self.held_only[split])
            problems = quality.Tally(keep=1)
            for t in (unresolved.get(split, quality.Tally()), *sides):
                problems.n += t.n
                problems.examples += [_said(t, sides, i) for i in t.examples]
            for row_id in self.both[split]:
                hops = {
                    h.hop
                    for h in conn.execute(text(walk), {"release_id": release_id, "row_id": row_id})
                }
                missing = _HOPS[_family(split)] - hops
                if missing:
                    problems.add(f"row {row_id}: the lineage walk lacks {sorted(missing)}")
            out.append(problems.figure("lineage_unresolved", split, self.rows[split]))
        return out


def _said(t: quality.Tally, sides: tuple[quality.Tally, quality.Tally], row_id: str) -> str:
    """A problem as the figure's detail names it (a side's tally keeps bare row ids)."""
    if t is sides[0]:
        return f"row {row_id}: in the files, not in release_members"
    if t is sides[1]:
        return f"row {row_id}: in release_members, not in the files"
    return row_id


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
    with system_pool():
        return measure(env, release_id, prefix, json.loads(env.store.get(key)))
