"""A real Airflow deployment on CeleryExecutor for tests, all on this machine.

Postgres metadata DB (a throwaway database) and Celery result backend in that same database,
Redis (127.0.0.1:6379) as the broker with a queue of the test's own, the api-server (the
workers run tasks through its execution API), one scheduler, and as many `airflow celery
worker` processes as the test starts. The DAG folder is parsed once with `airflow dags
reserialize` (no dag-processor: nothing in the test edits the DAG). Every process runs in its
own process group and is stopped, with whatever it forked, when the context exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from tests.airflow_server import (
    JWT_SECRET,
    ApiServer,
    airflow_process,
    api_server,
    kill_tree,
    python_path,
    stop_all,
)
from tests.conftest import ROOT, _admin, free_port
from tests.pg import database_url

REDIS_URL = os.environ.get("LGT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DAG_ID = "lgt_synthesis"
_ENDED = ("success", "failed")


def redis_ping(url: str = REDIS_URL) -> None:
    """Fail with the way to start Redis when the broker is not there."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.exceptions.ConnectionError as exc:
        raise RuntimeError(
            f"Redis is not answering on {url} ({exc}); `make services` starts it"
        ) from exc


def _drop_queue(url: str, queue: str) -> None:
    """Remove what the test left in Redis: its queue, bindings and unacked messages (those of
    a SIGKILLed worker stay unacknowledged until the visibility timeout)."""
    import redis

    r = redis.Redis.from_url(url)
    for key in r.scan_iter(match=f"*{queue}*"):
        r.delete(key)
    for key in r.scan_iter(match="_kombu.binding.*"):  # the workers' control (pidbox) queues
        for member in r.smembers(key):
            if queue.encode() in member:
                r.srem(key, member)
    for tag, payload in r.hscan_iter("unacked"):
        try:
            routing_key = json.loads(payload)[2]
        except (ValueError, IndexError):
            continue
        if routing_key == queue:
            r.hdel("unacked", tag)
            r.zrem("unacked_index", tag)


