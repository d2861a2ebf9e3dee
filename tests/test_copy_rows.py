"""Large insert-or-ignore batches go through COPY on Postgres (lgt_ops/db/copy_rows.py): the
rows read back must be exactly those VALUES would have written, the conflict rule the same,
nothing left staged after a rollback, and two writers of overlapping keys in opposite
orders must not deadlock."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from lgt_ops.db import make_engine
from lgt_ops.db.copy_rows import MIN_ROWS, copy_values
from lgt_ops.db.repo import forget_schema, insert_ignore
from lgt_ops.db.stats import refresh_statistics

pytestmark = pytest.mark.postgres

TRICKY = [
    " ", "a,b", 'say "hi"', "line\nbreak", "cr\rlf\r\n", "tab\there", "back\\slash",
    "\\.", "\\N", "NULL", "null", "é ü 漢字 🙂", "'quote'", "\\n", ",", '"', "x" * 5000,
]  # fmt: skip


@pytest.fixture
def engine(pg_url):
    eng = make_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE t (k TEXT PRIMARY KEY, s TEXT, n INTEGER, f DOUBLE PRECISION,"
                " b BOOLEAN, ts TIMESTAMP, made TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )
        )
    forget_schema(eng)
    yield eng
    eng.dispose()


def _rows(n: int, tag: str = "") -> list[dict]:
    when = datetime(2026, 12, 1, 7, 30, 15, 123456, tzinfo=UTC).replace(tzinfo=None)
    return [
        {
            "k": f"k{i:05d}{tag}",
            "s": TRICKY[i % len(TRICKY)] if i % 7 else None,
            "n": i - 50 if i % 5 else None,
            "f": i / 3 if i % 4 else None,
            "b": (i % 3 == 0) if i % 6 else None,
            "ts": when if i % 2 else None,
        }
        for i in range(n)
    ]


def _read(engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT k, s, n, f, b, ts FROM t ORDER BY k")).mappings()
        return [dict(r) for r in rows]


def test_copy_writes_exactly_the_values(engine):
    rows = _rows(3 * MIN_ROWS)
    assert copy_values(rows, list(rows[0])) is not None  # the batch takes the COPY path
    with engine.begin() as conn:
        assert insert_ignore(conn, "t", rows) == len(rows)
    assert _read(engine) == sorted(rows, key=lambda r: r["k"])
    # the same rows again: nothing new; half new: only those
    more = rows[:MIN_ROWS] + _rows(2 * MIN_ROWS, tag="b")
    with engine.begin() as conn:
        assert insert_ignore(conn, "t", rows) == 0
        assert insert_ignore(conn, "t", more) == 2 * MIN_ROWS  # the same transaction twice
    assert len(_read(engine)) == 5 * MIN_ROWS


def test_values_copy_cannot_read_back_take_the_other_path(engine):
    rows = _rows(2 * MIN_ROWS)
    rows[3]["s"] = {"a": 1}  # not a plain value
    with pytest.raises(Exception, match="dict"), engine.begin() as conn:
        insert_ignore(conn, "t", rows)  # VALUES refuses it too (psycopg2 cannot adapt a dict)
    rows[3]["s"] = ""  # CSV would read it as NULL
    rows[4]["s"] = None
    with engine.begin() as conn:
        assert insert_ignore(conn, "t", rows) == len(rows)
    assert [r["s"] for r in _read(engine)[3:5]] == ["", None]


def test_a_rolled_back_batch_leaves_nothing_staged(engine):
    rows = _rows(2 * MIN_ROWS)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        insert_ignore(conn, "t", rows)
        raise RuntimeError("the stage failed after its insert")
    assert _read(engine) == []
    with engine.begin() as conn:  # the same pooled connection: its staging table is empty
        assert insert_ignore(conn, "t", rows[:MIN_ROWS]) == MIN_ROWS
    assert len(_read(engine)) == MIN_ROWS


def _staged_bytes(conn) -> int:
    """The size on disk of this session's staging tables (temporary: only it sees them)."""
    sql = (
        "SELECT COALESCE(SUM(pg_relation_size(c.oid)), 0) FROM pg_class c"
        " WHERE c.relname LIKE '\\_lgt\\_copy\\_%' AND c.relpersistence = 't'"
        " AND pg_table_is_visible(c.oid)"
    )
    return int(conn.execute(text(sql)).scalar_one())


