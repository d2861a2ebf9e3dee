"""SQLAlchemy engine for the lineage DB: Postgres in production, SQLite for embedded runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError

from lgt_ops.config import ConfigError
from lgt_ops.failures import lineage_db_unreachable


def make_engine(url: str) -> Engine:
    """An engine with sane pool and SQLite settings (WAL, busy timeout, foreign keys).

    A URL that cannot be used (unparseable, unknown dialect or driver) is a ConfigError
    (permanent: fix the setting), not an unexpected error; its message never repeats the URL,
    which may hold a password."""
    try:
        return _engine(url)
    except (ArgumentError, ImportError, ValueError) as exc:  # NoSuchModuleError: ArgumentError
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(
            f"lineage database URL not usable: {type(exc).__name__}: {detail}; set"
            " LGT_DATABASE_URL (or the lgt_postgres connection), e.g."
            " postgresql+psycopg2://USER:PASSWORD@HOST:5432/lgt or sqlite:///PATH"
        ) from exc


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI objects
            # Let SQLAlchemy, not pysqlite, control transactions, so DDL is transactional too.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:  # noqa: ANN001
            # IMMEDIATE takes the write lock up front: concurrent writers wait (busy timeout)
            # instead of failing when a read transaction tries to upgrade.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    _unreachable_on_disconnect(engine)
    return engine


def _unreachable_on_disconnect(engine: Engine) -> None:
    """A lost or refused connection, wherever it happens (a stage's commit, the request
    journal's thread, a lookup), surfaces as `LineageDbUnreachable` with a one-line message
    naming the database (the driver's error stays chained); other errors are unchanged."""
    where = engine.url.render_as_string(hide_password=True)

    @event.listens_for(engine, "handle_error")
    def _unreachable(ctx: ExceptionContext) -> None:
        if ctx.is_disconnect or _refused(ctx.original_exception):
            raise lineage_db_unreachable(ctx.original_exception, where) from (
                ctx.sqlalchemy_exception or ctx.original_exception
            )


def raise_unreachable(engine: Engine, exc: BaseException) -> None:
    """For a driver error outside SQLAlchemy's statements (COPY): a lost or refused
    connection raises `LineageDbUnreachable`, as in `_unreachable_on_disconnect`; else
    nothing (the caller re-raises the error)."""
    import psycopg2

    if _refused(exc) or isinstance(exc, psycopg2.InterfaceError):  # cut, refused, closed
        where = engine.url.render_as_string(hide_password=True)
        raise lineage_db_unreachable(exc, where) from exc


def _refused(exc: BaseException) -> bool:
    """A connection that could not be made or was cut (server down, restarting, terminated):
    psycopg2 gives these no SQLSTATE, or one of class 08 (connection) / 57P (shutdown)."""
    import psycopg2

    if not isinstance(exc, psycopg2.OperationalError):
        return False
    code = getattr(exc, "pgcode", None)
    return code is None or code.startswith(("08", "57P"))


@contextmanager
def reaching(engine: Engine) -> Iterator[None]:
    """A connection failure inside becomes `LineageDbUnreachable`, naming the database."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        where = engine.url.render_as_string(hide_password=True)
        raise lineage_db_unreachable(exc, where) from exc
