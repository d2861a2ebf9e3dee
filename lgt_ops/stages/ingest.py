"""Ingest: list a source prefix, validate and hash new or changed images, attach metadata.

Two steps, so the orchestrator can fan out:
- `scan` (lgt_ops/stages/scan.py) lists the prefix once, records what it must not read and
  writes the keys that are new or changed (etag or metadata) into shard files in the store;
- `ingest_shard` validates each image of one shard file (full decode under a pixel budget
  shared by the concurrent decodes, EXIF orientation), records the image, its source row and
  its manifest annotations, and rejects bad files and bad boxes with a reason each.
  Unchanged keys cost nothing. No key can fail the prefix: each bad one costs itself only.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lgt_ops import chaos, decontam, registry
from lgt_ops.config import IngestLimits
from lgt_ops.db.repo import chunked, dumps, insert_ignore, select_in, upsert, utcnow
from lgt_ops.ids import hbucket, sha256_hex
from lgt_ops.images import (
    ImageFacts,
    PixelBudget,
    decode_cost,
    inspect,
    return_big_frees_to_os,
)
from lgt_ops.progress import Progress
from lgt_ops.reasons import IngestReason as R
from lgt_ops.reasons import Rejected
from lgt_ops.stages.base import Shard, StageEnv, StageStats, recorded, rejection
from lgt_ops.stages.manifest_rows import manifest_annotations
from lgt_ops.stages.scan import ScanResult, scan  # noqa: F401 - scan is ingest's first step
from lgt_ops.storage import ObjectMissing, ObjectRefused, ObjectStore

log = logging.getLogger(__name__)

SPEC = registry.Ingest  # name, version, role, template, config: declared once, there
STAGE = SPEC.name
_COMMIT_EVERY = 50
_DOWNLOAD_THREADS = 8
_HEADER_BYTES = 256 * 1024  # JPEG size markers can follow up to 64 KB of EXIF and more
stage_fingerprint = SPEC.fingerprint


def _read_shard(env: StageEnv, shard_key: str) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in env.store.get(shard_key).decode("utf-8").splitlines() if line
    ]


def _fetch(
    store: ObjectStore,
    entry: dict[str, Any],
    max_pixels: int,
    limits: IngestLimits,
    budget: PixelBudget,
    crops: bool = True,
) -> ImageFacts | Rejected:
    """The facts of one image, or why not.

    Only the file's first bytes (enough for the size in its header) are read before the
    budget is taken, so threads waiting for their turn hold no download and no open stream;
    the bytes are dropped on return, so a batch never keeps them.
    """
    cap = limits.max_file_bytes
    if entry["size"] > cap:
        return Rejected(R.FILE_TOO_LARGE, f"{entry['size']} bytes > {cap}; not downloaded")
    try:
        head = store.read_prefix(entry["key"], _HEADER_BYTES)
        if len(head) < _HEADER_BYTES:  # the whole file: inspect reads its header once
            return _too_large(head, cap) or inspect(
                head, max_pixels=max_pixels, budget=budget, crops=crops
            )
        with budget.hold(decode_cost(head, entry["size"])):
            data = _read_capped(store, entry["key"], cap)
            return _too_large(data, cap) or inspect(data, max_pixels=max_pixels, crops=crops)
    except ObjectMissing:
        return Rejected(R.MISSING_OBJECT, "listed, then gone before it was read")
    except ObjectRefused as exc:  # became a link or a FIFO after the scan
        return Rejected(exc.reason, exc.detail)
    except Rejected as exc:
        return exc


def _too_large(data: bytes, cap: int) -> Rejected | None:
    """The file grew past the cap after the listing."""
    return Rejected(R.FILE_TOO_LARGE, f"more than {cap} bytes") if len(data) > cap else None


def _read_capped(store: ObjectStore, key: str, cap: int) -> bytes:
    with store.open(key) as fh:
        return fh.read(cap + 1)


def ingest_shard(
    env: StageEnv, shard_key: str, shard_index: int = 0, shard_count: int = 1
) -> StageStats:
    """Validate and record the images listed in one shard file."""
    fp = stage_fingerprint(env)
    return_big_frees_to_os()  # else freed decode buffers stay in each thread's heap
    entries = _read_shard(env, shard_key)
    with recorded(env, STAGE, Shard(shard_index, shard_count), fp) as stats:
        stats.items_in = len(entries)
        todo = _still_pending(env, entries)
        stats.items_skipped = len(entries) - len(todo)
        progress = Progress(
            f"ingest {shard_key.rsplit('/', 1)[-1]}", len(todo), enabled=env.show_progress
        )
        # One download pool per shard (a pool per batch started 8 threads every 50 images).
        with ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
            for batch in chunked(todo, _COMMIT_EVERY):
                rows = _ingest_batch(env, fp, batch, stats, pool)
                with env.db.begin() as conn:
                    commit_tables(conn, rows)
                chaos.point(STAGE)  # test-only crash point (no-op otherwise)
                progress.update(len(batch), rejected=stats.items_rejected)
        progress.close()
    return stats


def commit_tables(conn: Any, rows: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("images", "annotations", "rejections"):
        insert_ignore(conn, name, rows[name])
    if rows["sources"]:
        keep = ("bucket", "key", "first_run_id")  # first_run_id is set once, on insert
        update = [c for c in rows["sources"][0] if c not in keep]
        upsert(conn, "sources", rows["sources"], ["bucket", "key"], update)


def _still_pending(env: StageEnv, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries whose source row does not yet match (a retried shard skips finished keys)."""
    if not entries:
        return []
    with env.db.connect() as conn:
        rows = select_in(
            conn,
            "SELECT key, etag, metadata_sha256, status FROM sources"
            " WHERE bucket = :b AND key IN :ids",
            [e["key"] for e in entries],
            b=entries[0]["source"],
        )
    have = {r.key: (r.etag, r.metadata_sha256, r.status) for r in rows}
    out = []
    for e in entries:
        meta_sha = sha256_hex(dumps(e["metadata"])) if e["metadata"] is not None else None
        h = have.get(e["key"])
        if h is None or h[2] == "removed" or h[:2] != (e["etag"], meta_sha):
            out.append(e)
    return out


