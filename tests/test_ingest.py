"""Ingest on Postgres + S3 over HTTP: bad inputs are rejected one by one, good ones go on."""

from __future__ import annotations

import json

from sqlalchemy import text

from lgt_ops.stages import ingest
from tests.samples import SAMPLE, jpeg, png, upload_sample


def _rejections(env) -> dict[str, str]:
    with env.db.connect() as conn:
        rows = conn.execute(text("SELECT item_ref, reason FROM rejections")).all()
    return {ref: reason for ref, reason in rows}


def test_bad_inputs_each_get_their_own_reason(pg_s3_env):
    env = pg_s3_env
    store = env.store
    upload_sample(store, "sources/mix/")
    good = (SAMPLE / "images" / "coffee.jpg").read_bytes()
    store.put("sources/mix/bad/truncated.jpg", good[: len(good) // 2])
    store.put("sources/mix/bad/zero.jpg", b"")
    store.put("sources/mix/bad/notes.png", b"a text file named .png\n")
    store.put("sources/mix/bad/huge.png", png(9000, 8000, mode="1"))  # 72 MP > 64 MP budget
    store.put("sources/mix/extra/red.jpg", jpeg(120, 80))
    extra = [
        {
            "key": "red.jpg",
            "caption": "A red square.",
            "objects": [
                {"id": "o1", "label": "square", "box": [0, 0, 120, 80],
                 "synonyms": ["Block", " red  block ", 3, ""]},  # kept as names, lower-cased
                {"id": "o2", "label": "ghost", "box": [100, 60, 400, 300]},
            ],
        },
        {"key": "missing.jpg", "caption": "Nobody uploaded this one."},
    ]
    store.put(
        "sources/mix/extra/manifest.jsonl",
        "\n".join(json.dumps(r) for r in extra).encode() + b"\n{broken json\n",
    )

    scan, stats = ingest.ingest_all(env, "sources/mix/")

    reasons = _rejections(env)
    assert reasons["sources/mix/bad/truncated.jpg"] == "truncated"
    assert reasons["sources/mix/bad/zero.jpg"] == "empty_file"
    assert reasons["sources/mix/bad/notes.png"] == "not_an_image"
    assert reasons["sources/mix/bad/huge.png"] == "too_many_pixels"
    assert reasons["sources/mix/extra/missing.jpg"] == "missing_object"
    assert reasons["sources/mix/extra/red.jpg#o2"] == "box_outside_image"
    assert reasons["sources/mix/extra/manifest.jsonl:3"] == "manifest_malformed"
    # Every good image went through, with its good box kept.
    assert stats.items_out == 11 and stats.items_rejected == 4
    with env.db.connect() as conn:
        n_images = conn.execute(text("SELECT COUNT(*) FROM images")).scalar_one()
        objects = conn.execute(
            text(
                "SELECT a.content FROM annotations a JOIN sources s"
                " ON s.objects_annotation_id = a.annotation_id WHERE s.key LIKE '%red.jpg'"
            )
        ).scalar_one()
    assert n_images == 11
    assert [o["id"] for o in json.loads(objects)["objects"]] == ["o1"]
    assert json.loads(objects)["objects"][0]["synonyms"] == ["block", "red block"]


def test_same_bytes_under_two_keys_is_one_image(pg_s3_env):
    env = pg_s3_env
    data = jpeg(50, 50)
    env.store.put("sources/dup/a.jpg", data)
    env.store.put("sources/dup/b/a-copy.jpg", data)
    ingest.ingest_all(env, "sources/dup/")
    with env.db.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM images")).scalar_one() == 1
        assert conn.execute(
            text("SELECT COUNT(DISTINCT image_id), COUNT(*) FROM sources")
        ).one() == (1, 2)


def test_rerun_skips_unchanged_and_picks_up_changes(pg_s3_env):
    env = pg_s3_env
    upload_sample(env.store, "sources/s/")
    first, _ = ingest.ingest_all(env, "sources/s/")
    assert first.pending == 10
    again, stats = ingest.ingest_all(env, "sources/s/")
    assert again.pending == 0 and stats.items_in == 0
    # A changed manifest caption re-ingests that one key; a deleted object is marked removed.
    lines = (SAMPLE / "manifest.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["caption"] = row["caption"] + " Edited."
    lines[1] = json.dumps(row)
    env.store.put("sources/s/manifest.jsonl", ("\n".join(lines) + "\n").encode())
    env.store.delete("sources/s/images/page.png")
    third, _ = ingest.ingest_all(env, "sources/s/")
    assert third.pending == 1 and third.removed == 1
    with env.db.connect() as conn:
        status = conn.execute(
            text("SELECT status FROM sources WHERE key = 'sources/s/images/page.png'")
        ).scalar_one()
        captions = conn.execute(
            text("SELECT COUNT(*) FROM annotations WHERE kind = 'caption'")
        ).scalar_one()
    assert status == "removed"
    assert captions == 9  # 8 original + the edited one
