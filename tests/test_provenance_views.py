"""Provenance views (sql/migrations/0004_provenance_views.sql) after the whole pipeline ran on
the simulator, on Postgres + S3 and on SQLite. Each view is cross-checked against the base
tables read with plain queries and summed in Python, and against the published files."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, text

from lgt_ops.llm.errors import EndpointDown
from lgt_ops.params import RunParams
from lgt_ops.pipeline import run_local
from lgt_ops.runctx import RunContext
from lgt_ops.sources import image_locations
from lgt_ops.stages import ingest
from tests import release_checks as checks
from tests.samples import SAMPLE, upload_sample

PREFIX = "sources/sample/"
RELEASE = "views"
MODEL_STAGES = ("annotate", "mcq", "blind", "cot", "compose", "cot2", "expand")
COUNTERS = (
    "items_in",
    "items_skipped",
    "items_out",
    "items_rejected",
    "requests_sent",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
)


def _run(env, **params):
    conf = {
        "source": PREFIX,
        "release_name": RELEASE,
        "allow_simulated": True,
        "k_rollouts": 2,
        **params,
    }
    p = RunParams.from_conf(conf)
    return run_local(env.with_settings(p.apply(env.settings)), p)


def _rows(db: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with db.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql), params).mappings()]


def _rows_tuples(db: Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


# -- what each view should say, computed from the base tables ----------------------------------
def expected_funnel(db: Engine, run_id: str) -> dict[str, dict[str, Any]]:
    """Per stage: the counters of the last attempt of each shard, summed."""
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for r in _rows(db, "SELECT * FROM stage_runs WHERE run_id = :r", r=run_id):
        key = (r["stage"], r["shard_index"])
        if key not in last or r["attempt"] > last[key]["attempt"]:
            last[key] = r
    out: dict[str, dict[str, Any]] = {}
    for (stage, _), r in last.items():
        agg = out.setdefault(stage, dict.fromkeys(COUNTERS, 0) | {"shards": 0, "failed": 0})
        for c in COUNTERS:
            agg[c] += r[c]
        agg["shards"] += 1
        agg["failed"] += r["status"] == "failed"
    return out


def funnel(db: Engine, run_id: str) -> dict[str, dict[str, Any]]:
    rows = _rows(db, "SELECT * FROM v_stage_funnel WHERE run_id = :r", r=run_id)
    return {
        r["stage"]: {c: int(r[c]) for c in COUNTERS}
        | {"shards": int(r["shards"]), "failed": int(r["failed_shards"])}
        for r in rows
    }


def check_funnels(db: Engine) -> None:
    for (run_id,) in _rows_tuples(db, "SELECT run_id FROM pipeline_runs"):
        assert funnel(db, run_id) == expected_funnel(db, run_id), run_id


def check_rejections(db: Engine) -> None:
    want = Counter(_rows_tuples(db, "SELECT run_id, stage, reason FROM rejections"))
    got = {
        (r["run_id"], r["stage"], r["reason"]): int(r["rejected"])
        for r in _rows(db, "SELECT * FROM v_stage_rejections")
    }
    assert want and got == dict(want)


def check_image_outputs(db: Engine) -> None:
    q_image = dict(_rows_tuples(db, "SELECT question_id, image_id FROM questions"))
    want: dict[str, Counter] = defaultdict(Counter)
    for image_id, stage in _rows_tuples(db, "SELECT image_id, stage FROM questions"):
        want[image_id][f"questions_stage{stage}"] += 1
    for (image_id,) in _rows_tuples(db, "SELECT image_id FROM sources WHERE status = 'ok'"):
        want[image_id]["sources"] += 1
    for table in ("rollouts", "expansions", "pairs"):
        for (qid,) in _rows_tuples(db, f"SELECT question_id FROM {table}"):
            want[q_image[qid]][table] += 1
    passed = {
        (q_image[qid], tid)
        for tid, qid, ok in _rows_tuples(
            db, "SELECT trace_id, question_id, passed FROM trace_verdicts"
        )
        if ok
    }
    for image_id, _ in passed:
        want[image_id]["traces_passed"] += 1
    members = _rows_tuples(db, "SELECT release_id, image_id FROM release_members")
    for _release, image_id in members:
        want[image_id]["release_rows"] += 1
    for _, image_id in set(members):
        want[image_id]["releases"] += 1

    rows = _rows(db, "SELECT * FROM v_image_outputs")
    assert {r["image_id"] for r in rows} == {
        i for (i,) in _rows_tuples(db, "SELECT image_id FROM images")
    }
    for r in rows:
        got = {k: int(v) for k, v in r.items() if k != "image_id" and v}
        assert got == dict(want[r["image_id"]]), r["image_id"]
    assert sum(r["release_rows"] for r in rows) == len(members)
    assert any(r["traces_passed"] for r in rows) and any(r["questions_stage2"] for r in rows)


def check_model_usage(db: Engine) -> None:
    """Tokens of the distinct requests behind each release, summed here from plain reads."""
    q_key = dict(_rows_tuples(db, "SELECT question_id, request_key FROM questions"))
    trace_key = dict(_rows_tuples(db, "SELECT rollout_id, request_key FROM rollouts"))
    trace_key |= dict(_rows_tuples(db, "SELECT expansion_id, request_key FROM expansions"))
    pairs = {
        p: (c, r)
        for p, c, r in _rows_tuples(db, "SELECT pair_id, chosen_id, rejected_id FROM pairs")
    }
    ledger = {r["request_key"]: r for r in _rows(db, "SELECT * FROM model_requests")}
    keys: dict[str, set[str]] = defaultdict(set)
    naive: Counter = Counter()  # references, before deduplication
    for release_id, qid, tid, pid in _rows_tuples(
        db, "SELECT release_id, question_id, trace_id, pair_id FROM release_members"
    ):
        refs = [q_key.get(qid)]
        refs += [trace_key[t] for t in ((tid,) if tid else ()) + (pairs[pid] if pid else ())]
        keys[release_id].update(k for k in refs if k)
        naive[release_id] += sum(1 for k in refs if k)
    want: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0, 0])
    for release_id, ks in keys.items():
        for k in ks:
            r = ledger[k]
            agg = want[(release_id, r["role"], r["model"], r["served_model"])]
            agg[0] += 1
            agg[1] += r["prompt_tokens"] or 0
            agg[2] += r["completion_tokens"] or 0

    rows = _rows(db, "SELECT * FROM v_release_model_usage")
    got = {
        (r["release_id"], r["role"], r["model"], r["served_model"]): [
            int(r["requests"]),
            int(r["prompt_tokens"]),
            int(r["completion_tokens"]),
        ]
        for r in rows
    }
    assert got == dict(want)
    assert {role for _, role, _, _ in got} == {"vlm", "llm", "reasoner"}
    assert all(served.startswith("lgt-simulator:") for *_, served in got)  # the test double
    for release_id, ks in keys.items():
        # Rows share requests (a question behind several rows, k rollouts in one request):
        # the view counts each request once.
        assert sum(v[0] for k, v in got.items() if k[0] == release_id) == len(ks)
        assert naive[release_id] > len(ks)


def check_lineage(db: Engine, store: Any, release_id: str, tmp: Path) -> list[dict[str, Any]]:
    rows = _rows(db, "SELECT * FROM v_release_row_lineage WHERE release_id = :r", r=release_id)
    members = _rows_tuples(
        db, "SELECT split, row_id FROM release_members WHERE release_id = :r", r=release_id
    )
    assert sorted((r["split"], r["row_id"]) for r in rows) == sorted(members)  # one row each

    with db.connect() as conn:
        first_source = image_locations(conn, sorted({r["image_id"] for r in rows}))
    questions = {r["question_id"]: r for r in _rows(db, "SELECT * FROM questions")}
    ledger = {r["request_key"]: r for r in _rows(db, "SELECT * FROM model_requests")}
    expansions = {r["expansion_id"]: r for r in _rows(db, "SELECT * FROM expansions")}
    rollouts = {r["rollout_id"]: r for r in _rows(db, "SELECT * FROM rollouts")}
    for r in rows:
        q = questions[r["question_id"]]
        assert (r["image_id"], r["question_request_key"]) == (q["image_id"], q["request_key"])
        assert (r["source_bucket"], r["source_key"]) == first_source[r["image_id"]]
        req = ledger[q["request_key"]]
        for col in ("model", "served_model", "template_id", "template_version", "task_id"):
            assert r[col] == req[col], col
        assert r["prompt_tokens"] == req["prompt_tokens"] and r["run_id"] == req["run_id"]
        if r["split"].startswith("sft_"):
            e = expansions[r["trace_id"]]
            er = ledger[e["request_key"]]
            assert r["expansion_request_key"] == e["request_key"]
            assert (r["expansion_model"], r["expansion_served_model"]) == (
                er["model"],
                er["served_model"],
            )
            assert r["expansion_completion_tokens"] == er["completion_tokens"] > 0
            assert r["rollout_id"] == e["rollout_id"]
            assert r["rollout_request_key"] == rollouts[e["rollout_id"]]["request_key"]
        else:
            assert r["expansion_request_key"] is None and r["rollout_id"] is None
        assert (r["pair_id"] is not None) == r["split"].startswith("dpo_")

    # The SFT rows as published say the same as the view.
    name, version = release_id.split("/")
    local = checks.download(store, f"releases/{name}/{version}", tmp / version)
    by_row = {(r["split"], r["row_id"]): r for r in rows}
    published = 0
    for split in ("sft_stage1", "sft_stage2"):
        cols = ["row_id", "image_id", "question_id", "rollout_id", "request_key"]
        for f in sorted((local / "sft" / split[-6:]).glob("*.parquet")):
            for p in pq.read_table(f, columns=cols).to_pylist():
                v = by_row[(split, p["row_id"])]
                assert (v["image_id"], v["question_id"]) == (p["image_id"], p["question_id"])
                assert (v["rollout_id"], v["expansion_request_key"]) == (
                    p["rollout_id"],
                    p["request_key"],
                )
                published += 1
    assert published == sum(1 for r in rows if r["split"].startswith("sft_")) > 0

    # ... and so does the hop-by-hop query, for one stage-2 SFT row.
    row = next(r for r in rows if r["split"] == "sft_stage2")
    hops = checks.walk_lineage(db, release_id, row["row_id"])
    (exp,) = hops["expansion"]
    (roll,) = hops["rollout"]
    (image,) = hops["image"]
    assert (exp.request_key, exp.served_model) == (
        row["expansion_request_key"],
        row["expansion_served_model"],
    )
    assert (roll.ref_id, roll.request_key) == (row["rollout_id"], row["rollout_request_key"])
    assert (hops["question"][0].request_key, image.ref_id) == (
        row["question_request_key"],
        row["image_id"],
    )
    assert f"{row['source_bucket']}/{row['source_key']}" in {s.ref_id for s in hops["source"]}
    return rows


def check_views(db: Engine, store: Any, release_id: str, tmp: Path) -> list[dict[str, Any]]:
    check_funnels(db)
    check_rejections(db)
    check_image_outputs(db)
    check_model_usage(db)
    return check_lineage(db, store, release_id, tmp)


# -- the tests ---------------------------------------------------------------------------------
def _with_endpoint(settings, role: str, **update: Any):
    eps = dict(settings.endpoints)
    eps[role] = eps[role].model_copy(update=update)
    return settings.model_copy(update={"endpoints": eps})


def test_views_on_postgres_after_a_failed_and_resumed_run(pg_s3_env, tmp_path):
    env = pg_s3_env.with_settings(pg_s3_env.settings.model_copy(update={"shard_size": 4}))
    upload_sample(env.store, PREFIX)
    # The same bytes under a second key: one image, two live sources (the copy sorts last).
    copies = sorted((SAMPLE / "images").iterdir())
    for path in copies:
        env.store.put(f"{PREFIX}zz-copies/{path.name}", path.read_bytes())

    # The reasoner passes the preflight, then is down (503) for expand: expand fails on the
    # first shard and the run stops there.
    from lgt_ops.llm.simulator import BackgroundSimulator, SimConfig

    with BackgroundSimulator(SimConfig(down_after_served=0)) as down:
        broken = _with_endpoint(env.settings, "reasoner", base_url=down.base_url, down_after_s=0.3)
        with pytest.raises(EndpointDown, match="reasoner endpoint"):
            _run(env.with_settings(broken), release_version="v1")
    run_id = env.run.run_id
    stopped = funnel(env.db, run_id)
    assert stopped == expected_funnel(env.db, run_id)
    assert stopped["expand"]["failed"] == stopped["expand"]["shards"] == 1
    assert stopped["cot"]["failed"] == 0 and stopped["cot"]["requests_sent"] > 0

    # The retry of the same run resumes: each shard counts once, as its last attempt.
    done = _run(env, release_version="v1")
    resumed = funnel(env.db, run_id)
    assert resumed == expected_funnel(env.db, run_id)
    assert resumed["expand"]["shards"] == 3 and resumed["expand"]["failed"] == 0
    with env.db.connect() as conn:
        all_attempts = conn.execute(
            text("SELECT SUM(requests_sent) FROM stage_runs WHERE run_id = :r AND stage = 'cot'"),
            {"r": run_id},
        ).scalar_one()
    assert resumed["cot"]["requests_sent"] == all_attempts - stopped["cot"]["requests_sent"]
    assert resumed["cot"]["items_skipped"] > 0  # shard 0's rollouts, made by attempt 1

    # Delete the copy of the image with the most release rows: its source row stays, as
    # removed, and no longer counts as a source of the image.
    by_id = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in copies}
    with env.db.connect() as conn:
        gone_id = conn.execute(
            text(
                "SELECT image_id FROM release_members WHERE release_id = :r"
                " GROUP BY image_id ORDER BY COUNT(*) DESC, image_id LIMIT 1"
            ),
            {"r": done.release.release_id},
        ).scalar_one()
    env.store.delete(f"{PREFIX}zz-copies/{by_id[gone_id].name}")
    assert ingest.scan(env, PREFIX).removed == 1

    rows = check_views(env.db, env.store, done.release.release_id, tmp_path)
    outputs = {r["image_id"]: r["sources"] for r in _rows(env.db, "SELECT * FROM v_image_outputs")}
    assert outputs == {i: 1 if i == gone_id else 2 for i in by_id}
    assert all(not r["source_key"].startswith(f"{PREFIX}zz-copies/") for r in rows)
    assert {r["ok_sources"] for r in rows if r["image_id"] == gone_id} == {1}
    assert {r["ok_sources"] for r in rows if r["image_id"] != gone_id} == {2}


def test_views_on_sqlite_and_a_rerun_that_asks_nothing(local_env, sim, tmp_path):
    env = local_env
    upload_sample(env.store, PREFIX)
    first = _run(env, release_version="v1")
    served = sim.sim.served
    again = _run(env.with_run(RunContext("again")), release_version="v2")
    assert sim.sim.served == served

    rerun = funnel(env.db, "again")
    assert rerun == expected_funnel(env.db, "again")
    assert sum(s["requests_sent"] for s in rerun.values()) == 0
    for stage in MODEL_STAGES:
        assert rerun[stage]["items_skipped"] == rerun[stage]["items_in"] > 0, stage
        assert rerun[stage]["items_out"] == rerun[stage]["prompt_tokens"] == 0, stage
    made = funnel(env.db, first.run_id)
    for stage in MODEL_STAGES:
        assert made[stage]["requests_sent"] > 0 and made[stage]["items_skipped"] == 0, stage

    # A new mcq dedup threshold re-runs mcq: the same requests, all answered from the ledger.
    dedup = env.with_settings(env.settings.with_method(mcq_dedup_threshold=0.5))
    _run(dedup.with_run(RunContext("dedup")), stages=["ingest", "annotate", "mcq"])
    assert sim.sim.served == served
    hits = funnel(env.db, "dedup")
    assert hits == expected_funnel(env.db, "dedup")
    assert hits["mcq"]["cache_hits"] == hits["mcq"]["items_in"] > 0
    assert hits["mcq"]["requests_sent"] == hits["mcq"]["items_skipped"] == 0

    check_views(env.db, env.store, first.release.release_id, tmp_path)
    rows = check_views(env.db, env.store, again.release.release_id, tmp_path)
    assert {r["ok_sources"] for r in rows} == {1}
    usage = _rows(env.db, "SELECT * FROM v_release_model_usage ORDER BY release_id, role")
    by_release = defaultdict(list)
    for r in usage:
        by_release[r["release_id"]].append({k: v for k, v in r.items() if k != "release_id"})
    assert by_release[first.release.release_id] == by_release[again.release.release_id]
    outputs = _rows(env.db, "SELECT * FROM v_image_outputs WHERE release_rows > 0")
    assert outputs and {r["releases"] for r in outputs} == {2}
