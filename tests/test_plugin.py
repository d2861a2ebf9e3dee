"""The releases page app in-process, against a lineage DB + store holding a published release.

Airflow's own authentication of the page is tested against a real api-server in
tests/test_releases_page.py; here the guard is a plain FastAPI dependency.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from fastapi import HTTPException, Request
from fastapi.testclient import TestClient

from lgt_ops.release.publish import publish
from lgt_ops.sources import resolve_source
from lgt_ops.stages import annotate, blind, ingest, mcq
from lgt_ops.stages.base import Shard
from lgt_ops.webapp import create_app
from tests.conftest import ROOT
from tests.samples import upload_sample

pytestmark = pytest.mark.airflow


def _signed_in(request: Request) -> None:
    if request.headers.get("x-user") != "alice":
        raise HTTPException(401, "Not authenticated")


def _login(next_url: str) -> str:
    return f"/auth/login?next={next_url}"


def load_plugin() -> type:
    spec = importlib.util.spec_from_file_location("lgt_plugin", ROOT / "plugins" / "lgt_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LgtPlugin


def test_plugin_registers_guarded_app_and_nav_view():
    plugin = load_plugin()
    assert plugin.fastapi_apps[0]["url_prefix"] == "/lgt"
    view = plugin.external_views[0]
    # A url_route makes the UI show the page in its frame; without one the nav entry is inert.
    assert view["href"] == "/lgt/releases" and view["url_route"] == "lgt-releases"
    app = plugin.fastapi_apps[0]["app"].build()
    assert app.router.dependencies, "every route of the page must depend on Airflow's auth"


def test_importing_the_plugin_leaves_the_page_unbuilt():
    """Every Airflow process imports plugins; only the API server needs the page's stack."""
    plugin = str(ROOT / "plugins" / "lgt_plugin.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('p', {plugin!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "heavy = ['lgt_ops.webapp', 'airflow.api_fastapi.core_api.security', 'fastapi']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture
def published(local_env):
    env = local_env
    upload_sample(env.store, "sources/sample/")
    ingest.ingest_all(env, "sources/sample/")
    src, _ = resolve_source(env, "sources/sample/")
    annotate.run(env, src, Shard())
    mcq.run(env, src, Shard())
    blind.run(env, src, Shard())
    rel = publish(env, src, name="web", version="1", allow_simulated=True)
    return env, rel


def test_release_pages_and_data(published):
    env, rel = published
    client = TestClient(create_app(lambda: env, _signed_in, _login), headers={"x-user": "alice"})
    listed = client.get("/api/releases").json()
    assert [r["release_id"] for r in listed] == ["web/1"] and listed[0]["latest"]
    assert listed[0]["rows"] == rel.counts and listed[0]["simulated"] is True
    one = client.get("/api/releases/web/1").json()
    assert one["content_sha256"] == rel.content_sha256
    assert one["manifest"]["splits"]["questions"]["rows"] == rel.counts["questions"]
    assert client.get("/api/releases/web/404").status_code == 404

    page = client.get("/releases")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert rel.content_sha256 in page.text and f"questions: {rel.counts['questions']}" in page.text
    assert 'href="/releases/web/1"' in page.text

    view = client.get("/releases/web/1").text
    assert "# web 1" in view and "SIMULATED DATA" in view  # the dataset card
    plots = [f["path"] for f in one["manifest"]["report"]]
    assert plots and all(f'src="/releases/web/1/{p}"' in view for p in plots)
    png = client.get(f"/releases/web/1/{plots[0]}")
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert client.get("/releases/web/1/report/../manifest.json").status_code == 404
    assert client.get("/releases/web/1/report/nope.png").status_code == 404

    ok = client.get("/api/releases/web/1/verify").json()
    assert (
        ok["ok"]
        and ok["files_checked"]
        == len(plots) + sum(len(s["files"]) for s in one["manifest"]["splits"].values()) + 2
    )


def test_verify_reports_a_changed_file(published):
    env, _ = published
    env.store.put("releases/web/1/README.md", b"edited")
    client = TestClient(create_app(lambda: env, _signed_in), headers={"x-user": "alice"})
    bad = client.get("/api/releases/web/1/verify").json()
    assert not bad["ok"] and bad["problems"] == ["README.md: sha256 differs from the manifest"]


def test_without_login_pages_redirect_and_data_is_refused(published):
    env, _ = published
    client = TestClient(create_app(lambda: env, _signed_in, _login), follow_redirects=False)
    page = client.get("/releases/web/1?x=1")
    assert page.status_code == 303
    assert page.headers["location"] == "/auth/login?next=/releases/web/1?x=1"
    for path in ("/api/releases", "/api/releases/web/1/verify", "/releases/web/1/report/a.png"):
        assert client.get(path).status_code == 401, path


def test_unreachable_lineage_db_is_a_clear_503(tmp_path):
    from lgt_ops.runctx import new_cli_run
    from lgt_ops.stages.base import StageEnv
    from tests.conftest import free_port, make_settings

    down = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/lgt"
    env = StageEnv.open(make_settings(down, tmp_path.as_uri()), new_cli_run("t"), migrate=False)
    client = TestClient(create_app(lambda: env, _signed_in), headers={"x-user": "alice"})
    for path in ("/api/releases", "/releases"):
        resp = client.get(path)
        assert resp.status_code == 503, path
        assert resp.json()["detail"].startswith("lineage database (connection lgt_postgres)")


def test_a_deleted_plot_is_a_404_naming_it(published):
    env, _ = published
    env.store.delete("releases/web/1/report/skills.png")
    client = TestClient(create_app(lambda: env, _signed_in), headers={"x-user": "alice"})
    resp = client.get("/releases/web/1/report/skills.png")
    assert resp.status_code == 404 and "releases/web/1/report/skills.png" in resp.text
