"""Build hook: ship the repository's top-level sql/ folder inside the package as lgt_ops/sql.

sql/ stays the single source of truth in git (migrations are reviewed there and applied by
`lgt db upgrade`); this copies it into the built package so a non-editable install (a wheel
in a fresh venv, the Docker image) finds its migrations and queries without a checkout.
Everything else is declared in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SQL_SRC = Path(__file__).resolve().parent / "sql"


class BuildPyWithSql(build_py):
    """build_py that also copies sql/ to <build_lib>/lgt_ops/sql."""

    def run(self) -> None:
        super().run()
        if not (SQL_SRC / "migrations").is_dir():
            # A wheel without migrations cannot run `lgt db upgrade`: refuse to build one.
            raise FileNotFoundError(f"{SQL_SRC}/migrations is missing: cannot package the SQL")
        self.copy_tree(str(SQL_SRC), str(Path(self.build_lib) / "lgt_ops" / "sql"))


setup(cmdclass={"build_py": BuildPyWithSql})
