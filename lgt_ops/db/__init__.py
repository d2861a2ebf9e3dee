"""Lineage database: engine, migrations and small repository helpers."""

from lgt_ops.db.engine import make_engine
from lgt_ops.db.migrate import upgrade

__all__ = ["make_engine", "upgrade"]
