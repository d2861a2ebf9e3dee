"""Planner statistics after bulk changes.

A first ingest or a big refresh changes most rows of `sources` and `images` at once; until
the statistics catch up, PostgreSQL can misjudge the shard query and read the whole corpus
for every shard. Autovacuum gets there eventually (if it is on); a run should not depend on
when. So the pipeline refreshes the statistics of tables that changed a lot before it fans
out over shards and before it publishes; and every shard task of a stage first analyzes the
tables that have grown to five times what their statistics say. Those of a first run's stage tables
are of empty tables when the run plans: without them the planner takes a lookup of a shard's
500 ids for most of the table (0.5 % a value with no statistics), so every shard read the
whole `difficulty` table, or all of a fingerprint's `question_checks` rows, and a 100,000-image
first run spent more PostgreSQL CPU in filter and pairs than the stages did.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, text

log = logging.getLogger(__name__)

# Re-analyze a table once this share of its rows changed since its last analyze: before the
# fan-out and the release; in a stage's shard task once four fifths of its rows are new (it
# grew five-fold, and by 5,000 rows), so a table growing from empty to N rows is analyzed
# about log5(N / 5,000) times. The first analysis with rows is the one that matters: its
# per-value statistics scale with the table from then on (the planner reads the row count
# off the table's current size), and each later one reads a 30,000-row sample (at 10k images,
# doubling as the trigger cost filter an eighth of its PostgreSQL CPU in ANALYZE).
CHANGED_SHARE = 0.1
GROWN_SHARE = 0.8
# The schema's own tables only: other sessions' temporary tables are listed too, and cannot
# be analyzed from here.
_STALE = text(
    "SELECT relname FROM pg_stat_user_tables WHERE schemaname = current_schema()"
    " AND n_mod_since_analyze > 1000 + :share * n_live_tup ORDER BY relname"
)


def refresh_statistics(db: Engine, share: float = CHANGED_SHARE) -> list[str]:
    """ANALYZE the lineage tables of which more than `share` of the rows (and 1,000) changed
    since their last analyze (PostgreSQL; SQLite: nothing). A table another session is
    analyzing through this function is left to it. The analyzed tables, by name."""
    if db.dialect.name != "postgresql":
        return []
    with db.connect() as conn:
        stale = [r[0] for r in conn.execute(_STALE, {"share": share})]
    done = []
    if stale:
        with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in stale:
                if _analyze_unless_busy(conn, table):
                    done.append(table)
        if done:
            log.info("refreshed planner statistics of %s", ", ".join(done))
    return done


def _analyze_unless_busy(conn: Connection, table: str) -> bool:
    """ANALYZE `table` unless another session holds its lock here (shard tasks start side by
    side and find the same tables stale: one analysis is enough)."""
    key = {"k": f"lgt-analyze:{table}"}
    if not conn.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), key).scalar():
        return False
    try:
        conn.execute(text(f'ANALYZE "{table}"'))
    finally:
        conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), key)
    return True
