"""Schema migrations: ordered, idempotent, refuse edited history, same schema on both DBs."""

from __future__ import annotations

import shutil

import pytest
from sqlalchemy import inspect, text

from lgt_ops.db import make_engine, upgrade
from lgt_ops.db.migrate import MigrationError, discover, split_statements, sql_dir

CORE_TABLES = {
    "pipeline_runs",
    "stage_runs",
    "sources",
    "images",
    "annotations",
    "model_requests",
    "questions",
    "question_parents",
    "rejections",
    "stage_items",
    "releases",
    "member_rows",
    "release_member_sets",
    "release_pointers",
    "schema_migrations",
}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrade_is_idempotent(backend, sqlite_url, pg_url):
    engine = make_engine(sqlite_url if backend == "sqlite" else pg_url)
    first = upgrade(engine)
    assert first == [m.version for m in discover(engine.dialect.name)]
    assert upgrade(engine) == []  # second call applies nothing
    tables = set(inspect(engine).get_table_names())
    assert tables >= CORE_TABLES
    with engine.connect() as conn:
        versions = [r[0] for r in conn.execute(text("SELECT version FROM schema_migrations"))]
    assert versions == sorted(first)


def test_edited_migration_is_refused(tmp_path, sqlite_url):
    root = tmp_path / "sql"
    shutil.copytree(sql_dir(), root)
    engine = make_engine(sqlite_url)
    upgrade(engine, root)
    first = sorted((root / "migrations").glob("0001_*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after the fact\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        upgrade(engine, root)


def test_split_statements_keeps_multiline_statements():
    sql = "-- comment\nCREATE TABLE a (\n  x INT\n);\nCREATE INDEX i ON a (x);\n"
    assert split_statements(sql) == ["CREATE TABLE a (\n  x INT\n)", "CREATE INDEX i ON a (x)"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_stage_items_keep_their_rows_when_rekeyed_by_item(backend, tmp_path, sqlite_url, pg_url):
    # migration 0016 re-keys stage_items (item_id first): a deployment's skip list survives it
    engine = make_engine(sqlite_url if backend == "sqlite" else pg_url)
    root = tmp_path / "sql"
    shutil.copytree(sql_dir(), root)
    later = [p for p in (root / "migrations").glob("*.sql") if p.name >= "0016"]
    held = {p.name: p.read_bytes() for p in later}
    for p in later:
        p.unlink()
    upgrade(engine, root)
    rows = [("cot", "fp", "a", "done", 2, "r1"), ("cot", "fp2", "a", "rejected", 0, None)]
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO stage_items (stage, fingerprint, item_id, status, outputs, run_id)"
            " VALUES (:s, :f, :i, :st, :o, :r)"),
            [dict(zip(("s", "f", "i", "st", "o", "r"), r, strict=True)) for r in rows])
    for name, data in held.items():
        (root / "migrations" / name).write_bytes(data)
    assert "0016" in upgrade(engine, root)
    with engine.connect() as conn:
        kept = conn.execute(text(
            "SELECT stage, fingerprint, item_id, status, outputs, run_id FROM stage_items"
            " ORDER BY fingerprint")).all()
    assert [tuple(r) for r in kept] == rows
    assert inspect(engine).get_pk_constraint("stage_items")["constrained_columns"] == [
        "item_id", "stage", "fingerprint"]
