"""Airflow runs fail fast on what a retry cannot fix, and retry what it can (real dag.test()
runs against Postgres, the S3 server and the simulator, with retries switched on)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import text

from tests import test_dag
from tests.conftest import free_port
from tests.samples import upload_sample
from tests.test_dag import _dag

connections = test_dag.connections  # the fixture, shared

pytestmark = pytest.mark.airflow


def _dag_with_retries(monkeypatch, retries: int):
    """The DAG as parsed with LGT_TASK_RETRIES=retries, retry delays cut to a second."""
    monkeypatch.setenv("LGT_TASK_RETRIES", str(retries))
    dag = _dag()
    for task in dag.tasks:
        assert task.retries == retries
        task.retry_delay = timedelta(seconds=1)
    return dag


def _task_instances(run) -> dict[str, tuple[str, int]]:
    """task_id[map_index] -> (state, try_number) of a finished run."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id).all()
        return {
            ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else ""): (
                str(ti.state).rsplit(".", 1)[-1].lower(),
                ti.try_number,
            )
            for ti in tis
        }


def _state(run) -> str:
    return str(run.state).rsplit(".", 1)[-1].lower()


def _no_running_rows(db) -> None:
    with db.connect() as conn:
        for table in ("pipeline_runs", "stage_runs"):
            n = conn.execute(
                text(f"SELECT COUNT(*) FROM {table} WHERE status = 'running'")
            ).scalar_one()
            assert n == 0, table


def _run_failed_on_first_try(run, db) -> None:
    tis = _task_instances(run)
    assert _state(run) == "failed"
    assert tis["start"] == ("failed", 1)  # retries=2, yet one try: not retried
    assert tis["finish"][0] == "failed"  # the run is failed, not "success" via its last task
    assert all(
        state == "upstream_failed" for t, (state, _) in tis.items() if t not in ("start", "finish")
    ), tis
    with db.connect() as conn:
        row = conn.execute(text("SELECT status, error_detail FROM pipeline_runs")).one()
    assert row.status == "failed" and "start" in row.error_detail
    _no_running_rows(db)


@pytest.mark.parametrize(
    "conf",
    [
        {"release_version": "v1", "stages": ["ingest", "mcq"]},  # no 'release' stage
        {"trace_min_chars": 900, "trace_max_chars": 300},  # knobs a stage refuses together
    ],
)
def test_impossible_parameters_fail_on_the_first_try(airflow_db, connections, monkeypatch, conf):
    dag = _dag_with_retries(monkeypatch, 2)
    run = dag.test(run_conf=conf)
    _run_failed_on_first_try(run, connections["db"])


def test_unknown_key_is_refused_or_fails_on_the_first_try(airflow_db, connections, monkeypatch):
    from airflow.sdk.exceptions import ParamValidationError

    dag = _dag_with_retries(monkeypatch, 2)
    try:
        run = dag.test(run_conf={"k_rollout": 4})  # a typo of k_rollouts
    except ParamValidationError as exc:  # refused by the trigger form's schema
        assert "k_rollout" in str(exc)
        return
    _run_failed_on_first_try(run, connections["db"])


def test_endpoint_down_is_retried_and_recorded(airflow_db, connections, monkeypatch):
    store, db, sim = connections["store"], connections["db"], connections["sim"]
    upload_sample(store, "sources/sample/")
    # The LLM endpoint answers the preflight, then goes down (503) before mcq's first request.
    sim.sim.cfg.down_after_served = 0
    monkeypatch.setenv(
        "AIRFLOW_CONN_LGT_LLM",
        json.dumps(
            {
                "conn_type": "openai",
                "host": sim.base_url,
                "password": "not-a-secret",
                "extra": {"model": "test-llm", "down_after_s": 1},
            }
        ),
    )
    dag = _dag_with_retries(monkeypatch, 1)
    run = dag.test(run_conf={"source": "sources/sample/", "stages": ["ingest", "mcq"]})

    tis = _task_instances(run)
    assert _state(run) == "failed"
    assert tis["preflight"] == ("success", 1)
    assert tis["shard_stages.mcq[0]"] == ("failed", 2)  # transient: tried again
    assert tis["start"] == ("success", 1) and tis["finish"][0] == "failed"
    with db.connect() as conn:
        attempts = conn.execute(
            text(
                "SELECT attempt, status, error_detail FROM stage_runs WHERE stage = 'mcq'"
                " ORDER BY attempt"
            )
        ).all()
        run_row = conn.execute(text("SELECT status, error_detail FROM pipeline_runs")).one()
    assert [(a.attempt, a.status) for a in attempts] == [(1, "failed"), (2, "failed")]
    assert all(
        "llm endpoint" in a.error_detail and "for more than 1s" in a.error_detail
        for a in attempts
    )
    assert run_row.status == "failed"
    assert "shard_stages.mcq" in run_row.error_detail and "llm endpoint" in run_row.error_detail
    _no_running_rows(db)


def test_an_unreachable_endpoint_fails_the_preflight_which_is_retried(
    airflow_db, connections, monkeypatch
):
    db = connections["db"]
    dead = {"conn_type": "openai", "host": f"http://127.0.0.1:{free_port()}/v1"}
    monkeypatch.setenv("AIRFLOW_CONN_LGT_LLM", json.dumps(dead))
    dag = _dag_with_retries(monkeypatch, 1)
    run = dag.test(run_conf={"stages": ["ingest", "mcq"]})

    tis = _task_instances(run)
    assert tis["preflight"] == ("failed", 2)  # transient: the server may still be starting
    assert tis["scan"][0] == "upstream_failed" and tis["finish"][0] == "failed"
    with db.connect() as conn:
        row = conn.execute(text("SELECT role, status, problem FROM endpoint_preflight")).one()
    assert (row.role, row.status) == ("llm", "down") and "does not answer" in row.problem
    _no_running_rows(db)


def test_a_run_that_ended_without_finish_is_closed_by_the_next(
    airflow_db, connections, monkeypatch
):
    store, db = connections["store"], connections["db"]
    upload_sample(store, "sources/sample/")
    dag = _dag_with_retries(monkeypatch, 0)
    conf = {"source": "sources/sample/", "stages": ["ingest"]}
    first = dag.test(run_conf=conf, mark_success_pattern="finish")  # as if finish never ran
    with db.connect() as conn:
        (left,) = conn.execute(text("SELECT run_id, status FROM pipeline_runs")).all()
    assert left.status == "running" and left.run_id.endswith(first.run_id)

    second = dag.test(run_conf=conf)
    assert _state(second) == "success"
    with db.connect() as conn:
        rows = {
            r.run_id: r
            for r in conn.execute(
                text("SELECT run_id, status, error_detail FROM pipeline_runs")
            ).all()
        }
    assert rows[left.run_id].status == "abandoned"
    assert "Airflow run ended" in rows[left.run_id].error_detail
    assert [r.status for k, r in rows.items() if k != left.run_id] == ["success"]
    _no_running_rows(db)
