"""Where a run's images come from, and which images a run (or a shard of it) works on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import Connection, bindparam, text

from lgt_ops.env import Shard, StageEnv
from lgt_ops.storage import ObjectStore


@dataclass(frozen=True)
class SourceSpec:
    """A prefix in a store: `sources/` in the main store, or `s3://other-bucket/prefix`."""

    store_url: str
    prefix: str

    @property
    def like(self) -> str:
        escaped = self.prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return escaped + "%"


def resolve_source(env: StageEnv, source: str | None) -> tuple[SourceSpec, ObjectStore]:
    raw = source if source is not None else env.settings.source_prefix
    parsed = urlparse(raw)
    if parsed.scheme in ("s3", "file"):
        if parsed.scheme == "s3":
            store = env.store_for(f"s3://{parsed.netloc}")
            prefix = parsed.path.lstrip("/")
        else:
            store = env.store_for(raw.rstrip("/"))
            prefix = ""
    else:
        store, prefix = env.store, raw.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return SourceSpec(store.url, prefix), store


_IMAGE_SET = (
    "SELECT i.image_id, i.width, i.height, i.hbucket FROM images i"
    " WHERE EXISTS (SELECT 1 FROM sources s WHERE s.image_id = i.image_id AND s.status = 'ok'"
    "   AND s.bucket = :bucket AND s.key LIKE :like ESCAPE '\\')"
)


PAGE = 5000  # image rows per query when a whole release's images are read


def _image_set_sql(
    spec: SourceSpec, shard: Shard | None, sample_size: int | None
) -> tuple[str, dict[str, Any]]:
    """The image set as a subquery (no order), and its parameters."""
    sql = _IMAGE_SET
    params: dict[str, Any] = {"bucket": spec.store_url, "like": spec.like}
    sharded = shard is not None and shard.count > 1
    if sharded:
        params["lo"], params["hi"] = shard.bounds()
    if sample_size:
        sql = f"SELECT * FROM ({sql} ORDER BY i.hbucket, i.image_id LIMIT :sample) sampled"
        params["sample"] = int(sample_size)
        if sharded:
            sql += " WHERE hbucket >= :lo AND hbucket < :hi"
    else:  # the range goes inside, where the images_hbucket index serves it
        if sharded:
            sql += " AND i.hbucket >= :lo AND i.hbucket < :hi"
        sql = f"SELECT * FROM ({sql}) all_images"
    return sql, params


def image_set_query(spec: SourceSpec, sample_size: int | None = None) -> tuple[str, dict[str, Any]]:
    """The whole image set (no shard, no order) as a subquery with its parameters: for a
    query the server aggregates rather than one that returns every image."""
    return _image_set_sql(spec, None, sample_size)


def image_set(
    conn: Connection, spec: SourceSpec, shard: Shard | None = None, sample_size: int | None = None
) -> list[Any]:
    """Images with a live source under the spec; a sample is the same images every run
    (smallest hbucket first), and a shard is a stable hash range of that set."""
    sql, params = _image_set_sql(spec, shard, sample_size)
    return conn.execute(text(sql + " ORDER BY image_id"), params).all()


def iter_image_set(
    conn: Connection, spec: SourceSpec, sample_size: int | None = None, page: int = PAGE
) -> Iterator[Any]:
    """The rows of `image_set` (no shard) in image_id order, a page at a time (keyset
    pagination on the primary key), so a reader of the whole corpus holds one page."""
    inner, params = _image_set_sql(spec, None, sample_size)
    sql = text(
        f"SELECT * FROM ({inner}) s WHERE s.image_id > :after ORDER BY s.image_id LIMIT :page"
    )
    after = ""
    while True:
        rows = conn.execute(sql, {**params, "after": after, "page": page}).all()
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1].image_id


def bucket_images(
    conn: Connection,
    spec: SourceSpec,
    sample_size: int | None,
    buckets: int,
    wanted: Sequence[int],
) -> list[Any]:
    """The rows of `image_set` (no shard) whose bucket (`hbucket % buckets`, as
    `release.incremental.bucket_of`) is in `wanted`, in (bucket, image_id) order."""
    inner, params = _image_set_sql(spec, None, sample_size)
    sql = text(
        f"SELECT * FROM ({inner}) s WHERE (s.hbucket % :n) IN :wanted"
        " ORDER BY (s.hbucket % :n), s.image_id"
    ).bindparams(bindparam("wanted", expanding=True))
    return conn.execute(sql, {**params, "n": buckets, "wanted": list(wanted)}).all()


def count_images(conn: Connection, spec: SourceSpec, sample_size: int | None = None) -> int:
    sql = f"SELECT COUNT(*) FROM ({_IMAGE_SET}) x"
    n = conn.execute(text(sql), {"bucket": spec.store_url, "like": spec.like}).scalar_one()
    return min(n, sample_size) if sample_size else n


def image_locations(conn: Connection, image_ids: list[str]) -> dict[str, tuple[str, str]]:
    """image_id -> (store url, key) of one live source (the first by key)."""
    from lgt_ops.db.repo import select_in

    rows = select_in(
        conn,
        "SELECT image_id, bucket, key FROM sources WHERE status = 'ok' AND image_id IN :ids"
        " ORDER BY bucket, key",
        image_ids,
    )
    out: dict[str, tuple[str, str]] = {}
    for r in rows:
        out.setdefault(r.image_id, (r.bucket, r.key))
    return out
