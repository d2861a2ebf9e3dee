"""The releases page in a real `airflow api-server`: refused without a login, and in Chromium
(logged in through the real login page) the "LGT releases" nav entry shows the release.

One API server per module (~20 s to start, ~1 GB): its lineage DB and store are a Postgres
database and an S3 bucket holding one release published by the pipeline on the sample with
the simulator, reached only through the lgt_postgres / lgt_s3 connections.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.airflow_server import ApiServer, api_server
from tests.conftest import _admin, make_settings
from tests.pg import PG_ADMIN_URL

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.s3]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
NAME, VERSION = "lgt-page", "1"


@dataclass(frozen=True)
class Release:
    release_id: str
    content_sha256: str
    rows: dict[str, int]  # split -> rows
    plots: list[str]  # report/<name>.png
    files: int  # what verify re-hashes: split files + plots + card


@pytest.fixture(scope="module")
def published(s3_endpoint: str, simulator_server: Any) -> Iterator[tuple[Release, dict]]:
    """The pipeline's release in a fresh Postgres DB + S3 bucket, and connections to them."""
    import boto3

    from lgt_ops.llm.simulator import SimConfig
    from lgt_ops.release.manage import load_manifest
    from lgt_ops.runctx import new_cli_run
    from lgt_ops.stages.base import StageEnv
    from tests.release_checks import run_pipeline
    from tests.samples import upload_sample

    db = f"lgt_test_{uuid.uuid4().hex[:10]}"
    bucket = f"lgt-{uuid.uuid4().hex[:12]}"
    _admin(f"CREATE DATABASE {db}")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    defaults = SimConfig(latency_ms=1.0)
    for field in SimConfig.model_fields:
        setattr(simulator_server.sim.cfg, field, getattr(defaults, field))
    settings = make_settings(
        f"{base.replace('postgresql://', 'postgresql+psycopg2://')}/{db}",
        f"s3://{bucket}",
        simulator_server.base_url,
        s3_endpoint,
    )
    env = StageEnv.open(settings, new_cli_run("test"))
    env.show_progress = False
    try:
        upload_sample(env.store, "sources/sample/")
        run_pipeline(env, release_name=NAME, release_version=VERSION, k_rollouts=2)
        manifest = load_manifest(env, f"{NAME}/{VERSION}")
        splits = manifest["splits"]
        release = Release(
            release_id=f"{NAME}/{VERSION}",
            content_sha256=manifest["content_sha256"],
            rows={s: v["rows"] for s, v in splits.items()},
            plots=[f["path"] for f in manifest["report"]],
            # parts, plots, the bucket index and the card
            files=sum(len(v["files"]) for v in splits.values()) + len(manifest["report"]) + 2,
        )
        s3 = {
            "conn_type": "aws",
            "login": "testing",
            "password": "testing",
            "extra": {"bucket": bucket, "endpoint_url": s3_endpoint, "region_name": "us-east-1"},
        }
        connections = {
            "lgt_postgres": f"postgres://{base.split('://', 1)[1]}/{db}",
            "lgt_s3": json.dumps(s3),
        }
        yield release, connections
    finally:
        env.db.dispose()
        _admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


