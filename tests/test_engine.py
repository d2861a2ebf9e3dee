"""The request engine against the simulator over HTTP: each failure class has its policy,
the ledger makes every successful call happen once, and the request key means content."""

from __future__ import annotations

import socket
import time

import pytest
from sqlalchemy import text

from lgt_ops.config import EndpointSettings, ImageSpec
from lgt_ops.db import make_engine, upgrade
from lgt_ops.llm.engine import RequestEngine
from lgt_ops.llm.errors import EndpointAuthError, EndpointDown
from lgt_ops.llm.ledger import Ledger
from lgt_ops.llm.request import ChatRequest, image_part
from lgt_ops.runctx import RunContext


def req(i: int, *, content: str = "say something", **sampling) -> ChatRequest:
    return ChatRequest(
        "llm",
        "m",
        "t",
        "1",
        [{"role": "user", "content": f"{content} #{i}"}],
        {"max_tokens": 256, "seed": i, **sampling},
    )


@pytest.fixture
def ledger(sqlite_url):
    db = make_engine(sqlite_url)
    upgrade(db)
    return Ledger(db, RunContext("test-run", dag_id="d", task_id="t"), "bench")


def endpoint(url: str, **kw) -> EndpointSettings:
    base = {
        "role": "llm",
        "base_url": url,
        "model": "m",
        "max_inflight": 16,
        "adaptive": False,
        "timeout_s": 5.0,
        "max_attempts": 6,
    }
    return EndpointSettings(**(base | kw))


def run(engine: RequestEngine, requests, ledger=None):
    outs = list(engine.run(requests))
    if ledger is not None:
        ledger.flush_now()
    return outs


def ledger_rows(ledger) -> dict[str, dict]:
    with ledger.engine.connect() as conn:
        return {
            r["request_key"]: dict(r)
            for r in conn.execute(text("SELECT * FROM model_requests")).mappings()
        }


# -- the key ---------------------------------------------------------------------------------
def test_request_key_is_content_not_transport():
    base = req(1)
    assert base.key == req(1).key
    assert base.key != req(2).key  # seed
    assert base.key != req(1, temperature=0.7).key
    other_model = ChatRequest("llm", "m2", "t", "1", base.messages, base.sampling)
    other_prompt = ChatRequest("llm", "m", "t", "2", base.messages, base.sampling)
    schema = ChatRequest("llm", "m", "t", "1", base.messages, base.sampling, {"type": "object"})
    assert len({base.key, other_model.key, other_prompt.key, schema.key}) == 4
    img = [{"role": "user", "content": [image_part("ab" * 32), {"type": "text", "text": "q"}]}]
    small = ChatRequest("vlm", "m", "t", "1", img, {}, image_spec=ImageSpec(max_side=512))
    big = ChatRequest("vlm", "m", "t", "1", img, {}, image_spec=ImageSpec(max_side=1024))
    presigned = ChatRequest(
        "vlm", "m", "t", "1", img, {}, image_spec=ImageSpec(max_side=512, transport="presigned_url")
    )
    assert small.key != big.key  # resizing changes what the model sees
    assert small.key == presigned.key  # how the bytes travel does not


def test_key_ignores_url_and_concurrency(sim, ledger):
    first = run(
        RequestEngine(endpoint(sim.base_url, max_inflight=4), ledger),
        [req(i) for i in range(6)],
        ledger,
    )
    assert all(o.ok for o in first) and sim.sim.served == 6
    # Same requests, another URL spelling and window: all answered from the ledger.
    again = RequestEngine(
        endpoint(sim.base_url.replace("127.0.0.1", "localhost"), max_inflight=32, timeout_s=99),
        ledger,
    )
    assert all(o.cached for o in run(again, [req(i) for i in range(6)], ledger))
    assert sim.sim.served == 6 and again.stats.sent == 0


# -- failure classes --------------------------------------------------------------------------
def test_overload_backs_off_without_failing(sim, ledger):
    sim.sim.cfg.fault_429 = 0.4
    sim.sim.cfg.retry_after_s = 0.01
    outs = run(RequestEngine(endpoint(sim.base_url), ledger), [req(i) for i in range(40)], ledger)
    assert all(o.ok for o in outs)
    rows = ledger_rows(ledger)
    assert sum(r["overloads"] for r in rows.values()) > 0
    assert all(r["status"] == "ok" and r["error_class"] is None for r in rows.values())


