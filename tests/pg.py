"""The test Postgres server: admin statements and database URLs, shared by the fixtures, the
chaos harness (also used by bench/chaos.py, outside pytest) and the cluster tests."""

from __future__ import annotations

import os

PG_ADMIN_URL = os.environ.get("LGT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def admin(sql: str) -> None:
    """Run one statement on the admin database, outside a transaction (CREATE/DROP DATABASE)."""
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def database_url(name: str) -> str:
    """The SQLAlchemy URL of database `name` on the test server."""
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://")
    return f"{base}/{name}"
