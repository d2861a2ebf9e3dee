"""Publish an immutable, versioned release.

Order of events, each step safe to crash in:
1. a `releases` row in state `staging` (a unique (name, version) claims the version);
2. splits written bucket by bucket (`lgt_ops.release.incremental`): a bucket whose digest
   equals the previous version's is reused (its parts copied from that version at step 3,
   its member rows linked, not copied), any other is streamed into Parquet parts under
   `releases/<name>/.staging/<version>/`, members recorded as they are written;
3. every staged part verified (size and sha256 re-read), then copied to the final prefix;
4. `manifest.json` written with a conditional create: the commit point in the store;
5. the row set to `published` and the `latest` pointer moved (an object overwrite and a
   row, both single atomic writes); staging removed.
All of it runs under the release name's publisher lock (`lgt_ops.release.recovery`): one live
publisher per name, and a dead one's lock is freed by its death. Before claiming, the lock
holder settles dead attempts: a committed one is finished, an uncommitted one removed (files,
members, row) and its auto-assigned version reused. A publish whose request (source, sample,
fingerprints, method, models, splits) equals that of an attempt it just finished, or of a
release its own pipeline run already published, returns that release instead of a new
version: a re-run after a crash converges to one release. A published version can never be
written again.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from lgt_ops.db.repo import insert_ignore
from lgt_ops.env import StageEnv
from lgt_ops.ids import sha256_hex
from lgt_ops.llm.simulated import MODEL_PREFIX
from lgt_ops.progress import Progress
from lgt_ops.release import card, goodput, incremental, report, splits, validate
from lgt_ops.release.build import build_buckets, todo_images
from lgt_ops.release.errors import ReleaseError, ReleaseExists, SimulatedOutputRefused
from lgt_ops.release.parquet import encode_part, system_pool, with_hf_features
from lgt_ops.release.pointers import mark_published, release_prefix
from lgt_ops.release.recovery import publisher_lock, recover
from lgt_ops.release.scope import source_rejection_counts
from lgt_ops.sources import SourceSpec, image_set_query
from lgt_ops.storage import ObjectExists

SCHEMA_VERSION = 1
_COPY_THREADS = 8  # server-side copies of reused parts are round trips, not work
KILL_POINTS = (
    "claimed",  # the version's row is `staging`, nothing written
    "part_staged",  # the first Parquet part is staged or reused (others not yet)
    "staged",  # every part staged, every member row recorded
    "promoted",  # the first part copied to its final place
    "before_commit",  # parts, plots and card in place; manifest.json not written
    "committed",  # manifest.json written (the commit point); the row still `staging`
    "published",  # the row `published` and `latest` moved; staging not yet removed
)


def kill_point(point: str) -> None:
    """Test hook: LGT_TEST_KILL_AT=<point> SIGKILLs this process at `point` (crash tests)."""
    if os.environ.get("LGT_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Published:
    release_id: str
    name: str
    version: str
    uri: str
    content_sha256: str
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        return {k: v["rows"] for k, v in self.manifest["splits"].items()}


def prefix_of(release_id: str) -> str:
    """The store prefix of release `NAME/VERSION`."""
    name, sep, version = release_id.partition("/")
    if not sep or not name or not version:
        raise ReleaseError(f"release id {release_id!r}: expected NAME/VERSION")
    return release_prefix(name, version)


def next_version(env: StageEnv, name: str) -> str:
    """`YYYYMMDD.N`: a new N for each release of the day."""
    day = datetime.now(UTC).strftime("%Y%m%d")
    with env.db.connect() as conn:
        taken = {
            r[0]
            for r in conn.execute(
                text("SELECT version FROM releases WHERE name = :n AND version LIKE :p"),
                {"n": name, "p": f"{day}.%"},
            )
        }
    n = 1
    while f"{day}.{n}" in taken:
        n += 1
    return f"{day}.{n}"


def _claim(env: StageEnv, release_id: str, name: str, version: str, uri: str) -> None:
    with env.db.begin() as conn:
        row = conn.execute(
            text("SELECT status FROM releases WHERE release_id = :r"), {"r": release_id}
        ).first()
        if row is not None and row.status == "published":
            raise ReleaseExists(
                f"release {release_id} is already published; versions are immutable"
            )
        if row is not None:  # settled by recover() under the lock; never expected here
            raise ReleaseError(f"release {release_id} is still staging after recovery")
        if env.store.head(f"{release_prefix(name, version)}/manifest.json") is not None:
            raise ReleaseExists(f"{uri}/manifest.json already exists in the store")
        insert_ignore(
            conn,
            "releases",
            [
                {
                    "release_id": release_id,
                    "name": name,
                    "version": version,
                    "status": "staging",
                    "uri": uri,
                    "manifest_sha256": "",
                    "content_sha256": "",
                    "run_id": env.run.run_id,
                }
            ],
        )


def _parent(env: StageEnv, name: str) -> str | None:
    with env.db.connect() as conn:
        row = conn.execute(
            text("SELECT release_id FROM release_pointers WHERE name = :n"), {"n": name}
        ).first()
    return row[0] if row else None


def publish(
    env: StageEnv,
    spec: SourceSpec,
    *,
    name: str,
    version: str | None = None,
    sample_size: int | None = None,
    allow_simulated: bool = False,
    only: Sequence[str] | None = None,
    lock_wait_s: float | None = None,
) -> Published:
    if version is not None and not _valid_version(version):
        raise ReleaseError(f"version {version!r}: use letters, digits, '.', '-' and '_'")
    builders = [b for b in splits.builders(env) if only is None or b.name in only]
    fps = splits.fingerprints(env)
    request = publish_request(env, spec, sample_size, fps, [b.name for b in builders])
    with publisher_lock(env, name, lock_wait_s), system_pool():
        recovered = recover(env, name)
        done = _same_request_release(env, name, version, request, recovered.finished)
        if done is not None and (allow_simulated or not done.manifest["simulated"]):
            return done
        if version is None:
            version = min(recovered.reusable) if recovered.reusable else next_version(env, name)
        return _publish_locked(
            env, spec, name, version, sample_size, allow_simulated, builders, fps, request
        )


def _valid_version(version: str) -> bool:
    return version.replace(".", "").replace("-", "").replace("_", "").isalnum()


def publish_request(
    env: StageEnv,
    spec: SourceSpec,
    sample_size: int | None,
    fps: dict[str, str],
    split_names: Sequence[str],
) -> dict[str, Any]:
    """What a release's content is a function of, besides the lineage rows it reads."""
    return {
        "source": {"store": spec.store_url, "prefix": spec.prefix, "sample_size": sample_size},
        "fingerprints": fps,
        "method": env.settings.method.model_dump(mode="json"),
        "image_spec": env.settings.image_spec.model_dump(mode="json"),
        "requested": {role: ep.model for role, ep in sorted(env.settings.endpoints.items())},
        "splits": sorted(split_names),
    }


