"""The method after stage 1: trace parsing, the filter's rules, DPO pair rules, composition
operators, and the whole chain on the simulator (re-runs free, changes re-run only what
depends on them)."""

from __future__ import annotations

import pytest
from sqlalchemy import bindparam, text

from lgt_ops import composition, traces
from lgt_ops.annotations import ImageContext
from lgt_ops.config import MethodParams
from lgt_ops.questions import Question
from lgt_ops.release.splits import sft_choice
from lgt_ops.runctx import RunContext
from lgt_ops.stages import filter as trace_filter
from lgt_ops.stages import pairs
from lgt_ops.traces import Trace
from tests import release_checks as checks
from tests.samples import upload_sample

GOOD = "<think>\nThe question asks about the cup. I look at it closely and it is red.\n</think>\n\n"


# -- parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "letter", "error"),
    [
        (GOOD + "Answer: B", "B", None),
        (GOOD + "Answer: (c).", "C", None),
        (GOOD + "I think it is B.", None, "no_answer"),
        (GOOD + "Answer: A\nAnswer: B", None, "conflicting_answers"),
        (GOOD + "Answer: F", None, "answer_not_an_option"),
        ("<think>\nstill thinking", None, "no_think_close"),
        ("<think>\na</think>b</think>\nAnswer: A", None, "multiple_think_blocks"),
    ],
)
def test_final_answers_are_parsed_strictly(reply, letter, error):
    parsed = traces.parse(reply, 4)
    assert (parsed.letter, parsed.error) == (letter, error)


def test_truncated_replies_say_so():
    assert traces.parse("<think>\ncut off mid", 4, truncated=True).error == "truncated"


def test_behaviours_are_counted_in_the_thinking_only():
    text = (
        "<think>\nFirst, locate the cup. Wait, that is a bowl. Let me verify the colour."
        " By elimination, B is out.\n</think>\n\nAnswer: A (verify)"
    )
    assert traces.behaviours(text) == {
        "verification": 1, "backtracking": 1, "subgoal": 1, "backward": 1}


# -- filter ------------------------------------------------------------------------------------
def trace(tid, text, *, correct=True, kind="expansion", parent=None, error=None, letter="A"):
    return Trace(tid, kind, "q1", text, letter, correct, error, parent, f"req-{tid}")


def test_filter_gives_each_trace_its_first_failed_rule():
    m = MethodParams(trace_min_chars=40, trace_max_chars=700)
    body = "I compare the cup with the plate next to it and check the colour twice. "
    ts = [
        trace("ok", GOOD + "Answer: A"),
        trace("dup", GOOD + "Answer: A"),
        trace("wrong", GOOD.replace("red", "blue") + "Answer: B", correct=False, letter="B"),
        trace("short", "<think>\nx\n</think>\n\nAnswer: A"),
        trace("long", "<think>\n" + body * 12 + "\n</think>\n\nAnswer: A"),
        trace("leak", GOOD.replace("I look", "According to the description, I look")
              + "Answer: A"),
        trace("loop", "<think>\n" + "let me check again " * 30 + "\n</think>\n\nAnswer: A"),
        trace("bad", GOOD + "maybe A", correct=False, error="no_answer", letter=None),
    ]
    verdicts = {v.trace.trace_id: v for v in trace_filter.judge(ts, m)}
    assert {k: v.reason for k, v in verdicts.items()} == {
        "ok": None, "dup": "near_duplicate", "wrong": "wrong_answer", "short": "too_short",
        "long": "too_long", "leak": "leaks_metadata", "loop": "degenerate_repetition",
        "bad": "unparseable",
    }
    assert [k for k, v in verdicts.items() if v.passed] == ["ok"]
    assert verdicts["wrong"].well_formed and not verdicts["bad"].well_formed


# -- pairs -------------------------------------------------------------------------------------
def test_pair_rules_follow_the_lpt_recipe():
    r_ok = trace("r_ok", "right cot", kind="rollout")
    r_bad = trace("r_bad", "wrong cot", kind="rollout", correct=False)
    fixed = trace("fixed", "wrong cot, then fixed", parent="r_bad")
    still = trace("still", "wrong cot, still wrong", parent="r_bad", correct=False)
    broke = trace("broke", "right cot, then broken", parent="r_ok", correct=False)
    garbled = trace("garbled", "right cot, garbled", parent="r_ok", correct=False)
    ts = [r_ok, r_bad, fixed, still, broke, garbled]
    passed = {"r_ok", "fixed"}
    formed = passed | {"r_bad", "still", "broke"}  # `garbled` is not well formed
    got = {(p.rule, p.chosen.trace_id, p.rejected.trace_id)
           for p in pairs.candidates(ts, passed, formed)}
    assert got == {
        ("X->O>X", "fixed", "r_bad"),
        ("X->O>X->X", "fixed", "still"),
        ("O>O->X", "r_ok", "broke"),
        ("O>X", "r_ok", "r_bad"),
    }
    capped = pairs.select(pairs.candidates(ts, passed, formed), 2, seed=1)
    assert [p.rule for p in capped] == ["X->O>X", "X->O>X->X"]  # self-correction first


