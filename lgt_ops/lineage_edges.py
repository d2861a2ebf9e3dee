"""Dataset-level lineage of each DAG task, as asset URIs OpenLineage can name.

Which datasets a task reads and writes: the source prefix (s3://bucket/prefix or a file://
store), the release location, and the lineage DB tables, as `postgres://host:port/db/schema/
table` (the URI scheme of Airflow's postgres provider; OpenLineage names it namespace
`postgres://host:port`, name `db.schema.table`). A SQLite lineage DB has no such name: its
tables are left out. No credentials ever go into a URI.
"""

from __future__ import annotations

from sqlalchemy.engine import make_url

SCHEMA = "public"

# task -> (tables it reads, tables it writes); bookkeeping tables (stage_runs, ...) left out.
TASK_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "scan": ((), ("sources", "rejections")),
    "ingest": ((), ("images", "sources", "annotations", "rejections")),
    "annotate": (("images", "annotations"), ("annotations", "rejections", "model_requests")),
    "mcq": (("annotations",), ("questions", "rejections", "model_requests")),
    "blind": (("questions",), ("question_checks", "rejections", "model_requests")),
    "cot": (
        ("questions", "question_checks"),
        ("rollouts", "difficulty", "rejections", "model_requests"),
    ),
    "compose": (
        ("questions", "question_checks", "difficulty"),
        ("questions", "question_parents", "rejections", "model_requests"),
    ),
    "cot2": (
        ("questions", "question_parents", "question_checks", "difficulty"),
        ("rollouts", "difficulty", "rejections", "model_requests"),
    ),
    "harden": (
        ("questions", "question_parents", "difficulty"),
        ("question_checks", "rejections"),
    ),
    "expand": (("rollouts", "question_checks"), ("expansions", "rejections", "model_requests")),
    "filter": (("rollouts", "expansions"), ("trace_verdicts", "rejections")),
    "pairs": (("rollouts", "expansions", "trace_verdicts"), ("pairs",)),
    "tag": (("rollouts", "expansions", "trace_verdicts"), ("behaviour_tags", "rejections")),
    "release": (
        (
            "questions",
            "question_checks",
            "rollouts",
            "expansions",
            "trace_verdicts",
            "pairs",
            "difficulty",
        ),
        ("releases", "member_rows", "release_member_sets", "release_pointers"),
    ),
}
# Tasks that read the images under the source prefix.
READS_SOURCE = frozenset({"scan", "ingest", "annotate", "cot", "cot2", "release"})


def table_uri(database_url: str, table: str) -> str | None:
    """The table's asset URI, or None when the lineage DB is not Postgres."""
    url = make_url(database_url)
    if not url.drivername.startswith("postgres") or not url.host or not url.database:
        return None
    return f"postgres://{url.host}:{url.port or 5432}/{url.database}/{SCHEMA}/{table}"


def location_uri(uri: str) -> str:
    """A store location as an asset URI: s3://bucket/prefix or file:///path, no trailing /."""
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}{rest.rstrip('/')}" if rest.strip("/") else uri  # file:/// stays


def task_edges(
    task: str, database_url: str, source: str, outputs: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """(input URIs, output URIs) of one task."""
    reads, writes = TASK_TABLES[task]
    inputs = [location_uri(source)] if task in READS_SOURCE else []
    inputs += [u for t in reads if (u := table_uri(database_url, t))]
    out = [location_uri(o) for o in outputs]
    out += [u for t in writes if (u := table_uri(database_url, t))]
    return inputs, out
