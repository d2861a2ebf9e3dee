"""The DAG on CeleryExecutor, as the Helm chart and compose's `celery` profile run it.

Real processes only: Redis as the broker, a Postgres metadata DB and result backend, the
api-server (workers run tasks through its execution API), a scheduler, two `airflow celery
worker` processes with names of their own, and the simulator as a subprocess.

One reference run on a single worker publishes a release (the second worker is up but not on
the queue yet). Then the lineage DB starts over (the bucket stays: release rows embed image
locations, so the same bucket and inputs must give the same content hash), the second worker
joins, and a second run goes out on both; while a `cot` task (the VLM rollouts, the stage with
the most requests) is mid-flight, its worker is SIGKILLed with its whole process tree, as if its
host was lost. The scheduler notices the missing task heartbeats, the task is retried on the
surviving worker, and the run publishes the same content hash without asking the simulator
again for an answer it had already recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.celery_cluster import CeleryCluster, TaskTry, celery_cluster
from tests.conftest import _admin, free_port
from tests.samples import upload_sample

pytestmark = [pytest.mark.celery, pytest.mark.airflow, pytest.mark.postgres, pytest.mark.s3]

COT = "shard_stages.cot"
CONF = {
    "source": "sources/sample/",
    "release_name": "celery",
    "allow_simulated": True,
    "k_rollouts": 4,
}
FAST_MS = 5.0  # simulator latency for undisturbed work
SLOW_MS = 300.0  # ...while the test waits for a cot task to be observably mid-flight
ANSWERED_BEFORE_KILL = 3  # cot answers recorded by the victim task before its worker dies


# -- the simulator as a process ------------------------------------------------------------------
class SimProcess:
    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def configure(self, **settings: object) -> None:
        self._call("/sim/config", settings)

    def reset(self) -> None:
        self._call("/sim/reset", {})

    def served_by_key(self) -> Counter[str]:
        return Counter(self._call("/sim/stats")["served_by_key"])


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[SimProcess]:
    port = free_port()
    log = (tmp_path / "sim.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lgt_ops.cli",
            "sim",
            "serve",
            "--port",
            str(port),
            "--latency-ms",
            str(FAST_MS),
            "--served-models",  # the connections name test-<role> models (the preflight checks)
            ",".join(f"test-{role}" for role in ("vlm", "llm", "reasoner")),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sim = SimProcess(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                sim._call("/health")
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("simulator did not start") from None
                time.sleep(0.3)
        yield sim
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


def lgt_connections(pg_url: str, s3_url: str, s3_endpoint: str, sim_url: str) -> dict[str, str]:
    """The lgt_* connections as compose and Helm define them (AIRFLOW_CONN_* JSON)."""
    user, hostdb = pg_url.split("://", 1)[1].split("@", 1)
    host, db = hostdb.split("/", 1)
    conns = {
        "lgt_s3": {
            "conn_type": "aws",
            "login": "testing",
            "password": "testing",
            "extra": {
                "endpoint_url": s3_endpoint,
                "region_name": "us-east-1",
                "bucket": s3_url.removeprefix("s3://"),
            },
        },
        "lgt_postgres": {
            "conn_type": "postgres",
            "login": user,
            "host": host.split(":")[0],
            "port": int(host.split(":")[1]),
            "schema": db,
        },
    }
    for role in ("vlm", "llm", "reasoner"):
        conns[f"lgt_{role}"] = {
            "conn_type": "openai",
            "host": f"{sim_url}/v1",
            "password": "not-a-secret",
            "extra": {"model": f"test-{role}", "max_inflight": 8},
        }
    return {k: json.dumps(v) for k, v in conns.items()}


# -- lineage DB reads ----------------------------------------------------------------------------
def _lineage(pg_url: str, sql: str, **params: object) -> list:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params))
    finally:
        engine.dispose()


def _release_hash(pg_url: str, version: str) -> str:
    rows = _lineage(
        pg_url,
        "SELECT content_sha256 FROM releases WHERE release_id = :r AND status = 'published'",
        r=f"celery/{version}",
    )
    assert len(rows) == 1, f"celery/{version} not published"
    return rows[0].content_sha256


def _answered(pg_url: str, map_index: int | None = None) -> list[str]:
    sql = "SELECT request_key FROM model_requests WHERE status = 'ok'"
    if map_index is None:
        return [r.request_key for r in _lineage(pg_url, sql)]
    sql += " AND task_id = :t AND map_index = :m"
    return [r.request_key for r in _lineage(pg_url, sql, t=COT, m=map_index)]


def _recreate(pg_url: str) -> None:
    """An empty lineage DB of the same name: the next run starts from nothing."""
    name = pg_url.rsplit("/", 1)[1]
    _admin(f"DROP DATABASE {name} WITH (FORCE)")
    _admin(f"CREATE DATABASE {name}")


def _kill_mid_cot(cluster: CeleryCluster, run_id: str, pg_url: str) -> TaskTry:
    """Wait for a running cot task with answers already recorded, then SIGKILL its worker."""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        state = cluster.run_state(run_id)
        assert state not in ("success", "failed"), f"run ended ({state}) before a cot task ran"
        for ti in cluster.task_tries(run_id):
            if ti.task_id != COT or ti.state != "running" or ti.hostname not in cluster.workers:
                continue
            if len(_answered(pg_url, ti.map_index)) >= ANSWERED_BEFORE_KILL:
                cluster.kill_worker(ti.hostname)
                return ti
        time.sleep(0.3)
    raise TimeoutError("no cot task observed mid-flight")


def test_dag_on_celery_two_workers_survives_a_killed_worker(
    tmp_path: Path, pg_url: str, s3_url: str, s3_endpoint: str, sim_process: SimProcess
):
    from lgt_ops.storage import S3Store

    upload_sample(S3Store(s3_url.removeprefix("s3://"), endpoint_url=s3_endpoint))
    conns = lgt_connections(pg_url, s3_url, s3_endpoint, sim_process.url)
    # 10 sample images in shards of 5: two shards; one retry per task for the killed one.
    extra = {"LGT_SHARD_SIZE": "5", "LGT_TASK_RETRIES": "1"}
    with celery_cluster(
        tmp_path / "cluster", conns, extra, workers={"worker-a": 2}, standby={"worker-b": 2}
    ) as cluster:
        # The reference: one worker runs everything (worker-b is up but not on the queue).
        single = cluster.trigger({**CONF, "release_version": "single"})
        assert cluster.wait_run(single) == "success", cluster.log_tail("scheduler")
        assert {t.hostname for t in cluster.task_tries(single)} == {"worker-a"}
        reference = _release_hash(pg_url, "single")
        reference_served = sim_process.served_by_key()

        # The same inputs from an empty lineage DB, on two workers; one dies mid-cot.
        _recreate(pg_url)
        sim_process.reset()
        sim_process.configure(latency_ms=SLOW_MS)
        cluster.join("worker-b")
        killed_run = cluster.trigger({**CONF, "release_version": "two-workers"})
        victim = _kill_mid_cot(cluster, killed_run, pg_url)
        answered_before = _answered(pg_url)
        sim_process.configure(latency_ms=FAST_MS)
        assert cluster.wait_run(killed_run) == "success", cluster.log_tail("scheduler")

        survivor = next(iter(cluster.workers))
        tries = cluster.task_tries(killed_run)
        # (a) the shards ran on both workers: shard tasks completed on each
        done = [t for t in tries if t.task_id.startswith("shard_stages.") and t.state == "success"]
        shard_hosts = {t.hostname for t in done}
        assert shard_hosts == {"worker-a", "worker-b"}, shard_hosts
        assert len({t.map_index for t in tries if t.task_id == COT}) == 2
        # (b) the killed try, then its retry on the other worker
        victim_tries = sorted(
            (t for t in tries if t.task_id == COT and t.map_index == victim.map_index),
            key=lambda t: t.try_number,
        )
        assert [(t.try_number, t.hostname) for t in victim_tries] == [
            (victim.try_number, victim.hostname),
            (victim.try_number + 1, survivor),
        ], victim_tries
        assert victim_tries[0].state == "failed" and victim_tries[-1].state == "success"
        assert _release_hash(pg_url, "two-workers") == reference

    # The same requests as the reference run, and none answered before the kill asked twice.
    served = sim_process.served_by_key()
    assert set(served) == set(reference_served)
    repeated = [k for k in answered_before if served[k[:32]] != reference_served[k[:32]]]
    assert answered_before and not repeated, f"{len(repeated)} answered requests sent again"
