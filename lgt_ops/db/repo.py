"""Bulk, idempotent writes over the reflected schema (the SQL files are the source of truth)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, Table, bindparam, text
from sqlalchemy.dialects import postgresql, sqlite

from lgt_ops.db import array_rows

_META: dict[str, MetaData] = {}
_LOCK = threading.Lock()


def _metadata(conn: Connection) -> MetaData:
    key = str(conn.engine.url)
    with _LOCK:
        meta = _META.get(key)
        if meta is None:
            meta = MetaData()
            meta.reflect(bind=conn)
            _META[key] = meta
        return meta


def forget_schema(engine: Engine) -> None:
    """Drop the cached reflection (after migrations changed the schema)."""
    with _LOCK:
        _META.pop(str(engine.url), None)
        _NAMED_CACHE.clear()


def table(conn: Connection, name: str) -> Table:
    meta = _metadata(conn)
    if name not in meta.tables:
        forget_schema(conn.engine)
        meta = _metadata(conn)
    try:
        return meta.tables[name]
    except KeyError as exc:
        raise RuntimeError(f"table {name!r} missing: run `lgt db upgrade`") from exc


def insert_for(conn: Connection, tbl: Table):  # noqa: ANN202 - dialect-specific Insert
    if conn.dialect.name == "postgresql":
        return postgresql.insert(tbl)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(tbl)
    raise RuntimeError(f"unsupported database dialect {conn.dialect.name!r}")


def insert_ignore(conn: Connection, name: str, rows: Sequence[Mapping[str, Any]]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING for many rows; returns rows actually inserted."""
    if not rows:
        return 0
    keys = rows[0].keys()
    if any(r.keys() != keys for r in rows):
        # A batch insert takes its columns from the first row: a missing key would be lost.
        raise ValueError(f"rows for {name!r} do not all have the same columns")
    tbl = table(conn, name)
    if len(rows) >= array_rows.MIN_ROWS and conn.dialect.name == "postgresql":
        written = array_rows.insert_ignore_arrays(conn, tbl, list(keys), rows)
        if written is not None:
            return written
    stmt = insert_for(conn, tbl).on_conflict_do_nothing()
    return execute_rows(conn, stmt, rows, cache_as=("ignore", name))


def upsert(
    conn: Connection,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    key: Sequence[str],
    update: Iterable[str],
) -> None:
    """INSERT ... ON CONFLICT (key) DO UPDATE SET the `update` columns."""
    if not rows:
        return
    tbl = table(conn, name)
    stmt = insert_for(conn, tbl)
    update = list(update)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(key), set_={c: stmt.excluded[c] for c in update}
    )
    named = ("upsert", name, *key, "|", *update)
    execute_rows(conn, stmt, last_per_key(rows, key, update), cache_as=named)


def last_per_key(
    rows: Sequence[Mapping[str, Any]], key: Sequence[str], update: Iterable[str]
) -> list[Mapping[str, Any]]:
    """One row per key, as row-by-row upserts would leave it: the first row's columns with
    the later rows' `update` columns (one multi-row upsert may not touch a key twice)."""
    merged: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    cols = list(update)
    for row in rows:
        k = tuple(row[c] for c in key)
        first = merged.get(k)
        merged[k] = row if first is None else {**first, **{c: row[c] for c in cols}}
    return list(merged.values())


_PAGE_ROWS = 1000
_Parts = tuple[str, str, str, tuple[str, ...]]  # head, one row's SQL, tail, column order
_SQL_CACHE: dict[tuple[str, tuple[str, ...]], _Parts | None] = {}
_NAMED_CACHE: dict[tuple[str, ...], _Parts | None] = {}
_ONE_ROW = re.compile(r"VALUES \((%\(\w+\)s(?:, %\(\w+\)s)*)\)")


def execute_rows(
    conn: Connection,
    stmt: Any,
    rows: Sequence[Mapping[str, Any]],
    cache_as: tuple[str, ...] | None = None,
) -> int:
    """Execute an INSERT for many rows; how many it wrote. On Postgres one multi-row VALUES
    statement per page: psycopg2's executemany is one round trip (and one parse and plan on
    the server) per row, which bounded every stage's commits. SQLite runs in process, so
    executemany stays. Goes through the SQLAlchemy connection, so its error handling (an
    unreachable database) applies. `cache_as` names the statement (e.g. ("ignore", table)),
    so its split SQL is found without compiling it again (a compile per batch was ~1/3 ms)."""
    rows = list(rows)
    if not rows:
        return 0
    keys = list(rows[0].keys())
    parts = _values_parts(conn, stmt, keys, cache_as) if len(rows) > 1 else None
    if parts is None:
        return max(conn.execute(stmt, rows).rowcount, 0)
    head, row_sql, tail, order = parts
    written = 0
    for page in chunked(rows, _PAGE_ROWS):
        sql = head + ", ".join([row_sql] * len(page)) + tail
        params = tuple(row[k] for row in page for k in order)
        written += max(conn.exec_driver_sql(sql, params).rowcount, 0)
    return written


def _values_parts(
    conn: Connection, stmt: Any, keys: list[str], cache_as: tuple[str, ...] | None = None
) -> _Parts | None:
    """The statement's SQL split around its one VALUES row, with positional placeholders,
    and the order of its columns (the table's, not the row's; None: not Postgres, or SQL
    this splitting does not recognise)."""
    if conn.dialect.name != "postgresql":
        return None
    named = (str(conn.engine.url), *cache_as, *keys) if cache_as else None
    if named is not None and named in _NAMED_CACHE:
        return _NAMED_CACHE[named]
    cache_key = (str(stmt.compile(dialect=conn.dialect, column_keys=keys)), tuple(keys))
    if cache_key not in _SQL_CACHE:
        sql = cache_key[0]
        found = _ONE_ROW.findall(sql)
        order = tuple(p[2:-2] for p in found[0].split(", ")) if len(found) == 1 else ()
        if sorted(order) != sorted(keys) or sql.count("%(") != len(keys):
            _SQL_CACHE[cache_key] = None
        else:
            head, tail = _ONE_ROW.split(sql, maxsplit=1)[::2]
            row_sql = "(" + ", ".join(["%s"] * len(keys)) + ")"
            _SQL_CACHE[cache_key] = (head + "VALUES ", row_sql, tail, order)
    if named is not None:
        _NAMED_CACHE[named] = _SQL_CACHE[cache_key]
    return _SQL_CACHE[cache_key]


def dumps(obj: Any) -> str:
    """JSON for TEXT columns (sorted keys, so equal content gives equal text)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def chunked(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def select_in(conn: Connection, sql: str, ids: Sequence[str], **params: Any) -> list[Any]:
    """Run `sql` (which has `IN :ids`) over `ids` in chunks; all rows. On PostgreSQL a chunk
    is one array parameter (`= ANY(:ids)`, which the server makes of an IN list anyway): an
    expanding IN list is rendered and quoted id by id on the client, a good part of a
    stage's planning CPU."""
    if conn.dialect.name == "postgresql":
        stmt = text(sql.replace("IN :ids", "= ANY(:ids)"))
    else:
        stmt = text(sql).bindparams(bindparam("ids", expanding=True))
    rows: list[Any] = []
    for chunk in chunked(list(ids), 900):
        rows.extend(conn.execute(stmt, {**params, "ids": list(chunk)}).all())
    return rows
