"""What a model stage's handle() makes of its requests' outcomes before its own work: the
rejection row of a request that ended without usable output, and the two shapes of item
that need one (a one-request item; an item whose verdict needs every request's answer).

The runner hands handle() only items none of whose requests failed for endpoint reasons
(those stay pending); an outcome that is still not `ok` here (refused, invalid, cut off...)
is final and recorded as a `request` rejection.
"""

from __future__ import annotations

from typing import Any

from lgt_ops.llm.outcome import Outcome
from lgt_ops.stages.base import Rejecter, Rows, StageEnv, rejection
from lgt_ops.stages.runner import WorkItem


def one_answer(
    env: StageEnv, stage: str, fp: str, item: WorkItem, outcomes: list[Outcome]
) -> tuple[Outcome, Rows, Rejecter]:
    """For a one-request item: its outcome, its rows (holding the request's rejection if it
    ended without usable output) and a Rejecter bound to the item and the request."""
    (outcome,) = outcomes
    rows = unanswered(env, stage, fp, item, outcomes) or Rows()
    return outcome, rows, Rejecter(env, stage, fp, item.image_id, outcome.request.key)


def unanswered(
    env: StageEnv, stage: str, fp: str, item: WorkItem, outcomes: list[Outcome]
) -> Rows | None:
    """None when every request of the item has usable output; else rows holding a
    rejection per request that has none, in outcome order. A stage whose verdict needs all
    of an item's samples (blind, cot) returns these rows and makes no verdict."""
    bad = [o for o in outcomes if not o.ok]
    if not bad:
        return None
    rows = Rows()
    rows.add("rejections", *(request_rejection(env, stage, fp, item, o) for o in bad))
    return rows


def request_rejection(
    env: StageEnv, stage: str, fp: str, item: WorkItem, outcome: Outcome
) -> dict[str, Any]:
    """A rejection row for a request that ended without usable output."""
    return rejection(
        env,
        stage,
        fp,
        "request",
        item.item_id,
        outcome.error_class or outcome.status,
        outcome.error_detail,
        image_id=item.image_id,
        request_key=outcome.request.key,
    )
