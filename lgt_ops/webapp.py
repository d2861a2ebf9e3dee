"""The releases page: published releases as HTML pages and JSON, mounted by the Airflow plugin.

Routes (relative to the mount point, `/lgt` in the plugin):
    GET /releases                              page: every published release
    GET /releases/{name}/{version}             page: one release (plots, verify, dataset card)
    GET /releases/{name}/{version}/report/{f}  one report plot (PNG) listed in the manifest
    GET /api/releases                          JSON: the list
    GET /api/releases/{name}/{version}         JSON: one release with its manifest
    GET /api/releases/{name}/{version}/verify  JSON: every file re-hashed against the manifest

Every route depends on `guard` (the plugin passes Airflow's own authentication). A page
request without a login is redirected to `login_url`; the other routes answer 401.
The library stays free of Airflow: the plugin injects the guard, the login URL and the
settings (from the lgt_postgres / lgt_s3 connections).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from html import escape
from typing import Any
from urllib.parse import quote

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy.exc import SQLAlchemyError

from lgt_ops.config import ConfigError, Settings
from lgt_ops.env import StageEnv
from lgt_ops.failures import LineageDbUnreachable, StoreUnreachable
from lgt_ops.release.errors import ReleaseError
from lgt_ops.release.manage import list_releases, load_manifest, verify
from lgt_ops.release.publish import prefix_of
from lgt_ops.runctx import new_cli_run
from lgt_ops.storage import ObjectMissing

EnvOpener = Callable[[], StageEnv]
VERIFY_TTL_S = 300.0  # a release's bytes are immutable: re-hash at most every 5 min per process


def env_opener(settings: Callable[[], Settings]) -> EnvOpener:
    """A StageEnv per distinct (database, store) configuration, reused across requests.

    `settings` is called on every request, so a changed connection takes effect at once; the
    engine and store behind an unchanged one are reused. The page only reads, so no migration.
    """
    envs: dict[tuple[str, ...], StageEnv] = {}
    lock = threading.Lock()

    def open_env() -> StageEnv:
        s = settings()
        key = (
            s.database_url,
            s.store_url,
            str(s.s3_endpoint_url),
            s.s3_access_key.get_secret_value() if s.s3_access_key else "",
            s.s3_secret_key.get_secret_value() if s.s3_secret_key else "",
        )
        with lock:
            if key not in envs:
                envs[key] = StageEnv.open(s, new_cli_run("web"), migrate=False)
                envs[key].show_progress = False
            return envs[key]

    return open_env


class _VerifyCache:
    """Verification results per release for VERIFY_TTL_S (a page view must not re-hash GBs),
    and one verification at a time per release (concurrent viewers wait for the same one)."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[float, dict[str, Any]]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, env: StageEnv, release_id: str) -> dict[str, Any]:
        with self._lock:
            one = self._locks.setdefault(release_id, threading.Lock())
        with one:
            hit = self._done.get(release_id)
            if hit and time.monotonic() - hit[0] < VERIFY_TTL_S:
                return hit[1]
            v = verify(env, release_id)
            result = {
                "release_id": release_id,
                "ok": v.ok,
                "files_checked": v.files_checked,
                "problems": v.problems,
            }
            self._done[release_id] = (time.monotonic(), result)
            return result


class _Manifests:
    """Manifests by (release id, content hash): a published release's manifest never changes,
    so the list page reads each one from the store once per process."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], dict[str, Any]] = {}

    def get(self, env: StageEnv, row: dict[str, Any]) -> dict[str, Any]:
        key = (row["release_id"], row["content_sha256"] or "")
        if key not in self._by_key:
            self._by_key[key] = load_manifest(env, row["release_id"])
        return self._by_key[key]

    def required(self, env: StageEnv, row: dict[str, Any]) -> dict[str, Any]:
        """The manifest, or 404 when the release's manifest is gone."""
        try:
            return self.get(env, row)
        except ReleaseError as exc:
            raise HTTPException(404, str(exc)) from exc

    def with_rows(self, env: StageEnv, row: dict[str, Any]) -> dict[str, Any]:
        """The listed release plus its rows per split, from its manifest (not a count query)."""
        try:
            splits = self.get(env, row)["splits"]
            rows = {s: int(v["rows"]) for s, v in sorted(splits.items())}
        except ReleaseError:
            rows = {}  # listed in the DB but its manifest is gone: the release view says so
        return {**row, "rows": rows}


def create_app(
    open_env: EnvOpener,
    guard: Callable[..., Any],
    login_url: Callable[[str], str] | None = None,
) -> FastAPI:
    """The releases app; `guard` is a FastAPI dependency every route depends on."""
    app = FastAPI(
        title="LGT-ETL releases",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(guard)],
    )
    manifests = _Manifests()
    _add_error_handlers(app, login_url)
    _add_api_routes(app, open_env, manifests, _VerifyCache())
    _add_page_routes(app, open_env, manifests)
    return app


