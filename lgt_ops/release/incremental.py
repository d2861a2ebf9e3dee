"""Incremental releases: a version reuses the parts of its parent whose inputs did not change.

Layout. Every split's rows are partitioned by a stable key, the bucket of the row's image
(`hbucket(image_id) % B`, B = `method.release_buckets`), and each bucket is one Parquet part
named after its content: `<split>/part-<bucket>-<n>-<sha256[:16]>.parquet` (n > 0 only when a
bucket outgrows `rows_per_file`). The layout is a function of the rows alone, so the same rows
give the same parts and the same content_sha256 whether written fresh or incrementally, and a
new image only touches its own bucket in each split.

Change detection, without rebuilding a part: a bucket's digest hashes the ids of every lineage
row its rows are built from (live sources and their annotation choice, model annotations,
questions, rollouts, expansions, difficulty, verdicts, tags, pairs, rejections, each under the
current fingerprint), read as (image_id, id) pairs with one query per table. Lineage rows are
insert-only and content-addressed, so unchanged ids mean unchanged rows; anything extra only
makes a digest change (a rebuild), never a stale reuse. The digest is read *before* any row,
so a row written concurrently at worst makes the next publish rebuild that bucket.

`buckets.json` (listed and hashed in the manifest) keeps, per bucket, its digest, its parts
and what the manifest's counts need (images, split stats, rejections, served models), so a
reused bucket costs a server-side copy of its parts and one `release_member_sets` row linking
the member rows its builder wrote (`release_members` is a view over the two tables, migration
0013): no row is read, encoded, hashed or copied again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, text

from lgt_ops.db.repo import insert_ignore
from lgt_ops.env import StageEnv
from lgt_ops.ids import hbucket
from lgt_ops.release.errors import ReleaseError

INDEX = "buckets.json"


def bucket_of(image_id: str, buckets: int) -> int:
    return hbucket(image_id) % buckets


def _q(table: str, column: str) -> str:
    """(image_id, ident) of a question-keyed table's rows under the current fingerprint."""
    return (
        f"SELECT q.image_id, x.{column} AS ident FROM {table} x"
        " JOIN questions q ON q.question_id = x.question_id WHERE x.fingerprint = :fp"
    )


# Every lineage table a release row is built from, as (image_id, ident) under a fingerprint.
_SOURCES: tuple[tuple[str, str | None], ...] = (
    (
        "SELECT image_id, bucket || '|' || key || '|' || COALESCE(caption_annotation_id, '')"
        " || '|' || COALESCE(objects_annotation_id, '') AS ident FROM sources"
        " WHERE status = 'ok' AND image_id IS NOT NULL",
        None,
    ),
    (
        "SELECT image_id, annotation_id AS ident FROM annotations"
        " WHERE source = 'model' AND fingerprint = :fp",
        "annotate",
    ),
    ("SELECT image_id, question_id AS ident FROM questions WHERE fingerprint = :fp", "mcq"),
    ("SELECT image_id, question_id AS ident FROM questions WHERE fingerprint = :fp", "compose"),
    (_q("question_checks", "question_id"), "blind"),
    (_q("rollouts", "rollout_id"), "cot"),
    (_q("difficulty", "question_id"), "cot"),
    (_q("rollouts", "rollout_id"), "cot2"),
    (_q("difficulty", "question_id"), "cot2"),
    (_q("question_checks", "question_id"), "harden"),
    (_q("expansions", "expansion_id"), "expand"),
    (_q("trace_verdicts", "trace_id"), "filter"),
    (_q("behaviour_tags", "trace_id"), "tag"),
    (_q("pairs", "pair_id"), "pairs"),
)

# Per bucket and table the digest keeps (rows, sum of row hashes): order-free, so Postgres
# sums it server-side (B rows back instead of every id). A row's hash is a 64-bit hash of
# "<image_id> <ident>": Postgres' own `hashtextextended` (half the cost of md5 over every
# lineage row), elsewhere the first 15 hex digits of its md5. Digests are only ever compared
# within one lineage DB; a different hash at worst rebuilds every bucket once.
_PG_HASH = "hashtextextended(image_id || ' ' || ident, 0)"
_PG_BUCKET = "((('x' || substr(image_id, 1, 8))::bit(32)::bigint & 2147483647) % :n)"


def _row_hash(image_id: str, ident: str) -> int:
    return int(hashlib.md5(f"{image_id} {ident}".encode()).hexdigest()[:15], 16)


def image_sums_of(
    conn: Connection, sql: str, params: dict[str, Any], buckets: int
) -> dict[int, tuple[int, int]]:
    """bucket -> (images, sum of their row hashes) of the images an image-set query
    (`sources.image_set_query`) selects, aggregated as the lineage rows are (`_aggregate`:
    by Postgres, B rows back rather than every image id; elsewhere one streamed pass)."""
    images = f"SELECT image_id, 'image' AS ident FROM ({sql}) s"
    return {b: (count, total) for b, count, total in _aggregate(conn, images, params, buckets)}


def bucket_digests(
    conn: Connection, images: dict[int, tuple[int, int]], buckets: int, fps: dict[str, str]
) -> dict[int, str]:
    """bucket -> digest of its images (`image_sums_of`) and every lineage row their release rows
    depend on.

    Rows of images outside the release may count too: that can only force a rebuild."""
    sums: dict[int, list[str]] = {b: [f"images {n} {total}"] for b, (n, total) in images.items()}
    queries = [
        (sql, {"fp": fps[stage]} if stage else {})
        for sql, stage in _SOURCES
        if not stage or stage in fps
    ]
    queries.append(_rejections(fps))
    for n, (sql, params) in enumerate(queries):
        for b, count, total in _aggregate(conn, sql, params, buckets):
            if b in sums:  # buckets without a release image do not matter
                sums[b].append(f"{n} {count} {total}")
    return {b: hashlib.sha256("\n".join(v).encode()).hexdigest() for b, v in sorted(sums.items())}


