"""Operating published releases: list them, verify their bytes, compare two of them.

`verify` trusts nothing but the manifest's hashes: it re-reads every file the manifest lists
(splits and report plots) and the dataset card, checks the manifest itself against the
hash recorded in the lineage DB when publishing, and lists the release's prefix for files the
manifest does not name (a dropped-in `part-99999.parquet` would be read by the loading globs).
`diff` compares the row ids two releases hold, split by split, and the question mix (stage,
skill, difficulty) of their questions.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
from sqlalchemy import text

from lgt_ops.env import StageEnv
from lgt_ops.ids import sha256_hex
from lgt_ops.release.errors import ReleaseNotFound
from lgt_ops.release.publish import prefix_of


def list_releases(env: StageEnv, name: str | None = None) -> list[dict[str, Any]]:
    """Published releases, newest first, with row counts and whether each is `latest`."""
    sql = (
        "SELECT r.release_id, r.name, r.version, r.status, r.uri, r.content_sha256,"
        " r.parent_release_id, r.simulated, r.counts, r.created_at,"
        " CASE WHEN p.release_id IS NULL THEN 0 ELSE 1 END AS latest"
        " FROM releases r LEFT JOIN release_pointers p ON p.release_id = r.release_id"
        " WHERE r.status = 'published'"
        + (" AND r.name = :name" if name else "")
        + " ORDER BY r.created_at DESC, r.release_id DESC"
    )
    with env.db.connect() as conn:
        rows = conn.execute(text(sql), {"name": name} if name else {}).all()
    return [
        {
            **r._asdict(),
            "counts": json.loads(r.counts),
            "latest": bool(r.latest),
            "simulated": bool(r.simulated),
            "created_at": str(r.created_at),
        }
        for r in rows
    ]


def load_manifest(env: StageEnv, release_id: str) -> dict[str, Any]:
    key = f"{prefix_of(release_id)}/manifest.json"
    if env.store.head(key) is None:
        raise ReleaseNotFound(f"release {release_id}: no manifest at {env.store.uri(key)}")
    return json.loads(env.store.get(key))


@dataclass
class Verification:
    release_id: str
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(env: StageEnv, release_id: str) -> Verification:
    """Re-hash every file of a release against its manifest (and the manifest against the DB)."""
    prefix = prefix_of(release_id)
    out = Verification(release_id)
    if env.store.head(f"{prefix}/manifest.json") is None and not _is_recorded(env, release_id):
        raise ReleaseNotFound(
            f"release {release_id} not found: no manifest at"
            f" {env.store.uri(prefix + '/manifest.json')} and no record in the lineage DB"
            " (`lgt release list` shows the published ones)"
        )
    body = _get(env, f"{prefix}/manifest.json", out)
    if body is None:
        return out
    manifest = json.loads(body)
    with env.db.connect() as conn:
        recorded = conn.execute(
            text("SELECT manifest_sha256 FROM releases WHERE release_id = :r"), {"r": release_id}
        ).scalar()
    if recorded is None:
        out.problems.append("manifest.json: release not recorded in the lineage DB")
    elif hashlib.sha256(body).hexdigest() != recorded:
        out.problems.append("manifest.json: sha256 differs from the one recorded at publish")
    files = [f for s in manifest["splits"].values() for f in s["files"]]
    files += manifest.get("report", [])
    if manifest.get("incremental"):  # the bucket index an incremental publish reads back
        files.append(manifest["incremental"]["index"])
    for f in files:
        _check(env, prefix, f["path"], f["sha256"], f.get("bytes"), out)
    if manifest.get("card_sha256"):
        _check(env, prefix, "README.md", manifest["card_sha256"], None, out)
    content = sha256_hex(
        "\n".join(
            f"{f['path']} {f['sha256']}"
            for s in sorted(manifest["splits"])
            for f in manifest["splits"][s]["files"]
        )
    )
    if content != manifest["content_sha256"]:
        out.problems.append("manifest.json: content_sha256 does not match its file list")
    listed = {f["path"] for f in files} | {"manifest.json"}
    if manifest.get("card_sha256"):  # a README.md beside a manifest without a card is extra
        listed.add("README.md")
    for path in unlisted_files(env, prefix, listed):
        out.problems.append(f"{path}: not listed in the manifest")
    return out


def unlisted_files(env: StageEnv, prefix: str, listed: set[str]) -> list[str]:
    """Every object under the release prefix that is not one of `listed` (paths in it)."""
    base = prefix.rstrip("/") + "/"
    return [
        info.key[len(base) :]
        for info in env.store.list(base)
        if info.key[len(base) :] not in listed
    ]


def _get(env: StageEnv, key: str, out: Verification) -> bytes | None:
    if env.store.head(key) is None:
        out.problems.append(f"{key}: missing")
        return None
    return env.store.get(key)


def _check(
    env: StageEnv, prefix: str, path: str, sha: str, size: int | None, out: Verification
) -> None:
    data = _get(env, f"{prefix}/{path}", out)
    out.files_checked += 1
    if data is None:
        return
    if size is not None and len(data) != size:
        out.problems.append(f"{path}: {len(data)} bytes, manifest says {size}")
    elif hashlib.sha256(data).hexdigest() != sha:
        out.problems.append(f"{path}: sha256 differs from the manifest")


@dataclass
class Diff:
    a: str
    b: str
    added: dict[str, list[str]]  # split -> row ids only in b
    removed: dict[str, list[str]]  # split -> row ids only in a
    rows: dict[str, tuple[int, int]]  # split -> (rows in a, rows in b)
    mix: dict[str, dict[str, tuple[int, int]]]  # stage/skill/difficulty -> value -> (a, b)

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "rows": {s: {"a": a, "b": b} for s, (a, b) in self.rows.items()},
            "added": {s: len(v) for s, v in self.added.items()},
            "removed": {s: len(v) for s, v in self.removed.items()},
            "added_ids": self.added,
            "removed_ids": self.removed,
            "questions": {
                k: {v: {"a": a, "b": b} for v, (a, b) in vals.items()}
                for k, vals in self.mix.items()
            },
        }


def _members(env: StageEnv, release_id: str) -> dict[str, set[str]]:
    with env.db.connect() as conn:
        rows = conn.execute(
            text("SELECT split, row_id FROM release_members WHERE release_id = :r"),
            {"r": release_id},
        ).all()
    out: dict[str, set[str]] = {}
    for split, row_id in rows:
        out.setdefault(split, set()).add(row_id)
    return out


def _question_mix(env: StageEnv, release_id: str) -> dict[str, Counter[str]]:
    """stage / skill / difficulty counts over the release's questions split, from its files."""
    manifest = load_manifest(env, release_id)
    prefix = prefix_of(release_id)
    mix: dict[str, Counter[str]] = {"stage": Counter(), "skill": Counter(), "difficulty": Counter()}
    for f in manifest["splits"].get("questions", {}).get("files", []):
        table = pq.read_table(
            io.BytesIO(env.store.get(f"{prefix}/{f['path']}")),
            columns=["stage", "skill", "difficulty"],
        )
        for row in table.to_pylist():
            mix["stage"][str(row["stage"])] += 1
            mix["skill"][row["skill"]] += 1
            mix["difficulty"][str(row["difficulty"])] += 1
    return mix


