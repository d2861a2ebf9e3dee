"""Status rows tell the truth: a SIGKILLed stage process leaves a `running` row that the next
attempt closes as `abandoned`; a failing stage is `failed` with its error; nothing stays
`running` (Postgres, the S3 server and the simulator; the stage runs through the real CLI)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, text

from lgt_ops.storage import S3Store
from tests import test_cli_failures
from tests.conftest import ROOT
from tests.samples import upload_sample
from tests.test_cli_failures import lgt

cli_env = test_cli_failures.cli_env  # the fixture, shared

SRC = ("--source", "sources/sample/")


pytestmark = [pytest.mark.postgres, pytest.mark.s3]


def _rows(db, table: str) -> list:
    with db.connect() as conn:
        return conn.execute(text(f"SELECT * FROM {table} ORDER BY started_at")).all()


def _wait_for_running(db, stage: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Until the stage's row is `running` and it has sent a request (mid-stage)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        with db.connect() as conn:
            running = conn.execute(
                text("SELECT COUNT(*) FROM stage_runs WHERE stage = :s AND status = 'running'"),
                {"s": stage},
            ).scalar_one()
        if running:
            return
        time.sleep(0.2)
    raise AssertionError(f"{stage} never started")


def test_sigkilled_stage_is_abandoned_by_the_next_attempt(
    cli_env,
    s3_url,
    s3_endpoint,
    pg_url,
    sim,
):
    store = S3Store(s3_url.removeprefix("s3://"), endpoint_url=s3_endpoint)
    upload_sample(store, "sources/sample/")
    assert lgt(cli_env, "ingest", *SRC).returncode == 0
    db = create_engine(pg_url)

    # A slow endpoint keeps the stage busy; kill -9 it in the middle.
    sim.sim.cfg.slots, sim.sim.cfg.latency_ms = 1, 2000.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "lgt_ops.cli", "mcq", *SRC],
        env=cli_env,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_running(db, "mcq", proc)
        served = sim.sim.served
        while sim.sim.served == served and proc.poll() is None:  # a request answered: mid-stage
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (killed,) = [r for r in _rows(db, "stage_runs") if r.stage == "mcq"]
    assert killed.status == "running"  # nothing could close it
    assert (killed.host, killed.pid) == (socket.gethostname(), proc.pid)
    (killed_run,) = [r for r in _rows(db, "pipeline_runs") if r.run_id == killed.run_id]
    assert killed_run.status == "running" and killed_run.pid == proc.pid

    # The next attempt (a new CLI run on this host) closes them, then does the work.
    sim.sim.cfg.slots, sim.sim.cfg.latency_ms = 64, 1.0
    again = lgt(cli_env, "mcq", *SRC)
    assert again.returncode == 0, again.stderr[-2000:]
    mcq = {r.run_id: r for r in _rows(db, "stage_runs") if r.stage == "mcq"}
    assert mcq[killed.run_id].status == "abandoned"
    assert f"process {socket.gethostname()}/{proc.pid} is gone" in mcq[killed.run_id].error_detail
    assert mcq[killed.run_id].finished_at is not None
    (fresh,) = [r for r in mcq.values() if r.run_id != killed.run_id]
    assert fresh.status == "success" and fresh.items_out > 0
    runs = {r.run_id: r.status for r in _rows(db, "pipeline_runs")}
    assert runs[killed.run_id] == "abandoned" and runs[fresh.run_id] == "success"

    # A stage that fails is `failed` with the error; its run too; nothing stays running.
    assert lgt(cli_env, "blind", *SRC).returncode == 0  # cot rolls out checked questions
    sim.sim.cfg.api_key = "the-right-key"
    refused = lgt(cli_env, "cot", *SRC, "--k-rollouts", "3", LGT_VLM_API_KEY="wrong")
    sim.sim.cfg.api_key = None
    (failed,) = [r for r in _rows(db, "stage_runs") if r.stage == "cot"]
    assert refused.returncode == 4 and failed.status == "failed"
    assert "refused credentials" in failed.error_detail
    failed_run = [r for r in _rows(db, "pipeline_runs") if r.run_id == failed.run_id][0]
    assert failed_run.status == "failed" and "refused credentials" in failed_run.error_detail
    for table in ("stage_runs", "pipeline_runs"):
        assert not [r for r in _rows(db, table) if r.status == "running"], table


_AIRFLOW_TRY = r"""
import sys
from lgt_ops.config import settings_from_env
from lgt_ops.params import RunParams
from lgt_ops.pipeline import run_stage
from lgt_ops.runctx import RunContext
from lgt_ops.stages.base import Shard, StageEnv

run = RunContext(sys.argv[1], "manual", "lgt_synthesis", "r1", "shard_stages.mcq", 0, 1)
env = StageEnv.open(settings_from_env(), run)
env.show_progress = False
run_stage(env, "mcq", RunParams.from_conf({"source": "sources/sample/"}), Shard(0, 1))
"""


def test_a_retry_on_another_host_supersedes_the_killed_try(
    cli_env, s3_url, s3_endpoint, pg_url, sim, monkeypatch
):
    """Rule 1 alone: the killed try's host is not this one, so its pid cannot be checked;
    another run leaves the row alone, the retry of the same task closes it."""
    from lgt_ops import liveness
    from lgt_ops.params import RunParams
    from lgt_ops.pipeline import run_stage
    from lgt_ops.runctx import RunContext
    from lgt_ops.stages.base import Shard, StageEnv
    from tests.conftest import make_settings

    store = S3Store(s3_url.removeprefix("s3://"), endpoint_url=s3_endpoint)
    upload_sample(store, "sources/sample/")
    assert lgt(cli_env, "ingest", *SRC).returncode == 0
    db = create_engine(pg_url)
    sim.sim.cfg.slots, sim.sim.cfg.latency_ms = 1, 2000.0
    killed_run = "airflow:lgt_synthesis:r1"
    proc = subprocess.Popen(
        [sys.executable, "-c", _AIRFLOW_TRY, killed_run],
        env=cli_env,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_running(db, "mcq", proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    sim.sim.cfg.slots, sim.sim.cfg.latency_ms = 64, 1.0

    monkeypatch.setattr(liveness, "_host", lambda: "worker-2")  # the retry runs elsewhere
    settings = make_settings(pg_url, s3_url, sim.base_url, s3_endpoint)
    params = RunParams.from_conf({"source": "sources/sample/"})

    def attempt(run_id: str, try_number: int):
        run = RunContext(
            run_id, "manual", "lgt_synthesis", run_id[-2:], "shard_stages.mcq", 0, try_number
        )
        env = StageEnv.open(settings, run)
        env.show_progress = False
        return run_stage(env, "mcq", params, Shard(0, 1))

    attempt("airflow:lgt_synthesis:r2", 1)  # another run: cannot judge worker-1's pid
    rows = {(r.run_id, r.attempt): r for r in _rows(db, "stage_runs") if r.stage == "mcq"}
    assert rows[(killed_run, 1)].status == "running"
    assert rows[("airflow:lgt_synthesis:r2", 1)].status == "success"

    attempt(killed_run, 2)  # the retry of the killed task
    rows = {(r.run_id, r.attempt): r for r in _rows(db, "stage_runs") if r.stage == "mcq"}
    assert rows[(killed_run, 1)].status == "abandoned"
    assert rows[(killed_run, 1)].error_detail == "superseded by a later attempt"
    assert rows[(killed_run, 2)].status == "success" and rows[(killed_run, 2)].host == "worker-2"
    assert not [r for r in rows.values() if r.status == "running"]
