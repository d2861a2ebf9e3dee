"""A release's per-bucket image sums (the digests' first line), read from an image-set query:
summed by Postgres, streamed elsewhere. Either way a bucket's entry follows its images alone."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from sqlalchemy import text

from lgt_ops.db import make_engine
from lgt_ops.ids import sha256_hex
from lgt_ops.release.incremental import _row_hash, bucket_of, image_sums_of

BUCKETS = 16


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    eng = make_engine(url)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE imgs (image_id TEXT PRIMARY KEY, live INTEGER)"))
    yield eng
    eng.dispose()


def _sums(db, ids: list[str]) -> dict[int, tuple[int, int]]:  # noqa: ANN001
    with db.begin() as conn:
        conn.execute(text("DELETE FROM imgs"))
        rows = [{"i": i, "live": 1} for i in ids] + [{"i": sha256_hex("gone"), "live": 0}]
        conn.execute(text("INSERT INTO imgs VALUES (:i, :live)"), rows)
    with db.connect() as conn:
        sql = "SELECT image_id FROM imgs WHERE live = :live"
        return image_sums_of(conn, sql, {"live": 1}, BUCKETS)


def test_a_bucket_entry_follows_its_images_alone(db):
    ids = [sha256_hex(str(k)) for k in range(300)]
    sums = _sums(db, ids)
    assert {b: n for b, (n, _) in sums.items()} == Counter(bucket_of(i, BUCKETS) for i in ids)
    assert _sums(db, random.Random(7).sample(ids, len(ids))) == sums  # order-free
    extra = sha256_hex("one more")
    more = _sums(db, [*ids, extra])
    changed = {b for b in more if more[b] != sums.get(b)}
    assert changed == {bucket_of(extra, BUCKETS)}
    if db.dialect.name == "sqlite":  # streamed: the md5 row hashes of "<id> image"
        assert sums == _streamed(ids)


def _streamed(ids: list[str]) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for i in ids:
        n, total = out.get(bucket_of(i, BUCKETS), (0, 0))
        out[bucket_of(i, BUCKETS)] = (n + 1, total + _row_hash(i, "image"))
    return out