@pytest.mark.parametrize("fault", ["fault_500", "fault_drop", "fault_malformed"])
def test_transient_failures_are_retried(sim, ledger, fault):
    setattr(sim.sim.cfg, fault, 0.3)
    engine = RequestEngine(endpoint(sim.base_url), ledger, seed=1)
    engine._backoff = lambda n: 0.01  # keep the test fast; the policy is what we check
    outs = run(engine, [req(i) for i in range(40)], ledger)
    assert all(o.ok for o in outs)
    assert sum(r["transient_errors"] for r in ledger_rows(ledger).values()) > 0


def test_timeouts_are_retried(sim, ledger):
    sim.sim.cfg.fault_timeout = 0.3
    sim.sim.cfg.timeout_sleep_s = 2.0
    engine = RequestEngine(endpoint(sim.base_url, timeout_s=0.3), ledger)
    engine._backoff = lambda n: 0.01
    outs = run(engine, [req(i) for i in range(20)], ledger)
    assert all(o.ok for o in outs)
    assert engine.stats.errors["transient"] > 0


def test_transient_retries_are_capped_and_not_final(sim, ledger):
    sim.sim.cfg.fault_500 = 1.0
    engine = RequestEngine(endpoint(sim.base_url, max_attempts=3), ledger)
    engine._backoff = lambda n: 0.01
    (out,) = run(engine, [req(1)], ledger)
    assert (out.status, out.attempts, out.error_class) == ("failed", 3, "transient")
    sim.sim.cfg.fault_500 = 0.0  # a failed request is not cached: the next run sends it
    (again,) = run(RequestEngine(endpoint(sim.base_url), ledger), [req(1)], ledger)
    assert again.ok and not again.cached


def test_request_specific_errors_are_recorded_and_not_retried(sim, ledger):
    marker = sim.sim.cfg.context_too_long_marker
    (out,) = run(
        RequestEngine(endpoint(sim.base_url), ledger),
        [req(1, content=f"very long {marker}")],
        ledger,
    )
    assert (out.status, out.error_class, out.attempts, out.http_status) == (
        "rejected",
        "context_too_long",
        1,
        400,
    )
    before = sim.sim.received
    (again,) = run(
        RequestEngine(endpoint(sim.base_url), ledger),
        [req(1, content=f"very long {marker}")],
        ledger,
    )
    assert again.cached and again.status == "rejected" and sim.sim.received == before


def test_truncated_output_is_regenerated_a_bounded_number_of_times(sim, ledger):
    sim.sim.cfg.fault_truncated = 1.0
    (out,) = run(
        RequestEngine(endpoint(sim.base_url, max_regenerations=2), ledger), [req(1)], ledger
    )
    assert (out.status, out.error_class, out.regenerations, out.attempts) == (
        "invalid_output",
        "truncated",
        2,
        3,
    )
    row = ledger_rows(ledger)[out.request.key]
    assert row["finish_reason"] == "length" and row["regenerations"] == 2


def test_schema_invalid_output_is_regenerated(sim, ledger):
    sim.sim.cfg.fault_invalid_json = 0.5
    schema = {
        "type": "object",
        "properties": {"questions": {"type": "array"}},
        "required": ["questions"],
    }
    from lgt_ops import prompts

    t = prompts.load("mcq")
    msgs = t.render(
        width=10,
        height=10,
        caption="A cup.",
        objects="o1: cup [0, 0, 5, 5]",
        count=2,
        skills="existence",
        n_options=4,
        letters="A, B, C, D",
    )
    requests = [
        ChatRequest("llm", "m", "mcq", "1", msgs, {"seed": i}, schema, "mcq") for i in range(20)
    ]
    # Enough regenerations that a run of bad luck cannot exhaust them (0.5 ** 31 per request).
    engine = RequestEngine(endpoint(sim.base_url, max_regenerations=30), ledger)
    outs = run(engine, requests, ledger)
    assert all(o.ok for o in outs)
    assert sum(o.regenerations for o in outs) > 0


def test_bad_credentials_fail_at_once(sim, ledger):
    sim.sim.cfg.api_key = "right"
    with pytest.raises(EndpointAuthError):
        run(RequestEngine(endpoint(sim.base_url, api_key="wrong"), ledger), [req(1)])
    outs = run(RequestEngine(endpoint(sim.base_url, api_key="right"), ledger), [req(1)])
    assert outs[0].ok


