"""OpenLineage events of a real DAG run carry dataset edges: the source prefix into scan and
ingest, the lineage DB tables each task writes, the release location out of release."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.samples import upload_sample
from tests.test_dag import connections  # noqa: F401  (the lgt_* Airflow connections)

pytestmark = pytest.mark.airflow

_RUN = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=sys.argv[1]).get_dag("lgt_synthesis")
print("STATE", dag.test(run_conf=json.loads(sys.argv[2])).state)
"""


def _events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _edges(events: list[dict], task: str, kind: str) -> set[tuple[str, str]]:
    """(namespace, name) of the datasets of the task's COMPLETE events (every map index)."""
    return {
        (d["namespace"], d["name"])
        for e in events
        if e["eventType"] == "COMPLETE" and e["job"]["name"] == f"lgt_synthesis.{task}"
        for d in e.get(kind, [])
    }


def test_events_name_the_source_prefix_tables_and_release(airflow_db, connections, tmp_path):  # noqa: F811
    store, settings = connections["store"], connections["settings"]
    upload_sample(store, "sources/sample/")
    log = tmp_path / "openlineage.jsonl"
    env = dict(os.environ)
    env["AIRFLOW__OPENLINEAGE__TRANSPORT"] = json.dumps(
        {"type": "file", "log_file_path": str(log), "append": True}
    )
    env["AIRFLOW__OPENLINEAGE__NAMESPACE"] = "lgt-test"
    conf = {
        "source": "sources/sample/",
        "release_name": "oltest",
        "release_version": "r1",
        "allow_simulated": True,
        "k_rollouts": 2,
        "sample_size": 4,
    }
    out = subprocess.run(
        [sys.executable, "-c", _RUN, str(ROOT / "dags"), json.dumps(conf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert "STATE success" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]

    events = _events(log)
    bucket = store.bucket
    from sqlalchemy.engine import make_url

    db = make_url(settings.database_url)
    pg = f"postgres://{db.host}:{db.port}"

    def table(name: str) -> tuple[str, str]:
        return (pg, f"{db.database}.public.{name}")

    source = (f"s3://{bucket}", "sources/sample")
    assert source in _edges(events, "scan", "inputs")
    assert table("sources") in _edges(events, "scan", "outputs")
    assert source in _edges(events, "ingest", "inputs")
    assert {table("images"), table("annotations")} <= _edges(events, "ingest", "outputs")
    assert table("questions") in _edges(events, "shard_stages.mcq", "outputs")
    assert table("rollouts") in _edges(events, "shard_stages.expand", "inputs")
    assert table("expansions") in _edges(events, "shard_stages.expand", "outputs")
    release_out = _edges(events, "release", "outputs")
    assert (f"s3://{bucket}", "releases/oltest/r1") in release_out
    assert table("releases") in release_out
    assert table("pairs") in _edges(events, "release", "inputs")
    # no credentials in any dataset name
    datasets = [d for e in events for d in e.get("inputs", []) + e.get("outputs", [])]
    assert datasets and not any("@" in d["namespace"] for d in datasets)


def test_dataset_names_carry_no_credentials_and_skip_sqlite():
    from lgt_ops.lineage_edges import TASK_TABLES, location_uri, table_uri, task_edges

    url = "postgresql+psycopg2://lgt:s3cret@db.internal:6543/lineage?sslmode=require"
    assert table_uri(url, "questions") == "postgres://db.internal:6543/lineage/public/questions"
    assert table_uri("postgresql://lgt@db/lineage", "pairs") == (
        "postgres://db:5432/lineage/public/pairs"
    )
    assert table_uri("sqlite:////tmp/lineage.db", "questions") is None
    assert location_uri("s3://bucket/sources/docci/") == "s3://bucket/sources/docci"
    assert location_uri("file:///") == "file:///"
    inputs, outputs = task_edges("expand", "sqlite:///x.db", "s3://b/sources/")
    assert (inputs, outputs) == ([], [])  # no source read, no nameable table
    inputs, outputs = task_edges("release", url, "s3://b/sources/", ("s3://b/releases/x/1",))
    assert inputs[0] == "s3://b/sources" and outputs[0] == "s3://b/releases/x/1"
    assert not any("s3cret" in u for u in inputs + outputs)
    assert set(TASK_TABLES) >= {"scan", "ingest", "release", "annotate", "tag"}


def test_every_task_that_reports_lineage_has_its_edges():
    """Each stage task reports its edges after its work: a stage missing from TASK_TABLES
    would fail the task at the end (KeyError), so every registry stage is listed."""
    from lgt_ops import registry
    from lgt_ops.lineage_edges import READS_SOURCE, TASK_TABLES

    assert set(TASK_TABLES) == {"scan", *registry.stage_names()}
    assert set(TASK_TABLES) >= READS_SOURCE
    for reads, writes in TASK_TABLES.values():
        assert writes or reads, "a task with no dataset edge"
