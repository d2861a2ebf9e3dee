"""Goodput (sql/migrations/0008_goodput_views.sql, lgt_ops/goodput.py, the release's
counts.goodput) after real pipeline runs on the simulator, on Postgres + S3 and on SQLite,
cross-checked against the base tables read with plain queries; and the demo's summary and
dataset card."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from lgt_ops import goodput
from lgt_ops.llm.errors import EndpointDown
from lgt_ops.params import RunParams
from lgt_ops.pipeline import run_local
from lgt_ops.release import card
from lgt_ops.runctx import RunContext
from lgt_ops.summary import print_summary
from tests.samples import run_demo, upload_sample

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "sources/sample/"
RELEASE = "goodput"
MODEL_STAGES = ("annotate", "mcq", "blind", "cot", "compose", "cot2", "expand")
_OF_STAGE = "question_id IN (SELECT question_id FROM questions WHERE stage = {})"
# Each model stage's outputs, and the column naming the run that made them.
OUTPUT_TABLES = {
    "annotate": "annotations WHERE source = 'model'",
    "mcq": "questions WHERE stage = 1",
    "blind": "question_checks WHERE stage = 'blind' AND kept",
    "compose": "questions WHERE stage = 2",
    "cot": f"rollouts WHERE {_OF_STAGE.format(1)}",
    "cot2": f"rollouts WHERE {_OF_STAGE.format(2)}",
    "expand": "expansions WHERE 1 = 1",
}


def _run(env, **params):
    conf = {"source": PREFIX, "release_name": RELEASE, "allow_simulated": True, "k_rollouts": 2}
    p = RunParams.from_conf({**conf, **params})
    return p, run_local(env.with_settings(p.apply(env.settings)), p)


def _rows(db: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with db.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql), params).mappings()]


def _scalar(db: Engine, sql: str, **params: Any) -> Any:
    with db.connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


def run_view(db: Engine, run_id: str) -> dict[str, dict[str, Any]]:
    return {
        r["stage"]: r for r in _rows(db, "SELECT * FROM v_run_goodput WHERE run_id = :r", r=run_id)
    }


def check_run(db: Engine, run_id: str) -> dict[str, dict[str, Any]]:
    """v_run_goodput and v_run_removals of `run_id` against stage_runs, model_requests and
    rejections, summed here; and lgt_ops.goodput's reading of them."""
    want: dict[str, Counter] = defaultdict(Counter)
    for r in _rows(db, "SELECT * FROM stage_runs WHERE run_id = :r", r=run_id):  # all attempts
        w = want[r["stage"]]
        w["accepted"] += r["items_out"]
        w["rejected"] += r["items_rejected"]
        w["http_attempts"] += r["requests_sent"]
        w["ledger_hits"] += r["cache_hits"]
    for r in _rows(db, "SELECT * FROM model_requests WHERE run_id = :r", r=run_id):
        w = want[r["stage"]]
        w["requests"] += 1
        w["prompt_tokens"] += r["prompt_tokens"] or 0
        w["completion_tokens"] += r["completion_tokens"] or 0
    view = run_view(db, run_id)
    assert set(view) == set(want)
    for stage, w in want.items():
        v = view[stage]
        for k in ("requests", "http_attempts", "ledger_hits", "prompt_tokens"):
            assert int(v[k]) == w[k], (stage, k)
        assert (int(v["completion_tokens"]), int(v["accepted"])) == (
            w["completion_tokens"],
            w["accepted"],
        )
        assert int(v["rejected"]) == w["rejected"], stage
        if w["requests"]:
            assert v["accepted_per_1k_requests"] == pytest.approx(
                1000 * w["accepted"] / w["requests"]
            )
        else:
            assert v["accepted_per_1k_requests"] is None, stage
        tokens = w["prompt_tokens"] + w["completion_tokens"]
        if tokens:
            assert v["accepted_per_m_tokens"] == pytest.approx(1e6 * w["accepted"] / tokens)
        else:
            assert v["accepted_per_m_tokens"] is None, stage

    removed = Counter(
        (r["stage"], r["reason"])
        for r in _rows(db, "SELECT stage, reason FROM rejections WHERE run_id = :r", r=run_id)
    )
    shares = _rows(db, "SELECT * FROM v_run_removals WHERE run_id = :r", r=run_id)
    assert {(r["stage"], r["reason"]): int(r["removed"]) for r in shares} == dict(removed)
    for r in shares:
        decided = want[r["stage"]]["accepted"] + want[r["stage"]]["rejected"]
        assert int(r["decided"]) == decided
        assert r["share"] == pytest.approx(r["removed"] / decided)

    with db.connect() as conn:
        read = {g.stage: g for g in goodput.run_goodput(conn, run_id)}
    assert set(read) == set(want) - {"scan"}
    for stage, g in read.items():
        assert (g.requests, g.accepted, g.tokens) == (
            want[stage]["requests"],
            want[stage]["accepted"],
            want[stage]["prompt_tokens"] + want[stage]["completion_tokens"],
        )
    return view


