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
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from lgt_ops import registry
from lgt_ops.config import IngestLimits
from lgt_ops.db.repo import chunked, dumps, insert_ignore, utcnow
from lgt_ops.fanout import fan_out
from lgt_ops.ids import sha256_hex
from lgt_ops.manifest import Metadata, is_metadata, merge, parse
from lgt_ops.reasons import SKIPPED, Rejected
from lgt_ops.reasons import IngestReason as R
from lgt_ops.sources import resolve_source
from lgt_ops.stages.base import Shard, StageEnv, recorded, rejection
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
    everything = list(store.list(spec.prefix))
    result.listed = len(everything)
    listed, problems = _sort_out(everything, spec.prefix, result)
    meta_files = [o for o in listed if is_metadata(o.key)]
    candidates = {o.key: o for o in listed if not is_metadata(o.key)}
    result.metadata_files, result.images_listed = len(meta_files), len(candidates)
    merged = _metadata(env, store, meta_files, candidates, problems, result)
    result.problems = len(problems)
    existing = _record(env, spec, fp, candidates, problems, result)
    pending = []
    for key, info in sorted(candidates.items()):
        meta = merged.get(key)
        have = existing.get(key)
        if have is None or have[2] == "removed" or have[:2] != (info.etag, _metadata_sha(meta)):
            pending.append((info, meta))
    result.pending = len(pending)
    _write_shards(env, spec, pending, shard_size, result)
    return result


def _metadata(
    env: StageEnv,
    store: ObjectStore,
    meta_files: list[ObjectInfo],
    candidates: dict[str, ObjectInfo],
    problems: list[Rejected],
    result: ScanResult,
) -> dict[str, Metadata]:
    """key -> its merged metadata; the metadata files' problems are added to `problems`."""
    refused = {p.item_ref for p in problems}
    parsed: list[Metadata] = []
    for info in meta_files:
        entries, found = _read_metadata(store, info, env.settings.ingest)
        parsed += entries
        problems += found
    merged, dup_problems = merge(parsed)
    problems += dup_problems
    for key, meta in merged.items():
        if key not in candidates and key not in refused and key not in result.skipped_keys:
            where = ", ".join(meta.origin.values())
            problems.append(Rejected.at(key, R.MISSING_OBJECT, f"named in {where}, no such object"))
    return merged


def _record(
    env: StageEnv,
    spec: Any,
    fp: str,
    candidates: dict[str, ObjectInfo],
    problems: list[Rejected],
    result: ScanResult,
) -> dict[str, tuple[Any, Any, Any]]:
    """Record the problems and the removed keys; key -> (etag, metadata sha, status) known."""
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
    return existing


def _write_shards(
    env: StageEnv,
    spec: Any,
    pending: list[tuple[ObjectInfo, Metadata | None]],
    shard_size: int | None,
    result: ScanResult,
) -> None:
    """The pending keys, in shard files of at most max_map_length shards."""
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
