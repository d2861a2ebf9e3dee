"""Images reach the VLM bounded in size, as data URLs or presigned S3 URLs, and their bytes
never end up in logs or the ledger; a stage's request metrics land in stage_runs."""

from __future__ import annotations

import json
import logging

from sqlalchemy import text

from lgt_ops.config import ImageSpec
from lgt_ops.sources import resolve_source
from lgt_ops.stages import annotate, ingest
from lgt_ops.stages.base import Shard
from tests.samples import upload_sample


def _annotate(env, caplog):
    upload_sample(env.store, "sources/sample/")
    ingest.ingest_all(env, "sources/sample/")
    spec, _ = resolve_source(env, "sources/sample/")
    with caplog.at_level(logging.DEBUG):
        return annotate.run(env, spec, Shard())


def test_data_urls_are_resized_and_never_logged(local_env, sim, caplog):
    env = local_env.with_settings(
        local_env.settings.model_copy(update={"image_spec": ImageSpec(max_side=256)})
    )
    stats = _annotate(env, caplog)
    assert stats.requests_sent == 4
    assert sim.sim.image_transports == {"data": 4}
    assert 0 < sim.sim.max_image_side <= 256
    assert not any("base64" in r.getMessage() for r in caplog.records)
    with env.db.connect() as conn:
        stored = " ".join(
            str(v) for row in conn.execute(text("SELECT * FROM model_requests")) for v in row
        )
    assert "base64" not in stored and "data:image" not in stored


def test_presigned_urls_from_s3(pg_s3_env, sim, caplog):
    env = pg_s3_env.with_settings(
        pg_s3_env.settings.model_copy(
            update={"image_spec": ImageSpec(max_side=256, transport="presigned_url")}
        )
    )
    _annotate(env, caplog)
    assert sim.sim.image_transports == {"http": 4}


def test_stage_runs_carry_request_metrics(local_env, sim, caplog):
    sim.sim.cfg.fault_429 = 0.8  # drawn per (request, attempt): most first attempts get a 429
    sim.sim.cfg.retry_after_s = 0.01
    stats = _annotate(local_env, caplog)
    with local_env.db.connect() as conn:
        row = conn.execute(
            text(
                "SELECT requests_sent, cache_hits, prompt_tokens, completion_tokens, errors, status"
                " FROM stage_runs WHERE stage = 'annotate'"
            )
        ).one()
    assert row.status == "success"
    assert row.requests_sent == stats.requests_sent > 4  # 429s were retried
    assert json.loads(row.errors)["overload"] > 0
    assert row.prompt_tokens > 0 and row.completion_tokens > 0