@contextmanager
def _metadata_connection(conn_id: str, uri: str) -> Iterator[None]:
    """A connection stored in Airflow's metadata DB, as one created in the UI would be."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.add(Connection(conn_id=conn_id, uri=uri))
    try:
        yield
    finally:
        with create_session() as session:
            session.query(Connection).filter(Connection.conn_id == conn_id).delete()


@pytest.fixture(scope="module")
def server(
    published: tuple[Release, dict], airflow_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    _, connections = published
    work = tmp_path_factory.mktemp("api-server")
    # LGT_* point at an empty lineage DB and store: the page must read the connections,
    # lgt_s3 from the environment and lgt_postgres from the metadata DB.
    decoy = {
        "LGT_DATABASE_URL": f"sqlite:///{work / 'decoy.db'}",
        "LGT_STORE_URL": (work / "decoy-store").as_uri(),
    }
    env_conns = {"lgt_s3": connections["lgt_s3"]}
    with (
        _metadata_connection("lgt_postgres", connections["lgt_postgres"]),
        api_server(work, env_conns, decoy) as s,
    ):
        yield s


def _page_urls(release: Release) -> list[str]:
    """Every route of the plugin's app, with the release's path parameters filled in."""
    from starlette.routing import Route

    from tests.test_plugin import load_plugin

    app = load_plugin().fastapi_apps[0]["app"].build()
    values = {
        "name": NAME,
        "version": VERSION,
        "filename": release.plots[0].removeprefix("report/"),
    }
    paths = [r.path for r in app.routes if isinstance(r, Route) and r.include_in_schema]
    assert len(paths) >= 6, paths
    return ["/lgt" + re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], p) for p in paths]


def _refused(resp: httpx.Response) -> bool:
    if resp.status_code in (301, 302, 303, 307):
        return resp.headers["location"].startswith("/auth/login")
    return resp.status_code in (401, 403)


def test_every_page_endpoint_refuses_without_login_and_serves_with_it(server, published):
    release, _ = published
    urls = _page_urls(release)
    with httpx.Client(base_url=server.url, follow_redirects=False, timeout=60) as http:
        assert http.get("/api/v2/dags").status_code == 401  # Airflow's own API, for reference
        for url in urls:
            anonymous = http.get(url)
            assert _refused(anonymous), (url, anonymous.status_code, anonymous.text[:200])
            forged = http.get(url, headers={"Authorization": "Bearer not-a-jwt"})
            assert forged.status_code in (401, 403), (url, forged.status_code)
        page = http.get("/lgt/releases/lgt-page/1")
        assert page.status_code == 303
        assert page.headers["location"] == "/auth/login?next=%2Flgt%2Freleases%2Flgt-page%2F1"
        token = server.token()
        for auth in (
            {"headers": {"Authorization": f"Bearer {token}"}},
            {"headers": {"Cookie": f"_token={token}"}},
        ):
            for url in urls:
                resp = http.get(url, **auth)
                assert resp.status_code == 200, (url, resp.status_code, server.log_tail())
    listed = httpx.get(
        f"{server.url}/lgt/api/releases", headers={"Authorization": f"Bearer {token}"}
    ).json()
    assert [r["release_id"] for r in listed] == [release.release_id]
    assert listed[0]["rows"] == release.rows


@pytest.mark.browser
def test_logged_in_user_opens_releases_from_the_nav(server, published):
    from playwright.sync_api import expect, sync_playwright

    release, _ = published
    assert Path(CHROMIUM).exists(), "Debian's chromium is installed by `make browser`"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)  # upper bounds on a busy machine, not timings
            page.goto(server.url + "/")
            # The UI sends an anonymous visitor to the auth manager's login page.
            page.wait_for_url(re.compile(r".*/auth/login.*"))
            page.get_by_label(re.compile("username", re.I)).fill(server.username)
            page.get_by_label(re.compile("password", re.I)).fill(server.password)
            page.get_by_role("button", name=re.compile("sign in|log ?in", re.I)).click()
            page.wait_for_url(re.compile(r"^(?!.*/auth/login).*$"))

            page.get_by_role("link", name="LGT releases").click()
            page.wait_for_url(re.compile(r".*/plugin/lgt-releases.*"))
            frame = page.frame_locator('iframe[title="LGT releases"]')
            row = frame.locator(f'tr[data-release="{release.release_id}"]')
            for split, n in release.rows.items():
                expect(row.locator(".rows")).to_contain_text(f"{split}: {n}")
            expect(row.locator(".sha")).to_have_text(release.content_sha256)
            expect(row.locator(".simulated")).to_have_text("simulated")
            expect(row.locator(".latest-col")).to_have_text("latest")

            row.get_by_role("link", name=VERSION).click()
            expect(frame.locator("h1")).to_have_text(release.release_id)
            expect(frame.locator("#card")).to_contain_text(f"# {NAME} {VERSION}")
            expect(frame.locator("#card")).to_contain_text("SIMULATED DATA")
            expect(frame.locator("#verify")).to_have_text(
                f"verified: {release.files} files match the manifest"
            )
            expect(frame.locator(".plots img")).to_have_count(len(release.plots))
            view = next(f for f in page.frames if f.url.endswith("/lgt/releases/lgt-page/1"))
            # Every plot decoded (a broken image has naturalWidth 0).
            view.wait_for_function(
                "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"
            )
            # The frame's navigation is mirrored into the UI's own URL (a shareable link).
            page.wait_for_url(re.compile(r".*/plugin/lgt-releases/lgt/releases/lgt-page/1"))
        finally:
            browser.close()