def test_sft_mix_alternates_corrected_and_verified_longest_first():
    ts = [trace(f"t{i}", "x" * (10 + i)) for i in range(5)]
    origin = {"t0": "verified", "t1": "verified", "t2": "corrected", "t3": "corrected",
              "t4": "verified"}
    assert [t.trace_id for t in sft_choice(ts, origin, 3)] == ["t3", "t4", "t2"]


# -- composition -------------------------------------------------------------------------------
def q(qid, skill, question, answer, options, grounding):
    return Question(qid, "img", 1, skill, question, tuple(options), "ABCD"[options.index(answer)],
                    answer, tuple(grounding))


def test_composition_operators_derive_answers_from_parents():
    ctx = ImageContext(image_id="img", width=100, height=100, caption="c", caption_id=None,
                       objects_id=None, objects=(
        {"id": "o1", "label": "cup", "box": [0, 0, 10, 10]},
        {"id": "o2", "label": "cup", "box": [20, 0, 30, 10]},
        {"id": "o3", "label": "plate", "box": [40, 0, 60, 10]},
        {"id": "o4", "label": "table", "box": [0, 20, 90, 90]},
        {"id": "o5", "label": "plate", "box": [60, 0, 70, 10]},
        {"id": "o6", "label": "plate", "box": [70, 0, 80, 10]},
    ))
    cups = q("a", "counting", "How many cups are there?", "2", ["1", "2", "3", "4"], ["o1", "o2"])
    plates = q("b", "counting", "How many plates?", "3", ["1", "2", "3", "0"], ["o3", "o5", "o6"])
    left = q("c", "spatial", "What is on the table's left side?", "cup",
             ["cup", "plate", "fork", "spoon"], ["o1", "o4"])
    colour = q("d", "attribute", "What colour is the cup?", "red",
               ["red", "blue", "green", "white"], ["o1"])
    found = {(c.operator, tuple(p.question_id for p in c.parents)): c
             for c in composition.candidates(ctx, [cups, plates, left, colour], 4, seed=0)}
    assert found[("compare", ("a", "b"))].answer == "more plates, by 1"
    assert found[("count_over", ("a", "b"))].answer == "5"
    chain = found[("chain", ("c", "d"))]
    assert (chain.answer, chain.problem) == ("red", None)
    assert set(chain.avoid) == {"cup", "cups"}  # the composed text must not name the cup
    assert found[("conjunction", ("c", "d"))].answer == "cup; red"
    for c in found.values():  # every option set: the answer and n - 1 distinct distractors
        assert len(set(c.options)) == 4 and c.answer not in c.distractors
    chosen = composition.select(
        composition.candidates(ctx, [cups, plates, left, colour], 4, seed=0),
        composition.OPERATORS, per_image=3, per_parent=1, n_options=4)
    used = [p.question_id for c in chosen for p in c.parents]
    assert len(used) == len(set(used))  # each parent feeds at most one composition


# -- the chain on the simulator ---------------------------------------------------------------
_run = checks.run_pipeline


def _served_by_stage(env, run_id):
    with env.db.connect() as conn:
        return dict(conn.execute(text(
            "SELECT stage, SUM(requests_sent) FROM stage_runs WHERE run_id = :r GROUP BY stage"),
            {"r": run_id}).all())


def test_whole_chain_on_postgres_and_s3_reruns_free_and_changes_rerun_dependents(
        pg_s3_env, sim, tmp_path):
    env = pg_s3_env
    upload_sample(env.store, "sources/sample/")
    first = _run(env, release_version="v1")
    assert first.release is not None
    local = checks.download(env.store, first.release.uri.split("/", 3)[3], tmp_path / "v1")
    checks.check_splits(checks.load_splits(local))
    checks.check_composition(env.db)
    checks.check_rejections(env.db)
    behaviours = first.release.manifest["counts"]["splits"]["sft_stage1"]
    assert behaviours["rows"] > 0 and behaviours["with_verification"] > 0
    card = env.store.get("releases/method/v1/README.md").decode()
    assert "## Cognitive behaviours" in card and "| sft_stage1 |" in card
    assert "config_name: sft_stage2_merged" in card and "config_name: dpo_stage2" in card

    served = sim.sim.served
    again = _run(env.with_run(RunContext("rerun")), release_version="v2")
    assert sim.sim.served == served  # nothing is asked twice
    assert again.release.content_sha256 == first.release.content_sha256

    # A new expansion setting re-runs expand, filter and pairs; questions and rollouts stay.
    changed = env.with_settings(env.settings.with_method(expand_temperature=0.3))
    third = _run(changed.with_run(RunContext("changed")), release_version="v3")
    by_stage = _served_by_stage(env, "changed")
    assert by_stage["expand"] > 0
    assert by_stage["mcq"] == by_stage["compose"] == by_stage["cot"] == 0
    assert third.stages["filter"]["items_skipped"] == 0
    assert third.release.content_sha256 != first.release.content_sha256