def check_release(db: Engine, release: Any) -> dict[str, dict[str, Any]]:
    """The manifest's counts.goodput, v_release_goodput, v_release_removals and the card."""
    manifest = release.manifest
    figures = manifest["counts"]["goodput"]["stages"]
    view = {
        r["stage"]: r
        for r in _rows(
            db, "SELECT * FROM v_release_goodput WHERE release_id = :r", r=release.release_id
        )
    }
    assert set(view) == set(figures) == set(manifest["fingerprints"]) | {"release"}
    for stage, f in figures.items():
        v = view[stage]
        for k in goodput.FIGURES:
            assert int(v[k]) == f[k], (stage, k)
        assert _maybe(v["accepted_per_1k_requests"]) == f["accepted_per_1k_requests"]
        assert _maybe(v["accepted_per_m_tokens"]) == f["accepted_per_m_tokens"]
    whole = figures["release"]
    assert whole["accepted"] == sum(release.counts.values()) > 0
    for k in ("requests", "prompt_tokens", "completion_tokens"):
        assert whole[k] == sum(f[k] for s, f in figures.items() if s != "release")
    assert whole["accepted_per_1k_requests"] == round(
        1000 * whole["accepted"] / whole["requests"], 2
    )
    assert figures["ingest"]["accepted"] == manifest["counts"]["images"]
    for stage, reasons in manifest["counts"]["rejections"].items():
        assert figures[stage]["rejected"] == sum(reasons.values()), stage

    shares = _rows(
        db, "SELECT * FROM v_release_removals WHERE release_id = :r", r=release.release_id
    )
    want = {
        (s, reason): n
        for s, rs in manifest["counts"]["rejections"].items()
        for reason, n in rs.items()
    }
    assert {(r["stage"], r["reason"]): int(r["removed"]) for r in shares} == want
    for r in shares:
        f = figures[r["stage"]]
        assert r["share"] == pytest.approx(r["removed"] / (f["accepted"] + f["rejected"]))

    md = card.render(manifest)
    section = md[md.index("## Goodput") :]
    assert "| release | " in section and "| filter | " in section
    assert f"| release | {whole['requests']:,} | {whole['prompt_tokens']:,} |" in section
    return figures