def _request_of(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": manifest["source"],
        "fingerprints": manifest["fingerprints"],
        "method": manifest["method"],
        "image_spec": manifest["image_spec"],
        "requested": manifest["models"]["requested"],
        "splits": sorted(manifest["splits"]),
    }


def _same_request_release(
    env: StageEnv,
    name: str,
    version: str | None,
    request: dict[str, Any],
    finished: list[str],
) -> Published | None:
    """The release this publish already is: one a dead attempt committed (just finished), or
    one this pipeline run published before (a retried task), with the same request."""
    with env.db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT release_id, version, uri, run_id FROM releases"
                " WHERE name = :n AND status = 'published' ORDER BY version DESC"
            ),
            {"n": name},
        ).all()
    for row in rows:
        if version is not None and row.version != version:
            continue
        retried = version is None and row.run_id == env.run.run_id
        if row.release_id not in finished and not retried:
            continue
        key = f"{release_prefix(name, row.version)}/manifest.json"
        if env.store.head(key) is None:
            continue
        manifest = json.loads(env.store.get(key))
        if _request_of(manifest) == request:
            return Published(
                row.release_id, name, row.version, row.uri, manifest["content_sha256"], manifest
            )
    return None


def _publish_locked(
    env: StageEnv,
    spec: SourceSpec,
    name: str,
    version: str,
    sample_size: int | None,
    allow_simulated: bool,
    builders: list[Any],
    fps: dict[str, str],
    request: dict[str, Any],
) -> Published:
    release_id = f"{name}/{version}"
    prefix = release_prefix(name, version)
    uri = env.store.uri(prefix)
    _claim(env, release_id, name, version, uri)
    kill_point("claimed")
    n_buckets = env.settings.method.release_buckets
    sums, digests = _digests(env, spec, sample_size, n_buckets, fps)
    parent_id = _parent(env, name)
    parent = _load_parent(env, parent_id)
    prior = _prior_states(env, parent_id, parent, request, n_buckets)
    layout = _Layout(env, f"releases/{name}/.staging/{version}", parent)
    states, todo = _reuse_unchanged(sums, digests, prior, layout)
    reused = sorted(states)
    total = sum(n for n, _ in sums.values())
    progress = Progress(f"release {release_id}", total, enabled=env.show_progress)
    progress.update(total - sum(n for _, n, _ in todo))
    names = [b.name for b in builders]
    images = todo_images(env, spec, sample_size, todo)  # read again, a run of buckets at a time
    for b, state in build_buckets(env, release_id, names, fps, todo, images, layout.add):
        states[b] = state
        progress.update(state.images)
    progress.close()
    with env.db.begin() as conn:  # reused buckets link the parent's member rows, not copy them
        rebuilt = sorted(set(states) - set(reused))
        incremental.link_members(conn, release_id, parent_id, rebuilt, reused)
    parts = layout.split_files([b.name for b in builders], builders, states)
    kill_point("staged")
    counts, served = _counts(env, spec, fps, builders, states)
    rows = sum(p["rows"] for ps in parts.values() for p in ps)
    unchanged = bool(prior) and not todo and len(reused) == len(prior)
    counts["goodput"] = incremental.unchanged_goodput(parent, counts, unchanged)
    if counts["goodput"] is None:
        counts["goodput"] = goodput.measure(env, spec, sample_size, fps, counts, rows)
    simulated = _refuse_simulated(env, release_id, layout, served, allow_simulated)
    manifest = _manifest(
        env, name, version, spec, sample_size, parts, fps, counts, served, simulated
    )
    layout.promote(prefix)
    manifest["incremental"] = _write_index(env, prefix, n_buckets, states, len(reused), layout)
    manifest["quality"] = _quality(env, release_id, prefix, manifest, parent, unchanged)
    manifest["report"] = _write_report(env, prefix, manifest)
    manifest["card_sha256"] = _write_card(env, prefix, manifest)
    body = _commit_manifest(env, prefix, uri, manifest)
    mark_published(env, release_id, name, manifest, hashlib.sha256(body).hexdigest(), simulated)
    kill_point("published")
    layout.clear_staging()
    return Published(release_id, name, version, uri, manifest["content_sha256"], manifest)


