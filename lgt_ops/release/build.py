"""Rebuilding the buckets of a release that changed, streamed in chunks of images.

The images of every bucket to rebuild are read in (bucket, image_id) order, a run of buckets
(about `sources.PAGE` images) per query, and visited `CHUNK` at a time, so a chunk usually
spans several small buckets: one set of lineage queries per chunk (not per bucket), while a
bucket is encoded as soon as the stream has moved past it. A split of an open bucket encodes
a part as soon as it holds `rows_per_file` rows (the part a whole bucket's encoding gives), so
memory stays bounded by one run of image rows, one chunk and, per split of the buckets it
left open, fewer than `rows_per_file` rows, whatever the release's size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from sqlalchemy import Connection

from lgt_ops.db.repo import insert_ignore, select_in
from lgt_ops.env import StageEnv
from lgt_ops.release import incremental, splits
from lgt_ops.release.scope import CHUNK, chunks_of, rejections_by_image
from lgt_ops.sources import PAGE, SourceSpec, bucket_images

# Every member row names all id columns (a batch insert takes the first row's keys).
_NO_IDS = {"question_id": None, "image_id": None, "trace_id": None, "pair_id": None}

# (builder, rows, file stem) -> the part's manifest entry, staged or reused by the caller
AddPart = Callable[[splits.SplitBuilder, list[dict[str, Any]], str], dict[str, Any]]


@dataclass
class _Open:
    """A bucket being rebuilt: its own builders (their stats are the bucket's), its rows."""

    builders: list[splits.SplitBuilder]
    state: incremental.BucketState
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    served: set[str] = field(default_factory=set)


def todo_images(
    env: StageEnv, spec: SourceSpec, sample_size: int | None, todo: list[tuple[int, int, str]]
) -> Iterator[Any]:
    """The image rows of the buckets in `todo` ((bucket, images, digest)), in (bucket,
    image_id) order: one query per run of buckets holding about `PAGE` images (their counts
    from the digest pass), so one run is held at a time, not the release's image set."""
    n_buckets = env.settings.method.release_buckets
    batch: list[int] = []
    size = 0
    for k, (b, count, _) in enumerate(todo):
        batch.append(b)
        size += count
        if size >= PAGE or k == len(todo) - 1:
            with env.db.connect() as conn:
                rows = bucket_images(conn, spec, sample_size, n_buckets, batch)
            yield from rows
            batch, size = [], 0


def build_buckets(
    env: StageEnv,
    release_id: str,
    names: list[str],
    fps: dict[str, str],
    todo: list[tuple[int, int, str]],
    images: Iterable[Any],
    add_part: AddPart,
) -> Iterator[tuple[int, incremental.BucketState]]:
    """(bucket, state) of each bucket in `todo` ((bucket, images, digest)), rebuilt from
    `images` (`todo_images`: their rows in (bucket, image_id) order), in bucket order. A
    bucket is encoded once the stream has moved past it."""
    n_buckets = env.settings.method.release_buckets
    digests = {b: digest for b, _, digest in todo}
    open_: dict[int, _Open] = {}
    stream = iter(images)
    while batch := list(islice(stream, CHUNK)):
        (chunk,) = chunks_of(env, batch)
        chunk.load_images(env)
        members: list[dict[str, Any]] = []
        with env.db.connect() as conn:
            outputs = splits.ChunkOutputs.load(env, conn, chunk)
            questions: dict[int, list[Any]] = {}
            for q in outputs.questions:
                questions.setdefault(incremental.bucket_of(q.image_id, n_buckets), []).append(q)
            keys: dict[int, list[str]] = {}
            for b in dict.fromkeys(incremental.bucket_of(i, n_buckets) for i in chunk.image_ids):
                if b not in open_:
                    open_[b] = _open(env, names, digests[b])
                view = dataclasses.replace(outputs, questions=questions.get(b, []))
                keys[b] = _rows(env, release_id, b, open_[b], chunk, view, members)
                _flush(env, b, open_[b], add_part, final=False)
            _served(conn, open_, keys)
            _rejections(conn, open_, chunk.image_ids, fps, n_buckets)
        with env.db.begin() as conn:
            insert_ignore(conn, "member_rows", members)
        for i in chunk.image_ids:
            open_[incremental.bucket_of(i, n_buckets)].state.images += 1
        last = incremental.bucket_of(chunk.image_ids[-1], n_buckets)
        for b in sorted(b for b in open_ if b < last):  # the stream has moved past these
            yield b, _close(env, b, open_.pop(b), add_part)
    for b in sorted(open_):
        yield b, _close(env, b, open_.pop(b), add_part)


def _open(env: StageEnv, names: list[str], digest: str) -> _Open:
    fresh = [x for x in splits.builders(env) if x.name in names]
    state = incremental.BucketState(digest, parts={x.name: [] for x in fresh})
    return _Open(fresh, state, {x.name: [] for x in fresh})


def _rows(
    env: StageEnv,
    release_id: str,
    n: int,
    bucket: _Open,
    chunk: Any,
    outputs: splits.ChunkOutputs,
    members: list[dict[str, Any]],
) -> list[str]:
    """Add this chunk's rows of one bucket; the request keys behind them."""
    keys: list[str] = []
    for b in bucket.builders:
        for row, member in b.rows(env, chunk, outputs):
            bucket.rows[b.name].append(row)
            owner = {"owner_release_id": release_id, "bucket": n, "split": b.name}
            members.append({**_NO_IDS, **owner, **member})
        keys += b.take_request_keys()
    return keys


def _served(conn: Connection, open_: dict[int, _Open], keys: dict[int, list[str]]) -> None:
    """Served models of each bucket's rows, with one query for the chunk."""
    wanted = sorted({k for ks in keys.values() for k in ks})
    rows = select_in(
        conn,
        "SELECT request_key, served_model FROM model_requests WHERE request_key IN :ids",
        wanted,
    )
    model = {r.request_key: r.served_model for r in rows if r.served_model}
    for b, ks in keys.items():
        open_[b].served.update(model[k] for k in ks if k in model)


def _rejections(
    conn: Connection, open_: dict[int, _Open], image_ids: list[str], fps: dict[str, str], n: int
) -> None:
    for image_id, by_stage in rejections_by_image(conn, image_ids, fps).items():
        state = open_[incremental.bucket_of(image_id, n)].state
        for stage, reasons in by_stage.items():
            incremental.add_counts(state.rejections.setdefault(stage, {}), reasons)


def _flush(env: StageEnv, bucket: int, o: _Open, add_part: AddPart, final: bool) -> None:
    """Encode each split's full parts of `rows_per_file` rows, and when `final` the rest: the
    n-th part holds rows [n * rows_per_file, (n + 1) * rows_per_file) of the bucket's split,
    the part (bytes and name) encoding them all at once gives."""
    per_file = env.settings.method.rows_per_file
    for b in o.builders:
        rows, parts = o.rows[b.name], o.state.parts[b.name]
        while len(rows) >= per_file or (final and rows):
            parts.append(add_part(b, rows[:per_file], f"part-{bucket:05d}-{len(parts):02d}"))
            del rows[:per_file]  # encoded: no longer held


def _close(env: StageEnv, bucket: int, o: _Open, add_part: AddPart) -> incremental.BucketState:
    """Encode the bucket's last parts (a bucket past `rows_per_file` rows gets several)."""
    _flush(env, bucket, o, add_part, final=True)
    for b in o.builders:
        o.state.stats[b.name] = b.summary()
    o.state.served = sorted(o.served)
    return o.state
