"""Bulk, idempotent writes over the reflected schema (the SQL files are the source of truth)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, Table, bindparam, text
from sqlalchemy.dialects import postgresql, sqlite

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
    result = conn.execute(insert_for(conn, tbl).on_conflict_do_nothing(), list(rows))
    return max(result.rowcount, 0)


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
    stmt = stmt.on_conflict_do_update(
        index_elements=list(key), set_={c: stmt.excluded[c] for c in update}
    )
    conn.execute(stmt, list(rows))


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
    """Run `sql` (which has `IN :ids`) over `ids` in chunks; all rows."""
    stmt = text(sql).bindparams(bindparam("ids", expanding=True))
    rows: list[Any] = []
    for chunk in chunked(list(ids), 900):
        rows.extend(conn.execute(stmt, {**params, "ids": list(chunk)}).all())
    return rows
