"""Ingest: list a source prefix, validate and hash new or changed images, attach metadata.

Two steps, so the orchestrator can fan out:
- `scan` lists the prefix once, skips keys that are not images of ours (folder markers,
  hidden keys), rejects keys it must not read (invalid keys, symlink loops, links out of the
  store, FIFOs and devices) without opening them, reads the metadata files, records problems
  (malformed or oversized manifest lines, manifest rows naming missing keys, removed objects)
  and writes the keys that are new or changed (etag or metadata) into shard files in the store;
- `ingest_shard` validates each image of one shard file (full decode under a pixel budget
  shared by the concurrent decodes, EXIF orientation), records the image, its source row and
  its manifest annotations, and rejects bad files and bad boxes with a reason each.
  Unchanged keys cost nothing. No key can fail the prefix: each bad one costs itself only.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from lgt_ops import boxes, chaos, decontam, registry
from lgt_ops.config import IngestLimits
from lgt_ops.db.repo import chunked, dumps, insert_ignore, upsert, utcnow
from lgt_ops.fanout import fan_out
from lgt_ops.ids import content_id, hbucket, sha256_hex
from lgt_ops.images import (
    ImageFacts,
    PixelBudget,
    decode_cost,
    inspect,
    return_big_frees_to_os,
)
from lgt_ops.manifest import Metadata, is_metadata, merge, parse
from lgt_ops.progress import Progress
from lgt_ops.reasons import SKIPPED, Rejected
from lgt_ops.reasons import IngestReason as R
from lgt_ops.sources import resolve_source
from lgt_ops.stages.base import Shard, StageEnv, StageStats, recorded, rejection, select_in
from lgt_ops.storage import ObjectInfo, ObjectMissing, ObjectRefused, ObjectStore

log = logging.getLogger(__name__)

SPEC = registry.Ingest  # name, version, role, template, config: declared once, there
STAGE = SPEC.name
_COMMIT_EVERY = 50
_DOWNLOAD_THREADS = 8
_HEADER_BYTES = 256 * 1024  # JPEG size markers can follow up to 64 KB of EXIF and more
stage_fingerprint = SPEC.fingerprint


@dataclass
class ScanResult:
    listed: int = 0
    images_listed: int = 0
    metadata_files: int = 0
    pending: int = 0
    removed: int = 0
    problems: int = 0
    skipped: int = 0
    shard_keys: list[str] = field(default_factory=list)
    # key -> reason for keys left out as not ours (not in as_dict: it can be long)
    skipped_keys: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "skipped_keys"}


def _run_prefix(env: StageEnv) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in env.run.run_id)
    return f"runs/{safe}"


def _metadata_sha(meta: Metadata | None) -> str | None:
    return sha256_hex(dumps(meta.as_json())) if meta is not None else None


def scan(env: StageEnv, source: str | None = None, shard_size: int | None = None) -> ScanResult:
    """List the source prefix and write shard files of keys that need ingesting."""
    spec, store = resolve_source(env, source)
    fp = stage_fingerprint(env)
    with recorded(env, "scan", Shard(), fp) as stats:
        result = _scan(env, spec, store, fp, shard_size)
        stats.items_in, stats.items_out = result.listed, result.pending
        stats.items_rejected, stats.items_skipped = result.problems, result.skipped
    return result


def _scan(
    env: StageEnv, spec: Any, store: ObjectStore, fp: str, shard_size: int | None
) -> ScanResult:
    result = ScanResult()
    limits = env.settings.ingest
    everything = list(store.list(spec.prefix))
    result.listed = len(everything)
    listed, problems = _sort_out(everything, spec.prefix, result)
    meta_files = [o for o in listed if is_metadata(o.key)]
    candidates = {o.key: o for o in listed if not is_metadata(o.key)}
    result.metadata_files, result.images_listed = len(meta_files), len(candidates)
    refused = {p.item_ref for p in problems}

    parsed: list[Metadata] = []
    for info in meta_files:
        entries, found = _read_metadata(store, info, limits)
        parsed += entries
        problems += found
    merged, dup_problems = merge(parsed)
    problems += dup_problems
    for key, meta in merged.items():
        if key not in candidates and key not in refused and key not in result.skipped_keys:
            where = ", ".join(meta.origin.values())
            problems.append(Rejected.at(key, R.MISSING_OBJECT, f"named in {where}, no such object"))
    result.problems = len(problems)

    with env.db.begin() as conn:
        existing = {
            r.key: (r.etag, r.metadata_sha256, r.status)
            for r in conn.execute(
                text(
                    "SELECT key, etag, metadata_sha256, status FROM sources"
                    " WHERE bucket = :b AND key LIKE :like ESCAPE '\\'"
                ),
                {"b": spec.store_url, "like": spec.like},
            )
        }
        rows = [
            rejection(env, STAGE, fp, "source", p.item_ref, p.reason, p.detail) for p in problems
        ]
        insert_ignore(conn, "rejections", rows)
        gone = [k for k, v in existing.items() if k not in candidates and v[2] != "removed"]
        for keys in chunked(gone, 500):
            conn.execute(
                text(
                    "UPDATE sources SET status = 'removed', last_run_id = :r, updated_at = :t"
                    " WHERE bucket = :b AND key = :k"
                ),
                [{"r": env.run.run_id, "t": utcnow(), "b": spec.store_url, "k": k} for k in keys],
            )
        result.removed = len(gone)

    pending = []
    for key, info in sorted(candidates.items()):
        meta = merged.get(key)
        have = existing.get(key)
        if have is None or have[2] == "removed" or have[:2] != (info.etag, _metadata_sha(meta)):
            pending.append((info, meta))
    result.pending = len(pending)
    cap = env.settings.max_map_length
    size = fan_out(len(pending), shard_size or env.settings.shard_size, cap).shard_size
    for n, chunk in enumerate(chunked(pending, size)):
        key = f"{_run_prefix(env)}/ingest/shard-{n:05d}.jsonl"
        lines = [
            json.dumps(
                {
                    "source": spec.store_url,
                    "prefix": spec.prefix,
                    "key": info.key,
                    "etag": info.etag,
                    "size": info.size,
                    "metadata": meta.as_json() if meta else None,
                },
                sort_keys=True,
            )
            for info, meta in chunk
        ]
        env.store.put(key, ("\n".join(lines) + "\n").encode("utf-8"))
        result.shard_keys.append(key)
    return result


def _hidden(key: str, prefix: str) -> bool:
    rest = key[len(prefix) :]
    return any(part.startswith(".") for part in rest.split("/"))


def _sort_out(
    listed: list[ObjectInfo], prefix: str, result: ScanResult
) -> tuple[list[ObjectInfo], list[Rejected]]:
    """The keys worth reading; the rest are skipped (not ours) or rejected (not readable)."""
    keep: list[ObjectInfo] = []
    problems: list[Rejected] = []
    for info in listed:
        reason, detail = info.problem, info.detail
        if reason is None and _hidden(info.key, prefix):
            reason, detail = R.HIDDEN_KEY, "a path part starts with '.'"
        if reason is None:
            keep.append(info)
        elif reason in SKIPPED:
            result.skipped_keys[info.key] = reason
        else:
            problems.append(Rejected.at(printable(info.key), reason, detail))
    result.skipped = len(result.skipped_keys)
    if result.skipped:
        counts = Counter(result.skipped_keys.values())
        log.info("scan skipped %d keys that are not images: %s", result.skipped, dict(counts))
    return keep, problems


def printable(key: str) -> str:
    """The key as valid UTF-8 text: a local file name's undecodable bytes become `\\xNN`."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_metadata(
    store: ObjectStore, info: ObjectInfo, limits: IngestLimits
) -> tuple[list[Metadata], list[Rejected]]:
    if info.size > limits.max_file_bytes:
        detail = f"{info.size} bytes > limit {limits.max_file_bytes}; not read"
        return [], [Rejected.at(info.key, R.FILE_TOO_LARGE, detail)]
    try:
        data = store.get(info.key)
    except ObjectMissing:
        return [], [Rejected.at(info.key, R.MISSING_OBJECT, "listed, then gone before it was read")]
    except ObjectRefused as exc:
        return [], [Rejected.at(info.key, exc.reason, exc.detail)]
    return parse(info.key, data, limits)


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
        with budget.hold(decode_cost(head, entry["size"])):
            data = head if len(head) < _HEADER_BYTES else _read_capped(store, entry["key"], cap)
            if len(data) > cap:  # grew after the listing
                return Rejected(R.FILE_TOO_LARGE, f"more than {cap} bytes")
            return inspect(data, max_pixels=max_pixels)
    except ObjectMissing:
        return Rejected(R.MISSING_OBJECT, "listed, then gone before it was read")
    except ObjectRefused as exc:  # became a link or a FIFO after the scan
        return Rejected(exc.reason, exc.detail)
    except Rejected as exc:
        return exc


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
        for batch in chunked(todo, _COMMIT_EVERY):
            rows = _ingest_batch(env, fp, batch, stats)
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
    env: StageEnv, fp: str, batch: list[dict[str, Any]], stats: StageStats
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
    with ThreadPoolExecutor(_DOWNLOAD_THREADS) as pool:
        fetched = list(pool.map(lambda e: _fetch(store, e, max_pixels, limits, budget), batch))
    benchmarks = decontam.index_for(env)
    for entry, facts in zip(batch, fetched, strict=True):
        facts = decontam.screen_image(benchmarks, facts)  # contaminated:<benchmark>, unseen
        meta_sha = sha256_hex(dumps(entry["metadata"])) if entry["metadata"] is not None else None
        source_row: dict[str, Any] = {
            "bucket": entry["source"],
            "key": entry["key"],
            "etag": entry["etag"],
            "size": entry["size"],
            "metadata": dumps(entry["metadata"]) if entry["metadata"] is not None else None,
            "metadata_sha256": meta_sha,
            "first_run_id": env.run.run_id,
            "last_run_id": env.run.run_id,
            "updated_at": utcnow(),
        }
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
        rows["images"].append(
            {
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
        )
        caption_id, objects_id = None, None
        for ann in _annotations(env, fp, entry, facts, rows["rejections"], stats):
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


_BUDGETS: dict[int, PixelBudget] = {}


def _budget(pixels: int) -> PixelBudget:
    """One budget per process and size, shared by every shard this process ingests at once."""
    return _BUDGETS.setdefault(pixels, PixelBudget(pixels))


def _box_of(obj: dict[str, Any], objects_source: str | None) -> tuple[Any, str]:
    """The box and the field it came under: `box`, or `bbox` (the COCO habit) as an alias.
    COCO files spell it `bbox`, so errors about their boxes name that field."""
    if "box" in obj and "bbox" in obj and obj["box"] != obj["bbox"]:
        raise Rejected(R.BOX_MALFORMED, "'box' and 'bbox' disagree; give one")
    value = obj["box"] if "box" in obj else obj.get("bbox")
    alias = objects_source == "coco" or ("bbox" in obj and "box" not in obj)
    return value, "bbox" if alias else "box"


def _annotations(
    env: StageEnv,
    fp: str,
    entry: dict[str, Any],
    facts: ImageFacts,
    rejections: list[dict[str, Any]],
    stats: StageStats,
) -> Iterator[dict[str, Any]]:
    meta = entry["metadata"]
    if not meta:
        return
    ref = entry["key"]
    if meta.get("caption"):
        content = {"caption": meta["caption"]}
        yield annotation_row(env, facts.image_id, "caption", "manifest", ref, content, fp)
    if meta.get("objects") is None:
        return
    objects, seen = [], set()
    for n, obj in enumerate(meta["objects"], start=1):
        oid = str(obj.get("id") or f"o{n}") if isinstance(obj, dict) else f"o{n}"
        try:
            if not isinstance(obj, dict) or not str(obj.get("label") or "").strip():
                raise Rejected(R.OBJECT_LABEL_MISSING, f"object {obj!r}"[:200])
            if oid in seen:
                raise Rejected(R.DUPLICATE_OBJECT_ID, f"id {oid} used twice")
            raw, name = _box_of(obj, meta.get("objects_source"))
            fmt = meta.get("box_format", "xyxy")
            xyxy = boxes.to_xyxy(raw, fmt, facts.width, facts.height, field=name)
            box = boxes.validate(xyxy, facts.width, facts.height)
        except Rejected as exc:
            stats.rejected_by_reason[exc.reason] += 1
            rejections.append(
                rejection(
                    env,
                    STAGE,
                    fp,
                    "object",
                    f"{ref}#{oid}",
                    exc.reason,
                    exc.detail,
                    image_id=facts.image_id,
                )
            )
            continue
        seen.add(oid)
        objects.append({"id": oid, "label": str(obj["label"]).strip().lower(), "box": list(box)})
    if objects:
        content = {"objects": objects, "source_box_format": meta.get("box_format", "xyxy")}
        source = meta.get("objects_source") or "manifest"
        yield annotation_row(env, facts.image_id, "objects", source, ref, content, fp)


def annotation_row(
    env: StageEnv,
    image_id: str,
    kind: str,
    source: str,
    source_ref: str,
    content: dict[str, Any],
    fp: str,
    request_key: str | None = None,
) -> dict[str, Any]:
    return {
        "annotation_id": content_id("annotation", image_id, kind, source, content),
        "image_id": image_id,
        "kind": kind,
        "source": source,
        "source_ref": source_ref,
        "request_key": request_key,
        "content": dumps(content),
        "fingerprint": fp,
        "run_id": env.run.run_id,
    }


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