def _run(args: list[str], env: dict[str, str], cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "airflow", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, f"airflow {' '.join(args)}:\n{output}"


@dataclass
class TaskTry:
    task_id: str
    map_index: int
    try_number: int
    state: str | None
    hostname: str | None


@dataclass
class CeleryCluster:
    workdir: Path
    env: dict[str, str]
    api: ApiServer | None
    metadata_url: str
    stack: ExitStack
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)  # all but the api-server

    # -- processes ------------------------------------------------------------------------------
    @property
    def queue(self) -> str:
        return self.env["AIRFLOW__OPERATORS__DEFAULT_QUEUE"]

    def node(self, name: str) -> str:
        """The worker's Celery node name: unique to this cluster, as its queue is."""
        return f"{name}@{self.queue}"

    def start_worker(
        self, name: str, concurrency: int = 1, wait: bool = True, standby: bool = False
    ) -> None:
        """`airflow celery worker` named `name`: its Celery node name and the hostname its task
        instances record (tests.hostname). A standby worker listens on a queue nobody sends
        to until `join` (it can start while another one runs a reference alone)."""
        env = {**self.env, "LGT_TEST_HOSTNAME": name}
        args = [
            "celery",
            "worker",
            "--celery-hostname",
            self.node(name),
            "--concurrency",
            str(concurrency),
            "--queues",
            f"{self.queue}-standby" if standby else self.queue,
            "--pid",
            str(self.workdir / f"{name}.pid"),
            "--skip-serve-logs",  # two workers on one machine would race for its port
            "--without-mingle",
            "--without-gossip",
        ]
        log = self.workdir / f"{name}.log"
        self.workers[name] = self.stack.enter_context(airflow_process(args, env, log))
        self.procs.append(self.workers[name])
        if wait:
            self.wait_worker(name)

    def wait_worker(self, name: str) -> None:
        """Until the worker consumes from the queue ("ready." in its log)."""
        log = self.workdir / f"{name}.log"
        deadline = time.monotonic() + 120
        while "ready." not in log.read_text(errors="replace"):
            if self.workers[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start:\n{self.log_tail(name)}")
            time.sleep(0.5)

    def join(self, name: str) -> None:
        """Make a standby worker consume the DAG's queue (Celery's add_consumer control
        command; it answers once the worker consumes)."""
        from celery import Celery

        app = Celery(broker=REDIS_URL)
        try:
            replies = app.control.add_consumer(
                self.queue, destination=[self.node(name)], reply=True, timeout=30
            )
        finally:
            app.close()
        assert replies and "ok" in next(iter(replies[0].values())), replies

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and everything it forked (its task runners included)."""
        kill_tree(self.workers.pop(name))

    def log_tail(self, name: str, chars: int = 4000) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-chars:]

    # -- the REST API ---------------------------------------------------------------------------
    @property
    def server(self) -> ApiServer:
        assert self.api is not None, "the api-server is not up yet"
        return self.api

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.server.url}{path}",
            data=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self.server.token()}",
            },
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def create_pools(self, pools_json: Path = ROOT / "deploy" / "pools.json") -> None:
        for name, pool in json.loads(pools_json.read_text()).items():
            self._post("/api/v2/pools", {"name": name, **pool})

    def trigger(self, conf: dict[str, Any]) -> str:
        run_id = f"manual__{uuid.uuid4().hex[:12]}"
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf}
        self._post(f"/api/v2/dags/{DAG_ID}/dagRuns", body)
        return run_id

    # -- the metadata DB ------------------------------------------------------------------------
    def _query(self, sql: str, **params: Any) -> list[Any]:
        engine = create_engine(self.metadata_url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(sql), params))
        finally:
            engine.dispose()

    def run_state(self, run_id: str) -> str | None:
        rows = self._query("SELECT state FROM dag_run WHERE run_id = :r", r=run_id)
        return rows[0].state if rows else None

    def wait_run(self, run_id: str, timeout_s: float = 240.0) -> str:
        deadline = time.monotonic() + timeout_s
        while (state := self.run_state(run_id)) not in _ENDED:
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {state} after {timeout_s} s")
            for name, proc in self.workers.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {name} exited:\n{self.log_tail(name)}")
            time.sleep(1)
        return state

    def task_tries(self, run_id: str) -> list[TaskTry]:
        """Every try of every task instance of the run: the current one (task_instance) and
        the earlier ones Airflow moved to task_instance_history."""
        sql = (
            "SELECT task_id, map_index, try_number, state, hostname FROM {table}"
            " WHERE dag_id = :d AND run_id = :r"
        )
        rows = []
        for table in ("task_instance", "task_instance_history"):
            rows += self._query(sql.format(table=table), d=DAG_ID, r=run_id)
        return [TaskTry(*row) for row in rows]


def metadata_env(workdir: Path, metadata_url: str, queue: str) -> dict[str, str]:
    """The environment every Airflow process of the cluster shares (but the api-server URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN"))}
    backend = metadata_url.replace("postgresql+psycopg2://", "db+postgresql://")
    env.update(
        {
            "AIRFLOW_HOME": str(workdir / "airflow"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__CELERY__BROKER_URL": REDIS_URL,
            "AIRFLOW__CELERY__RESULT_BACKEND": backend,
            "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",  # no process pool in the scheduler
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,  # nobody else's worker takes our tasks
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.hostname.from_env",
            "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # A task whose worker died stops heartbeating: the scheduler fails that try after
            # this many seconds (300 by default) and, with retries left, queues the next one.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "10",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
            # Caps every retry delay (the DAG's is 1 minute, doubling) at one second.
            "AIRFLOW__CORE__MAX_TASK_RETRY_DELAY": "1",
            "LGT_SCHEDULE": "",  # triggered runs only
            "PYTHONPATH": python_path(dict(os.environ)),
        }
    )
    return env


@contextmanager
def celery_cluster(
    workdir: Path,
    connections: dict[str, str],
    extra_env: dict[str, str] | None = None,
    workers: dict[str, int] | None = None,
    standby: dict[str, int] | None = None,
) -> Iterator[CeleryCluster]:
    """A migrated metadata DB, the DAG parsed, pools created, the api-server, the scheduler,
    `workers` and `standby` workers (name -> concurrency) up; the test may start more.
    Everything is stopped and dropped on exit."""
    redis_ping()
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"lgt_af_{uuid.uuid4().hex[:10]}"
    queue = f"lgt-test-{uuid.uuid4().hex[:10]}"
    _admin(f"CREATE DATABASE {name}")
    metadata_url = database_url(name)
    port = free_port()
    env = metadata_env(workdir, metadata_url, queue)
    env.update(extra_env or {})
    env.update({f"AIRFLOW_CONN_{k.upper()}": v for k, v in connections.items()})
    env["AIRFLOW__API__BASE_URL"] = f"http://127.0.0.1:{port}"
    env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"http://127.0.0.1:{port}/execution/"
    try:
        with ExitStack() as stack:
            _run(["db", "migrate"], env, workdir)
            _run(["dags", "reserialize"], env, workdir)
            # Scheduler and workers start while the api-server does (they need it only once a
            # task runs): on two cores that is most of the setup time.
            scheduler = ["scheduler", "--skip-serve-logs"]
            cluster = CeleryCluster(workdir, env, None, metadata_url, stack)
            cluster.procs.append(
                stack.enter_context(airflow_process(scheduler, env, workdir / "scheduler.log"))
            )
            for worker, concurrency in (workers or {}).items():
                cluster.start_worker(worker, concurrency, wait=False)
            for worker, concurrency in (standby or {}).items():
                cluster.start_worker(worker, concurrency, wait=False, standby=True)
            cluster.api = stack.enter_context(
                api_server(workdir, connections, env, role="admin", port=port)
            )
            cluster.create_pools()
            for worker in {**(workers or {}), **(standby or {})}:
                cluster.wait_worker(worker)
            try:
                yield cluster
            finally:
                stop_all(cluster.procs)  # together: each takes seconds to shut down
    finally:
        _drop_queue(REDIS_URL, queue)
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