def diff(env: StageEnv, a: str, b: str) -> Diff:
    """What changed from release `a` to release `b`."""
    ma, mb = _members(env, a), _members(env, b)
    for rid in (a, b):
        if not _is_published(env, rid):
            raise ReleaseNotFound(
                f"release {rid} is not published (`lgt release list` shows the published ones)"
            )
    splits = sorted(set(ma) | set(mb))
    qa, qb = _question_mix(env, a), _question_mix(env, b)
    mix = {k: {v: (qa[k][v], qb[k][v]) for v in sorted(set(qa[k]) | set(qb[k]))} for k in qa}
    return Diff(
        a,
        b,
        added={s: sorted(mb.get(s, set()) - ma.get(s, set())) for s in splits},
        removed={s: sorted(ma.get(s, set()) - mb.get(s, set())) for s in splits},
        rows={s: (len(ma.get(s, ())), len(mb.get(s, ()))) for s in splits},
        mix=mix,
    )


def _is_recorded(env: StageEnv, release_id: str) -> bool:
    with env.db.connect() as conn:
        row = conn.execute(
            text("SELECT 1 FROM releases WHERE release_id = :r"), {"r": release_id}
        ).first()
    return row is not None


def _is_published(env: StageEnv, release_id: str) -> bool:
    with env.db.connect() as conn:
        return (
            conn.execute(
                text("SELECT 1 FROM releases WHERE release_id = :r AND status = 'published'"),
                {"r": release_id},
            ).first()
            is not None
        )