def _add_error_handlers(app: FastAPI, login_url: Callable[[str], str] | None) -> None:
    """Login redirects for pages; a clear 503 naming the service (connection) that is down."""

    @app.exception_handler(HTTPException)
    async def _login_redirect(request: Request, exc: HTTPException) -> Response:
        # A person opening a page without a login goes to the login page and comes back.
        wants_page = "/api/" not in request.url.path and "/report/" not in request.url.path
        if exc.status_code == 401 and wants_page and login_url is not None:
            return RedirectResponse(login_url(_path_and_query(request)), status_code=303)
        return await http_exception_handler(request, exc)

    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(LineageDbUnreachable)
    async def _db_down(request: Request, exc: Exception) -> Response:
        return _unavailable("lineage database (connection lgt_postgres)", exc)

    @app.exception_handler(BotoCoreError)
    @app.exception_handler(ClientError)
    @app.exception_handler(OSError)
    @app.exception_handler(StoreUnreachable)
    async def _store_down(request: Request, exc: Exception) -> Response:
        return _unavailable("release store (connection lgt_s3)", exc)

    @app.exception_handler(ObjectMissing)
    async def _file_missing(request: Request, exc: ObjectMissing) -> Response:
        return JSONResponse({"detail": f"missing in the store: {exc.args[0]}"}, status_code=404)

    @app.exception_handler(ConfigError)
    async def _misconfigured(request: Request, exc: ConfigError) -> Response:
        return _unavailable("configuration", exc)


def _add_api_routes(
    app: FastAPI, env: EnvOpener, manifests: _Manifests, verified: _VerifyCache
) -> None:
    @app.get("/api/releases")
    def api_releases() -> list[dict[str, Any]]:
        e = env()
        return [manifests.with_rows(e, r) for r in _listed(e)]

    @app.get("/api/releases/{name}/{version}")
    def api_release(name: str, version: str) -> dict[str, Any]:
        e = env()
        row = _release_row(e, name, version)
        return {**row, "manifest": manifests.required(e, row)}

    @app.get("/api/releases/{name}/{version}/verify")
    def api_verify(name: str, version: str) -> dict[str, Any]:
        e = env()
        row = _release_row(e, name, version)
        return verified.get(e, row["release_id"])


def _add_page_routes(app: FastAPI, env: EnvOpener, manifests: _Manifests) -> None:
    @app.get("/releases/{name}/{version}/report/{filename}")
    def report_plot(name: str, version: str, filename: str) -> Response:
        e = env()
        row = _release_row(e, name, version)
        paths = {f["path"] for f in manifests.required(e, row).get("report", [])}
        path = f"report/{filename}"
        if path not in paths:
            raise HTTPException(404, f"release {row['release_id']} has no plot {path}")
        data = e.store.get(f"{prefix_of(row['release_id'])}/{path}")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private"})

    @app.get("/releases", response_class=HTMLResponse)
    def releases_page(request: Request) -> str:
        e = env()
        rows = [manifests.with_rows(e, r) for r in _listed(e)]
        return _page("LGT-ETL releases", _list_html(request, rows))

    @app.get("/releases/{name}/{version}", response_class=HTMLResponse)
    def release_page(request: Request, name: str, version: str) -> str:
        e = env()
        row = _release_row(e, name, version)
        man = manifests.required(e, row)
        card_key = f"{prefix_of(row['release_id'])}/README.md"
        card = e.store.get(card_key).decode("utf-8", "replace") if e.store.head(card_key) else ""
        title = f"{row['release_id']} · LGT-ETL releases"
        return _page(title, _release_html(request, row, man, card))


def _unavailable(what: str, exc: Exception) -> Response:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return JSONResponse({"detail": f"{what} not available: {first}"}, status_code=503)


# -- data ------------------------------------------------------------------------------------
def _listed(env: StageEnv) -> list[dict[str, Any]]:
    """By name; within a name newest first (the order list_releases gives, kept by sorted)."""
    return sorted(list_releases(env), key=lambda r: r["name"])


def _release_row(env: StageEnv, name: str, version: str) -> dict[str, Any]:
    for r in list_releases(env, name):
        if r["version"] == version:
            return r
    raise HTTPException(404, f"no published release {name}/{version}")