def _maybe(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def release_requests(db: Engine, image_ids: set[str] | None = None) -> dict[str, set[str]]:
    """Per model stage, the ledger rows behind its outputs and rejections (for these images)."""
    q_image = dict(
        (r["question_id"], r["image_id"])
        for r in _rows(db, "SELECT question_id, image_id FROM questions")
    )
    keys: dict[str, set[str]] = defaultdict(set)

    def take(stage: str, key: str | None, image_id: str | None) -> None:
        if key and (image_ids is None or image_id in image_ids):
            keys[stage].add(key)

    for r in _rows(db, "SELECT request_key, image_id FROM annotations WHERE source = 'model'"):
        take("annotate", r["request_key"], r["image_id"])
    for r in _rows(db, "SELECT request_key, image_id, stage FROM questions"):
        take("mcq" if r["stage"] == 1 else "compose", r["request_key"], r["image_id"])
    q_stage = {r["question_id"]: r["stage"] for r in _rows(db, "SELECT * FROM questions")}
    for r in _rows(db, "SELECT request_key, question_id FROM rollouts"):
        stage = "cot" if q_stage[r["question_id"]] == 1 else "cot2"
        take(stage, r["request_key"], q_image[r["question_id"]])
    for r in _rows(db, "SELECT request_key, question_id FROM expansions"):
        take("expand", r["request_key"], q_image[r["question_id"]])
    blind = "SELECT request_key, question_id FROM question_checks WHERE stage = 'blind'"
    for r in _rows(db, blind):
        take("blind", r["request_key"], q_image[r["question_id"]])
    for r in _rows(db, "SELECT stage, request_key, image_id FROM rejections"):
        take(r["stage"], r["request_key"], r["image_id"])
    return keys


# -- the tests ---------------------------------------------------------------------------------
def test_goodput_on_sqlite_a_cached_rerun_and_a_ledger_hit_rerun(local_env, sim, tmp_path):
    env = local_env
    upload_sample(env.store, PREFIX)
    p1, first = _run(env, release_version="v1")
    view = check_run(env.db, first.run_id)
    ledger = Counter(r["stage"] for r in _rows(env.db, "SELECT stage FROM model_requests"))
    for stage in MODEL_STAGES:
        v = view[stage]
        # Every ledger row of the stage was made by this run; nothing was answered twice.
        assert int(v["requests"]) == ledger[stage] == int(v["http_attempts"]) > 0, stage
        made = _scalar(
            env.db,
            f"SELECT COUNT(*) FROM {OUTPUT_TABLES[stage]} AND run_id = :r",
            r=first.run_id,
        )
        assert int(v["accepted"]) == made > 0, stage
    assert int(view["cot"]["accepted"]) == 2 * int(view["cot"]["requests"])  # k=2 per request
    assert view["filter"]["requests"] == 0 and view["filter"]["accepted_per_1k_requests"] is None

    f1 = check_release(env.db, first.release)
    keys = release_requests(env.db)
    for stage in MODEL_STAGES:
        # The first run made every request behind the release's image set.
        assert f1[stage]["requests"] == len(keys[stage]) == int(view[stage]["requests"]), stage
        assert f1[stage]["prompt_tokens"] == int(view[stage]["prompt_tokens"]), stage

    # A re-run with everything cached: no request made, ratios undefined, no division by 0.
    served = sim.sim.served
    p2, again = _run(env.with_run(RunContext("again")), release_version="v2")
    assert sim.sim.served == served
    rerun = check_run(env.db, "again")
    assert sum(int(v["requests"]) + int(v["http_attempts"]) for v in rerun.values()) == 0
    assert all(v["accepted_per_1k_requests"] is None for v in rerun.values())
    assert all(v["accepted_per_m_tokens"] is None for v in rerun.values())
    # ... while the release it publishes cost what the first one did.
    assert check_release(env.db, again.release) == f1

    out = _summary(env, p2, again)
    section = out[out.index("goodput (this run") : out.index("goodput of release")]
    assert re.search(r"^cot +0 +0 +0 +0 +0 +0 +0 +- +-$", section, re.M), section
    assert re.search(rf"^release +{f1['release']['requests']:,} ", out, re.M), out

    # bench/projection.py scales the run's figures: per stage-1 question, k=2 -> k=10.
    sys.path.insert(0, str(ROOT / "bench"))
    import projection

    rows = {
        r["stage"]: r
        for r in projection.project(projection.read(env.db, first.run_id), 2, 10, 1000)
    }
    per_q = 1000 / int(view["mcq"]["accepted"])
    cot, expand = view["cot"], view["expand"]
    assert rows["cot"]["requests"] == pytest.approx(int(cot["requests"]) * per_q)
    assert rows["cot"]["completion_sim"] == pytest.approx(
        int(cot["completion_tokens"]) * per_q * 10 / 2
    )
    assert rows["cot"]["completion_budget"] == pytest.approx(
        rows["cot"]["requests"] * 10 * env.settings.method.cot_max_tokens
    )
    # Expansions: min(4, k) rollouts per question, 2 measured at k=2.
    assert rows["expand"]["requests"] == pytest.approx(int(expand["requests"]) * per_q * 4 / 2)
    assert rows["expand"]["gpu_h_budget"] > rows["expand"]["gpu_h_sim"] > 0

    # A new mcq dedup threshold re-runs mcq from the ledger: accepted rows for 0 requests.
    dedup = env.with_settings(env.settings.with_method(mcq_dedup_threshold=0.5))
    _run(dedup.with_run(RunContext("dedup")), stages=["ingest", "annotate", "mcq"])
    hits = check_run(env.db, "dedup")["mcq"]
    assert int(hits["ledger_hits"]) > 0 and int(hits["accepted"]) > 0
    assert int(hits["requests"]) == 0 and hits["accepted_per_1k_requests"] is None


@pytest.mark.postgres
@pytest.mark.s3
def test_goodput_on_postgres_after_a_failed_and_resumed_run(pg_s3_env, tmp_path):
    env = pg_s3_env.with_settings(pg_s3_env.settings.model_copy(update={"shard_size": 4}))
    upload_sample(env.store, PREFIX)
    # The reasoner passes the preflight, then is down (503) for expand: the run stops there.
    from lgt_ops.llm.simulator import BackgroundSimulator, SimConfig

    with BackgroundSimulator(SimConfig(down_after_served=0)) as down:
        eps = dict(env.settings.endpoints)
        eps["reasoner"] = eps["reasoner"].model_copy(
            update={"base_url": down.base_url, "down_after_s": 0.3}
        )
        broken = env.settings.model_copy(update={"endpoints": eps})
        with pytest.raises(EndpointDown, match="reasoner endpoint"):
            _run(env.with_settings(broken), release_version="v1")
    run_id = env.run.run_id
    stopped = check_run(env.db, run_id)
    assert int(stopped["expand"]["accepted"]) == 0 and int(stopped["cot"]["requests"]) > 0

    p, done = _run(env, release_version="v1")  # the retry of the same run resumes
    view = check_run(env.db, run_id)
    attempts = _scalar(
        env.db, "SELECT COUNT(*) FROM stage_runs WHERE run_id = :r AND stage = 'expand'", r=run_id
    )
    assert attempts > int(
        _scalar(
            env.db,
            "SELECT COUNT(DISTINCT shard_index) FROM stage_runs"
            " WHERE run_id = :r AND stage = 'expand'",
            r=run_id,
        )
    )
    for stage in MODEL_STAGES:
        made = _scalar(
            env.db, f"SELECT COUNT(*) FROM {OUTPUT_TABLES[stage]} AND run_id = :r", r=run_id
        )
        # Summed over all attempts: each output counted once, by the attempt that made it.
        assert int(view[stage]["accepted"]) == made > 0, stage
        terminal = _scalar(
            env.db,
            "SELECT COUNT(*) FROM model_requests WHERE run_id = :r AND stage = :s"
            " AND status IN ('ok', 'invalid_output', 'rejected')",
            r=run_id,
            s=stage,
        )
        assert int(view[stage]["requests"]) == terminal, stage  # failed rows answered later
    # A request that failed and was answered by the retry counts once: one per expansion.
    assert int(view["expand"]["requests"]) == int(view["expand"]["accepted"])
    assert int(view["expand"]["requests"]) >= int(stopped["expand"]["requests"])
    failed = "SELECT COUNT(*) FROM model_requests WHERE run_id = :r AND status = 'failed'"
    assert _scalar(env.db, failed, r=run_id) == 0

    figures = check_release(env.db, done.release)
    keys = release_requests(env.db)
    for stage in MODEL_STAGES:
        assert figures[stage]["requests"] == len(keys[stage]), stage
    out = _summary(env, p, done)
    assert "goodput (this run" in out and f"goodput of release {done.release.release_id}" in out
    assert "share of each stage's output removed" in out


def test_the_demo_prints_goodput_and_its_card_has_it(tmp_path):
    data_dir = tmp_path / "demo"
    out = run_demo(data_dir, cwd=tmp_path)
    assert "goodput (this run; requests = distinct model requests it made)" in out
    assert "share of each stage's output removed, by filter (this run)" in out
    (release_id,) = re.findall(r"^release (\S+)  \(SIMULATED", out, re.M)
    m = re.search(r"^release +([\d,]+) +([\d,]+) +([\d,]+) +([\d,]+) ", out, re.M)
    assert m, out
    requests, tokens_in, tokens_out, rows = (int(g.replace(",", "")) for g in m.groups())

    from sqlalchemy import create_engine

    db = create_engine(f"sqlite:///{data_dir / 'lineage.db'}")
    ledger = _rows(db, "SELECT prompt_tokens, completion_tokens FROM model_requests")
    assert requests == len(ledger) > 0  # one run on a fresh database made every request
    assert tokens_in == sum(r["prompt_tokens"] for r in ledger)
    assert tokens_out == sum(r["completion_tokens"] for r in ledger)
    assert rows == sum(int(n) for n in re.findall(r"^  \w+: (\d+) rows$", out, re.M))

    name, version = release_id.split("/")
    readme = (data_dir / "store" / "releases" / name / version / "README.md").read_text()
    assert "## Goodput" in readme and "simulator's (a test double)" in readme
    assert f"| release | {requests:,} | {tokens_in:,} | {tokens_out:,} | {rows:,} |" in readme
    manifest = json.loads(
        (data_dir / "store" / "releases" / name / version / "manifest.json").read_text()
    )
    assert manifest["counts"]["goodput"]["stages"]["release"]["requests"] == requests
    db.dispose()


def _summary(env, params, result) -> str:
    import io

    buf = io.StringIO()
    print_summary(env, params, result, buf)
    return buf.getvalue()
