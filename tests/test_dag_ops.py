"""The DAG as operators meet it: the trigger form and its validation (through Airflow's REST
API), the runbook, timeouts and the failure callback."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from lgt_ops.params import PARAM_SCHEMA, STAGES, TASK_TIMEOUT_MINUTES
from tests.conftest import ROOT

pytestmark = pytest.mark.airflow

RUNBOOK_SECTIONS = (
    "## Tasks",
    "## When a task fails",
    "**Endpoint down**",
    "**Auth refused**",
    "**Release exists**",
    "**Simulated output refused**",
    "**A stage incomplete**",
    "v_stage_funnel",
    "v_stage_rejections",
    "## Re-running after a prompt change",
)


def _dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors
    return bag.get_dag("lgt_synthesis")


def test_dag_has_runbook_description_and_timeouts(airflow_db):
    from lgt_ops.airflow_adapter import on_failure

    dag = _dag()
    assert dag.description and "release" in dag.description
    assert dag.dagrun_timeout == timedelta(hours=72)
    for section in RUNBOOK_SECTIONS:
        assert section in dag.doc_md, section
    for task in dag.tasks:
        assert task.execution_timeout is not None, task.task_id
        assert task.execution_timeout <= timedelta(hours=6), task.task_id
        assert task.on_failure_callback in (on_failure, [on_failure]), task.task_id
        short = task.task_id.rsplit(".", 1)[-1]
        assert f"`{'shard_stages.' + short if '.' in task.task_id else short}`" in dag.doc_md
    timeouts = {t.task_id: t.execution_timeout for t in dag.tasks}
    assert timeouts["start"] == timeouts["finish"] == timedelta(minutes=10)
    assert timeouts["shard_stages.expand"] == timedelta(hours=6)
    # the runbook's task table states the same timeouts
    rows = re.findall(r"^\| `(?:shard_stages\.)?(\w+)`.*\| (\d+) (min|h) \|$", dag.doc_md, re.M)
    stated = {task: int(n) * (60 if unit == "h" else 1) for task, n, unit in rows}
    assert stated == TASK_TIMEOUT_MINUTES


def test_every_form_field_has_a_title_and_description_and_stages_is_a_multi_select(airflow_db):
    params = _dag().params
    for name in PARAM_SCHEMA:
        param = params.get_param(name)
        assert param.schema.get("title"), name
        assert param.description, name
    stages = params.get_param("stages").schema
    # What Airflow's form renders as a multi-select: an array with top-level examples
    # (FieldSelector.isFieldMultiSelect); items.enum makes the API refuse anything else.
    assert stages["type"] == "array" and stages["examples"] == list(STAGES)
    assert stages["items"]["enum"] == list(STAGES) and stages["uniqueItems"]


@pytest.fixture
def api(airflow_db, monkeypatch):
    """Airflow's REST API app (the one the api-server serves), with the DAG synced to the DB."""
    from airflow.api_fastapi.app import create_app
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from fastapi.testclient import TestClient

    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(DagBag(dag_folder=str(ROOT / "dags")), "dags-folder", None)
    with TestClient(create_app("core")) as client:
        yield client


def _run_ids(api) -> set[str]:
    runs = api.get("/api/v2/dags/lgt_synthesis/dagRuns", params={"limit": 1000}).json()
    return {r["dag_run_id"] for r in runs["dag_runs"]}


