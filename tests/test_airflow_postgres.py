"""Airflow's metadata DB on Postgres, as every deployment runs it (compose, Helm).

The rest of the suite keeps Airflow's metadata in SQLite; this runs the real `airflow db
migrate` in a subprocess against a throwaway Postgres database, which needs the drivers of the
`apache-airflow[postgres]` extra (asyncpg for Airflow's async engine, psycopg2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

pytestmark = [pytest.mark.airflow, pytest.mark.postgres]


def test_airflow_db_migrate_on_postgres(pg_url: str, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update(
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=pg_url,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
    )
    done = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            dag_table = conn.execute(text("SELECT to_regclass('public.dag')")).scalar()
    finally:
        engine.dispose()
    assert revision, "no alembic revision stamped"
    assert dag_table == "dag", "Airflow's tables were not created"
    # The CLI's own check reads the same DB through Airflow's settings (sync and async engines).
    check = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
