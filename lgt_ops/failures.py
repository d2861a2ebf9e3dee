"""What kind of failure an error is: permanent (a retry cannot fix it) or transient.

Every expected failure of lgt_ops derives from `Failure`. Its message is one line: what
failed, which item or endpoint, and what to do. `permanent` tells an orchestrator not to
retry (the Airflow adapter fails such a task on its first try); `exit_code` is what the `lgt`
command returns (the table in README, "Failures and exit codes"). `describe()` also names
the third-party errors that mean "the lineage DB / the object store is unreachable".

This module is light on purpose: the CLI and the Airflow adapter import it before anything
heavy, and it imports no database, storage or HTTP library at module level.
"""

from __future__ import annotations

from typing import ClassVar

# `lgt` exit codes (README "Failures and exit codes" mirrors this table).
EXIT_OK = 0
EXIT_VERIFY_FAILED = 1  # `lgt release verify` found problems, `validate` a failed check
EXIT_USAGE = 2  # bad parameters or configuration (argparse also uses 2)
EXIT_RELEASE = 3  # release exists / simulated output refused / not found
EXIT_ENDPOINT_AUTH = 4
EXIT_ENDPOINT_DOWN = 5
EXIT_INCOMPLETE = 6  # a stage left items unfinished; re-run to resume
EXIT_LINEAGE_DB = 7
EXIT_STORE = 8
EXIT_INTERNAL = 70  # an unexpected error (a bug): run with -v for the traceback
EXIT_INTERRUPTED = 130


class Failure(Exception):
    """An expected failure, with a one-line message for the operator."""

    permanent: ClassVar[bool] = False
    exit_code: ClassVar[int] = EXIT_INTERNAL

    def line(self) -> str:
        """The message on one line (multi-line details are joined)."""
        return " ".join(str(self).split())


class PermanentFailure(Failure):
    """Retrying with the same inputs cannot help: fix the parameters, settings or data."""

    permanent = True


class TransientFailure(Failure):
    """A service is missing or slow; retrying later can succeed (and resumes the work)."""

    permanent = False


class LineageDbUnreachable(TransientFailure):
    exit_code = EXIT_LINEAGE_DB


class StoreUnreachable(TransientFailure):
    exit_code = EXIT_STORE


class StoreRefused(PermanentFailure):
    """The store answered but refused: no such bucket, or credentials rejected."""

    exit_code = EXIT_STORE


class RunFailed(PermanentFailure):
    """A pipeline run ended failed; the message names the failed tasks or stage shards.
    Retrying the closing step cannot help: re-run (or clear) the failed tasks instead."""

    exit_code = EXIT_INTERNAL


_DB_HINT = "check LGT_DATABASE_URL (or the lgt_postgres connection) and that the database is up"
_DB_CONNECTION_SIGNS = (
    "could not connect",
    "connection refused",
    "connection to server",
    "server closed the connection",
    "could not translate host name",
    "timeout expired",
    "terminating connection",
    "unable to open database file",
    "connection already closed",
)
_STORE_HINT = (
    "check LGT_STORE_URL / LGT_S3_ENDPOINT_URL (or the lgt_s3 connection) and that the store is up"
)
_STORE_REFUSALS = frozenset(
    {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def lineage_db_unreachable(exc: BaseException, where: str | None = None) -> LineageDbUnreachable:
    place = f" ({where})" if where else ""
    return LineageDbUnreachable(
        f"lineage database unreachable{place}: {_first_line(exc)}; {_DB_HINT}"
    )


def _db_failure(exc: BaseException) -> Failure | None:
    try:
        from sqlalchemy.exc import InterfaceError, OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy is a core dependency
        return None
    if not isinstance(exc, InterfaceError | OperationalError):
        return None
    text = str(exc).lower()
    if exc.connection_invalidated or any(sign in text for sign in _DB_CONNECTION_SIGNS):
        return lineage_db_unreachable(exc)
    return None  # e.g. a deadlock or a cancelled statement: not a connection problem


def _store_failure(exc: BaseException) -> Failure | None:
    try:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )
    except ImportError:  # the local-directory store needs no botocore
        return None
    if isinstance(
        exc,
        EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError | ReadTimeoutError,
    ):
        return StoreUnreachable(f"object store unreachable: {_first_line(exc)}; {_STORE_HINT}")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _STORE_REFUSALS:
            bucket = exc.response.get("Error", {}).get("BucketName", "")
            what = f" (bucket {bucket})" if bucket else ""
            return StoreRefused(
                f"object store refused the request{what}: {code}: {_first_line(exc)}; "
                f"{_STORE_HINT}, the bucket name and the credentials"
            )
    return None


def describe(exc: BaseException) -> Failure | None:
    """The expected failure `exc` is (or stands for), or None for an unexpected error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # the error, or what it was raised from
        seen.add(id(current))
        if isinstance(current, Failure):
            return current
        found = _db_failure(current) or _store_failure(current)
        if found is not None:
            return found
        current = current.__cause__
    return None