def _rejections(fps: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Rejections of images counted by the release: those under a current fingerprint."""
    stages = sorted(fps)
    where = " OR ".join(f"(stage = :s{k} AND fingerprint = :f{k})" for k in range(len(stages)))
    params = {f"s{k}": s for k, s in enumerate(stages)} | {
        f"f{k}": fps[s] for k, s in enumerate(stages)
    }
    sql = (
        "SELECT image_id, rejection_id AS ident FROM rejections"
        f" WHERE image_id IS NOT NULL AND ({where or 'FALSE'})"
    )
    return sql, params


def _aggregate(
    conn: Connection, sql: str, params: dict[str, Any], buckets: int
) -> Iterable[tuple[int, int, int]]:
    """(bucket, rows, sum of row hashes) of the (image_id, ident) rows of `sql`."""
    if conn.dialect.name == "postgresql":
        agg = f"SELECT {_PG_BUCKET} AS b, COUNT(*), SUM({_PG_HASH}) FROM ({sql}) t GROUP BY 1"
        rows = conn.execute(text(agg), {**params, "n": buckets}).all()
        return [(int(b), int(c), int(t)) for b, c, t in rows]
    out: dict[int, list[int]] = {}
    for image_id, ident in conn.execute(text(sql), params):
        acc = out.setdefault(bucket_of(image_id, buckets), [0, 0])
        acc[0] += 1
        acc[1] += _row_hash(image_id, ident)
    return [(b, c, t) for b, (c, t) in out.items()]


@dataclass
class BucketState:
    """What one bucket contributed to a release (an entry of `buckets.json`)."""

    digest: str
    images: int = 0
    parts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # split -> files
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> stats
    rejections: dict[str, dict[str, int]] = field(default_factory=dict)
    served: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "images": self.images,
            "parts": self.parts,
            "stats": self.stats,
            "rejections": self.rejections,
            "served": sorted(self.served),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BucketState:
        return cls(d["digest"], d["images"], d["parts"], d["stats"], d["rejections"], d["served"])


def render_index(buckets: int, states: dict[int, BucketState]) -> bytes:
    body = {"buckets": buckets, "entries": {str(b): s.as_dict() for b, s in sorted(states.items())}}
    # compact: the C encoder (an indented dump takes the pure-Python one, 10x slower)
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def parent_states(
    env: StageEnv, parent_prefix: str, parent: dict[str, Any], buckets: int
) -> dict[int, BucketState]:
    """The parent's bucket states, when its layout is this one's; else nothing to reuse."""
    ref = parent.get("incremental", {}).get("index")
    if not ref or parent["incremental"].get("buckets") != buckets:
        return {}
    key = f"{parent_prefix}/{ref['path']}"
    if env.store.head(key) is None:
        return {}
    data = env.store.get(key)
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        return {}  # a damaged index is not trusted: rebuild everything
    entries = json.loads(data)["entries"]
    return {int(b): BucketState.from_dict(d) for b, d in entries.items()}


def unchanged_goodput(
    parent: dict[str, Any] | None, counts: dict[str, Any], every_bucket_reused: bool
) -> dict[str, Any] | None:
    """The parent's goodput when this version is the parent's content again: every bucket
    reused under the same request, so the same image set, outputs and rejections, hence the
    same requests behind them (insert-only rows), and the same counts. Else None (measure)."""
    if parent is None or not every_bucket_reused:
        return None
    old = parent.get("counts") or {}
    if "goodput" not in old or any(old.get(k) != v for k, v in counts.items()):
        return None
    return old["goodput"]


def add_counts(into: dict[str, int], more: dict[str, int]) -> None:
    """Sum counters, keeping zero entries (a fresh and an incremental publish must agree)."""
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def link_members(
    conn: Connection, release_id: str, parent_id: str | None, rebuilt: list[int], reused: list[int]
) -> None:
    """Record the member sets of a version: its own for the buckets it rebuilt, and its
    parent's (one row per bucket, the rows themselves are shared) for the ones it reused."""
    own = [{"release_id": release_id, "bucket": b, "owner_release_id": release_id} for b in rebuilt]
    insert_ignore(conn, "release_member_sets", own)
    if not reused:
        return
    stmt = text(
        "INSERT INTO release_member_sets (release_id, bucket, owner_release_id)"
        " SELECT :r, bucket, owner_release_id FROM release_member_sets"
        " WHERE release_id = :p AND bucket IN :b"
    ).bindparams(bindparam("b", expanding=True))
    linked = conn.execute(stmt, {"r": release_id, "p": parent_id, "b": sorted(reused)}).rowcount
    if linked != len(reused):
        raise ReleaseError(
            f"release {release_id}: {len(reused) - linked} reused buckets have no member set"
            f" in {parent_id}"
        )


def shares_members(conn: Connection, parent_id: str) -> bool:
    """Whether the parent's members are kept per bucket (else it predates shared sets and
    nothing of it is reused)."""
    legacy = conn.execute(
        text("SELECT 1 FROM release_member_sets WHERE release_id = :p AND bucket < 0"),
        {"p": parent_id},
    ).first()
    return legacy is None


def delete_members(conn: Connection, release_id: str) -> None:
    """Remove an unpublished release's member sets and the rows it wrote (no other version
    links a set of a release that was never published)."""
    params = {"r": release_id}
    conn.execute(text("DELETE FROM release_member_sets WHERE release_id = :r"), params)
    conn.execute(text("DELETE FROM member_rows WHERE owner_release_id = :r"), params)
