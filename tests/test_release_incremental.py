"""Incremental releases: a version reuses the parent's parts whose bucket did not change.

One pipeline on the sample, then: an unchanged republish (nothing written, same content
hash), a refresh with two new images (only their buckets rewritten, the same bytes a fresh
publish makes), verify on the incremental version, and the card's configs loaded with
`datasets` giving exactly the release's rows.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import text

from lgt_ops.params import RunParams
from lgt_ops.release import goodput, incremental, splits, validate
from lgt_ops.release.manage import verify
from lgt_ops.release.publish import publish
from lgt_ops.runctx import RunContext
from lgt_ops.sources import resolve_source
from lgt_ops.storage import LocalStore
from tests.release_checks import run_pipeline
from tests.samples import new_photos, upload_sample


class _CountingStore(LocalStore):
    """The real local store, remembering every key written (to assert what a publish sent)."""

    def __init__(self, root) -> None:  # noqa: ANN001
        super().__init__(root)
        self.written: list[str] = []

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self.written.append(key)
        super().put(key, data, if_absent=if_absent)


def _parts(manifest: dict) -> dict[str, str]:
    return {f["path"]: f["sha256"] for s in manifest["splits"].values() for f in s["files"]}


def _as_run(env):  # noqa: ANN001, ANN202
    """The env with the method settings `run_pipeline(k_rollouts=2)` publishes under."""
    p = RunParams.from_conf(
        {"source": "sources/sample/", "release_name": "method", "k_rollouts": 2}
    )
    return env.with_settings(p.apply(env.settings))


def _members(env, release_id: str) -> list:
    with env.db.connect() as conn:
        return conn.execute(
            text("SELECT split, row_id FROM release_members WHERE release_id = :r ORDER BY 1, 2"),
            {"r": release_id},
        ).all()


def _count(env, sql: str, **params) -> int:  # noqa: ANN001
    with env.db.connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


@pytest.fixture
def counted(local_env):
    store = _CountingStore(local_env.store.root)
    env = local_env.with_run(local_env.run)
    env.store = store
    return env


def test_incremental_publishes_reuse_unchanged_parts(counted):
    env = counted.with_settings(counted.settings.with_method(release_buckets=16))
    upload_sample(env.store, "sources/sample/")
    v1 = run_pipeline(env, release_version="v1", k_rollouts=2).release
    spec, _ = resolve_source(env, "sources/sample/")
    parts_v1 = _parts(v1.manifest)
    assert len({p.rsplit("/", 1)[0] for p in parts_v1}) == 6  # every split has parts

    # Unchanged: every part reused, none sent to the store, the same identity and members.
    env.store.written.clear()
    v2 = publish(_as_run(env), spec, name="method", version="v2", allow_simulated=True)
    assert v2.manifest["incremental"]["parts_written"] == 0
    assert v2.manifest["incremental"]["parts_reused"] == len(parts_v1)
    assert not [k for k in env.store.written if k.endswith(".parquet")]
    assert v2.content_sha256 == v1.content_sha256 and _parts(v2.manifest) == parts_v1
    assert _members(env, "method/v2") == _members(env, "method/v1")
    # ... shared, not copied: v2 links v1's member sets and writes no member row itself.
    assert _count(env, "SELECT COUNT(*) FROM member_rows WHERE owner_release_id = 'method/v2'") == 0
    sets = "SELECT COUNT(*) FROM release_member_sets WHERE release_id = :r"
    assert _count(env, sets, r="method/v2") == _count(env, sets, r="method/v1") > 0
    # ... and its goodput, reused from v1, is what measuring it gives.
    fps = splits.fingerprints(_as_run(env))
    counts = {k: v for k, v in v2.manifest["counts"].items() if k != "goodput"}
    rows = sum(v2.counts.values())
    measured = goodput.measure(_as_run(env), spec, None, fps, counts, rows)
    assert v2.manifest["counts"]["goodput"] == measured
    # ... and so are its quality figures: reused from v1, equal to validating v2 afresh.
    revalidated = validate.measure(_as_run(env), "method/v2", "releases/method/v2", v2.manifest)
    assert v2.manifest["quality"] == v1.manifest["quality"] == revalidated.as_dict()

    # Two new images: only the parts of their buckets change.
    new_ids = new_photos(env.store, "sources/sample/images/")
    touched = {incremental.bucket_of(i, 16) for i in new_ids}
    env.store.written.clear()
    v3 = run_pipeline(env.with_run(RunContext("refresh")), release_version="v3", k_rollouts=2)
    v3 = v3.release
    written = {k.split("/.staging/v3/", 1)[1] for k in env.store.written if k.endswith(".parquet")}
    assert written and v3.manifest["incremental"]["parts_written"] == len(written)
    assert {int(re.search(r"part-(\d+)-", p).group(1)) for p in written} <= touched
    parts_v3 = _parts(v3.manifest)
    for path, sha in parts_v3.items():
        if path not in written:
            assert parts_v1.get(path) == sha  # reused, byte for byte
    assert v3.counts["questions"] > v1.counts["questions"]

    # A fresh publish of the same rows (no parent) has the same parts and content hash.
    fresh = publish(_as_run(env), spec, name="fresh", version="1", allow_simulated=True)
    assert fresh.manifest["incremental"]["parts_reused"] == 0
    assert fresh.content_sha256 == v3.content_sha256 and _parts(fresh.manifest) == parts_v3
    assert fresh.counts == v3.counts
    assert fresh.manifest["counts"] == v3.manifest["counts"]
    assert _members(env, "fresh/1") == _members(env, "method/v3")  # linked + rebuilt members
    assert fresh.manifest["counts"]["goodput"] == v3.manifest["counts"]["goodput"]

    # verify re-hashes the incremental version's reused parts too.
    assert verify(env, "method/v3").ok
    reused = next(p for p in parts_v3 if p not in written)
    key = f"releases/method/v3/{reused}"
    data = bytearray(env.store.get(key))
    data[len(data) // 2] ^= 0xFF
    env.store.put(key, bytes(data))
    assert verify(env, "method/v3").problems == [f"{reused}: sha256 differs from the manifest"]
    assert verify(env, "method/v1").ok  # the parent's copy is its own


def test_card_configs_load_exactly_the_release(local_env):
    import datasets
    import yaml

    env = local_env
    upload_sample(env.store, "sources/sample/")
    run_pipeline(env, release_version="v1", k_rollouts=2)
    new_photos(env.store, "sources/sample/images/")
    rel = run_pipeline(env.with_run(RunContext("refresh")), release_version="v2", k_rollouts=2)
    rel = rel.release
    assert rel.manifest["incremental"]["parts_reused"] > 0
    root = env.store.local_path("releases/method/v2")
    card = (root / "README.md").read_text()
    configs = yaml.safe_load(card.split("---")[1])["configs"]
    members: dict[str, set[str]] = {}
    for split, row_id in _members(env, "method/v2"):
        members.setdefault(split, set()).add(row_id)
    for config in configs:
        files = [str(root / p) for p in config["data_files"][0]["path"]]
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
        name = config["config_name"]
        want = members.get("sft_stage1", set()) | members.get("sft_stage2", set())
        if name != "sft_stage2_merged":
            want = members.get(name, set())
        assert sorted(ds["row_id"]) == sorted(want), name


def test_a_parent_with_members_from_before_shared_sets_is_rebuilt(local_env):
    """Members recorded before per-bucket sets (one set per release, bucket -1, as migration
    0013 carries them over) are not reused by bucket: the next version rebuilds every bucket
    and records its own sets, with the same rows."""
    env = local_env
    upload_sample(env.store, "sources/sample/")
    v1 = run_pipeline(env, release_version="v1", k_rollouts=2).release
    with env.db.begin() as conn:  # v1 as migrated: one legacy set
        conn.execute(text("UPDATE member_rows SET bucket = -1"))
        conn.execute(text("DELETE FROM release_member_sets WHERE release_id = 'method/v1'"))
        conn.execute(text("INSERT INTO release_member_sets VALUES ('method/v1', -1, 'method/v1')"))
    spec, _ = resolve_source(env, "sources/sample/")
    v2 = publish(_as_run(env), spec, name="method", version="v2", allow_simulated=True)
    assert v2.manifest["incremental"]["buckets_reused"] == 0
    assert v2.content_sha256 == v1.content_sha256
    assert _members(env, "method/v2") == _members(env, "method/v1")
    owned = "SELECT COUNT(*) FROM member_rows WHERE owner_release_id = 'method/v2'"
    assert _count(env, owned) == sum(v2.counts.values())
