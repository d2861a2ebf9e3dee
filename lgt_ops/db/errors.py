"""The lineage database went away: one clear library error instead of a driver traceback."""

from __future__ import annotations

from sqlalchemy.engine import make_url


class LineageDBUnavailable(RuntimeError):
    """The connection to the lineage database was lost or refused (restart, failover,
    terminated backend). Committed work is kept: re-running the task resumes from it."""


def describe(url: str, exc: BaseException) -> str:
    """One line: which database, what the driver said, what to do."""
    safe = make_url(url).render_as_string(hide_password=True)
    said = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
    return (
        f"lineage database {safe} unavailable ({said}); committed work is kept — check that "
        "the database is up and re-run the task to resume"
    )
