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