def _digests(
    env: StageEnv, spec: SourceSpec, sample_size: int | None, n_buckets: int, fps: dict[str, str]
) -> tuple[dict[int, tuple[int, int]], dict[int, str]]:
    """Per bucket: the release's images (`incremental.image_sums_of` the image set) and the
    digest of every lineage row its rows are built from. Read before any row: a row written
    meanwhile can only force a rebuild."""
    with env.db.connect() as conn:
        sql, params = image_set_query(spec, sample_size)
        sums = incremental.image_sums_of(conn, sql, params, n_buckets)
        return sums, incremental.bucket_digests(conn, sums, n_buckets, fps)


def _quality(
    env: StageEnv,
    release_id: str,
    prefix: str,
    manifest: dict[str, Any],
    parent: dict[str, Any] | None,
    unchanged: bool,
) -> dict[str, Any]:
    """The validator's figures, measured on the promoted parts before the commit point (a
    crash here is cleaned up); an unchanged refresh has the parent's rows and lineage (every
    bucket digest equal), hence its figures, which are not read again."""
    if unchanged and parent is not None and parent.get("quality"):
        return parent["quality"]
    return validate.measure(env, release_id, prefix, manifest).as_dict()


def _refuse_simulated(
    env: StageEnv, release_id: str, layout: _Layout, served: set[str], allow_simulated: bool
) -> bool:
    """Whether the simulator served any selected output; refused unless allowed."""
    simulated = any(s.startswith(MODEL_PREFIX) for s in served)
    if simulated and not allow_simulated:
        _abandon(env, release_id, layout)
        raise SimulatedOutputRefused(
            f"release {release_id}: the selected outputs were produced by the simulator (a"
            " test double); refusing to publish them. Point the endpoints at real models, or"
            " set allow_simulated (--allow-simulated) for a demo/test release."
        )
    return simulated


def _write_index(
    env: StageEnv,
    prefix: str,
    n_buckets: int,
    states: dict[int, incremental.BucketState],
    buckets_reused: int,
    layout: _Layout,
) -> dict[str, Any]:
    """Write the bucket index next to the parts; the manifest's `incremental` section."""
    index = incremental.render_index(n_buckets, states)
    env.store.put(f"{prefix}/{incremental.INDEX}", index)
    return {
        "buckets": n_buckets,
        "index": {
            "path": incremental.INDEX,
            "sha256": hashlib.sha256(index).hexdigest(),
            "bytes": len(index),
        },
        "buckets_reused": buckets_reused,
        "parts_written": layout.written,
        "parts_reused": layout.reused,
    }


