"""Ordered, idempotent schema migrations from `sql/migrations/NNNN_name.sql`.

A migration may have a dialect-specific twin `NNNN_name.postgresql.sql` (or `.sqlite.sql`)
which replaces the portable file on that dialect. Applied versions are recorded with a
checksum; editing an applied migration is refused rather than silently ignored. Concurrent
upgraders (several Airflow tasks starting at once) serialise on a lock.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, text

from lgt_ops.failures import EXIT_USAGE, PermanentFailure

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)(?:\.(postgresql|sqlite))?\.sql$")
_LOCK_ID = 7_351_104_2


class MigrationError(PermanentFailure, RuntimeError):
    """The migrations cannot be applied as they are (missing from the install, misnamed, or
    edited after being applied): a retry cannot fix it."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def sql_dir() -> Path:
    """The sql/ folder: $LGT_SQL_DIR, the copy built into the package, or the source tree.

    The wheel carries the repository's sql/ as lgt_ops/sql (see setup.py), so an installed
    package needs no checkout; an editable install or a checkout uses sql/ beside lgt_ops/.
    """
    package = Path(__file__).resolve().parents[1]
    candidates = [os.environ.get("LGT_SQL_DIR"), package / "sql", package.parent / "sql"]
    for cand in candidates:
        if cand and (Path(cand) / "migrations").is_dir():
            return Path(cand)
    raise MigrationError(
        "cannot find sql/migrations (not in the installed package, not beside it): "
        "set LGT_SQL_DIR to the project's sql/ folder"
    )


def discover(dialect: str, root: Path | None = None) -> list[Migration]:
    """Migrations for `dialect`, in version order."""
    folder = (root or sql_dir()) / "migrations"
    chosen: dict[str, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(
                f"migration file {path.name!r} is not named NNNN_name[.dialect].sql"
            )
        version, name, only = m.groups()
        if only and only != dialect:
            continue
        if version in chosen and not only:
            continue  # the dialect-specific twin already won
        chosen[version] = Migration(version, name, path)
    return [chosen[v] for v in sorted(chosen)]


def split_statements(sql: str) -> list[str]:
    """Split on ';' at the end of a line; migrations keep one statement per terminator."""
    statements, current = [], []
    for line in sql.splitlines():
        if line.strip().startswith("--") and not current:
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            stmt = "\n".join(current).strip().rstrip(";").strip()
            if stmt:
                statements.append(stmt)
            current = []
    tail = "\n".join(current).strip()
    if tail and not all(ln.strip().startswith("--") or not ln.strip() for ln in current):
        statements.append(tail)
    return statements


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})


def _ensure_table(conn: Connection) -> None:
    conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version TEXT PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL,"
            " applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
    )


def applied(conn: Connection) -> dict[str, str]:
    rows = conn.execute(text("SELECT version, checksum FROM schema_migrations")).all()
    return {r[0]: r[1] for r in rows}


def upgrade(engine: Engine, root: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the versions applied by this call."""
    dialect = engine.dialect.name
    done: list[str] = []
    for mig in discover(dialect, root):
        with engine.begin() as conn:
            _lock(conn)
            _ensure_table(conn)
            have = applied(conn)
            if mig.version in have:
                if have[mig.version] != mig.checksum:
                    raise MigrationError(
                        f"migration {mig.path.name} changed after it was applied "
                        "(checksum differs): add a new migration instead of editing it"
                    )
                continue
            for stmt in split_statements(mig.sql):
                conn.exec_driver_sql(stmt)
            conn.execute(
                text("INSERT INTO schema_migrations (version, name, checksum) VALUES (:v, :n, :c)"),
                {"v": mig.version, "n": mig.name, "c": mig.checksum},
            )
            done.append(mig.version)
    return done


def current_version(engine: Engine) -> str | None:
    with engine.begin() as conn:
        _ensure_table(conn)
        have = applied(conn)
    return max(have) if have else None
