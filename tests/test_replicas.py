"""A role's endpoint as several replicas, against two simulators over HTTP: requests are spread
over both; a replica killed mid-run is ejected and the run completes with every answered
request recorded once and never asked again; the replica is probed back in when it returns;
with every replica down the task fails with one line naming them; the preflight checks each
replica; the settings take the list from the environment and the Airflow connection."""

from __future__ import annotations

import json
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
    """Two simulator replicas, each serving 16 requests at a time for 20 ms."""
    sims = [BackgroundSimulator(SimConfig(slots=16, latency_ms=20)).start() for _ in range(2)]
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


def test_the_preflight_checks_every_replica(pair, tmp_path, sqlite_url):
    settings = make_settings(sqlite_url, (tmp_path / "store").as_uri())
    eps = {**settings.endpoints, "llm": endpoint(pair, model=settings.endpoint("llm").model)}
    settings = settings.model_copy(update={"endpoints": eps})
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

    pair[1].crash()  # a replica missing at preflight: named in the one line
    report = preflight.check(settings, ["mcq"])
    assert [c.status for c in report.checks] == ["ok", "unreachable"]
    with pytest.raises(EndpointDown) as caught:
        report.raise_if_failed()
    line = str(caught.value)
    assert "\n" not in line and pair[1].base_url in line and pair[0].base_url not in line
    assert set(role_needs(settings, ["mcq"])) == {"llm"}
