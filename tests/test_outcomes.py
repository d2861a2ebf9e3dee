"""A model stage's request outcomes (lgt_ops/stages/outcomes.py): a request that ended
without usable output is one `request` rejection row; blind and cot, whose verdicts need
every sample, then stop with those rows and make no verdict (no question check, no
rollouts, no difficulty); with every sample answered they go on to their verdict."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lgt_ops.llm.outcome import Outcome
from lgt_ops.questions import Question
from lgt_ops.stages import blind, cot
from lgt_ops.stages.outcomes import one_answer, request_rejection, unanswered
from lgt_ops.stages.runner import WorkItem

FP = "fp-test"
GOOD = "<think>\nThe cup is red.\n</think>\n\nAnswer: B"


def _question() -> Question:
    return Question(
        "ab12cd34" * 8, "img-1", 1, "color", "What colour is the cup?",
        ("blue", "red", "green", "black"), "B", "red", ("o1",),
    )  # fmt: skip


def _item(env, stage) -> WorkItem:
    """An item of three separate requests (distinct seeds), as without `n` support."""
    q = _question()
    (base,) = stage.build_requests(env, q)[:1]
    reqs = [replace(base, sampling={**base.sampling, "n": 1, "seed": s}) for s in (3, 1, 2)]
    return WorkItem(q.question_id, q.image_id, reqs, q)


def _outcomes(item: WorkItem, statuses: list[str]) -> list[Outcome]:
    out = []
    for req, status in zip(item.requests, statuses, strict=True):
        if status == "ok":
            choice = {"index": 0, "message": {"content": GOOD}, "finish_reason": "stop"}
            out.append(Outcome(req, "ok", response={"choices": [choice]}))
        else:
            out.append(Outcome(req, status, error_class="context_too_long", error_detail="4k"))
    return out


@pytest.mark.parametrize("stage", [blind, cot])
def test_a_sample_without_output_is_rejected_and_stops_the_verdict(local_env, stage):
    item = _item(local_env, stage)
    outcomes = _outcomes(item, ["rejected", "ok", "invalid_output"])
    rows = stage.handle(local_env, FP, item, outcomes)
    bad = [outcomes[0], outcomes[2]]
    want = [request_rejection(local_env, stage.STAGE, FP, item, o) for o in bad]
    assert rows.tables == {"rejections": want}
    assert rows.outputs == 0
    first = want[0]
    assert (first["item_kind"], first["item_ref"], first["reason"]) == (
        "request",
        item.item_id,
        "context_too_long",
    )
    assert first["request_key"] == outcomes[0].request.key
    assert first["image_id"] == "img-1" and first["detail"] == "4k"
    if stage is cot:
        assert cot.rollout_rows(local_env, cot.STAGE, FP, item.context, item, outcomes)[1] is None


@pytest.mark.parametrize("stage", [blind, cot])
def test_every_sample_answered_gives_a_verdict_and_no_request_rejection(local_env, stage):
    item = _item(local_env, stage)
    outcomes = _outcomes(item, ["ok", "ok", "ok"])
    assert unanswered(local_env, stage.STAGE, FP, item, outcomes) is None
    rows = stage.handle(local_env, FP, item, outcomes)
    assert not [r for r in rows.tables.get("rejections", []) if r["item_kind"] == "request"]
    verdict = "question_checks" if stage is blind else "difficulty"
    assert len(rows.tables[verdict]) == 1


def test_one_answer_holds_the_rejection_of_its_request(local_env):
    item = _item(local_env, blind)
    item.requests[1:] = []
    for status, n in (("ok", 0), ("rejected", 1)):
        (outcome,) = _outcomes(item, [status])
        got, rows, reject = one_answer(local_env, "blind", FP, item, [outcome])
        assert got is outcome
        assert len(rows.tables.get("rejections", [])) == n
        assert reject.request_key == outcome.request.key
