"""Stages on the simulator over HTTP: annotate fills gaps, mcq writes grounded questions,
and re-runs make no requests."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from sqlalchemy import text

from lgt_ops.release.incremental import bucket_of
from lgt_ops.sources import bucket_images, image_set, iter_image_set, resolve_source
from lgt_ops.stages import annotate, ingest, mcq
from lgt_ops.stages.base import HBUCKETS, Shard
from tests.samples import upload_sample


def _prepared(env):
    upload_sample(env.store, "sources/sample/")
    ingest.ingest_all(env, "sources/sample/")
    spec, _ = resolve_source(env, "sources/sample/")
    return spec


def test_annotate_fills_only_what_is_missing(local_env, sim):
    env = local_env
    spec = _prepared(env)
    stats = annotate.run(env, spec, Shard())
    assert stats.items_in == 4  # 2 images lack captions, 2 lack objects
    with env.db.connect() as conn:
        rows = conn.execute(
            text("SELECT kind, source, request_key FROM annotations WHERE source = 'model'")
        ).all()
    assert sorted(r.kind for r in rows) == ["caption", "caption", "objects", "objects"]
    assert all(r.request_key for r in rows)
    assert sim.sim.served == 4


def test_mcq_questions_are_grounded_and_rerun_is_free(local_env, sim):
    env = local_env
    spec = _prepared(env)
    annotate.run(env, spec, Shard())
    first = mcq.run(env, spec, Shard())
    assert first.items_out > 0 and first.requests_sent == 10
    served = sim.sim.served
    with env.db.connect() as conn:
        qs = conn.execute(
            text(
                "SELECT q.*, s.objects_annotation_id FROM questions q"
                " JOIN sources s ON s.image_id = q.image_id"
            )
        ).all()
        objects = {
            r.image_id: {o["id"] for o in json.loads(r.content)["objects"]}
            for r in conn.execute(
                text("SELECT image_id, content FROM annotations WHERE kind = 'objects'")
            )
        }
        reasons = {
            r[0] for r in conn.execute(text("SELECT reason FROM rejections WHERE stage='mcq'"))
        }
    counting = 0
    for q in qs:
        options = json.loads(q.options)
        assert options[" ABCD".index(q.answer_letter) - 1] == q.answer_text
        assert set(json.loads(q.grounding)) <= objects[q.image_id]
        if q.skill == "counting":  # laid out by code: consecutive counts around the answer
            counting += 1
            values = sorted(int(o) for o in options)
            assert values == list(range(values[0], values[0] + 4)) and values[0] >= 0
            assert int(q.answer_text) in values
    assert counting > 0
    # The simulator spoils some questions on purpose: they are rejected, with reasons.
    assert reasons and reasons <= {
        "duplicate_options",
        "unknown_grounding",
        "bad_answer_letter",
        "answerable_from_options",
        "near_duplicate",
    }
    again = mcq.run(env, spec, Shard())
    assert again.items_skipped == 10 and again.items_out == 0 and again.requests_sent == 0
    assert sim.sim.served == served


def test_shards_partition_the_images(local_env, sim):
    env = local_env
    spec = _prepared(env)
    annotate.run(env, spec, Shard())
    seen = 0
    for i in range(3):
        seen += mcq.run(env, spec, Shard(i, 3)).items_in
    assert seen == 10


@pytest.mark.parametrize("count", [1, 2, 3, 7, 512])
def test_shard_ranges_cover_every_hbucket_exactly_once(count):
    bounds = [Shard(i, count).bounds() for i in range(count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == HBUCKETS
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:], strict=False))


@pytest.mark.parametrize("sample_size", [None, 6])
def test_shards_split_the_sample_and_the_whole_set_alike(pg_s3_env, sim, sample_size):
    env = pg_s3_env
    spec = _prepared(env)
    with env.db.connect() as conn:
        whole = [r.image_id for r in image_set(conn, spec, None, sample_size)]
        parts = [[r.image_id for r in image_set(conn, spec, Shard(i, 4), sample_size)]
                 for i in range(4)]
    assert sorted(sum(parts, [])) == sorted(whole)
    assert len(whole) == (sample_size or 10)



@pytest.mark.parametrize("sample_size", [None, 6])
def test_the_image_set_read_in_pages_or_by_bucket_is_the_same_set(pg_s3_env, sim, sample_size):
    env = pg_s3_env
    spec = _prepared(env)
    with env.db.connect() as conn:
        whole = [r.image_id for r in image_set(conn, spec, None, sample_size)]
        paged = [r.image_id for r in iter_image_set(conn, spec, sample_size, page=3)]
        picked = [r.image_id for r in bucket_images(conn, spec, sample_size, 4, [3, 0, 2])]
    assert paged == whole  # keyset pages: every image once, in image_id order
    want = sorted((bucket_of(i, 4), i) for i in whole if bucket_of(i, 4) != 1)
    assert [(bucket_of(i, 4), i) for i in picked] == want

def test_counting_options_are_laid_out_with_every_feasible_rank_equally_likely():
    ranks: dict[int, Counter] = {}
    for i in range(4000):
        count = i % 6
        correct, wrong = mcq.laid_out(str(count), [str(count + d) for d in range(4)], f"q{i}")
        values = sorted(int(v) for v in (correct, *wrong))
        assert correct == str(count) and len(wrong) == 3 and values[0] >= 0
        assert values == list(range(values[0], values[0] + 4))
        assert mcq.laid_out(str(count), [str(count + d) for d in range(4)], f"q{i}") == (
            correct,
            wrong,
        )  # seeded per question: a re-run lays out the same options
        ranks.setdefault(count, Counter())[values.index(count)] += 1
    for count, seen in ranks.items():
        feasible = min(count, 3) + 1  # a count of 1 can only be 1st or 2nd
        assert set(seen) == set(range(feasible)), (count, seen)
        for n in seen.values():
            assert abs(n / seen.total() - 1 / feasible) < 0.08, (count, seen)
    # Other options are the model's own.
    assert mcq.laid_out("red", ["blue", "red", "green", "pink"], "q") == (
        "red",
        ["blue", "green", "pink"],
    )
    assert mcq.laid_out("2", ["2", "2.5", "3", "4"], "q") == ("2", ["2.5", "3", "4"])