def _trigger(api, conf):
    return api.post("/api/v2/dags/lgt_synthesis/dagRuns", json={"logical_date": None, "conf": conf})


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"k_rollouts": 0}, "parameter 'k_rollouts': 0 is less than the minimum of 1"),
        ({"stages": ["mcq", "train"]}, "parameter 'stages': 'train' is not one of"),
        ({"release_name": "Bad Name!"}, "parameter 'release_name': 'Bad Name!' does not match"),
        ({"dry_run": "yes"}, "parameter 'dry_run': 'yes' is not of type 'boolean'"),
        ({"k_rollout": 4}, "unknown parameter 'k_rollout'"),
        (
            {"llm_base_url": "http://vllm-0:8000/v1, vllm-1:8000/v1"},
            "parameter 'llm_base_url': 'vllm-1:8000/v1' is not an http(s) URL",
        ),
        (
            {"release_version": "v1", "stages": ["mcq"]},
            "parameter 'release_version': set, but the 'release' stage is not selected",
        ),
        ({"compose_operators": []}, "parameter 'compose_operators': [] should be non-empty"),
        (
            {"trace_min_chars": 900, "trace_max_chars": 300},
            "trace_min_chars (900) must be below trace_max_chars (300)",
        ),
    ],
)
def test_the_rest_trigger_refuses_a_bad_conf_with_a_readable_message(api, conf, message):
    before = _run_ids(api)
    answer = _trigger(api, conf)
    assert answer.status_code == 400, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith("Invalid run parameters: ") and message in detail
    assert "Failed validating" not in detail and "\n" not in detail  # no schema dump
    assert _run_ids(api) == before  # no run was created


def test_a_valid_trigger_passes_the_guard_untouched(api):
    conf = {"source": "sources/docci/", "stages": ["ingest", "mcq"], "dry_run": True,
            "llm_base_url": "http://vllm-0:8000/v1,http://vllm-1:8000/v1"}  # replicas
    answer = _trigger(api, conf)
    assert answer.status_code == 200, answer.text
    assert answer.json()["conf"] == conf and answer.json()["state"] == "queued"
    run_id = answer.json()["dag_run_id"]
    assert api.delete(f"/api/v2/dags/lgt_synthesis/dagRuns/{run_id}").status_code == 204


def _backfill(api, conf, dry_run: bool = False):
    body = {
        "dag_id": "lgt_synthesis",
        "from_date": "2025-01-02T00:00:00Z",
        "to_date": "2025-01-03T00:00:00Z",
        "dag_run_conf": conf,
    }
    return api.post("/api/v2/backfills" + ("/dry_run" if dry_run else ""), json=body)


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"k_rollout": 4}, "unknown parameter 'k_rollout'"),
        ({"k_rollouts": 0}, "parameter 'k_rollouts': 0 is less than the minimum of 1"),
        ({"trace_min_chars": 900, "trace_max_chars": 300}, "trace_min_chars (900) must be below"),
    ],
)
def test_a_backfill_with_a_bad_conf_is_refused_with_the_same_message(api, conf, message):
    for dry_run in (True, False):
        answer = _backfill(api, conf, dry_run)
        assert answer.status_code == 400, answer.text
        detail = answer.json()["detail"]
        assert detail.startswith("Invalid run parameters: ") and message in detail
    listed = api.get("/api/v2/backfills", params={"dag_id": "lgt_synthesis"}).json()
    assert listed["backfills"] == []  # nothing was created


def test_a_valid_backfill_conf_passes_the_guard(api):
    answer = _backfill(api, {"stages": ["ingest"], "dry_run": True}, dry_run=True)
    assert answer.status_code == 200, answer.text
    assert answer.json()["total_entries"] >= 1


def test_the_guard_leaves_authentication_to_airflow(api, monkeypatch):
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    with TestClient(create_app("core")) as anonymous:
        for conf in ({"k_rollout": 4}, {"k_rollouts": 0}, {}):
            assert _trigger(anonymous, conf).status_code == 401, conf
            assert _backfill(anonymous, conf).status_code == 401, conf


def test_an_unknown_key_fails_start_and_the_callback_logs_one_line(airflow_db, caplog, capfd):
    """Past the API (dag.test, the CLI, a plugin-less api-server), Airflow keeps conf keys that
    are not params (SerializedParamsDict.deep_merge adds them without a schema): `start`
    refuses them, naming the key."""
    run = _dag().test(run_conf={"k_rollout": 4})
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert states["start"].endswith("failed"), states
    logged = caplog.text + "".join(capfd.readouterr())
    lines = [line for line in logged.splitlines() if "LGT task failed:" in line]
    assert any(
        "task=start" in line and "ParamsError: unknown parameter 'k_rollout'" in line
        for line in lines
    ), lines
