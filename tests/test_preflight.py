"""The endpoint preflight, against the simulator started as each misconfigured server: the run
fails first, with one line, before any stage request is sent; a correct configuration passes
and its table is stored with the run; `lgt endpoints check` and a DAG run fail the same way."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from lgt_ops import failures
from lgt_ops.llm.errors import EndpointAuthError
from lgt_ops.llm.preflight import PreflightFailed
from tests import test_dag
from tests.conftest import ROOT, free_port
from tests.release_checks import run_pipeline
from tests.samples import upload_sample

connections = test_dag.connections  # the lgt_* Airflow connections fixture, shared

# mode (simulator settings) -> the role that fails and words of its one-line message
MISCONFIGURED = {
    "model missing": ({"served_models": "some/other-model"}, "vlm", ["does not serve model",
                      "LGT_VLM_MODEL", "some/other-model"]),
    "no image input": ({"modality": "text"}, "vlm", ["does not take image input",
                       "At most 0 image(s)"]),
    "no thinking": ({"thinking": "none"}, "reasoner", ["without thinking",
                    "LGT_REASONER_MODEL"]),
    "small context": ({"max_model_len": 4096}, "llm", ["context of 4096 tokens", "mcq stage",
                      "--max-model-len"]),
    "no guided decoding": ({"structured_output": "ignored"}, "vlm", [
                           "response_format json_schema) is not honoured",
                           "--guided-decoding-backend"]),
    "bad_words refused": ({"bad_words": "rejected"}, "reasoner", ["refuses vLLM's bad_words",
                          "expand_bad_words"]),
}  # fmt: skip


def _stored(env) -> dict[str, dict]:
    with env.db.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM endpoint_preflight WHERE run_id = :r"), {"r": env.run.run_id}
        )
        return {r.role: dict(r._mapping) for r in rows}


@pytest.mark.parametrize("mode", list(MISCONFIGURED))
def test_a_misconfigured_endpoint_fails_the_run_first_in_one_line(local_env, sim, mode):
    settings, role, words = MISCONFIGURED[mode]
    env = local_env
    upload_sample(env.store, "sources/sample/")
    for key, value in settings.items():
        setattr(sim.sim.cfg, key, value)

    with pytest.raises(PreflightFailed) as caught:
        run_pipeline(env)

    line = caught.value.line()
    assert line == str(caught.value)  # one line already
    assert line.startswith(f"preflight: {role} endpoint {sim.base_url}")
    assert all(word in line for word in words), line
    assert sim.sim.received == 0  # no stage sent anything ...
    assert sum(sim.sim.probes.values()) <= 3  # ... only the checks, one per role
    stored = _stored(env)
    assert set(stored) == {"vlm", "llm", "reasoner"}
    assert stored[role]["status"] == "failed" and stored[role]["problem"] in line
    with env.db.connect() as conn:
        run = conn.execute(text("SELECT status, error_detail FROM pipeline_runs")).one()
        assert conn.execute(text("SELECT COUNT(*) FROM images")).scalar_one() == 0
    assert run.status == "failed" and "preflight" in run.error_detail


def test_a_correct_configuration_passes_and_its_table_is_stored(local_env, sim, capsys):
    from lgt_ops.params import RunParams
    from lgt_ops.summary import print_summary

    env = local_env
    upload_sample(env.store, "sources/sample/")
    sim.sim.cfg.split_reasoning = True  # a reasoner served with its reasoning parser
    summary = run_pipeline(env, sample_size=2, release_version="v1")

    stored = _stored(env)
    assert {r: row["status"] for r, row in stored.items()} == dict.fromkeys(
        ("vlm", "llm", "reasoner"), "ok"
    )
    caps = {r: json.loads(row["capabilities"]) for r, row in stored.items()}
    assert caps["vlm"] == {"model_listed": True, "image": "data_url", "json_schema": True}
    assert caps["llm"] == {"model_listed": True, "json_schema": True}
    assert caps["reasoner"] == {
        "model_listed": True,
        "thinking": "reasoning_content",
        "bad_words": True,  # expand sends vLLM's bad_words (the simulator honours them)
    }
    assert stored["vlm"]["stages"] == "annotate,cot,cot2"
    assert stored["reasoner"]["stages"] == "expand"
    assert stored["llm"]["stages"] == "mcq,blind,compose"
    for row in stored.values():
        assert row["endpoint"] == sim.base_url and row["server_version"]
        assert row["max_model_len"] == 32768 and 0 < row["needed_tokens"] <= 32768
        assert row["latency_ms"] is not None and row["problem"] is None
    with env.db.connect() as conn:  # expand used the separated thinking
        thinking = conn.execute(text("SELECT reasoning_content FROM expansions")).scalars().all()
    assert any(thinking)  # (the simulator leaves a few replies unparseable on purpose)

    print_summary(env, RunParams(), summary)
    out = capsys.readouterr().out
    assert "endpoints (preflight)" in out and "thinking=reasoning_content" in out


def test_a_replica_down_at_preflight_is_a_warning_and_the_run_completes_on_the_other(
    local_env, sim, capsys, caplog
):
    from lgt_ops.params import RunParams
    from lgt_ops.summary import print_summary

    env = local_env
    upload_sample(env.store, "sources/sample/")
    dead = f"http://127.0.0.1:{free_port()}/v1"  # a replica being restarted: nobody listens
    with caplog.at_level(logging.WARNING, logger="lgt_ops.llm.preflight"):
        summary = run_pipeline(env, sample_size=2, llm_base_url=f"{sim.base_url},{dead}")

    with env.db.connect() as conn:
        rows = conn.execute(
            text("SELECT role, endpoint, status, problem FROM endpoint_preflight")
        ).all()
        run = conn.execute(text("SELECT status FROM pipeline_runs")).scalar_one()
        questions = conn.execute(text("SELECT COUNT(*) FROM questions")).scalar_one()
    llm = {r.endpoint: (r.status, r.problem) for r in rows if r.role == "llm"}
    assert llm[sim.base_url] == ("ok", None)
    assert llm[dead][0] == "down" and "does not answer" in llm[dead][1]
    assert {r.status for r in rows if r.role != "llm"} == {"ok"}
    assert run == "success" and questions > 0  # the llm stages ran on the live replica
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(dead in w and w.startswith("warning: preflight: llm endpoint") for w in warned)

    print_summary(env, RunParams(), summary)
    out = capsys.readouterr().out
    assert f"warning: preflight: llm endpoint {dead} does not answer" in out


def test_without_a_reasoning_parser_the_thinking_is_read_inline(sim):
    from lgt_ops.llm import preflight
    from tests.conftest import make_settings

    settings = make_settings("sqlite://", "file:///unused", sim.base_url)
    report = preflight.check(settings, ["expand"])  # the simulator's default: no parser
    (row,) = report.checks
    assert report.ok and row.capabilities["thinking"] == "inline"
    assert sim.sim.received == 0 and sim.sim.probes == {"200": 1}

    sim.sim.cfg.api_key = "the-right-key"  # credentials refused: permanent, exit 4
    with pytest.raises(EndpointAuthError, match="reasoner endpoint .* refused credentials"):
        preflight.check(settings, ["expand"]).raise_if_failed()


def test_bad_words_refused_fails_naming_it_and_an_empty_list_sends_none(sim):
    from lgt_ops.llm import preflight
    from tests.conftest import make_settings

    settings = make_settings("sqlite://", "file:///unused", sim.base_url)
    sim.sim.cfg.bad_words = "rejected"  # a server that refuses the field with a 400
    report = preflight.check(settings, ["expand"])
    (row,) = report.checks
    assert row.status == "failed" and row.capabilities["bad_words"] is False
    assert "bad_words=no" in preflight.format_table(report.rows())
    with pytest.raises(PreflightFailed, match="refuses vLLM's bad_words.*expand_bad_words"):
        report.raise_if_failed()

    report = preflight.check(settings.with_method(expand_bad_words=()), ["expand"])
    assert report.ok and "bad_words" not in report.checks[0].capabilities
    assert sim.sim.received == 0


def test_structured_output_ignored_fails_every_role_that_relies_on_it(sim):
    from lgt_ops.llm import preflight
    from tests.conftest import make_settings

    settings = make_settings("sqlite://", "file:///unused", sim.base_url)
    sim.sim.cfg.structured_output = "ignored"  # no guided decoding: prose comes back
    report = preflight.check(settings, ["annotate", "mcq", "cot", "expand"])
    status = {c.role: (c.status, c.capabilities.get("json_schema")) for c in report.checks}
    assert status == {"vlm": ("failed", False), "llm": ("failed", False), "reasoner": ("ok", None)}
    line = report.failure_line()
    assert line.count("is not honoured") == 2 and "\n" not in line
    # Stages that do not ask for a schema do not need one.
    assert preflight.check(settings, ["cot", "expand"]).ok


@pytest.mark.s3
def test_the_vlm_probe_sends_its_image_as_a_presigned_url_when_configured(sim, s3_url, s3_endpoint):
    from lgt_ops.config import ImageSpec
    from lgt_ops.llm import preflight
    from lgt_ops.storage import store_from_settings
    from tests.conftest import make_settings

    settings = make_settings("sqlite://", s3_url, sim.base_url, s3_endpoint)
    settings = settings.model_copy(update={"image_spec": ImageSpec(transport="presigned_url")})
    store = store_from_settings(settings)
    report = preflight.check(settings, ["cot"], store)
    assert report.ok and report.checks[0].capabilities["image"] == "presigned_url"
    assert store.get(preflight.PROBE_IMAGE_KEY) == preflight.probe_png()

    sim.sim.cfg.modality = "text"
    line = preflight.check(settings, ["cot"], store).failure_line()
    assert "does not take image input" in line and "presigned URLs reachable" in line


def _lgt(sim_url: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LGT_")}
    base.update(PYTHONPATH=str(ROOT), LGT_DATA_DIR=str(tmp_path / "lgt"))
    for role in ("VLM", "LLM", "REASONER"):
        base[f"LGT_{role}_BASE_URL"] = sim_url
    return subprocess.run(
        [sys.executable, "-m", "lgt_ops.cli", "endpoints", "check", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
    )


def test_lgt_endpoints_check_prints_the_table_and_fails_in_one_line(sim, tmp_path):
    ok = _lgt(sim.base_url, tmp_path)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].split()[:3] == ["role", "endpoint", "model"]
    assert [line.split()[0] for line in lines[2:]] == ["vlm", "llm", "reasoner"]
    assert all(line.split()[-1] == "ok" for line in lines[2:])

    bad = _lgt(sim.base_url, tmp_path, "--stages", "mcq", LGT_LLM_MODEL="not/served")
    assert bad.returncode == failures.EXIT_USAGE
    assert [line.split()[0] for line in bad.stdout.splitlines()[2:]] == ["llm"]
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith(f"lgt: preflight: llm endpoint {sim.base_url} does not serve model")
    assert "'not/served'" in line and "LGT_LLM_MODEL" in line

    dead = f"http://user:secret@127.0.0.1:{free_port()}/v1"  # nobody listening: transient
    down = _lgt(sim.base_url, tmp_path, "--stages", "expand", LGT_REASONER_BASE_URL=dead)
    assert down.returncode == failures.EXIT_ENDPOINT_DOWN
    (line,) = down.stderr.strip().splitlines()
    assert "reasoner endpoint http://127.0.0.1:" in line and "does not answer" in line
    assert "secret" not in line + down.stdout  # credentials never shown
    assert sim.sim.received == 0


@pytest.mark.airflow
def test_a_dag_run_with_a_misconfigured_endpoint_fails_at_preflight_on_the_first_try(
    airflow_db, connections, monkeypatch
):
    from tests.test_dag_failures import _dag_with_retries, _state, _task_instances

    store, db, sim = connections["store"], connections["db"], connections["sim"]
    upload_sample(store, "sources/sample/")
    sim.sim.cfg.modality = "text"  # the VLM endpoint serves a text-only model
    dag = _dag_with_retries(monkeypatch, 2)
    run = dag.test(run_conf={"source": "sources/sample/", "stages": ["ingest", "annotate"]})

    tis = _task_instances(run)
    assert _state(run) == "failed"
    assert tis["start"] == ("success", 1)
    assert tis["preflight"] == ("failed", 1)  # retries=2, yet one try: not retried
    assert tis["scan"][0] == "upstream_failed" and tis["finish"][0] == "failed"
    assert sim.sim.received == 0
    with db.connect() as conn:
        (row,) = conn.execute(text("SELECT * FROM endpoint_preflight")).all()
        run_row = conn.execute(text("SELECT run_id, status FROM pipeline_runs")).one()
    assert (row.role, row.status, row.run_id) == ("vlm", "failed", run_row.run_id)
    assert "does not take image input" in row.problem and run_row.status == "failed"
