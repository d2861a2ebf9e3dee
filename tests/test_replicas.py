"""A role's endpoint as several replicas, against two simulators over HTTP: requests are spread
over both; a replica killed mid-run is ejected and the run completes with every answered
request recorded once and never asked again; the replica is probed back in when it returns;
with every replica down the task fails with one line naming them; the preflight checks each
replica, tolerates one that is down and fails on one that is misconfigured; a replica that
comes back serving the wrong model (or too small a context) is kept out; the settings take the
list from the environment and the Airflow connection."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from sqlalchemy import text

from lgt_ops.config import EndpointSettings, settings_from_env
from lgt_ops.db import make_engine, upgrade
from lgt_ops.llm import preflight
from lgt_ops.llm.engine import RequestEngine
from lgt_ops.llm.errors import EndpointDown
from lgt_ops.llm.ledger import Ledger
from lgt_ops.llm.needs import role_needs
from lgt_ops.llm.simulator import BackgroundSimulator, SimConfig
from lgt_ops.runctx import RunContext
from tests.conftest import make_settings
from tests.test_engine import ledger_rows, req


@pytest.fixture
def ledger(sqlite_url):
    db = make_engine(sqlite_url)
    upgrade(db)
    return Ledger(db, RunContext("replicas", dag_id="d", task_id="t"), "bench")


@pytest.fixture
def pair():
    """Two simulator replicas of model "m", each serving 16 requests at a time for 20 ms."""
    config = SimConfig(slots=16, latency_ms=20, served_models="m")
    sims = [BackgroundSimulator(config.model_copy()).start() for _ in range(2)]
    yield sims
    for s in sims:
        s.stop()


def endpoint(sims, **kw) -> EndpointSettings:
    base = {
        "role": "llm",
        "base_url": [s.base_url for s in sims],
        "model": "m",
        "max_inflight": 8,
        "adaptive": False,
        "timeout_s": 5.0,
        "max_attempts": 6,
    }
    return EndpointSettings(**(base | kw))


def served(sims) -> Counter:
    """Answers delivered per request key (key prefix), over every replica."""
    total: Counter = Counter()
    for s in sims:
        total.update(s.sim.served_by_key)
    return total


def assert_each_answered_once(sims, ledger, outs, n: int) -> None:
    assert len(outs) == n and all(o.ok for o in outs)
    assert len({o.request.key for o in outs}) == n  # every request, each once
    by_key = served(sims)
    twice = {k for k, c in by_key.items() if c > 1}
    detail = [
        (o.replica, o.attempts, o.transient_errors, o.error_detail, o.latency_ms,
         [s.sim.served_by_key.get(o.request.key[:32]) for s in sims])
        for o in outs if o.request.key[:32] in twice
    ]  # fmt: skip
    assert len(by_key) == n and not twice, detail
    rows = ledger_rows(ledger)
    assert len(rows) == n and {r["status"] for r in rows.values()} == {"ok"}
    assert {k[:32] for k in rows} == set(by_key)


def test_requests_are_spread_over_both_replicas(pair, ledger):
    engine = RequestEngine(endpoint(pair), ledger)
    outs = list(engine.run(req(i) for i in range(300)))
    ledger.flush_now()
    assert_each_answered_once(pair, ledger, outs, 300)
    a, b = (s.sim.served for s in pair)
    assert min(a, b) >= 100, (a, b)  # least outstanding: both take a real share
    assert all(s.sim.max_inflight_seen <= 8 for s in pair)  # each within its own window
    assert {o.replica for o in outs} == {s.base_url for s in pair}


def test_a_replica_killed_mid_run_is_ejected_then_probed_back(pair, ledger):
    dead, live = pair
    engine = RequestEngine(endpoint(pair), ledger)
    engine._backoff = lambda n: 0.05
    replica = engine.pool.replicas[0]
    outs, served_at_revival = [], None
    for out in engine.run(req(i) for i in range(800)):
        outs.append(out)
        ledger.flush_now()  # what a stage commits as it goes
        if len(outs) == 150:
            dead.crash()  # requests in flight on it are cut: they go to the other replica
        if len(outs) == 350:
            assert not replica.up and replica.ejections == 1
            served_at_revival = dead.sim.served
            dead.revive()
    ledger.flush_now()
    assert_each_answered_once(pair, ledger, outs, 800)
    assert replica.up and replica.readmissions >= 1
    assert dead.sim.served > served_at_revival  # probed back in, and used again
    assert live.sim.served > dead.sim.served


def test_all_replicas_down_fails_in_one_line_naming_them_and_the_retry_resumes(pair, ledger):
    engine = RequestEngine(endpoint(pair, down_after_s=0.5), ledger)
    engine._backoff = lambda n: 0.05
    requests = [req(i) for i in range(200)]
    got = 0
    with pytest.raises(EndpointDown) as caught:
        for _ in engine.run(requests):
            got += 1
            ledger.flush_now()
            if got == 40:
                for s in pair:
                    s.crash()
    line = str(caught.value)
    assert "\n" not in line and "llm endpoint replicas" in line and "unreachable" in line
    assert all(s.base_url in line for s in pair), line
    ledger.flush_now()
    answered = {k[:32] for k, r in ledger_rows(ledger).items() if r["status"] == "ok"}
    assert answered and answered == set(served(pair))  # answered = recorded
    for s in pair:
        s.revive()
    outs = list(RequestEngine(endpoint(pair), ledger).run(requests))
    ledger.flush_now()
    assert all(o.ok for o in outs) and sum(o.cached for o in outs) == len(answered)
    assert set(served(pair).values()) == {1}  # nothing answered was asked again


def test_one_replica_is_the_same_path(pair, ledger):
    engine = RequestEngine(endpoint(pair[:1]), ledger)
    assert len(engine.pool.replicas) == 1
    outs = list(engine.run(req(i) for i in range(50)))
    ledger.flush_now()
    assert_each_answered_once(pair[:1], ledger, outs, 50)
    pair[0].crash()
    engine = RequestEngine(endpoint(pair[:1], down_after_s=0.3), ledger)
    engine._backoff = lambda n: 0.05
    with pytest.raises(EndpointDown, match=r"^llm endpoint http\S+ unreachable"):
        list(engine.run([req(1000)]))


# -- settings and the preflight ----------------------------------------------------------------
def test_replicas_from_the_environment_and_the_airflow_connection(monkeypatch):
    env = {"LGT_LLM_BASE_URL": "http://a:8000/v1/, http://b:8000/v1,http://a:8000/v1"}
    ep = settings_from_env(env).endpoint("llm")
    assert ep.urls == ("http://a:8000/v1", "http://b:8000/v1")
    assert [r.urls for r in ep.replicas()] == [("http://a:8000/v1",), ("http://b:8000/v1",)]
    assert settings_from_env({}).endpoint("llm").urls == ()

    from lgt_ops.airflow_adapter import settings_from_airflow

    extra = {"model": "x", "base_urls": ["http://vllm-0:8000/v1", "http://vllm-1:8000/v1"]}
    monkeypatch.setenv(
        "AIRFLOW_CONN_LGT_LLM",
        json.dumps({"conn_type": "openai", "host": "http://ignored:1/v1", "extra": extra}),
    )
    ep = settings_from_airflow(settings_from_env({})).endpoint("llm")
    assert ep.urls == tuple(extra["base_urls"]) and ep.model == "x"


def test_the_helm_charts_replica_lists_are_what_the_settings_read(monkeypatch):
    """The Secret the Helm chart renders for in-chart vLLM StatefulSets (3 reasoner pods, 1 VLM
    pod) gives the same replica URLs through the Airflow connections as through LGT_* env."""
    import yaml

    from lgt_ops.airflow_adapter import settings_from_airflow
    from tests.conftest import ROOT
    from tests.gotemplate import Chart

    chart_dir = ROOT / "helm" / "lgt-etl"
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    values["vllm"]["enabled"] = True
    for m in values["vllm"]["models"]:
        m["replicas"] = 3 if m["role"] == "reasoner" else 1
    secret = yaml.safe_load(Chart(chart_dir).render("connections-secret.yaml", values))
    data = secret["stringData"]
    from_env = settings_from_env(data)
    for role in ("vlm", "llm", "reasoner"):
        monkeypatch.setenv(
            f"AIRFLOW_CONN_LGT_{role.upper()}", data[f"AIRFLOW_CONN_LGT_{role.upper()}"]
        )
    from_conn = settings_from_airflow(settings_from_env({}))
    pods = "http://lgt-lgt-etl-vllm-reasoner-{}.lgt-lgt-etl-vllm-reasoner-headless.lgt.svc.cluster.local:8000/v1"
    assert from_conn.endpoint("reasoner").urls == tuple(pods.format(i) for i in range(3))
    for role in ("vlm", "llm", "reasoner"):
        assert from_conn.endpoint(role).urls == from_env.endpoint(role).urls, role
        assert len(from_conn.endpoint(role).replicas()) == (3 if role == "reasoner" else 1)


def _llm_on(settings, sims, **kw):
    """The settings with the llm role on these replicas, each serving its configured model."""
    model = settings.endpoint("llm").model
    for s in sims:
        s.sim.cfg.served_models = model
    eps = {**settings.endpoints, "llm": endpoint(sims, model=model, **kw)}
    return settings.model_copy(update={"endpoints": eps})


def test_the_preflight_checks_every_replica(pair, tmp_path, sqlite_url):
    settings = _llm_on(make_settings(sqlite_url, (tmp_path / "store").as_uri()), pair)
    report = preflight.check(settings, ["mcq"])
    assert [(c.role, c.endpoint, c.status) for c in report.checks] == [
        ("llm", s.base_url, "ok") for s in pair
    ]
    assert all(s.sim.probes["200"] == 1 for s in pair)  # each replica got its probe

    db = make_engine(sqlite_url)
    upgrade(db)
    with db.begin() as conn:
        conn.execute(text("INSERT INTO pipeline_runs (run_id, run_type) VALUES ('r', 'test')"))
    preflight.record(db, "r", report)
    rows = preflight.stored(db, "r")  # one row per replica (role, endpoint)
    assert [r["endpoint"] for r in rows] == sorted(s.base_url for s in pair)

    assert set(role_needs(settings, ["mcq"])) == {"llm"}


def test_a_replica_down_at_preflight_is_a_warning_all_down_is_transient(
    pair, tmp_path, sqlite_url, caplog
):
    settings = _llm_on(make_settings(sqlite_url, (tmp_path / "store").as_uri()), pair)
    pair[1].crash()  # being restarted while the preflight runs
    with caplog.at_level(logging.WARNING, logger="lgt_ops.llm.preflight"):
        report = preflight.check(settings, ["mcq"])
    assert [c.status for c in report.checks] == ["ok", "down"]
    assert report.ok and report.failure_line() is None
    report.raise_if_failed()  # the run goes on with the other replica
    (warning,) = report.warnings()
    assert pair[1].base_url in warning and "does not answer" in warning
    assert pair[0].base_url not in warning
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert logged == [warning]

    pair[0].crash()  # every replica of the role down: the one-line transient failure
    report = preflight.check(settings, ["mcq"])
    assert [c.status for c in report.checks] == ["down", "down"] and not report.warnings()
    with pytest.raises(EndpointDown) as caught:
        report.raise_if_failed()
    line = str(caught.value)
    assert "\n" not in line and all(s.base_url in line for s in pair)


def test_a_misconfigured_replica_fails_the_preflight_naming_it(pair, tmp_path, sqlite_url):
    settings = _llm_on(make_settings(sqlite_url, (tmp_path / "store").as_uri()), pair)
    model = settings.endpoint("llm").model
    pair[1].sim.cfg.served_models = "some/other-model"  # answers, but is the wrong server
    report = preflight.check(settings, ["mcq"])
    assert [c.status for c in report.checks] == ["ok", "failed"] and not report.ok
    with pytest.raises(preflight.PreflightFailed) as caught:
        report.raise_if_failed()
    line = str(caught.value)
    assert line.startswith(f"preflight: llm endpoint {pair[1].base_url} does not serve model")
    assert "LGT_LLM_MODEL" in line and pair[0].base_url not in line

    pair[1].sim.cfg.served_models = model
    pair[1].sim.cfg.max_model_len = 1024  # too small a context: also a wrong server
    line = preflight.check(settings, ["mcq"]).failure_line()
    assert f"llm endpoint {pair[1].base_url}: model '{model}' has a context of 1024" in line


# -- who is taken (back) in ----------------------------------------------------------------------
def test_a_replica_revived_with_the_wrong_model_is_kept_out(pair, ledger, caplog):
    dead, live = pair
    engine = RequestEngine(endpoint(pair), ledger)
    engine._backoff = lambda n: 0.02
    replica = engine.pool.replicas[0]
    outs = []
    with caplog.at_level(logging.WARNING, logger="lgt_ops.llm.replicas"):
        for out in engine.run(req(i) for i in range(600)):
            outs.append(out)
            ledger.flush_now()
            if len(outs) == 100:
                dead.crash()
            if len(outs) == 250:
                assert not replica.up
                got_at_revival = (dead.sim.received, dead.sim.served)
                dead.sim.cfg.served_models = "some/other-model"  # restarted as the wrong server
                dead.revive()
    assert all(o.ok for o in outs) and len(outs) == 600
    assert not replica.up and replica.readmissions == 0  # probed many times, never taken
    assert (dead.sim.received, dead.sim.served) == got_at_revival  # no request reached it
    kept = [r.getMessage() for r in caplog.records if "stays out" in r.getMessage()]
    assert len(kept) == 1, kept  # logged once
    assert dead.base_url in kept[0] and "does not serve model 'm'" in kept[0]


def test_a_replica_down_at_preflight_is_checked_before_it_gets_work(pair, ledger):
    first, second = pair
    second.sim.cfg.max_model_len = 512  # answers, lists "m", but its context is too small
    engine = RequestEngine(endpoint(pair), ledger, needed_tokens=4096, unchecked=[second.base_url])
    engine._backoff = lambda n: 0.02
    assert [r.up for r in engine.pool.replicas] == [True, False]
    outs = list(engine.run(req(i) for i in range(200)))
    assert all(o.ok for o in outs) and second.sim.received == 0
    assert "context of 512 tokens" in engine.pool.replicas[1].kept_out

    second.sim.cfg.max_model_len = 32768  # a good server: probed in, then used
    engine = RequestEngine(endpoint(pair), ledger, needed_tokens=4096, unchecked=[second.base_url])
    engine._backoff = lambda n: 0.02
    outs = list(engine.run(req(i) for i in range(200, 1200)))
    assert all(o.ok for o in outs) and engine.pool.replicas[1].readmissions == 1
    assert second.sim.served > 0


def test_the_base_url_parameter_takes_a_list_and_names_each_bad_url():
    from lgt_ops.params import ParamsError, RunParams

    p = RunParams.from_conf({"reasoner_base_url": "http://r-0:8000/v1, https://r-1/v1"})
    ep = p.apply(settings_from_env({})).endpoint("reasoner")
    assert ep.urls == ("http://r-0:8000/v1", "https://r-1/v1")
    with pytest.raises(ParamsError) as caught:
        RunParams.from_conf({"vlm_base_url": "http://v-0/v1,ftp://v-1/v1,,http://v-2:port/v1"})
    line = str(caught.value)
    assert "parameter 'vlm_base_url': 'ftp://v-1/v1' is not an http(s) URL" in line
    assert "'http://v-2:port/v1' is not an http(s) URL" in line and "an empty URL" in line
    assert "http://v-0/v1'" not in line  # the good one is not blamed
