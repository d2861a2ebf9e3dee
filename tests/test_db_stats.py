"""Planner statistics are refreshed after bulk changes, so shard queries use the index."""

from __future__ import annotations

from sqlalchemy import text

from lgt_ops.db import make_engine, upgrade
from lgt_ops.db.stats import refresh_statistics
from lgt_ops.ids import hbucket, sha256_hex


def _bulk_images(db, n: int) -> None:  # noqa: ANN001
    rows = [{"image_id": (i := sha256_hex(str(n) + str(k))), "hbucket": hbucket(i), "width": 8,
             "height": 8, "format": "JPEG", "mode": "RGB", "bytes": 100} for k in range(n)]
    with db.begin() as conn:
        conn.execute(text(
            "INSERT INTO images (image_id, hbucket, width, height, format, mode, bytes)"
            " VALUES (:image_id, :hbucket, :width, :height, :format, :mode, :bytes)"), rows)
        conn.execute(text("SELECT pg_stat_force_next_flush()"))


def test_stale_tables_are_analyzed_once(pg_url):
    db = make_engine(pg_url)
    upgrade(db)
    refresh_statistics(db)
    _bulk_images(db, 5000)
    assert "images" in refresh_statistics(db)
    with db.connect() as conn:
        analyzed = conn.execute(text(
            "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'images'"
        )).scalar_one()
        plan = "\n".join(r[0] for r in conn.execute(text(
            "EXPLAIN SELECT image_id FROM images WHERE hbucket >= 0 AND hbucket < 1000000")))
    assert analyzed and "images_hbucket" in plan
    assert "images" not in refresh_statistics(db)  # fresh now: nothing to do


def test_sqlite_needs_nothing(sqlite_url):
    db = make_engine(sqlite_url)
    upgrade(db)
    assert refresh_statistics(db) == []
