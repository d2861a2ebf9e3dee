"""The Airflow DAG: parses cheaply and cleanly, and runs end to end with dag.test() against
Postgres, the S3 server and the simulator, through the lgt_* Airflow connections."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, text

from tests import release_checks as checks
from tests.conftest import ROOT, make_settings
from tests.samples import upload_sample

pytestmark = pytest.mark.airflow

_PARSE_CHECK = r"""
import json, sys, time
from airflow.sdk import Connection
def _no_lookups(*a, **k):
    raise AssertionError("connection looked up at parse time")
Connection.get = classmethod(_no_lookups)
import sqlalchemy.engine
_connect = sqlalchemy.engine.Engine.connect
def _no_connect(self, *a, **k):
    if "airflow" not in str(self.url):
        raise AssertionError(f"database opened at parse time: {self.url}")
    return _connect(self, *a, **k)
sqlalchemy.engine.Engine.connect = _no_connect
from airflow.dag_processing.dagbag import DagBag
t = time.monotonic()
bag = DagBag(dag_folder=sys.argv[1])
heavy = [m for m in ("pyarrow", "openai", "aiohttp", "lgt_ops.pipeline", "lgt_ops.stages.base")
         if m in sys.modules]
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "dags": sorted(bag.dag_ids), "seconds": time.monotonic() - t, "heavy": heavy}))
"""


def test_dag_folder_parses_cleanly_and_cheaply(airflow_db):
    out = subprocess.run(
        [sys.executable, "-c", _PARSE_CHECK, str(ROOT / "dags")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    assert "lgt_synthesis" in report["dags"]
    assert report["heavy"] == []  # no pyarrow/openai/engine imports at parse time


def _dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors
    return bag.get_dag("lgt_synthesis")


@pytest.fixture
def connections(monkeypatch, pg_url, s3_url, s3_endpoint, sim):
    """The lgt_* Airflow connections, as AIRFLOW_CONN_* variables (as in compose and Helm)."""
    bucket = s3_url.removeprefix("s3://")
    monkeypatch.setenv(
        "AIRFLOW_CONN_LGT_S3",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {
                    "endpoint_url": s3_endpoint,
                    "region_name": "us-east-1",
                    "bucket": bucket,
                },
            }
        ),
    )
    user_host = pg_url.split("://", 1)[1]
    user, hostdb = user_host.split("@", 1)
    host, db = hostdb.split("/", 1)
    monkeypatch.setenv(
        "AIRFLOW_CONN_LGT_POSTGRES",
        json.dumps(
            {
                "conn_type": "postgres",
                "login": user,
                "host": host.split(":")[0],
                "port": int(host.split(":")[1]),
                "schema": db,
            }
        ),
    )
    for role in ("vlm", "llm", "reasoner"):
        monkeypatch.setenv(
            f"AIRFLOW_CONN_LGT_{role.upper()}",
            json.dumps(
                {
                    "conn_type": "openai",
                    "host": sim.base_url,
                    "password": "not-a-secret",
                    "extra": {"model": f"test-{role}", "max_inflight": 16},
                }
            ),
        )
    # The simulator serves exactly these names (GET /v1/models, checked by the preflight).
    sim.sim.cfg.served_models = ",".join(f"test-{role}" for role in ("vlm", "llm", "reasoner"))
    for var in ("LGT_DATABASE_URL", "LGT_STORE_URL"):
        monkeypatch.delenv(var, raising=False)
    from lgt_ops.storage import S3Store

    store = S3Store(bucket, endpoint_url=s3_endpoint)
    settings = make_settings(pg_url, s3_url, sim.base_url, s3_endpoint)
    return {"store": store, "db": create_engine(pg_url), "sim": sim, "settings": settings}


def _counts(db) -> dict[str, int]:
    with db.connect() as conn:
        return {
            t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
            for t in ("images", "questions", "model_requests", "annotations", "rejections",
                      "rollouts", "expansions", "trace_verdicts", "pairs", "question_parents",
                      "question_checks")
        }


def test_dag_runs_end_to_end_and_twice_is_free(airflow_db, connections, tmp_path):
    store, db, sim = connections["store"], connections["db"], connections["sim"]
    upload_sample(store, "sources/sample/")
    dag = _dag()
    conf = {
        "source": "sources/sample/",
        "release_name": "dagtest",
        "allow_simulated": True,
        "release_version": "r1",
    }
    run = dag.test(run_conf=conf)
    assert str(run.state) in ("success", "DagRunState.SUCCESS"), run.state

    first = _counts(db)
    assert first["images"] == 10 and first["questions"] > 0
    with db.connect() as conn:
        ledger = conn.execute(
            text("SELECT dag_id, run_id, task_id, served_model FROM model_requests")
        ).all()
        release = conn.execute(
            text(
                "SELECT content_sha256, status, simulated FROM releases"
                " WHERE release_id = 'dagtest/r1'"
            )
        ).one()
        stage_runs = {r[0] for r in conn.execute(text("SELECT DISTINCT stage FROM stage_runs"))}
        run_status = conn.execute(text("SELECT status FROM pipeline_runs")).scalar_one()
    assert {r.dag_id for r in ledger} == {"lgt_synthesis"}
    model_stages = {"annotate", "mcq", "blind", "cot", "compose", "cot2", "expand"}
    assert {r.task_id for r in ledger} == {f"shard_stages.{s}" for s in model_stages}
    assert all(r.run_id.startswith("airflow:lgt_synthesis:") for r in ledger)
    assert {r.served_model for r in ledger} == {
        f"lgt-simulator:test-{role}" for role in ("vlm", "llm", "reasoner")
    }
    assert release.status == "published" and release.simulated
    assert {"scan", "ingest", "filter", "pairs"} | model_stages <= stage_runs
    assert run_status == "success"
    manifest = json.loads(store.get("releases/dagtest/r1/manifest.json"))
    parts = [f"releases/dagtest/r1/{f['path']}" for f in manifest["splits"]["questions"]["files"]]
    rows = [r for p in parts for r in pq.read_table(io.BytesIO(store.get(p))).to_pylist()]
    with db.connect() as conn:  # current: stage 1 past the blind check, stage 2 harden kept
        kept = conn.execute(text(
            "SELECT COUNT(*) FROM questions q JOIN question_checks c"
            " ON c.question_id = q.question_id AND c.kept"
            " WHERE (q.stage = 1 AND c.stage = 'blind') OR (q.stage = 2 AND c.stage = 'harden')"
        )).scalar_one()
    assert 0 < len(rows) == kept < first["questions"]
    # The image travels with the release: its bytes (its content id), no bucket path.
    assert all(hashlib.sha256(r["image"]["bytes"]).hexdigest() == r["image_id"] for r in rows)
    assert not any("/" in r["image"]["path"] for r in rows)

    # The method's invariants, read back as a trainer and an auditor would.
    local = checks.download(store, "releases/dagtest/r1", tmp_path / "r1")
    splits = checks.load_splits(local)
    checks.check_splits(splits)
    checks.check_composition(db)
    checks.check_rejections(db)
    for name in ("sft_stage1", "sft_stage2"):
        row = splits[name].remove_columns(["images"])[0]
        checks.check_sft_lineage(db, "dagtest/r1", row)
        hops = checks.walk_lineage(db, "dagtest/r1", row["row_id"])
        assert hops["expansion"][0].task_id == "shard_stages.expand"

    served = sim.sim.served
    conf["release_version"] = "r2"
    again = dag.test(run_conf=conf)
    assert str(again.state) in ("success", "DagRunState.SUCCESS")
    assert sim.sim.served == served  # no new model request
    assert _counts(db) == first  # no duplicate rows
    with db.connect() as conn:
        hashes = (
            conn.execute(
                text("SELECT content_sha256 FROM releases WHERE name='dagtest' ORDER BY version")
            )
            .scalars()
            .all()
        )
    assert hashes == [release.content_sha256] * 2


def test_invalid_params_are_refused(airflow_db):
    from airflow.sdk.exceptions import ParamValidationError

    dag = _dag()
    with pytest.raises(ParamValidationError, match="k_rollouts"):
        dag.test(run_conf={"k_rollouts": 0})


def _image_of_request(conn, key: str) -> set[str]:
    """The images a ledger request worked for, through whatever it produced."""
    sql = (
        "SELECT image_id FROM annotations WHERE request_key = :k"
        " UNION SELECT image_id FROM questions WHERE request_key = :k"
        " UNION SELECT q.image_id FROM rollouts r JOIN questions q"
        "   ON q.question_id = r.question_id WHERE r.request_key = :k"
        " UNION SELECT q.image_id FROM expansions e JOIN questions q"
        "   ON q.question_id = e.question_id WHERE e.request_key = :k"
        " UNION SELECT q.image_id FROM question_checks c JOIN questions q"
        "   ON q.question_id = c.question_id WHERE c.request_key = :k"
        " UNION SELECT image_id FROM rejections WHERE request_key = :k"
    )
    return {r[0] for r in conn.execute(text(sql), {"k": key}) if r[0]}


def test_nightly_refresh_pays_only_for_new_images(airflow_db, connections):
    from lgt_ops.release.manage import diff, verify
    from lgt_ops.runctx import RunContext
    from lgt_ops.stages.base import StageEnv
    from tests.samples import new_photos

    store, db, sim = connections["store"], connections["db"], connections["sim"]
    upload_sample(store, "sources/sample/")
    dag = _dag()
    conf = {"source": "sources/sample/", "release_name": "nightly", "allow_simulated": True,
            "release_version": "n1", "k_rollouts": 4}
    assert str(dag.test(run_conf=conf).state).endswith(("success", "SUCCESS"))
    with db.connect() as conn:
        before = set(conn.execute(text("SELECT request_key FROM model_requests")).scalars())

    new_ids = new_photos(store, "sources/sample/images/")
    served = sim.sim.served
    conf["release_version"] = "n2"
    assert str(dag.test(run_conf=conf).state).endswith(("success", "SUCCESS"))
    with db.connect() as conn:
        after = set(conn.execute(text("SELECT request_key FROM model_requests")).scalars())
        fresh = after - before
        assert fresh and sim.sim.served - served == len(fresh)  # all new work, none repeated
        for key in fresh:  # ... and every new call was for one of the two new images
            assert _image_of_request(conn, key) <= new_ids, key
            assert _image_of_request(conn, key), key

    env = StageEnv.open(connections["settings"], RunContext("inspect"))
    d = diff(env, "nightly/n1", "nightly/n2")
    assert all(not ids for ids in d.removed.values())
    with db.connect() as conn:
        members = conn.execute(text(
            "SELECT split, row_id, image_id FROM release_members WHERE release_id = 'nightly/n2'"
        )).all()
    expected: dict[str, set[str]] = {}
    for m in members:
        if m.image_id in new_ids:
            expected.setdefault(m.split, set()).add(m.row_id)
    assert expected.get("questions") and expected.get("sft_stage1")
    assert {s: set(ids) for s, ids in d.added.items() if ids} == expected
    assert verify(env, "nightly/n2").ok


VALID_FORMS = [
    {},
    {"source": "s3://other-bucket/docci/", "stages": ["ingest", "mcq", "release"],
     "sample_size": 500, "k_rollouts": 16, "release_name": "docci-v2", "dry_run": True},
    {"vlm_model": "Qwen/Qwen2.5-VL-72B-Instruct", "vlm_base_url": "http://vllm-vlm:8000/v1",
     "reasoner_model": "deepseek-ai/DeepSeek-R1", "behaviour_tagger": "llm",
     "release_version": "2026.11.25-a"},
]
INVALID_FORMS = [
    ({"k_rollouts": 0}, "k_rollouts"),
    ({"sample_size": -5}, "sample_size"),
    ({"stages": ["mcq", "train"]}, "stages"),
    ({"stages": []}, "stages"),
    ({"release_name": "Bad Name!"}, "release_name"),
    ({"release_version": "../escape"}, "release_version"),
    ({"dry_run": "yes"}, "dry_run"),
    ({"behaviour_tagger": "gpt"}, "behaviour_tagger"),
]


@pytest.mark.parametrize("conf", VALID_FORMS)
def test_trigger_form_accepts_valid_params(airflow_db, conf):
    from lgt_ops.params import RunParams

    params = copy.deepcopy(_dag().params)
    for key, value in conf.items():
        params[key] = value  # the form's own validation (Airflow Param + JSON schema)
    params.validate()
    run = RunParams.from_conf(conf)  # what the tasks re-validate
    assert run.k_rollouts == conf.get("k_rollouts", 10)


@pytest.mark.parametrize(("conf", "name"), INVALID_FORMS)
def test_trigger_form_refuses_invalid_params_naming_them(airflow_db, conf, name):
    from airflow.sdk.exceptions import ParamValidationError

    from lgt_ops.params import ParamsError, RunParams

    params = copy.deepcopy(_dag().params)
    with pytest.raises(ParamValidationError, match=name):
        for key, value in conf.items():
            params[key] = value
    with pytest.raises(ParamsError, match=f"parameter '{name}'"):
        RunParams.from_conf(conf)


def test_library_refuses_what_spans_fields_and_unknown_keys():
    from lgt_ops.params import ParamsError, RunParams

    with pytest.raises(ParamsError, match="'release' stage is not selected"):
        RunParams.from_conf({"release_version": "v1", "stages": ["mcq"]})
    with pytest.raises(ParamsError, match="unknown parameter 'k_rollout'"):
        RunParams.from_conf({"k_rollout": 4})


_LINEAGE_CHECK = r"""
import json
from airflow.sdk.lineage import get_hook_lineage_collector
from lgt_ops.airflow_adapter import report_lineage
report_lineage(["s3://bucket/sources/docci/"], ["s3://bucket/releases/lgt/v1"])
got = get_hook_lineage_collector().collected_assets
print(json.dumps({"in": [a.asset.uri for a in got.inputs],
                  "out": [a.asset.uri for a in got.outputs]}))
"""


@pytest.mark.parametrize("configured", [True, False])
def test_openlineage_edges_when_the_provider_is_configured(airflow_db, configured):
    import os

    env = dict(os.environ)
    env.pop("AIRFLOW__OPENLINEAGE__TRANSPORT", None)
    if configured:
        env["AIRFLOW__OPENLINEAGE__TRANSPORT"] = json.dumps({"type": "console"})
    out = subprocess.run([sys.executable, "-c", _LINEAGE_CHECK], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    edges = json.loads(out.stdout.strip().splitlines()[-1])
    if configured:
        assert edges == {"in": ["s3://bucket/sources/docci"],
                         "out": ["s3://bucket/releases/lgt/v1"]}
    else:  # no provider configuration: a no-op, never an error
        assert edges == {"in": [], "out": []}
