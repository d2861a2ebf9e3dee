"""The dry run's arithmetic: what each model stage will have to do in this run.

A stage's plan only sees inputs that exist now: before `cot` has made rollouts under its
present fingerprint, `expand` has nothing to plan, although it will have work once `cot` ran.
So per stage the report counts:

- ready_items: items the stage can do now (their inputs exist, they are not done under its
  fingerprint) on images no earlier selected stage still has to work on;
- waiting_images: images an earlier stage selected in this run still has to work on. What
  this stage holds for them now is superseded (new annotations -> new contexts -> new
  questions -> new rollouts), so they count what that earlier stage's pending items will
  fan out to: for each image, the pending items of the first earlier stage u with work on
  it, times this stage's items per item of u, from the method parameters (questions asked
  per image, rollouts expanded per question, ...), rounded up per image;
- pending_items_at_most = ready_items + those waiting items;
- requests_at_most = the ready items' requests + waiting items x requests per item.

The two totals are upper bounds: checks reject some outputs on the way (a rejected question
gets no rollouts). Images not yet ingested are not counted (the DAG ingests before it plans;
ingest calls no model).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from lgt_ops import registry
from lgt_ops.config import Settings


@dataclass(frozen=True)
class FanOut:
    """A stage's items per image and requests per item, at most."""

    items_per_image: int
    requests_per_item: int


@dataclass(frozen=True)
class Ready:
    """One item a stage's plan found ready: the image it belongs to and its requests."""

    image_id: str | None
    requests: int


def fan_outs(settings: Settings) -> dict[str, FanOut]:
    """Each model stage's fan-out under these settings (declared by the stage classes)."""
    return {s.name: FanOut(*s.fan_out(settings)) for s in registry.PIPELINE if s.has_plan()}


def estimate(ready: dict[str, list[Ready]], fan: dict[str, FanOut]) -> dict[str, dict[str, Any]]:
    """Per stage, in `ready`'s order (the run order of the selected model stages)."""
    report: dict[str, dict[str, Any]] = {}
    # image -> (pending items of the first earlier stage with work on it, its items per image)
    upstream: dict[str, tuple[int, int]] = {}
    for stage, items in ready.items():
        f = fan[stage]
        now = [r for r in items if r.image_id is None or r.image_id not in upstream]
        # per image, rounded up: one compose item per image waits on its 8 cot items
        waiting_items = sum(
            math.ceil(Fraction(n * f.items_per_image, per_image))
            for n, per_image in upstream.values()
        )
        report[stage] = {
            "ready_items": len(now),
            "waiting_images": len(upstream),
            "pending_items_at_most": len(now) + waiting_items,
            "requests_at_most": sum(r.requests for r in now) + waiting_items * f.requests_per_item,
        }
        if f.items_per_image:  # a stage that makes nothing (tag off) supersedes nothing
            # images already waiting keep the projection from the earlier stage
            counts = Counter(r.image_id for r in now if r.image_id is not None)
            upstream.update({img: (n, f.items_per_image) for img, n in counts.items()})
    return report
