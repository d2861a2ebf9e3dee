"""The request journal: answers are durable within a bounded delay, independently of the
stage's output commits, so a kill re-sends only what was in flight; a terminal ledger row is
never overwritten; a lost lineage database connection is one clear error and the retry
converges to the rows of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from lgt_ops.db import make_engine, upgrade
from lgt_ops.failures import LineageDbUnreachable
from lgt_ops.llm.ledger import JournalPolicy, Ledger, Outcome
from lgt_ops.llm.request import ChatRequest
from lgt_ops.runctx import RunContext, new_cli_run
from lgt_ops.sources import resolve_source
from lgt_ops.stages import ingest, mcq
from lgt_ops.stages.base import Shard, StageEnv
from tests.conftest import ROOT, _admin, make_settings
from tests.pg import database_url
from tests.samples import jpeg

N_IMAGES = 40
MAX_INFLIGHT = 4
JOURNAL_ANSWERS = 4

# Tables that log attempts by design (one row per try): they differ after a retry.
ATTEMPT_LOGS = {"stage_runs", "pipeline_runs", "endpoint_preflight"}


# -- helpers -----------------------------------------------------------------------------------
def _req(i: int) -> ChatRequest:
    return ChatRequest(
        "llm", "m", "t", "1", [{"role": "user", "content": f"q{i}"}], {"temperature": 0.0}
    )


def _status(db, key: str) -> str | None:
    with db.connect() as conn:
        return conn.execute(
            text("SELECT status FROM model_requests WHERE request_key = :k"), {"k": key}
        ).scalar()


def _rows(db) -> int:
    with db.connect() as conn:
        return conn.execute(text("SELECT COUNT(*) FROM model_requests")).scalar_one()


def _wait(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def second_pg_url() -> Iterator[str]:
    """Another fresh database, for the uninterrupted reference run."""
    name = f"lgt_test_{uuid.uuid4().hex[:10]}"
    _admin(f"CREATE DATABASE {name}")
    yield database_url(name)
    _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _pg_env(pg_url: str, store: Path, sim) -> StageEnv:
    settings = make_settings(pg_url, store.as_uri(), sim.base_url)
    eps = {
        role: ep.model_copy(update={"max_inflight": MAX_INFLIGHT, "adaptive": False})
        for role, ep in settings.endpoints.items()
    }
    settings = settings.model_copy(
        update={"endpoints": eps, "ledger_journal_seconds": 1.0, "ledger_journal_answers": 4}
    )
    env = StageEnv.open(settings, new_cli_run("test"))
    env.show_progress = False
    env.store.ensure_bucket()
    return env


def _source(env: StageEnv, prefix: str = "sources/j/") -> None:
    lines = []
    for i in range(N_IMAGES):
        key = f"img/{i:03d}.jpg"
        env.store.put(prefix + key, jpeg(64 + i, 48, (i * 5 % 256, 90, 150)))
        caption = f"Square {i}: a red cup on the left and a blue bowl on the right."
        objects = [
            {"id": "o1", "label": "cup", "box": [0, 0, 20, 20]},
            {"id": "o2", "label": "bowl", "box": [40, 10, 60, 40]},
        ]
        lines.append(json.dumps({"key": key, "caption": caption, "objects": objects}))
    env.store.put(prefix + "manifest.jsonl", ("\n".join(lines) + "\n").encode())
    ingest.ingest_all(env, prefix)


def lineage_counts(db) -> dict[str, int]:
    """Rows per lineage table (attempt logs excluded: they record tries, not results)."""
    from sqlalchemy import inspect

    names = sorted(set(inspect(db).get_table_names()) - ATTEMPT_LOGS)
    with db.connect() as conn:
        return {n: conn.execute(text(f'SELECT COUNT(*) FROM "{n}"')).scalar_one() for n in names}


def _run_or_dump(cmd: list[str], env: dict[str, str], check: bool = True):
    """Run the CLI; if it hangs, abort it so the failure shows every thread's stack."""
    proc = subprocess.Popen(
        cmd,
        env={**env, "PYTHONFAULTHANDLER": "1"},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} hung:\n{err.decode()[-8000:]}") from None
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        assert done.returncode == 0, err.decode()[-3000:]
    return done


