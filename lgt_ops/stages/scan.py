"""Ingest's first step: list a source prefix once and write the keys that need ingesting.

`scan` skips keys that are not images of ours (folder markers, hidden keys), rejects keys it
must not read (invalid keys, symlink loops, links out of the store, FIFOs and devices)
without opening them, reads the metadata files, records problems (malformed or oversized
manifest lines, manifest rows naming missing keys, removed objects) and writes the keys that
are new or changed (etag or metadata) into shard files in the store, for `ingest_shard`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from lgt_ops import registry
from lgt_ops.config import IngestLimits
from lgt_ops.db.repo import insert_ignore, utcnow
from lgt_ops.fanout import fan_out
from lgt_ops.manifest import Metadata, is_metadata, merge, parse_pages
from lgt_ops.reasons import SKIPPED, Rejected
from lgt_ops.reasons import IngestReason as R
from lgt_ops.sources import resolve_source
from lgt_ops.stages.base import Shard, StageEnv, recorded, rejection
from lgt_ops.stages.scan_index import PAGE, ScanIndex
from lgt_ops.storage import ObjectInfo, ObjectMissing, ObjectRefused, ObjectStore

log = logging.getLogger(__name__)

SPEC = registry.Ingest  # scan records its stage_runs row under ingest's fingerprint
STAGE = SPEC.name
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
    with ScanIndex() as index:
        meta_files, problems = _list(store, spec.prefix, index, result)
        result.metadata_files, result.images_listed = len(meta_files), index.images()
        _metadata(env, store, meta_files, index, problems, result)
        result.problems = len(problems)
        _record(env, spec, fp, index, problems, result)
        result.pending = index.pending_count()
        _write_shards(env, spec, index, shard_size, result)
    return result


def _list(
    store: ObjectStore, prefix: str, index: ScanIndex, result: ScanResult
) -> tuple[list[ObjectInfo], list[Rejected]]:
    """One pass over the listing, a page at a time: images go to the index, metadata files
    are kept (they are few), the rest is skipped or rejected."""
    meta_files: list[ObjectInfo] = []
    problems: list[Rejected] = []
    page: list[tuple[str, str, int]] = []
    for info in store.list(prefix):
        result.listed += 1
        if not _sort_out(info, prefix, result, problems):
            continue
        if is_metadata(info.key):
            meta_files.append(info)
            continue
        page.append((info.key, info.etag, info.size))
        if len(page) >= PAGE:
            index.add_listed(page)
            page = []
    index.add_listed(page)
    result.skipped = len(result.skipped_keys)
    if result.skipped:
        counts = Counter(result.skipped_keys.values())
        log.info("scan skipped %d keys that are not images: %s", result.skipped, dict(counts))
    return meta_files, problems


def _metadata(
    env: StageEnv,
    store: ObjectStore,
    meta_files: list[ObjectInfo],
    index: ScanIndex,
    problems: list[Rejected],
    result: ScanResult,
) -> None:
    """Merge the metadata files into the index, one file at a time; their problems are
    added to `problems`. The first file to describe a key wins (files in key order)."""
    refused = {p.item_ref for p in problems}
    duplicates: list[Rejected] = []
    for info in meta_files:
        for entries, found in _read_metadata(store, info, env.settings.ingest):
            problems += found
            held = index.described(sorted({m.key for m in entries}))
            merged, dup_problems = merge([*held.values(), *entries])
            duplicates += dup_problems
            index.put_metadata(merged.values())
    problems += duplicates
    for meta in index.unlisted_metadata():
        if meta.key not in refused and meta.key not in result.skipped_keys:
            where = ", ".join(meta.origin.values())
            detail = f"named in {where}, no such object"
            problems.append(Rejected.at(meta.key, R.MISSING_OBJECT, detail))


def _record(
    env: StageEnv,
    spec: Any,
    fp: str,
    index: ScanIndex,
    problems: list[Rejected],
    result: ScanResult,
) -> None:
    """Record the problems and the removed keys; the known source rows go to the index."""
    with env.db.begin() as conn:
        known = conn.execute(
            text(
                "SELECT key, etag, metadata_sha256, status FROM sources"
                " WHERE bucket = :b AND key LIKE :like ESCAPE '\\'"
            ).execution_options(stream_results=True, yield_per=PAGE),
            {"b": spec.store_url, "like": spec.like},
        )
        for rows in known.partitions(PAGE):
            index.add_known(tuple(r) for r in rows)
        rows = [
            rejection(env, STAGE, fp, "source", p.item_ref, p.reason, p.detail) for p in problems
        ]
        insert_ignore(conn, "rejections", rows)
        page: list[str] = []
        for key in [*index.gone(), None]:
            if key is not None:
                page.append(key)
            if page and (key is None or len(page) >= 500):
                result.removed += len(page)
                _mark_removed(env, conn, spec, page)
                page = []


def _mark_removed(env: StageEnv, conn: Any, spec: Any, keys: list[str]) -> None:
    conn.execute(
        text(
            "UPDATE sources SET status = 'removed', last_run_id = :r, updated_at = :t"
            " WHERE bucket = :b AND key = :k"
        ),
        [{"r": env.run.run_id, "t": utcnow(), "b": spec.store_url, "k": k} for k in keys],
    )


def _write_shards(
    env: StageEnv, spec: Any, index: ScanIndex, shard_size: int | None, result: ScanResult
) -> None:
    """The pending keys, in key order, in shard files of at most max_map_length shards."""
    cap = env.settings.max_map_length
    size = fan_out(result.pending, shard_size or env.settings.shard_size, cap).shard_size
    lines: list[str] = []
    for key, etag, nbytes, meta in index.pending():
        line = {
            "source": spec.store_url,
            "prefix": spec.prefix,
            "key": key,
            "etag": etag,
            "size": nbytes,
            "metadata": meta,
        }
        lines.append(json.dumps(line, sort_keys=True))
        if len(lines) == size:
            _put_shard(env, lines, result)
            lines = []
    if lines:
        _put_shard(env, lines, result)


def _put_shard(env: StageEnv, lines: list[str], result: ScanResult) -> None:
    key = f"{_run_prefix(env)}/ingest/shard-{len(result.shard_keys):05d}.jsonl"
    env.store.put(key, ("\n".join(lines) + "\n").encode("utf-8"))
    result.shard_keys.append(key)


def _hidden(key: str, prefix: str) -> bool:
    rest = key[len(prefix) :]
    return any(part.startswith(".") for part in rest.split("/"))


def _sort_out(info: ObjectInfo, prefix: str, result: ScanResult, problems: list[Rejected]) -> bool:
    """Whether the key is worth reading; if not, it is skipped (not ours) or rejected."""
    reason, detail = info.problem, info.detail
    if reason is None and _hidden(info.key, prefix):
        reason, detail = R.HIDDEN_KEY, "a path part starts with '.'"
    if reason is None:
        return True
    if reason in SKIPPED:
        result.skipped_keys[info.key] = reason
    else:
        problems.append(Rejected.at(printable(info.key), reason, detail))
    return False


def printable(key: str) -> str:
    """The key as valid UTF-8 text: a local file name's undecodable bytes become `\\xNN`."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_metadata(
    store: ObjectStore, info: ObjectInfo, limits: IngestLimits
) -> Iterator[tuple[list[Metadata], list[Rejected]]]:
    """The file's entries and problems, a page at a time."""
    if info.size > limits.max_file_bytes:
        detail = f"{info.size} bytes > limit {limits.max_file_bytes}; not read"
        yield [], [Rejected.at(info.key, R.FILE_TOO_LARGE, detail)]
        return
    try:
        stream = store.open(info.key)  # read as it is parsed: never the whole file at once
    except ObjectMissing:
        yield [], [Rejected.at(info.key, R.MISSING_OBJECT, "listed, then gone before it was read")]
        return
    except ObjectRefused as exc:
        yield [], [Rejected.at(info.key, exc.reason, exc.detail)]
        return
    with closing(stream):
        yield from parse_pages(info.key, stream, limits)