def _write_card(env: StageEnv, prefix: str, manifest: dict[str, Any]) -> str:
    """Write the dataset card (README.md); its sha256 for the manifest."""
    card_md = card.render(manifest).encode("utf-8")
    env.store.put(f"{prefix}/README.md", card_md)
    return hashlib.sha256(card_md).hexdigest()


def _commit_manifest(env: StageEnv, prefix: str, uri: str, manifest: dict[str, Any]) -> bytes:
    """Write manifest.json if absent: the commit point of a release (its bytes returned)."""
    body = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    kill_point("before_commit")
    try:
        env.store.put(f"{prefix}/manifest.json", body, if_absent=True)
    except ObjectExists as exc:
        raise ReleaseExists(f"{uri}/manifest.json appeared while publishing") from exc
    kill_point("committed")
    return body


def _reuse_unchanged(
    sums: dict[int, tuple[int, int]],
    digests: dict[int, str],
    prior: dict[int, incremental.BucketState],
    layout: _Layout,
) -> tuple[dict[int, incremental.BucketState], list[tuple[int, int, str]]]:
    """The parent's states of the buckets whose digest is unchanged (their parts marked for
    reuse), and the (bucket, images, digest) of every other bucket, to rebuild; `sums` are
    the release's images per bucket (`incremental.image_sums_of`)."""
    states: dict[int, incremental.BucketState] = {}
    todo: list[tuple[int, int, str]] = []
    for b, (n, _) in sorted(sums.items()):
        old = prior.get(b)
        if old is not None and old.digest == digests[b]:
            states[b] = old
            for files in old.parts.values():
                layout.reuse(files)
        else:
            todo.append((b, n, digests[b]))
    return states, todo


def _load_parent(env: StageEnv, parent_id: str | None) -> dict[str, Any] | None:
    if parent_id is None:
        return None
    key = f"{prefix_of(parent_id)}/manifest.json"
    return json.loads(env.store.get(key)) if env.store.head(key) is not None else None


def _prior_states(
    env: StageEnv,
    parent_id: str | None,
    parent: dict[str, Any] | None,
    request: dict[str, Any],
    n_buckets: int,
) -> dict[int, incremental.BucketState]:
    """The parent's buckets, when it was made under the same request (else nothing to reuse:
    a bucket digest covers the lineage rows, not the configuration that selects them)."""
    if parent_id is None or parent is None or _request_of(parent) != request:
        return {}
    with env.db.connect() as conn:
        if not incremental.shares_members(conn, parent_id):
            return {}
    return incremental.parent_states(env, prefix_of(parent_id), parent, n_buckets)


class _Layout:
    """A release's parts as they are decided: staged (new bytes) or reused from the parent."""

    def __init__(self, env: StageEnv, staging: str, parent: dict[str, Any] | None) -> None:
        self.env = env
        self.staging = staging
        self.parent_prefix = (
            release_prefix(parent["name"], parent["version"]) if parent is not None else None
        )
        self.parent_files = {
            f["path"]: f["sha256"]
            for s in (parent or {}).get("splits", {}).values()
            for f in s["files"]
        }
        self.staged: list[dict[str, Any]] = []
        self.copied: list[dict[str, Any]] = []

    @property
    def written(self) -> int:
        return len(self.staged)

    @property
    def reused(self) -> int:
        return len(self.copied)

    def add(self, builder: Any, rows: list[dict[str, Any]], stem: str) -> dict[str, Any]:
        """Encode one part; stage it unless the parent holds the same bytes at the same path."""
        schema = with_hf_features(builder.schema, builder.image_columns)
        part = encode_part(rows, schema, "")
        path = f"{builder.path}/{stem}-{part.sha256[:16]}.parquet"
        entry = {"path": path, "rows": part.rows, "sha256": part.sha256, "bytes": part.bytes}
        if self.parent_files.get(path) == part.sha256:
            self.reuse([entry])
        else:
            self.env.store.put(f"{self.staging}/{path}", part.data)
            self.staged.append(entry)
            kill_point("part_staged")
        return entry

    def reuse(self, files: list[dict[str, Any]]) -> None:
        self.copied.extend(files)
        kill_point("part_staged")  # an incremental publish may stage nothing

    def split_files(
        self, names: list[str], builders: list[Any], states: dict[int, incremental.BucketState]
    ) -> dict[str, list[dict[str, Any]]]:
        """split -> its files in path order; a split without rows gets one empty part (its
        schema), so every config still loads."""
        out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for state in states.values():
            for split, files in state.parts.items():
                out[split].extend(files)
        for b in builders:
            if not out[b.name]:
                out[b.name] = [self.add(b, [], "part-empty")]
        return {n: sorted(fs, key=lambda f: f["path"]) for n, fs in out.items()}

    def promote(self, prefix: str) -> None:
        """Staged parts re-read and checked, then copied in; reused parts copied server-side
        from the parent (size checked; `verify` re-hashes them)."""
        for p in self.staged:
            src = f"{self.staging}/{p['path']}"
            data = self.env.store.get(src)
            if len(data) != p["bytes"] or hashlib.sha256(data).hexdigest() != p["sha256"]:
                raise ReleaseError(f"staged file {src} does not match what was written")
            self.env.store.copy(src, f"{prefix}/{p['path']}")
            kill_point("promoted")
        with ThreadPoolExecutor(max_workers=_COPY_THREADS) as pool:
            # list(): the first failed copy raises here
            list(pool.map(lambda p: self._copy_reused(p, prefix), self.copied))

    def _copy_reused(self, p: dict[str, Any], prefix: str) -> None:
        src = f"{self.parent_prefix}/{p['path']}"
        info = self.env.store.head(src)
        if info is None or info.size != p["bytes"]:
            raise ReleaseError(f"reused part {src} is missing or not {p['bytes']} bytes")
        self.env.store.copy(src, f"{prefix}/{p['path']}")
        kill_point("promoted")

    def clear_staging(self) -> None:
        for p in self.staged:
            self.env.store.delete(f"{self.staging}/{p['path']}")


