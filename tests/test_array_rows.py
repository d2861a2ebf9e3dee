"""Large insert-or-ignore batches are one statement of column arrays on Postgres
(lgt_ops/db/array_rows.py): the rows read back must be exactly those VALUES would have
written, the conflict rule the same, and two writers of overlapping keys in opposite orders
must not deadlock."""

from __future__ import annotations

import math
import threading
from datetime import UTC, datetime
from enum import StrEnum

import pytest
from sqlalchemy import event, text

from lgt_ops.db import make_engine
from lgt_ops.db.array_rows import MIN_ROWS, column_literal
from lgt_ops.db.repo import forget_schema, insert_ignore

pytestmark = pytest.mark.postgres

TRICKY = [
    " ", "a,b", 'say "hi"', "line\nbreak", "cr\rlf\r\n", "tab\there", "back\\slash",
    "\\.", "\\N", "NULL", "null", "None", '"NULL"', "{a,b}", "{", "}", "", "é ü 漢字 🙂",
    "'quote'", "\\n", ",", '"', "%s %(x)s", "x" * 5000,
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
            "ts": when.replace(microsecond=0) if i % 3 == 1 else when if i % 2 else None,
        }
        for i in range(n)
    ]


def _read(engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT k, s, n, f, b, ts FROM t ORDER BY k")).mappings()
        return [dict(r) for r in rows]


def _statements(engine) -> list[str]:
    """Every statement the engine sends from now on."""
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda c, cur, sql, *a: sent.append(sql))
    return sent


def test_a_batch_is_one_statement_and_writes_exactly_the_values(engine):
    rows = _rows(3 * MIN_ROWS)
    sent = _statements(engine)
    with engine.begin() as conn:
        assert insert_ignore(conn, "t", rows) == len(rows)
    writes = [s for s in sent if "pg_catalog" not in s]  # not the schema's reflection
    assert len(writes) == 1 and "unnest" in writes[0], writes
    assert _read(engine) == sorted(rows, key=lambda r: r["k"])
    # the same rows again: nothing new; half new: only those
    more = rows[:MIN_ROWS] + _rows(2 * MIN_ROWS, tag="b")
    with engine.begin() as conn:
        assert insert_ignore(conn, "t", rows) == 0
        assert insert_ignore(conn, "t", more) == 2 * MIN_ROWS  # the same transaction twice
    assert len(_read(engine)) == 5 * MIN_ROWS


def test_empty_strings_and_nulls_stay_apart(engine):
    rows = _rows(2 * MIN_ROWS)
    for i, r in enumerate(rows):
        r["s"] = "" if i % 2 else None
    with engine.begin() as conn:
        assert insert_ignore(conn, "t", rows) == len(rows)
    assert [r["s"] for r in _read(engine)] == [r["s"] for r in rows]


def test_values_the_arrays_do_not_take_go_through_values(engine):
    rows = _rows(2 * MIN_ROWS)
    rows[3]["s"] = {"a": 1}  # not a plain value
    with pytest.raises(Exception, match="dict"), engine.begin() as conn:
        insert_ignore(conn, "t", rows)  # VALUES refuses it too (psycopg2 cannot adapt a dict)
    rows[3]["s"] = "nul\x00inside"  # no PostgreSQL text holds NUL: refused, not made NULL
    with pytest.raises(ValueError, match="NUL"), engine.begin() as conn:
        insert_ignore(conn, "t", rows)
    assert _read(engine) == []
    rows[3]["s"] = 7  # an int among strings: VALUES, where the server coerces it as before
    with engine.begin() as conn:
        assert insert_ignore(conn, "t", rows) == len(rows)
    assert _read(engine)[3]["s"] == "7"


def test_numbers_booleans_and_special_floats_read_back(engine):
    rows = _rows(2 * MIN_ROWS)
    specials = [math.inf, -math.inf, 1e-300, -0.0, 2.0**53 + 2, 1 / 7, 123456789.123456789]
    for r, f in zip(rows, specials, strict=False):
        r["f"] = f
    rows[-1]["f"] = math.nan
    rows[-2]["n"] = -(2**31)
    with engine.begin() as conn:
        assert insert_ignore(conn, "t", rows) == len(rows)
    got = _read(engine)
    assert [r["f"] for r in got[: len(specials)]] == specials
    assert math.isnan(got[-1]["f"])
    assert [(r["n"], r["b"]) for r in got] == [(r["n"], r["b"]) for r in rows]


class Colour(StrEnum):
    RED = "red"
    QUOTED = 'say "red"'


def test_column_literals():
    assert column_literal([1, None, -2]) == "{1,NULL,-2}"
    assert column_literal([True, False, None]) == "{True,False,NULL}"
    assert column_literal(["a", None, ""]) == '{"a",NULL,""}'
    assert column_literal([Colour.RED, "x"]) == '{"red","x"}'
    assert column_literal([Colour.QUOTED, "b\\s"]) == '{"say \\"red\\"","b\\\\s"}'
    when = datetime(2026, 12, 2, 9, 5, 7, 250)
    assert column_literal([when, None]) == '{"2026-12-02 09:05:07.000250",NULL}'
    assert column_literal([b"bytes"]) is None
    assert column_literal(["a", 1]) is None
    assert column_literal(["a", "nul\x00"]) is None
    assert column_literal([{"a": 1}]) is None


def test_a_rolled_back_batch_writes_nothing(engine):
    rows = _rows(2 * MIN_ROWS)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        insert_ignore(conn, "t", rows)
        raise RuntimeError("the stage failed after its insert")
    assert _read(engine) == []


def test_an_autocommit_session_writes_every_row(engine):
    rows = _rows(2 * MIN_ROWS)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        assert insert_ignore(conn, "t", rows) == len(rows)
    assert len(_read(engine)) == len(rows)


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


def test_a_column_type_reflection_does_not_know_goes_through_values(engine):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE x (k TEXT PRIMARY KEY, doc XML)"))
    forget_schema(engine)
    rows = [{"k": f"k{i}", "doc": f"<a n='{i}'/>"} for i in range(2 * MIN_ROWS)]
    with pytest.warns(Warning, match="xml"), engine.begin() as conn:
        assert insert_ignore(conn, "x", rows) == len(rows)  # reflected as NullType
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM x WHERE doc IS NOT NULL")).scalar() == 128