def _staged_rows(conn) -> int:
    """Rows in this session's staging tables, as this transaction sees them."""
    sql = (
        "SELECT c.relname FROM pg_class c WHERE c.relname LIKE '\\_lgt\\_copy\\_%'"
        " AND c.relpersistence = 't' AND pg_table_is_visible(c.oid)"
    )
    names = conn.execute(text(sql)).scalars().all()
    return sum(conn.execute(text(f'SELECT COUNT(*) FROM "{n}"')).scalar_one() for n in names)


def test_a_batch_leaves_its_transaction_nothing_staged(engine):
    # A second batch into the same table in the same transaction must not read the first's.
    with engine.begin() as conn:
        assert insert_ignore(conn, "t", _rows(MIN_ROWS)) == MIN_ROWS
        assert _staged_rows(conn) == 0
        assert insert_ignore(conn, "t", _rows(MIN_ROWS, tag="b")) == MIN_ROWS
        assert _staged_rows(conn) == 0


def test_an_autocommit_session_writes_every_row(engine):
    # Each statement commits there, so a staging table would be empty by the INSERT.
    rows = _rows(2 * MIN_ROWS)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        assert insert_ignore(conn, "t", rows) == len(rows)
    assert len(_read(engine)) == len(rows)


def test_a_long_lived_connection_does_not_grow_its_staging_table(engine):
    # Emptied rows would stay in a temporary table's pages (no autovacuum there): every
    # batch would then rescan all earlier ones, and a long run slow down as it goes.
    with engine.connect() as conn:
        sizes = []
        for batch in range(12):
            insert_ignore(conn, "t", _rows(500, tag=f"-{batch}"))
            conn.commit()
            sizes.append(_staged_bytes(conn))
            conn.commit()
    assert len(_read(engine)) == 12 * 500
    assert max(sizes) <= max(sizes[0], 8192), sizes


def test_overlapping_batches_in_opposite_orders_do_not_deadlock(engine):
    rows = _rows(2000)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def write(batch: list[dict]) -> None:
        try:
            start.wait()
            for _ in range(5):
                with engine.begin() as conn:
                    insert_ignore(conn, "t", batch)
                    conn.execute(text("DELETE FROM t"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(b,)) for b in (rows, rows[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_the_statistics_refresh_skips_other_sessions_staging_tables(engine):
    with engine.connect() as holder:  # a session that keeps its staging table
        with holder.begin():
            insert_ignore(holder, "t", _rows(3000))
        holder.execute(text("SELECT pg_stat_force_next_flush()"))
        holder.commit()
        stale = refresh_statistics(engine)
    assert "t" in stale
    assert not [s for s in stale if s.startswith("_lgt_copy")]


def test_a_role_without_temporary_tables_writes_through_values(engine, pg_url):
    from sqlalchemy.engine import make_url

    name, role = make_url(pg_url).database, f"lgt_no_temp_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{name}" FROM PUBLIC'))
        conn.execute(text(f"GRANT SELECT, INSERT ON t TO {role}"))
    limited = make_engine(str(make_url(pg_url).set(username=role)))
    try:
        rows = _rows(2 * MIN_ROWS)
        with limited.begin() as conn:
            assert insert_ignore(conn, "t", rows) == len(rows)
        assert len(_read(engine)) == len(rows)
    finally:
        limited.dispose()
        with engine.begin() as conn:
            conn.execute(text(f'GRANT TEMPORARY ON DATABASE "{name}" TO PUBLIC'))
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
