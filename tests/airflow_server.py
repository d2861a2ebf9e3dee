"""Real Airflow processes for tests: `airflow api-server` (SimpleAuthManager with one password
user, the metadata DB of the test session, this checkout's plugins, and given connections), and
any other long-running `airflow` command (scheduler, celery worker) in its own process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.conftest import ROOT, free_port

SIMPLE_AUTH = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
START_TIMEOUT_S = 180.0
# Every component that issues or checks task tokens (scheduler, api-server) shares this secret.
JWT_SECRET = "lgt-page-test-secret"


@dataclass(frozen=True)
class ApiServer:
    url: str
    username: str
    password: str
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def token(self) -> str:
        """A JWT from the auth manager's own token endpoint (what the login page posts to)."""
        body = json.dumps({"username": self.username, "password": self.password}).encode()
        req = urllib.request.Request(
            f"{self.url}/auth/token",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())["access_token"]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_all(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM to each process's own group (they fork workers) at once, SIGKILL to those that
    linger, then SIGKILL to whatever of their trees is left (Airflow's task runners sit in
    process groups of their own, so a group signal misses them)."""
    trees = {proc.pid: _tree(proc.pid) for proc in procs}
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for tree in trees.values():
        for child in tree:
            with suppress(psutil.NoSuchProcess):
                child.kill()


def _stop(proc: subprocess.Popen) -> None:
    stop_all([proc])


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant at once: what losing its host looks like."""
    tree = _tree(proc.pid)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait(timeout=10)


def python_path(env: dict[str, str]) -> str:
    """This checkout first on PYTHONPATH (DAG imports, the plugin, tests.* helpers)."""
    return os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)


@contextmanager
def airflow_process(
    args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen]:
    """`airflow <args>` in its own process group (stdout+stderr to `log`), stopped on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow", *args],
            env=env,
            cwd=cwd or log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stopping it reaches its workers
        )
    try:
        yield proc
    finally:
        _stop(proc)


@contextmanager
def api_server(
    workdir: Path,
    connections: dict[str, str],
    extra_env: dict[str, str] | None = None,
    role: str = "viewer",
    port: int | None = None,
) -> Iterator[ApiServer]:
    """Start the API server (the metadata DB must be migrated already); stop it on exit.
    The one user has `role` (viewer, user, op, admin); `port` defaults to a free one."""
    workdir.mkdir(parents=True, exist_ok=True)
    user, password = "alice", "lgt-page-test"
    passwords = workdir / "passwords.json"
    passwords.write_text(json.dumps({user: password}))
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ.copy()
    env.update(
        {
            "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{user}:{role}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__API__BASE_URL": url,
            "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
            "PYTHONPATH": python_path(env),
        }
    )
    env.update(extra_env or {})
    for conn_id, value in connections.items():
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = value
    args = ["api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with airflow_process(args, env, workdir / "api-server.log", cwd=workdir) as proc:
        log = workdir / "api-server.log"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"api-server did not start:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield ApiServer(url, user, password, log)