# -- HTML ------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem;color:#1a202c}
h1{font-size:1.4rem} h2{font-size:1.1rem;margin-top:1.6rem}
table{border-collapse:collapse;font-size:.9rem} th,td{padding:.35rem .7rem;text-align:left;
border-bottom:1px solid #e2e8f0;vertical-align:top} th{background:#f7fafc}
code{font-size:.85rem} .tag{border-radius:.3rem;padding:.05rem .4rem;font-size:.8rem}
.sim{background:#fefcbf;color:#744210} .latest{background:#c6f6d5;color:#22543d}
.ok{color:#22543d;font-weight:600} .bad{color:#9b2c2c;font-weight:600}
.plots img{max-width:32rem;margin:.3rem;border:1px solid #e2e8f0}
pre{background:#f7fafc;padding:1rem;white-space:pre-wrap;font-size:.85rem}
"""


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}'
        f"</title><style>{_CSS}</style></head><body>{body}</body></html>"
    )


def _path_and_query(request: Request) -> str:
    q = f"?{request.url.query}" if request.url.query else ""
    return f"{request.url.path}{q}"


def _url(request: Request, *parts: str) -> str:
    """A path inside this app, wherever it is mounted (`root_path` is the mount point)."""
    root = request.scope.get("root_path", "").rstrip("/")
    return escape("/".join([root, *(quote(p, safe="") for p in parts)]))


def _rows_text(rows: dict[str, int]) -> str:
    return ", ".join(f"{s}: {n}" for s, n in rows.items()) or "manifest missing"


def _list_html(request: Request, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<h1>LGT-ETL releases</h1><p>No published release yet.</p>"
    head = (
        "<tr><th>Name</th><th>Version</th><th>Published (UTC)</th><th>Rows per split</th>"
        "<th>Content sha256</th><th>Simulated</th><th>Latest</th></tr>"
    )
    body = []
    for r in rows:
        href = _url(request, "releases", r["name"], r["version"])
        body.append(
            f'<tr data-release="{escape(r["release_id"])}"><td>{escape(r["name"])}</td>'
            f'<td><a href="{href}">{escape(r["version"])}</a></td>'
            f"<td>{escape(r['created_at'][:19])}</td>"
            f'<td class="rows">{escape(_rows_text(r["rows"]))}</td>'
            f'<td><code class="sha">{escape(r["content_sha256"] or "")}</code></td>'
            f'<td class="simulated">{_flag(r["simulated"], "simulated", "sim")}</td>'
            f'<td class="latest-col">{_flag(r["latest"], "latest", "latest")}</td></tr>'
        )
    return f"<h1>LGT-ETL releases</h1><table>{head}{''.join(body)}</table>"


def _flag(on: bool, label: str, css: str) -> str:
    return f'<span class="tag {css}">{label}</span>' if on else "no"


def _release_html(
    request: Request, row: dict[str, Any], manifest: dict[str, Any], card: str
) -> str:
    rid = row["release_id"]
    name, version = row["name"], row["version"]
    splits = "".join(
        f"<tr><td>{escape(s)}</td><td>{int(v['rows'])}</td><td>{len(v.get('files', []))}</td></tr>"
        for s, v in sorted(manifest["splits"].items())
    )
    plots = "".join(
        f'<img alt="{escape(f["path"])}" src="'
        + _url(request, "releases", name, version, "report", f["path"].removeprefix("report/"))
        + '">'
        for f in manifest.get("report", [])
    )
    verify_url = _url(request, "api", "releases", name, version, "verify")
    back = _url(request, "releases")
    sha = escape(row["content_sha256"] or "")
    sim = (
        '<p class="tag sim">Simulated output (the simulator, a test double): not model output.</p>'
        if row["simulated"]
        else ""
    )
    return f"""
<p><a href="{back}">&larr; all releases</a></p>
<h1>{escape(rid)}</h1>{sim}
<table>
<tr><th>Published (UTC)</th><td>{escape(row["created_at"][:19])}</td></tr>
<tr><th>Location</th><td><code>{escape(row["uri"] or "")}</code></td></tr>
<tr><th>Content sha256</th><td><code class="sha">{sha}</code></td></tr>
<tr><th>Parent release</th><td>{escape(row["parent_release_id"] or "none")}</td></tr>
<tr><th>Simulated</th><td>{"yes" if row["simulated"] else "no"}</td></tr>
<tr><th>Latest</th><td>{"yes" if row["latest"] else "no"}</td></tr>
<tr><th>Verify</th><td id="verify" data-url="{verify_url}">verifying&hellip;</td></tr>
</table>
<h2>Splits</h2><table><tr><th>Split</th><th>Rows</th><th>Files</th></tr>{splits}</table>
<h2>Report</h2><div class="plots">{plots or "no plots"}</div>
<h2>Dataset card (README.md)</h2><pre id="card">{escape(card)}</pre>
<script>{_VERIFY_JS}</script>
"""


# The verify status is fetched after the page renders: it re-reads every file of the release.
_VERIFY_JS = """
(async () => {
  const el = document.getElementById("verify");
  try {
    const r = await fetch(el.dataset.url, {credentials: "same-origin"});
    const v = await r.json();
    if (!r.ok) throw new Error(v.detail || r.status);
    el.className = v.ok ? "ok" : "bad";
    el.textContent = v.ok
      ? `verified: ${v.files_checked} files match the manifest`
      : `FAILED: ${v.problems.join("; ")}`;
  } catch (e) {
    el.className = "bad";
    el.textContent = `verify failed: ${e.message}`;
  }
})();
"""
