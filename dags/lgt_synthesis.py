"""LGT-ETL synthesis: images in the bucket -> grounded questions, traces, pairs -> a release.

Wiring only: every task calls one function of `lgt_ops.pipeline` (the same functions the
`lgt` CLI calls). Heavy imports happen inside tasks, so parsing this file stays cheap. The
on-call runbook (the DAG's doc_md) is lgt_synthesis.md beside this file.

    start -> preflight -> scan -> ingest[shard files] -> plan
          -> shard[annotate -> mcq -> blind -> cot -> compose -> cot2 -> harden
                   -> expand -> filter -> pairs -> tag]
          -> release (the lgt_release Asset) -> finish
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.sdk import Asset, Param, dag, task, task_group

from lgt_ops import registry
from lgt_ops.airflow_adapter import fail_fast, on_failure
from lgt_ops.params import PARAM_SCHEMA, TASK_TIMEOUT_MINUTES, RunParams

if TYPE_CHECKING:
    from lgt_ops.env import StageEnv

RELEASE_ASSET = Asset(name="lgt_release", uri="lgt://releases", group="lgt")
SCHEDULE = os.environ.get("LGT_SCHEDULE", "0 2 * * *")  # nightly; "" disables the schedule
RUNBOOK = str(Path(__file__).with_name("lgt_synthesis.md"))  # Airflow reads a *.md doc_md path
# A first run over millions of images takes days; a nightly refresh, hours.
DAGRUN_TIMEOUT = timedelta(hours=int(os.environ.get("LGT_DAGRUN_TIMEOUT_HOURS", "72")))

DEFAULT_ARGS = {
    "owner": "lgt-etl",
    "retries": int(os.environ.get("LGT_TASK_RETRIES", "3")),
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
    "on_failure_callback": on_failure,
}


def _timeout(task_id: str) -> timedelta:
    return timedelta(minutes=TASK_TIMEOUT_MINUTES[task_id])


def _param(name: str) -> Param:
    schema = dict(PARAM_SCHEMA[name])
    default = schema.pop("default")
    return Param(default, **schema)


# -- the tasks: each calls one function of lgt_ops.pipeline --------------------------------------
def _run() -> tuple[RunParams, StageEnv]:
    """This task's run parameters and its StageEnv."""
    from lgt_ops import airflow_adapter as af

    params = af.run_params()
    return params, af.task_env(params)


def _report_lineage(
    stage: str, env: StageEnv, params: RunParams, outputs: tuple[str, ...] = ()
) -> None:
    from lgt_ops import airflow_adapter as af
    from lgt_ops import pipeline

    af.report_task_lineage(stage, env, pipeline.source_uri(env, params), outputs)


@task(execution_timeout=_timeout("start"))
@fail_fast
def start() -> str:
    from lgt_ops import airflow_adapter as af
    from lgt_ops import pipeline

    params, env = _run()
    af.close_ended_runs(env)
    pipeline.start(env, params)
    return env.run.run_id


@task(execution_timeout=_timeout("preflight"))
@fail_fast
def preflight() -> list[dict]:
    from lgt_ops import pipeline

    params, env = _run()
    report = pipeline.preflight(env, params)  # None in a dry run
    return report.rows() if report is not None else []


@task(execution_timeout=_timeout("scan"))
@fail_fast
def scan() -> list[dict]:
    from lgt_ops import pipeline

    params, env = _run()
    result = pipeline.scan(env, params)
    _report_lineage("scan", env, params)
    n = len(result.shard_keys)
    return [{"key": key, "index": i, "count": n} for i, key in enumerate(result.shard_keys)]


@task(max_active_tis_per_dag=8, execution_timeout=_timeout("ingest"))
@fail_fast
def ingest(shard: dict) -> dict:
    from lgt_ops.stages import ingest as stage

    params, env = _run()
    stats = stage.ingest_shard(env, shard["key"], shard["index"], shard["count"])
    _report_lineage("ingest", env, params)
    return {"out": stats.items_out, "rejected": stats.items_rejected}


@task(trigger_rule="none_failed", execution_timeout=_timeout("plan"))
@fail_fast
def plan() -> list[dict]:
    from lgt_ops import pipeline

    params, env = _run()
    if params.dry_run:
        pipeline.log_dry_run(env, params)
    return [shard.as_dict() for shard in pipeline.plan(env, params)]


def stage_task(stage: type[registry.Stage]) -> Any:
    """The task of one per-shard stage: its pool (`lgt_<role>`) and timeout from the registry."""

    @task(task_id=stage.name, pool=stage.pool(), execution_timeout=_timeout(stage.name))
    @fail_fast
    def run_stage(shard: dict) -> dict:
        from lgt_ops import pipeline
        from lgt_ops.env import Shard

        params, env = _run()
        stats = pipeline.run_stage(env, stage.name, params, Shard.parse(shard))
        if stats is None:
            return {"skipped": True}
        _report_lineage(stage.name, env, params)
        return stats.as_dict()

    return run_stage


@task_group
def shard_stages(shard: dict) -> None:
    previous = None
    for stage in registry.shard_stages():  # the registry's order
        current = stage_task(stage)(shard)
        if previous is not None:
            previous >> current
        previous = current


@task(outlets=[RELEASE_ASSET], trigger_rule="none_failed", execution_timeout=_timeout("release"))
@fail_fast
def release(*, outlet_events=None) -> dict | None:
    from airflow.sdk.exceptions import AirflowSkipException

    from lgt_ops import pipeline

    params, env = _run()
    published = pipeline.release(env, params)
    if published is None:
        raise AirflowSkipException("release stage not selected (or dry run)")
    outlet_events[RELEASE_ASSET].extra = {
        "release_id": published.release_id,
        "uri": published.uri,
        "content_sha256": published.content_sha256,
        "rows": published.counts,
        "simulated": published.manifest["simulated"],
    }
    _report_lineage("release", env, params, (published.uri,))
    return {"release_id": published.release_id, "uri": published.uri}


@task(trigger_rule="all_done", execution_timeout=_timeout("finish"))
@fail_fast
def finish(pipeline_run: str) -> str:
    from lgt_ops import airflow_adapter as af
    from lgt_ops import pipeline

    del pipeline_run  # an explicit edge from start(): finish always closes that run
    return pipeline.finish(af.task_env(), af.failed_tasks())


# -- the graph ----------------------------------------------------------------------------------
@dag(
    dag_id="lgt_synthesis",
    schedule=SCHEDULE or None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={name: _param(name) for name in PARAM_SCHEMA},
    tags=["lgt", "synthesis"],
    description="Images in the bucket -> grounded questions, reasoning traces, pairs -> a release",
    dagrun_timeout=DAGRUN_TIMEOUT,
    on_failure_callback=on_failure,
    doc_md=RUNBOOK,
)
def lgt_synthesis() -> None:
    pipeline_run = start()
    shards = scan()
    pipeline_run >> preflight() >> shards
    ingested = ingest.expand(shard=shards)
    planned = plan()
    ingested >> planned
    per_shard = shard_stages.expand(shard=planned)
    published = release()
    per_shard >> published
    published >> finish(pipeline_run)


lgt_synthesis()
