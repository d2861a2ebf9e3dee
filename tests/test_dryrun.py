"""The dry run counts what downstream stages will have to do, not only what is ready now."""

from __future__ import annotations

from fractions import Fraction
from math import ceil

from sqlalchemy import text

from lgt_ops import pipeline
from lgt_ops.config import MethodParams, settings_from_env
from lgt_ops.dryrun import FanOut, Ready, estimate, fan_outs
from lgt_ops.params import RunParams
from tests.samples import upload_sample


def _settings(supports_n: bool = True, tagger: str = "heuristic"):
    s = settings_from_env({}).with_method(behaviour_tagger=tagger)
    eps = {**s.endpoints, "vlm": s.endpoints["vlm"].model_copy(update={"supports_n": supports_n})}
    return s.model_copy(update={"endpoints": eps})


FAN = fan_outs(_settings())


def test_expand_counts_what_the_pending_cot_rollouts_will_need():
    # The reported case: questions exist, cot has not run under its fingerprint: 65 ready
    # cot items on 10 images and nothing expand could plan yet.
    m = MethodParams()
    cot = [Ready(f"img{i % 10}", 1) for i in range(65)]
    report = estimate({"cot": cot, "expand": []}, FAN)
    assert report["cot"] == {
        "ready_items": 65,
        "waiting_images": 0,
        "pending_items_at_most": 65,
        "requests_at_most": 65,  # one request with n=k per question
    }
    # per stage-1 question to roll out: its rollouts to expand, and those of the compositions
    # it will feed (compose runs after cot): (mcq + compose) questions per mcq question
    per_question = min(m.expand_rollouts_per_question, m.cot_rollouts)
    expand = ceil(
        Fraction(65 * per_question * (m.mcq_per_image + m.compose_per_image), m.mcq_per_image)
    )
    assert report["expand"] == {
        "ready_items": 0,
        "waiting_images": 10,
        "pending_items_at_most": expand,
        "requests_at_most": expand * m.expand_per_rollout,
    }


def test_work_on_an_image_waiting_upstream_is_superseded_not_counted_twice():
    m = MethodParams()
    ready = {
        "mcq": [Ready("a", 1), Ready("b", 1)],  # new mcq fingerprint on images a and b
        "cot": [Ready("a", 1), Ready("a", 1), Ready("c", 1)],  # a's old questions, c's new one
    }
    report = estimate(ready, FAN)
    assert report["cot"]["ready_items"] == 1  # only c: a's questions will be replaced
    assert report["cot"]["waiting_images"] == 2
    assert report["cot"]["pending_items_at_most"] == 1 + 2 * m.mcq_per_image  # stage 1 only


def test_without_the_llm_tagger_tag_has_no_work_and_no_requests():
    report = estimate({"cot": [Ready("a", 1)], "tag": []}, FAN)
    assert report["tag"]["pending_items_at_most"] == 0
    m = MethodParams()
    fan = fan_outs(_settings(False, "llm"))
    assert fan["cot"] == FanOut(m.mcq_per_image, m.cot_rollouts)  # stage-1 questions
    assert fan["cot2"] == FanOut(m.compose_per_image, m.cot_rollouts)  # composed ones
    assert "harden" not in fan  # a rule stage: nothing to ask


def _questions(env) -> int:
    """Stage-1 questions that passed the blind check (what cot rolls out)."""
    with env.db.connect() as conn:
        return conn.execute(
            text("SELECT COUNT(*) FROM question_checks WHERE stage = 'blind' AND kept = :y"),
            {"y": True},
        ).scalar_one()


def test_dry_run_after_questions_exist_reports_the_expansions_to_come(local_env):
    base = {"source": "sources/sample/", "k_rollouts": 2, "allow_simulated": True}
    env = local_env.with_settings(RunParams.from_conf(base).apply(local_env.settings))
    upload_sample(env.store, "sources/sample/")
    first = RunParams.from_conf({**base, "stages": ["ingest", "annotate", "mcq", "blind"]})
    pipeline.run_local(env, first)
    questions = _questions(env)
    assert questions > 0

    report = pipeline.dry_run_report(env, RunParams.from_conf(base))
    stages = report["stages"]
    assert stages["mcq"]["pending_items_at_most"] == stages["blind"]["pending_items_at_most"] == 0
    assert stages["compose"]["ready_items"] == 0  # no parent has a pass rate yet
    assert stages["cot"]["ready_items"] == questions
    assert stages["expand"]["ready_items"] == 0  # nothing to plan: no rollouts yet
    assert stages["expand"]["waiting_images"] > 0
    m = env.settings.method  # per cot question: min(4 chosen, k=2), for it and its compositions
    assert stages["expand"]["pending_items_at_most"] == ceil(
        Fraction(questions * 2 * (m.mcq_per_image + m.compose_per_image), m.mcq_per_image)
    )
    assert stages["filter"] == stages["harden"] == {"model_calls": 0}

    later = ["cot", "compose", "cot2", "harden", "expand"]
    pipeline.run_local(env, RunParams.from_conf({**base, "stages": later}))
    after = pipeline.dry_run_report(env, RunParams.from_conf(base))["stages"]
    for name in ("annotate", "mcq", "blind", "compose", "cot", "cot2", "expand"):
        assert after[name]["pending_items_at_most"] == 0, (name, after[name])
