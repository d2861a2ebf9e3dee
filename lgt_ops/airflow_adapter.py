"""The one module of lgt_ops that knows Airflow: connections -> Settings, task context ->
RunContext, permanent failures -> AirflowFailException, and dataset-level lineage for
OpenLineage. DAG files call only these helpers and `lgt_ops.pipeline`; the library itself
runs without Airflow installed. Cheap to import (DAG files import it at parse time): the
stage machinery is imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import quote, urlencode

from pydantic import SecretStr, ValidationError

from lgt_ops.config import (
    ROLES,
    ConfigError,
    EndpointSettings,
    Settings,
    joined_urls,
    settings_from_env,
)
from lgt_ops.failures import describe
from lgt_ops.fanout import DEFAULT_MAX_MAP_LENGTH
from lgt_ops.params import RunParams
from lgt_ops.runctx import RunContext, airflow_run_id

if TYPE_CHECKING:  # the DAG imports this module at parse time: keep engines/boto3 out
    from lgt_ops.env import StageEnv

log = logging.getLogger(__name__)

CONN_S3 = "lgt_s3"
CONN_POSTGRES = "lgt_postgres"
CONN_ENDPOINTS = {role: f"lgt_{role}" for role in ROLES}
# libpq options a Postgres connection's extra may carry (TLS to a managed database).
_PG_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout")


def _connection(conn_id: str) -> Any | None:
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def _extra(conn: Any) -> dict[str, Any]:
    extra = conn.extra_dejson if hasattr(conn, "extra_dejson") else {}
    return extra or {}


def settings_from_airflow(base: Settings | None = None) -> Settings:
    """LGT_* environment settings, overridden by whichever lgt_* connections exist.

    Works in tasks and in the API server (the releases page): there Airflow marks the process
    as a server, so `Connection.get` also finds connections stored in the metadata DB.
    """
    s = base or settings_from_env()
    update: dict[str, Any] = {}
    s3 = _connection(CONN_S3)
    if s3 is not None:
        extra = _extra(s3)
        bucket = extra.get("bucket") or extra.get("bucket_name")
        if bucket:
            update["store_url"] = f"s3://{bucket}"
        update["s3_endpoint_url"] = extra.get("endpoint_url") or s.s3_endpoint_url
        update["s3_region"] = extra.get("region_name") or s.s3_region
        if s3.login:
            update["s3_access_key"] = SecretStr(s3.login)
        if s3.password:
            update["s3_secret_key"] = SecretStr(s3.password)
    pg = _connection(CONN_POSTGRES)
    if pg is not None:
        auth = quote(pg.login or "", safe="")
        if pg.password:
            auth += ":" + quote(pg.password, safe="")
        host = f"{pg.host}:{pg.port or 5432}"
        url = f"postgresql+psycopg2://{auth}@{host}/{pg.schema or 'lgt'}"
        options = {k: _extra(pg)[k] for k in _PG_OPTIONS if _extra(pg).get(k)}
        if options:
            url += "?" + urlencode(options)
        update["database_url"] = url
    endpoints = dict(s.endpoints)
    for role, conn_id in CONN_ENDPOINTS.items():
        conn = _connection(conn_id)
        if conn is not None:
            endpoints[role] = _endpoint(endpoints[role], conn_id, conn)
    update["endpoints"] = endpoints
    update["max_map_length"] = max_map_length()
    return s.model_copy(update=update)


def _endpoint(base: EndpointSettings, conn_id: str, conn: Any) -> EndpointSettings:
    """`base` with what the endpoint connection sets, validated: a bad value (max_inflight
    "many", a negative down_after_s) is a ConfigError naming the connection, not a retry."""
    extra = _extra(conn)
    update: dict[str, Any] = {}
    if extra.get("base_urls"):  # several replicas of one model: a list (or commas)
        update["base_url"] = joined_urls(extra["base_urls"])
    elif conn.host:
        update["base_url"] = _base_url(conn)
    if conn.password:
        update["api_key"] = SecretStr(conn.password)
    for key in ("model", "max_inflight", "down_after_s"):
        if extra.get(key):
            update[key] = extra[key]
    try:
        return EndpointSettings.model_validate({**base.model_dump(), **update})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in exc.errors()
        )
        raise ConfigError(f"connection {conn_id}: invalid extra: {problems}") from exc


def releases_page_guard() -> Callable[..., Any]:
    """FastAPI dependency guarding the releases page with Airflow's own auth manager.

    Airflow's `requires_access_asset("GET")` resolves the user from the `Authorization: Bearer`
    header or the UI's `_token` cookie (401 without either) and asks the configured auth
    manager whether that user may read assets (403 if not). Releases are what the DAG emits as
    the `lgt_release` asset, so whoever may read assets may read them, under any auth manager.
    """
    from airflow.api_fastapi.core_api.security import requires_access_asset

    return requires_access_asset("GET")


def login_url(next_url: str) -> str:
    """The auth manager's login page, coming back to `next_url` after a login."""
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().get_url_login(next_url=next_url)


def max_map_length() -> int:
    """Airflow's `[core] max_map_length`: the longest list a task may be mapped over."""
    from airflow.sdk import conf

    return conf.getint("core", "max_map_length", fallback=DEFAULT_MAX_MAP_LENGTH)


def _base_url(conn: Any) -> str:
    host = str(conn.host)
    if "://" in host:
        return host.rstrip("/")
    scheme = conn.schema if conn.schema in ("http", "https") else "http"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{host}{port}/v1"


