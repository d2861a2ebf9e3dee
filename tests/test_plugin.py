"""The Airflow plugin's release view, against a lineage DB with a published release."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lgt_ops.release.publish import publish
from lgt_ops.sources import resolve_source
from lgt_ops.stages import annotate, ingest, mcq
from lgt_ops.stages.base import Shard
from lgt_ops.webapp import create_app
from tests.samples import upload_sample

pytestmark = pytest.mark.airflow


def test_plugin_registers_app_and_link():
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("lgt_plugin", ROOT / "plugins" / "lgt_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugin = module.LgtPlugin
    assert plugin.fastapi_apps[0]["url_prefix"] == "/lgt"
    assert plugin.external_views[0]["href"] == "/lgt/releases"


def test_release_view(local_env):
    env = local_env
    upload_sample(env.store, "sources/sample/")
    ingest.ingest_all(env, "sources/sample/")
    src, _ = resolve_source(env, "sources/sample/")
    annotate.run(env, src, Shard())
    mcq.run(env, src, Shard())
    rel = publish(env, src, name="web", version="1", allow_simulated=True)
    client = TestClient(create_app(env.db))
    listed = client.get("/releases").json()
    assert [r["release_id"] for r in listed] == ["web/1"] and listed[0]["latest"]
    one = client.get("/releases/web/1").json()
    assert one["content_sha256"] == rel.content_sha256 and one["simulated"] is True
    assert one["splits"][0]["n"] == rel.counts["questions"]
    assert client.get("/releases/web/404").status_code == 404