def test_llm_behaviour_tagger_is_off_by_default_and_feeds_the_release_when_on(local_env, sim):
    env = local_env
    upload_sample(env.store, "sources/sample/")
    off = _run(env, release_version="off")
    assert off.stages["tag"]["requests_sent"] == 0
    served = sim.sim.served

    on = _run(env.with_run(RunContext("tagged")), release_version="on", behaviour_tagger="llm")
    with env.db.connect() as conn:
        tags = conn.execute(text("SELECT * FROM behaviour_tags")).all()
        passed = conn.execute(text("SELECT COUNT(*) FROM trace_verdicts WHERE passed")).scalar()
    # Only the tagger asked anything: one request per trace that passed the filter.
    assert sim.sim.served - served == len(tags) == passed
    assert {t.tagger for t in tags} == {f"llm:{env.settings.endpoint('llm').model}"}
    assert on.release.manifest["fingerprints"]["tag"]
    rows = checks.load_splits(checks.download(
        env.store, "releases/method/on", env.settings.data_dir / "on"))["sft_stage1"]
    by_trace = {t.trace_id: t for t in tags}
    for row in rows.remove_columns(["images"]):
        tagged = by_trace[row["trace_id"]]
        assert [row[b] for b in traces.BEHAVIOURS] == [
            getattr(tagged, b) for b in traces.BEHAVIOURS]


def test_reasoning_content_is_kept_when_the_server_separates_it(local_env, sim):
    env = local_env
    upload_sample(env.store, "sources/sample/")
    sim.sim.cfg.split_reasoning = True  # like vLLM with a reasoning parser
    sim.sim.cfg.unparseable_rate = 0.0
    sim.sim.cfg.conflicting_rate = 0.0  # every expansion answers, so every tail is checked
    sim.sim.cfg.no_think_close_rate = 0.0  # (tests/test_trace_quality.py has unclosed replies)
    _run(env, stages=["ingest", "annotate", "mcq", "blind", "cot", "expand"], k_rollouts=2)
    with env.db.connect() as conn:
        rows = conn.execute(text(
            "SELECT e.*, q.answer_letter FROM expansions e"
            " JOIN questions q ON q.question_id = e.question_id")).all()
    assert rows and all(r.reasoning_content for r in rows)
    for r in rows:
        thinking, _, tail = r.trace.partition("</think>")
        assert r.reasoning_content.strip() in thinking  # the separated thinking, in the trace
        assert tail.strip() == f"Answer: {r.final_letter}"


def test_a_refresh_finds_the_undone_traces_by_id_and_plans_as_a_first_run_would(local_env, sim):
    from lgt_ops import current

    env = local_env
    upload_sample(env.store, "sources/sample/")
    first = _run(env, release_version="v1")
    run_env = env.with_settings(checks.run_params().apply(env.settings))  # as _run applies them
    later = run_env.with_run(RunContext("later"))
    fp = trace_filter.stage_fingerprint(run_env)
    columns = "trace_id, question_id, passed, well_formed, reason, verification, backtracking"
    with env.db.begin() as conn:
        qids = [r[0] for r in conn.execute(text(
            "SELECT DISTINCT question_id FROM trace_verdicts ORDER BY question_id"))]
        undone = qids[::3]  # forget a third of the filter's and pairs' work
        ids = current.trace_ids_of(conn, run_env, undone)
        items = [trace_filter.input_id(q, ts) for q, ts in ids.items()]
        kept = conn.execute(text(f"SELECT {columns} FROM trace_verdicts ORDER BY 1")).all()
        conn.execute(text("DELETE FROM stage_items WHERE stage IN ('filter', 'pairs')"
                          " AND item_id IN :ids").bindparams(bindparam("ids", expanding=True)),
                     {"ids": items})
        conn.execute(text("DELETE FROM trace_verdicts WHERE question_id IN :ids")
                     .bindparams(bindparam("ids", expanding=True)), {"ids": undone})
    with env.db.connect() as conn:
        assert not current.worked_before(conn, run_env, "filter", fp)  # its own run only
        assert current.worked_before(conn, later, "filter", fp)
        as_first = trace_filter.pending_traces(conn, run_env, "filter", fp, qids)
        as_refresh = trace_filter.pending_traces(conn, later, "filter", fp, qids)
    assert as_refresh == as_first
    assert sorted(as_refresh.traces) == undone and as_refresh.considered == len(qids)

    again = _run(later, release_version="v2")
    assert again.stages["filter"]["items_skipped"] == len(qids) - len(undone)
    assert again.stages["pairs"]["items_skipped"] == len(qids) - len(undone)
    with env.db.connect() as conn:
        assert conn.execute(text(f"SELECT {columns} FROM trace_verdicts ORDER BY 1")).all() == kept
    assert again.release.content_sha256 == first.release.content_sha256