def run_context(context: dict[str, Any]) -> RunContext:
    dag_run = context["dag_run"]
    ti = context["ti"]
    run_type = str(getattr(dag_run, "run_type", "manual")).rsplit(".", 1)[-1].lower()
    map_index = getattr(ti, "map_index", -1)
    return RunContext(
        run_id=airflow_run_id(dag_run.dag_id, dag_run.run_id),
        run_type=run_type,
        dag_id=dag_run.dag_id,
        airflow_run_id=dag_run.run_id,
        task_id=ti.task_id,
        map_index=None if map_index is None or map_index < 0 else map_index,
        try_number=int(getattr(ti, "try_number", 1) or 1),
    )


def task_env(params: RunParams | None = None) -> StageEnv:
    """The stage environment for the running task, with the run's parameter overrides."""
    from airflow.sdk import get_current_context

    from lgt_ops.env import StageEnv

    context = get_current_context()
    env = StageEnv.open(settings_from_airflow(), run_context(context))
    if params is not None:
        env = env.for_run(params)
    env.show_progress = True  # INFO lines in the task log every 15 s (lgt_ops.progress)
    return env


def run_params(context: dict[str, Any] | None = None) -> RunParams:
    from airflow.sdk import get_current_context

    context = context or get_current_context()
    return RunParams.from_conf(dict(context["params"]))


def on_failure(context: Mapping[str, Any]) -> None:
    """One summary line per failed task (or failed run): the hook point for alerting."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    error = context.get("exception") or context.get("reason") or "unknown"
    if isinstance(error, BaseException):
        # fail_fast wraps a permanent failure in AirflowFailException: name the library's error.
        error = error.__cause__ or error
        error = f"{type(error).__name__}: {error}"
    map_index = getattr(ti, "map_index", -1)
    log.error(
        "LGT task failed: dag=%s run=%s task=%s%s try=%s error=%s",
        getattr(dag_run, "dag_id", None) or getattr(ti, "dag_id", "?"),
        getattr(dag_run, "run_id", None) or getattr(ti, "run_id", "?"),
        getattr(ti, "task_id", "-"),
        f"[{map_index}]" if isinstance(map_index, int) and map_index >= 0 else "",
        getattr(ti, "try_number", "-"),
        " ".join(str(error).split())[:500],  # one line, whatever the message holds
    )


def report_task_lineage(
    task: str, env: StageEnv, source_uri: str, outputs: tuple[str, ...] = ()
) -> None:
    """The task's dataset edges (source prefix, lineage DB tables, release) for OpenLineage."""
    from lgt_ops.lineage_edges import task_edges

    inputs, outs = task_edges(task, env.settings.database_url, source_uri, outputs)
    report_lineage(inputs, outs)


def report_lineage(inputs: list[str], outputs: list[str]) -> None:
    """Dataset-level edges for OpenLineage (a no-op unless its provider is installed)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.lineage import get_hook_lineage_collector

    class LgtLineageHook(BaseHook):
        """Names LGT-ETL as the producer of the collected lineage."""

        hook_name = "LGT-ETL"

        def get_conn(self) -> None:
            return None

    collector = get_hook_lineage_collector()
    hook = LgtLineageHook()
    for uri in inputs:
        collector.add_input_asset(context=hook, uri=uri)
    for uri in outputs:
        collector.add_output_asset(context=hook, uri=uri)


P = ParamSpec("P")
R = TypeVar("R")


def fail_fast(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate a task body: a permanent failure (lgt_ops.failures) fails the task on this try,
    without retries, as one line; anything else is raised as is (and retried)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            failure = describe(exc)
            if failure is None or not failure.permanent:
                raise
            from airflow.sdk.exceptions import AirflowFailException

            log.error("%s (%s; not retried)", failure.line(), type(failure).__name__)
            raise AirflowFailException(failure.line()) from exc

    return wrapper


def failed_tasks(context: dict[str, Any] | None = None) -> list[str]:
    """Tasks of this DAG run that failed (those that could not run because of them are
    named only when no task itself failed, e.g. one marked failed by hand)."""
    from airflow.sdk import get_current_context

    context = context or get_current_context()
    dag_run, ti = context["dag_run"], context["ti"]
    states = ti.get_task_states(dag_id=dag_run.dag_id, run_ids=[dag_run.run_id])
    by_task = states.get(dag_run.run_id, {})
    failed = sorted(task for task, state in by_task.items() if state == "failed")
    return failed or sorted(t for t, state in by_task.items() if state == "upstream_failed")


_ENDED = ("success", "failed")


def close_ended_runs(env: StageEnv, context: dict[str, Any] | None = None) -> list[str]:
    """Close as abandoned this DAG's earlier pipeline runs that are still `running` although
    Airflow ended their run (a dagrun timeout, a run marked failed by hand: their `finish`
    never ran). Returns the run ids closed."""
    from airflow.sdk import get_current_context

    from lgt_ops.abandon import abandon_run, running_runs

    ti = (context or get_current_context())["ti"]
    closed = []
    for run_id, airflow_run in running_runs(env):
        try:
            state = str(ti.get_dagrun_state(dag_id=env.run.dag_id, run_id=airflow_run))
        except Exception:  # noqa: BLE001 - a run deleted from Airflow's DB: cannot tell
            log.debug("no Airflow state for %s", airflow_run, exc_info=True)
            continue
        if state.rsplit(".", 1)[-1].lower() in _ENDED:
            abandon_run(env, run_id, f"its Airflow run ended ({state}) before its finish task")
            closed.append(run_id)
    return closed
