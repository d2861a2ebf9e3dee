"""Releases: immutable versions, reproducible bytes, simulator output guarded, HF-loadable."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from sqlalchemy import text

from lgt_ops.release.publish import ReleaseError, ReleaseExists, publish
from lgt_ops.sources import resolve_source
from lgt_ops.stages import annotate, blind, ingest, mcq
from lgt_ops.stages.base import Shard
from tests.samples import upload_sample


def _stage1(env):
    upload_sample(env.store, "sources/sample/")
    ingest.ingest_all(env, "sources/sample/")
    spec, _ = resolve_source(env, "sources/sample/")
    annotate.run(env, spec, Shard())
    mcq.run(env, spec, Shard())
    blind.run(env, spec, Shard())  # stage-1 questions are current once checked
    return spec


def test_publish_on_postgres_and_s3(pg_s3_env):
    env = pg_s3_env
    spec = _stage1(env)
    rel = publish(env, spec, name="t", version="v1", allow_simulated=True)
    manifest = json.loads(env.store.get("releases/t/v1/manifest.json"))
    assert manifest["simulated"] is True and manifest["content_sha256"] == rel.content_sha256
    files = manifest["splits"]["questions"]["files"]
    tables = [pq.read_table(io.BytesIO(env.store.get(f"releases/t/v1/{f['path']}"))) for f in files]
    assert sum(t.num_rows for t in tables) == manifest["splits"]["questions"]["rows"] > 0
    with env.db.connect() as conn:
        n_questions = conn.execute(
            text("SELECT COUNT(*) FROM question_checks WHERE stage = 'blind' AND kept")
        ).scalar_one()
        members = conn.execute(
            text("SELECT COUNT(*) FROM release_members WHERE release_id='t/v1'")
        ).scalar_one()
        status = conn.execute(
            text("SELECT status FROM releases WHERE release_id='t/v1'")
        ).scalar_one()
        latest = conn.execute(
            text("SELECT release_id FROM release_pointers WHERE name='t'")
        ).scalar_one()
    assert manifest["splits"]["questions"]["rows"] == n_questions == members
    assert status == "published" and latest == "t/v1"
    assert json.loads(env.store.get("releases/t/latest.json"))["release_id"] == "t/v1"
    assert "SIMULATED DATA" in env.store.get("releases/t/v1/README.md").decode()


def test_versions_are_immutable_and_reproducible(local_env):
    env = local_env
    spec = _stage1(env)
    a = publish(env, spec, name="t", version="1", allow_simulated=True)
    with pytest.raises(ReleaseExists):
        publish(env, spec, name="t", version="1", allow_simulated=True)
    b = publish(env, spec, name="t", version="2", allow_simulated=True)
    assert a.content_sha256 == b.content_sha256
    assert b.manifest["parent_release"] == "t/1"
    for f in a.manifest["splits"]["questions"]["files"]:
        assert env.store.get(f"releases/t/1/{f['path']}") == env.store.get(
            f"releases/t/2/{f['path']}"
        )


def test_simulator_output_is_not_published_by_default(local_env):
    env = local_env
    spec = _stage1(env)
    with pytest.raises(ReleaseError, match="simulator"):
        publish(env, spec, name="real", version="1")
    with env.db.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM releases")).scalar_one() == 0
    assert env.store.head("releases/real/1/manifest.json") is None


def test_crashed_attempt_is_cleared_by_the_next(local_env):
    env = local_env
    spec = _stage1(env)
    with env.db.begin() as conn:  # what a crash after claiming the version leaves behind
        conn.execute(
            text(
                "INSERT INTO releases (release_id, name, version, status, uri, manifest_sha256,"
                " content_sha256) VALUES ('t/9', 't', '9', 'staging', 'x', '', '')"
            )
        )
    rel = publish(env, spec, name="t", version="9", allow_simulated=True)
    assert rel.release_id == "t/9"


def test_questions_split_loads_with_datasets(local_env):
    import datasets

    env = local_env
    spec = _stage1(env)
    rel = publish(env, spec, name="hf", version="1", allow_simulated=True)
    root = env.store.local_path("releases/hf/1")
    ds = datasets.load_dataset(
        "parquet", data_files=str(root / "questions" / "*.parquet"), split="train"
    )
    assert ds.num_rows == rel.counts["questions"]
    assert isinstance(ds.features["image"], datasets.Image)
    row = ds[0]
    assert row["image"].size[0] > 0  # the path resolves to a real image
    assert row["options"][" ABCD".index(row["answer"]) - 1] == row["answer_text"]