def _ingest_batch(
    env: StageEnv,
    fp: str,
    batch: list[dict[str, Any]],
    stats: StageStats,
    pool: ThreadPoolExecutor,
) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {
        "images": [],
        "sources": [],
        "annotations": [],
        "rejections": [],
    }
    max_pixels = env.settings.method.max_image_pixels
    limits = env.settings.ingest
    store = env.store_for(batch[0]["source"])
    budget = _budget(limits.decode_pixel_budget)
    benchmarks = decontam.index_for(env)
    crops = bool(benchmarks.images)  # the 80 crop hashes only matter against benchmark images
    fetched = list(pool.map(lambda e: _fetch(store, e, max_pixels, limits, budget, crops), batch))
    for entry, facts in zip(batch, fetched, strict=True):
        facts = decontam.screen_image(benchmarks, facts)  # contaminated:<benchmark>, unseen
        source_row = _source_row(env, entry)
        if isinstance(facts, Rejected):
            stats.items_rejected += 1
            stats.rejected_by_reason[facts.reason] += 1
            rows["rejections"].append(
                rejection(env, STAGE, fp, "source", entry["key"], facts.reason, facts.detail)
            )
            rows["sources"].append(
                {
                    **source_row,
                    "image_id": None,
                    "status": "rejected",
                    "reason": facts.reason,
                    "caption_annotation_id": None,
                    "objects_annotation_id": None,
                }
            )
            continue
        rows["images"].append(_image_row(env, facts))
        caption_id, objects_id = None, None
        for ann in manifest_annotations(env, fp, entry, facts, rows["rejections"], stats):
            rows["annotations"].append(ann)
            if ann["kind"] == "caption":
                caption_id = ann["annotation_id"]
            else:
                objects_id = ann["annotation_id"]
        rows["sources"].append(
            {
                **source_row,
                "image_id": facts.image_id,
                "status": "ok",
                "reason": None,
                "caption_annotation_id": caption_id,
                "objects_annotation_id": objects_id,
            }
        )
        stats.items_out += 1
    return rows


def _source_row(env: StageEnv, entry: dict[str, Any]) -> dict[str, Any]:
    """The sources row of a shard file's entry (its outcome columns are added by the caller)."""
    meta = entry["metadata"]
    return {
        "bucket": entry["source"],
        "key": entry["key"],
        "etag": entry["etag"],
        "size": entry["size"],
        "metadata": dumps(meta) if meta is not None else None,
        "metadata_sha256": sha256_hex(dumps(meta)) if meta is not None else None,
        "first_run_id": env.run.run_id,
        "last_run_id": env.run.run_id,
        "updated_at": utcnow(),
    }


def _image_row(env: StageEnv, facts: ImageFacts) -> dict[str, Any]:
    return {
        "image_id": facts.image_id,
        "hbucket": hbucket(facts.image_id),
        "width": facts.width,
        "height": facts.height,
        "format": facts.format,
        "mode": facts.mode,
        "bytes": facts.bytes,
        "exif_orientation": facts.exif_orientation,
        "phash": facts.phash,
        "created_run_id": env.run.run_id,
    }


_BUDGETS: dict[int, PixelBudget] = {}


def _budget(pixels: int) -> PixelBudget:
    """One budget per process and size, shared by every shard this process ingests at once."""
    return _BUDGETS.setdefault(pixels, PixelBudget(pixels))


def ingest_all(env: StageEnv, source: str | None = None) -> tuple[ScanResult, StageStats]:
    """Scan and ingest every shard in this process (the CLI path)."""
    result = scan(env, source)
    total = StageStats()
    for n, key in enumerate(result.shard_keys):
        s = ingest_shard(env, key, n, max(1, len(result.shard_keys)))
        for f in ("items_in", "items_skipped", "items_out", "items_rejected"):
            setattr(total, f, getattr(total, f) + getattr(s, f))
        total.rejected_by_reason.update(s.rejected_by_reason)
    return result, total