def test_unreachable_endpoint_fails_the_run(ledger):
    # Bound but not listening: connections are refused, and the kernel cannot hand the port
    # to a client socket (which could otherwise connect to itself).
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{held.getsockname()[1]}/v1"
        engine = RequestEngine(endpoint(dead, down_after_s=0.5), ledger)
        engine._backoff = lambda n: 0.05
        with pytest.raises(EndpointDown, match="unreachable"):
            run(engine, [req(i) for i in range(5)])


def wait_until_quiet(simulator, quiet_s: float = 0.3, limit_s: float = 10.0) -> None:
    """Return once the simulator has received no request for `quiet_s`."""
    deadline = time.monotonic() + limit_s
    seen, since = simulator.received, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if simulator.received != seen:
            seen, since = simulator.received, time.monotonic()
        elif time.monotonic() - since >= quiet_s and simulator.inflight == 0:
            return
    raise AssertionError("the simulator kept receiving requests after the engine stopped")


def test_down_mid_run_then_resume_sends_only_the_rest(sim, ledger):
    """The task fails cleanly when the endpoint goes away; its retry resumes from the ledger."""
    requests = [req(i) for i in range(60)]
    engine = RequestEngine(endpoint(sim.base_url, max_inflight=4, down_after_s=0.5), ledger)
    engine._backoff = lambda n: 0.05
    sim.sim.cfg.down_after_served = 20  # the endpoint goes away after 20 answers
    with pytest.raises(EndpointDown):
        for _ in engine.run(requests):
            ledger.flush_now()  # what a stage commits as it goes
    ledger.flush_now()
    recorded = {k for k, r in ledger_rows(ledger).items() if r["status"] == "ok"}
    assert len(recorded) == 20
    # Retries the failed engine cancelled may already be on the wire; the server still reads
    # them. Let them meet the endpoint while it is down, so the resumed run's count is its own.
    wait_until_quiet(sim.sim)
    sim.sim.cfg.down_after_served = None
    sim.sim.reset()
    outs = run(RequestEngine(endpoint(sim.base_url), ledger), requests, ledger)
    assert all(o.ok for o in outs)
    resent = {k for k in sim.sim.served_by_key}
    assert not resent & {k[:32] for k in recorded}  # nothing already recorded was sent again
    assert sim.sim.served == 60 - len(recorded)


# -- ledger, samples, images ------------------------------------------------------------------
def test_ledger_records_usage_latency_and_who_asked(sim, ledger):
    (out,) = run(RequestEngine(endpoint(sim.base_url), ledger), [req(1, n=3)], ledger)
    assert len(out.choices) == 3  # n>1: one request, k samples
    row = ledger_rows(ledger)[out.request.key]
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0 and row["latency_ms"] > 0
    assert row["served_model"] == "lgt-simulator:m"
    assert row["system_fingerprint"].startswith("lgt-simulator")
    assert (row["run_id"], row["dag_id"], row["task_id"]) == ("test-run", "d", "t")


def test_large_responses_live_in_the_object_store(sim, sqlite_url, tmp_path):
    from lgt_ops.storage import LocalStore

    store = LocalStore(tmp_path / "store")
    db = make_engine(sqlite_url)
    upgrade(db)
    ledger = Ledger(db, RunContext("r"), "s", store)
    sim.sim.cfg.completion_chars = 300_000
    sim.sim.cfg.max_model_len = 131_072  # room for the 100k-token reply
    (out,) = run(
        RequestEngine(endpoint(sim.base_url), ledger), [req(1, max_tokens=100_000)], ledger
    )
    row = ledger_rows(ledger)[out.request.key]
    assert row["response"] is None and row["response_uri"].startswith("ledger/")
    (cached,) = ledger.lookup([req(1, max_tokens=100_000)]).values()
    assert cached.contents() == out.contents()


def test_adaptive_window_settles_near_capacity(sim, ledger):
    sim.sim.cfg.slots = 8
    sim.sim.cfg.latency_ms = 10
    engine = RequestEngine(endpoint(sim.base_url, max_inflight=512, adaptive=True), ledger)
    outs = run(engine, [req(i) for i in range(2000)])
    assert all(o.ok for o in outs)
    # It found more than its starting window, but did not pile hundreds into the queue.
    assert 8 <= engine.window.size <= 64, engine.window.history[-10:]
