"""Planner statistics after bulk changes.

A first ingest or a big refresh changes most rows of `sources` and `images` at once; until
the statistics catch up, PostgreSQL can misjudge the shard query and read the whole corpus
for every shard. Autovacuum gets there eventually (if it is on); a run should not depend on
when. So the pipeline refreshes the statistics of tables that changed a lot before it fans
out over shards and before it publishes.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)

# Re-analyze a table once this share of its rows changed since its last analyze.
CHANGED_SHARE = 0.1
# The schema's own tables only: other sessions' temporary tables (db/copy_rows.py stages
# batches in them) are listed too, and cannot be analyzed from here.
_STALE = text(
    "SELECT relname FROM pg_stat_user_tables WHERE schemaname = current_schema()"
    " AND n_mod_since_analyze > 1000 + :share * n_live_tup ORDER BY relname"
)


def refresh_statistics(db: Engine) -> list[str]:
    """ANALYZE the lineage tables whose statistics are stale (PostgreSQL; SQLite: nothing)."""
    if db.dialect.name != "postgresql":
        return []
    with db.connect() as conn:
        stale = [r[0] for r in conn.execute(_STALE, {"share": CHANGED_SHARE})]
    if stale:
        with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in stale:
                conn.execute(text(f'ANALYZE "{table}"'))
        log.info("refreshed planner statistics of %s", ", ".join(stale))
    return stale