def _counts(
    env: StageEnv,
    spec: SourceSpec,
    fps: dict[str, str],
    builders: list[Any],
    states: dict[int, incremental.BucketState],
) -> tuple[dict[str, Any], set[str]]:
    """The manifest's counts and the served models, summed over the buckets."""
    rejections: dict[str, dict[str, int]] = {}
    stats: dict[str, dict[str, int]] = {b.name: {} for b in builders}
    served: set[str] = set()
    for state in states.values():
        for stage, reasons in state.rejections.items():
            incremental.add_counts(rejections.setdefault(stage, {}), reasons)
        for split, s in state.stats.items():
            incremental.add_counts(stats[split], s)
        served.update(state.served)
    with env.db.connect() as conn:
        src = source_rejection_counts(conn, spec, fps["ingest"])
    if src:
        incremental.add_counts(rejections.setdefault("ingest", {}), src)
    counts = {
        "images": sum(s.images for s in states.values()),
        "rejections": {k: dict(sorted(v.items())) for k, v in sorted(rejections.items())},
        "splits": {k: dict(sorted(v.items())) for k, v in stats.items()},
    }
    return counts, served


def _manifest(
    env: StageEnv,
    name: str,
    version: str,
    spec: SourceSpec,
    sample_size: int | None,
    parts: dict[str, list[dict[str, Any]]],
    fps: dict[str, str],
    counts: dict[str, Any],
    served: set[str],
    simulated: bool,
) -> dict[str, Any]:
    files = {s: {"rows": sum(p["rows"] for p in ps), "files": ps} for s, ps in parts.items()}
    content = sha256_hex(
        "\n".join(f"{f['path']} {f['sha256']}" for s in sorted(files) for f in files[s]["files"])
    )
    endpoints = env.settings.endpoints
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "release_id": f"{name}/{version}",
        "parent_release": _parent(env, name),
        "simulated": simulated,
        "content_sha256": content,
        "splits": files,
        "configs": splits.configs(list(parts)),
        "fingerprints": fps,
        "models": {
            "requested": {role: ep.model for role, ep in sorted(endpoints.items())},
            "served": sorted(served),
        },
        "method": env.settings.method.model_dump(mode="json"),
        "image_spec": env.settings.image_spec.model_dump(mode="json"),
        "source": {"store": spec.store_url, "prefix": spec.prefix, "sample_size": sample_size},
        "counts": counts,
        "run_id": env.run.run_id,
    }


def _write_report(env: StageEnv, prefix: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Report plots against the parent release; their hashes go into the manifest."""
    parent = None
    if manifest["parent_release"]:
        key = f"{prefix_of(manifest['parent_release'])}/manifest.json"
        if env.store.head(key) is not None:
            parent = json.loads(env.store.get(key))
    files = []
    for path, data in sorted(report.render(manifest, parent).items()):
        env.store.put(f"{prefix}/{path}", data)
        files.append({"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    return files


def _abandon(env: StageEnv, release_id: str, layout: _Layout) -> None:
    layout.clear_staging()
    with env.db.begin() as conn:
        incremental.delete_members(conn, release_id)
        conn.execute(text("DELETE FROM releases WHERE release_id = :r"), {"r": release_id})
