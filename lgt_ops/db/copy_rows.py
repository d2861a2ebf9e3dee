"""INSERT ... ON CONFLICT DO NOTHING of a large batch through COPY (PostgreSQL).

A multi-row VALUES statement makes the server parse, plan and coerce one constant per
value: about half of what a batch of filter verdicts cost the server at 10k images. COPY
streams the rows (CSV, no parse per value) into a session-private staging table with the
batch's columns, typed as the target's; then one INSERT ... SELECT moves them with the same
conflict rule, in primary-key order (concurrent writers of overlapping keys then take their
row locks in the same order, so they cannot deadlock on each other). The batch's rows leave
the staging table in the same statement sequence, and the table is emptied in place at every
commit or rollback (ON COMMIT DELETE ROWS), so a rolled-back batch leaves nothing behind and
its size stays one transaction's however many batches a connection writes. All
four statements run in the caller's transaction, so a pooler in transaction mode (PgBouncer)
keeps them on one server connection.

Only batches of plain values take this path (strings and StrEnums, numbers, booleans,
timestamps, NULL) and no empty string (CSV's NULL); anything else goes through VALUES,
unchanged.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from itertools import chain
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Table

from lgt_ops.db.engine import raise_unreachable
from lgt_ops.ids import sha256_hex

MIN_ROWS = 64  # below this, the three extra round trips cost more than they save
_PLAIN = frozenset({str, int, float, bool, datetime, type(None)})


def can_stage(conn: Connection) -> bool:
    """Whether this session may create its staging tables (a hardened database may revoke
    TEMPORARY from the role: then every batch takes VALUES; asked once per connection), and
    is in a transaction block: the staging table empties at every commit, and an autocommit
    session commits after each statement, between the COPY and the INSERT."""
    if conn.connection.dbapi_connection.autocommit:
        return False
    allowed = conn.info.get("lgt_copy_staging")
    if allowed is None:
        sql = "SELECT has_database_privilege(current_database(), 'TEMPORARY')"
        allowed = conn.info["lgt_copy_staging"] = bool(conn.exec_driver_sql(sql).scalar())
    return allowed


def copy_values(rows: Sequence[Mapping[str, Any]], keys: list[str]) -> list[tuple] | None:
    """The rows as tuples in `keys` order, or None when one holds a value COPY would not
    read back as the same: a dict, bytes, ..., or an empty string (CSV writes None and ""
    alike, and COPY reads that as NULL). C-level passes: this runs on every batch."""
    values = list(map(itemgetter(*keys), rows)) if len(keys) > 1 else [(r[keys[0]],) for r in rows]
    types = set(map(type, chain.from_iterable(values)))
    if not all(t in _PLAIN or issubclass(t, StrEnum) for t in types):  # str(member) = value
        return None
    if "" in chain.from_iterable(values):
        return None
    return values


def insert_ignore_copy(conn: Connection, tbl: Table, keys: list[str], values: list[tuple]) -> int:
    """Insert `values` (tuples in `keys` order) unless their key exists; how many were new."""
    cols = ", ".join(f'"{k}"' for k in keys)
    # The staging table has just these columns, typed as the target's (no constraint, no
    # default); named by them, so a batch of other columns (or a migrated target) gets its own.
    stage = f"_lgt_copy_{tbl.name}_{sha256_hex(cols)[:12]}"
    conn.exec_driver_sql(
        f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" ON COMMIT DELETE ROWS'
        f' AS SELECT {cols} FROM "{tbl.name}" WITH NO DATA'
    )
    order = ", ".join(f'"{c.name}"' for c in tbl.primary_key.columns if c.name in keys) or "1"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(values)  # None: an empty unquoted field
    buf.seek(0)
    _copy(conn, f'COPY "{stage}" ({cols}) FROM STDIN WITH (FORMAT csv)', buf)
    written = conn.exec_driver_sql(
        f'INSERT INTO "{tbl.name}" ({cols}) SELECT {cols} FROM "{stage}"'
        f" ORDER BY {order} ON CONFLICT DO NOTHING"
    ).rowcount
    # Emptied for a next batch in this transaction; the deleted rows' pages go at its end
    # (ON COMMIT DELETE ROWS truncates in place), so no batch scans earlier ones. A TRUNCATE
    # per batch cost more: a new file and a catalog row each time.
    conn.exec_driver_sql(f'DELETE FROM "{stage}"')
    return max(written, 0)


def _copy(conn: Connection, sql: str, buf: io.StringIO) -> None:
    """COPY on the connection's own DBAPI cursor (SQLAlchemy has no COPY); a lost connection
    is reported as every other statement's is (LineageDbUnreachable)."""
    import psycopg2

    cursor = conn.connection.dbapi_connection.cursor()
    try:
        cursor.copy_expert(sql, buf)
    except psycopg2.Error as exc:
        raise_unreachable(conn.engine, exc)
        raise
    finally:
        cursor.close()
