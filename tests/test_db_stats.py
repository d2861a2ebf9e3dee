"""Planner statistics are refreshed after bulk changes, so shard queries use the index."""

from __future__ import annotations

from sqlalchemy import text

from lgt_ops.db import make_engine, upgrade
from lgt_ops.db.stats import GROWN_SHARE, refresh_statistics
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


def _grow(db, table: str, n: int, start: int = 0) -> None:  # noqa: ANN001
    with db.begin() as conn:
        conn.execute(text(
            f"INSERT INTO {table} SELECT 'q' || lpad(k::text, 7, '0'), 'fp-1', k, repeat('x', 60)"
            " FROM generate_series(:a, :b) AS k"), {"a": start, "b": start + n - 1})
        conn.execute(text("SELECT pg_stat_force_next_flush()"))


def _lookup_plan(db, table: str) -> str:  # noqa: ANN001
    ids = [f"q{k:07d}" for k in range(0, 100_000, 200)]  # a shard's 500 ids
    with db.connect() as conn:
        return "\n".join(r[0] for r in conn.execute(text(
            f"EXPLAIN SELECT * FROM {table} WHERE fingerprint IN ('fp-1', 'fp-2')"
            " AND question_id = ANY(:ids)"), {"ids": ids}))


def test_a_stage_task_analyzes_a_table_that_grew_from_empty(pg_url):
    # A first run's stage tables are empty when the run plans: analyzed then, their
    # statistics make the planner read the whole table for a shard's ids.
    db = make_engine(pg_url)
    with db.begin() as conn:
        conn.execute(text("CREATE TABLE grown (question_id TEXT, fingerprint TEXT, v INTEGER,"
                          " pad TEXT, PRIMARY KEY (question_id, fingerprint))"))
    refresh_statistics(db)
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE grown"))  # empty, as at a first run's plan
    _grow(db, "grown", 100_000)
    assert "Seq Scan" in _lookup_plan(db, "grown")
    assert "grown" in refresh_statistics(db, share=GROWN_SHARE)
    assert "Seq Scan" not in _lookup_plan(db, "grown")  # the primary key's index
    _grow(db, "grown", 150_000, start=100_000)  # grew 2.5-fold: the statistics still hold
    assert "Seq Scan" not in _lookup_plan(db, "grown")
    assert "grown" not in refresh_statistics(db, share=GROWN_SHARE)
    _grow(db, "grown", 300_000, start=250_000)  # more than five-fold since
    assert "grown" in refresh_statistics(db, share=GROWN_SHARE)


def test_a_table_another_task_is_analyzing_is_left_to_it(pg_url):
    db = make_engine(pg_url)
    upgrade(db)
    refresh_statistics(db)
    _bulk_images(db, 5000)
    with db.connect() as other:
        other.execute(text("SELECT pg_advisory_lock(hashtext('lgt-analyze:images'))"))
        assert "images" not in refresh_statistics(db)
        other.execute(text("SELECT pg_advisory_unlock(hashtext('lgt-analyze:images'))"))
        other.commit()
    assert "images" in refresh_statistics(db)
