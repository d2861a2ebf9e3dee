"""The DAG as operators meet it: the trigger form and its validation (through Airflow's REST
API), the runbook, timeouts and the failure callback."""

from __future__ import annotations

from datetime import timedelta

import pytest

from lgt_ops.params import PARAM_SCHEMA, STAGES
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


def _trigger(api, conf):
    return api.post("/api/v2/dags/lgt_synthesis/dagRuns", json={"logical_date": None, "conf": conf})


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"k_rollouts": 0}, "param k_rollouts: 0 is less than the minimum of 1"),
        ({"stages": ["mcq", "train"]}, "param stages: 'train' is not one of"),
        ({"release_name": "Bad Name!"}, "param release_name: 'Bad Name!' does not match"),
        ({"dry_run": "yes"}, "param dry_run: 'yes' is not of type 'boolean'"),
    ],
)
def test_the_rest_trigger_refuses_a_bad_value(api, conf, message):
    answer = _trigger(api, conf)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["detail"]


def test_an_unknown_key_fails_start_and_the_callback_logs_one_line(airflow_db, caplog, capfd):
    """Airflow's trigger accepts conf keys that are not params (SerializedParamsDict.deep_merge
    adds them without a schema), so `start` refuses them, naming the key."""
    run = _dag().test(run_conf={"k_rollout": 4})
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert states["start"].endswith("failed"), states
    logged = caplog.text + "".join(capfd.readouterr())
    lines = [line for line in logged.splitlines() if "LGT task failed:" in line]
    assert any(
        "task=start" in line and "ParamsError: unknown parameter 'k_rollout'" in line
        for line in lines
    ), lines