# -- the ledger --------------------------------------------------------------------------------
def test_a_terminal_row_is_final_and_a_failed_one_is_replaced(tmp_path):
    db = make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    upgrade(db)
    ledger = Ledger(db, RunContext("r"), "s")
    ok, failed = _req(1), _req(2)
    ledger.record(Outcome(request=ok, status="ok", response={"choices": []}))
    ledger.record(Outcome(request=failed, status="failed", error_class="transient"))
    ledger.flush_now()
    # A late failed write (e.g. a concurrent attempt) must not overwrite the ok answer ...
    ledger.record(Outcome(request=ok, status="failed", error_class="transient"))
    # ... while a retried failed request gets its answer.
    ledger.record(Outcome(request=failed, status="ok", response={"choices": []}))
    ledger.flush_now()
    assert _status(db, ok.key) == "ok"
    assert _status(db, failed.key) == "ok"


@pytest.mark.parametrize("policy", [JournalPolicy(seconds=0.2, answers=1000), JournalPolicy(60, 3)])
def test_the_journal_commits_answers_without_a_stage_commit(tmp_path, policy):
    db = make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    upgrade(db)
    ledger = Ledger(db, RunContext("r"), "s", journal=policy)
    n = min(policy.answers, 3)
    try:
        for i in range(n):
            ledger.record(Outcome(request=_req(i), status="ok", response={"choices": []}))
        # Nobody calls flush: the writer thread commits on its own (by delay or by count;
        # the count policy's 60 s delay would exceed this wait).
        assert _wait(lambda: _rows(db) == n, seconds=20)
        assert ledger.journaled == n and ledger.pending == 0
    finally:
        ledger.close()


# -- SIGKILL mid-stage -------------------------------------------------------------------------
def test_sigkill_mid_stage_resends_only_what_was_in_flight(pg_url, tmp_path, sim):
    """A stage run via the CLI on Postgres kills itself (LGT_CHAOS_KILL) after 25 answers;
    the resumed run re-sends only requests that were in flight or not yet journaled."""
    env = _pg_env(pg_url, tmp_path / "store", sim)
    _source(env)
    sim.sim.cfg.latency_ms = 120  # 4 in flight -> ~30 answers/s: kills land mid-stage
    report = tmp_path / "kill.jsonl"
    cli = os.environ.copy()
    cli.update(
        {
            "LGT_DATABASE_URL": pg_url,
            "LGT_STORE_URL": env.settings.store_url,
            "LGT_LLM_BASE_URL": sim.base_url,
            "LGT_VLM_BASE_URL": sim.base_url,
            "LGT_LLM_MAX_INFLIGHT": str(MAX_INFLIGHT),
            "LGT_LLM_ADAPTIVE": "0",
            "LGT_LEDGER_JOURNAL_SECONDS": "1.0",  # count-bound here: 4 answers < 1 s of answers
            "LGT_LEDGER_JOURNAL_ANSWERS": str(JOURNAL_ANSWERS),
        }
    )
    cmd = [sys.executable, "-m", "lgt_ops.cli", "mcq", "--source", "sources/j/"]
    killed = _run_or_dump(
        cmd, {**cli, "LGT_CHAOS_KILL": "mcq:25", "LGT_CHAOS_REPORT": str(report)}, check=False
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    at_kill = json.loads(report.read_text())
    assert _wait(lambda: sim.sim.inflight == 0)  # the dead client's requests still finish
    served_before = dict(sim.sim.served_by_key)
    with env.db.connect() as conn:
        durable = {r[0][:32] for r in conn.execute(text("SELECT request_key FROM model_requests"))}
    # The stage never committed an item batch (25 items), yet the answers are in the ledger.
    assert len(durable) >= 25 - at_kill["unjournaled"]

    sim.sim.cfg.latency_ms = 1
    _run_or_dump(cmd, cli)

    served = sim.sim.served_by_key
    repeated = {k for k, n in served.items() if n > 1}
    window = at_kill["in_flight"] + at_kill["unjournaled"]
    print(
        f"kill after 25 answers: in flight {at_kill['in_flight']}, unjournaled "
        f"{at_kill['unjournaled']}, repeated {len(repeated)}"
    )
    assert not repeated & durable  # nothing journaled was asked again
    assert repeated <= set(served_before)
    assert len(repeated) <= window
    # The engine sends nothing new while the journal is behind: sent-but-not-durable requests
    # stay under the window plus the journal's answer bound.
    assert window < MAX_INFLIGHT + JOURNAL_ANSWERS
    assert len(served) == N_IMAGES
    with env.db.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM model_requests")).scalar_one() == N_IMAGES


# -- the lineage database goes away mid-stage --------------------------------------------------
def _db_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _cut_connections(db_name: str, allow: bool) -> None:
    """What a Postgres restart looks like to the stage: every backend of its database is
    terminated and new connections are refused until `allow` is set again."""
    _admin(f"ALTER DATABASE {db_name} ALLOW_CONNECTIONS {'true' if allow else 'false'}")
    if not allow:
        _admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{db_name}' AND pid <> pg_backend_pid()"
        )


