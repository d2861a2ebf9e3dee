"""The chaos suite: `lgt run` SIGKILLed at seeded points in six stages (one while publishing)
and resumed each time ends with the same release bytes and the same lineage rows as an
uninterrupted run, no `staging` release, no orphan release member, and no answered request
paid again beyond the in-flight window at each kill."""

from __future__ import annotations

import pytest

from tests.chaos_harness import ATTEMPT_LOGS, MODEL_POINTS, trial

pytestmark = [pytest.mark.chaos, pytest.mark.postgres]

IMAGES = 6
SEED = 20261130
KILLS = 6


def test_killed_and_resumed_pipeline_publishes_the_same_release(sim, tmp_path):
    t = trial(sim, tmp_path, IMAGES, SEED, KILLS)
    for k in t.kills:
        print(
            f"kill {k}: awaiting {k.awaiting}, unjournaled {k.unjournaled}, repeated {k.repeated}"
        )
    stages = {k.point for k in t.kills}
    assert len(stages) >= 5 and "release" in stages
    assert len(stages & MODEL_POINTS) >= 2
    assert t.same_hash, (t.reference.content_sha256, t.result.content_sha256)
    assert t.table_diffs() == {}
    assert not ATTEMPT_LOGS & set(t.result.counts)
    assert t.result.staging == 0 and t.result.orphan_members == 0
    for k in t.kills:
        assert k.repeated <= k.in_flight, k
