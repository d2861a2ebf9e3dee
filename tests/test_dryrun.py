"""The dry run counts what downstream stages will have to do, not only what is ready now."""

from __future__ import annotations

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
    cot = [Ready(f"img{i % 10}", 1) for i in range(65)]
    report = estimate({"cot": cot, "expand": []}, FAN)
    assert report["cot"] == {
        "ready_items": 65,
        "waiting_images": 0,
        "pending_items_at_most": 65,
        "requests_at_most": 65,  # one request with n=k per question
    }
    per_question = min(MethodParams().expand_rollouts_per_question, MethodParams().cot_rollouts)
    assert report["expand"] == {
        "ready_items": 0,
        "waiting_images": 10,
        "pending_items_at_most": 65 * per_question,
        "requests_at_most": 65 * per_question * MethodParams().expand_per_rollout,
    }


def test_work_on_an_image_waiting_upstream_is_superseded_not_counted_twice():
    m = MethodParams()
    questions = m.mcq_per_image + m.compose_per_image
    ready = {
        "mcq": [Ready("a", 1), Ready("b", 1)],  # new mcq fingerprint on images a and b
        "cot": [Ready("a", 1), Ready("a", 1), Ready("c", 1)],  # a's old questions, c's new one
    }
    report = estimate(ready, FAN)
    assert report["cot"]["ready_items"] == 1  # only c: a's questions will be replaced
    assert report["cot"]["waiting_images"] == 2
    assert report["cot"]["pending_items_at_most"] == 1 + 2 * questions


def test_without_the_llm_tagger_tag_has_no_work_and_no_requests():
    report = estimate({"cot": [Ready("a", 1)], "tag": []}, FAN)
    assert report["tag"]["pending_items_at_most"] == 0
    assert fan_outs(_settings(False, "llm"))["cot"] == FanOut(
        MethodParams().mcq_per_image + MethodParams().compose_per_image,
        MethodParams().cot_rollouts,
    )


def _questions(env) -> int:
    with env.db.connect() as conn:
        return conn.execute(text("SELECT COUNT(*) FROM questions")).scalar_one()


def test_dry_run_after_questions_exist_reports_the_expansions_to_come(local_env):
    base = {"source": "sources/sample/", "k_rollouts": 2, "allow_simulated": True}
    env = local_env.with_settings(RunParams.from_conf(base).apply(local_env.settings))
    upload_sample(env.store, "sources/sample/")
    first = RunParams.from_conf({**base, "stages": ["ingest", "annotate", "mcq", "compose"]})
    pipeline.run_local(env, first)
    questions = _questions(env)
    assert questions > 0

    report = pipeline.dry_run_report(env, RunParams.from_conf(base))
    stages = report["stages"]
    assert stages["mcq"]["pending_items_at_most"] == stages["compose"]["ready_items"] == 0
    assert stages["cot"]["ready_items"] == questions
    assert stages["expand"]["ready_items"] == 0  # nothing to plan: no rollouts yet
    assert stages["expand"]["waiting_images"] > 0
    assert stages["expand"]["pending_items_at_most"] == questions * 2  # min(4 chosen, k=2)
    assert stages["filter"] == {"model_calls": 0}

    pipeline.run_local(env, RunParams.from_conf({**base, "stages": ["cot", "expand"]}))
    after = pipeline.dry_run_report(env, RunParams.from_conf(base))["stages"]
    for name in ("annotate", "mcq", "compose", "cot", "expand"):
        assert after[name]["pending_items_at_most"] == 0, (name, after[name])