def test_lineage_db_lost_mid_stage_is_one_error_and_the_retry_converges(
    pg_url, second_pg_url, tmp_path, sim
):
    reference = _pg_env(second_pg_url, tmp_path / "ref", sim)
    _source(reference)
    spec, _ = resolve_source(reference, "sources/j/")
    mcq.run(reference, spec, Shard())
    expected = lineage_counts(reference.db)
    reference.db.dispose()

    env = _pg_env(pg_url, tmp_path / "store", sim)
    _source(env)
    spec, _ = resolve_source(env, "sources/j/")
    sim.sim.reset()
    sim.sim.cfg.latency_ms = 120
    errors: list[BaseException] = []

    def stage() -> None:
        try:
            mcq.run(env, spec, Shard())
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    worker = threading.Thread(target=stage)
    worker.start()
    try:
        assert _wait(lambda: sim.sim.served >= 12)
        served_at_cut = sim.sim.served
        _cut_connections(_db_name(pg_url), allow=False)
        worker.join(timeout=120)
    finally:
        _cut_connections(_db_name(pg_url), allow=True)
    with env.db.connect() as conn:
        durable_at_cut = {
            r[0][:32] for r in conn.execute(text("SELECT request_key FROM model_requests"))
        }
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], LineageDbUnreachable), errors
    message = str(errors[0])
    assert "\n" not in message and _db_name(pg_url) in message and "database is up" in message

    assert _wait(lambda: sim.sim.inflight == 0)
    sim.sim.cfg.latency_ms = 1
    mcq.run(env, spec, Shard())  # the retry, on a fresh pool

    repeated = {k for k, n in sim.sim.served_by_key.items() if n > 1}
    print(f"DB cut after {served_at_cut} answers: repeated {len(repeated)}")
    # Answers not yet journaled when the database went away are lost with it, and so are the
    # requests in flight; the engine stopped sending as soon as the journal failed.
    assert not repeated & durable_at_cut
    assert len(repeated) < MAX_INFLIGHT + JOURNAL_ANSWERS
    assert lineage_counts(env.db) == expected
    with env.db.connect() as conn:  # the cut attempt's row was closed by the retry
        statuses = [r[0] for r in conn.execute(text("SELECT status FROM stage_runs"))]
    assert "running" not in statuses and "success" in statuses
