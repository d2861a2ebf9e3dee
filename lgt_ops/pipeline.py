"""The pipeline as plain functions: the Airflow DAG and the CLI call exactly these.

    preflight (the endpoints the selected stages need) -> scan -> ingest[shard files] -> plan
         -> per image shard: annotate -> mcq -> blind -> cot -> compose -> cot2 -> harden
         -> expand -> filter -> pairs -> tag (optional LLM behaviour tagger)
         -> release

Per-shard stages are independent across shards (every stage works image by image), so the
DAG maps them over shards and a shard can be in a later stage while another is earlier.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from lgt_ops import dryrun, registry
from lgt_ops.abandon import close_leftover_stages
from lgt_ops.config import Settings
from lgt_ops.db.stats import GROWN_SHARE, refresh_statistics
from lgt_ops.failures import RunFailed
from lgt_ops.fanout import fan_out
from lgt_ops.llm import preflight as endpoint_preflight
from lgt_ops.llm.preflight import PreflightReport
from lgt_ops.params import RunParams
from lgt_ops.release.publish import Published, publish
from lgt_ops.runs import ensure_pipeline_run, error_line, finish_pipeline_run
from lgt_ops.sources import count_images, resolve_source
from lgt_ops.stages import ingest
from lgt_ops.stages.base import (
    Shard,
    StageEnv,
    StageStats,
)
from lgt_ops.stages.runner import run_stage as run_shard

log = logging.getLogger(__name__)

# Per-shard stages in dependency order (from the registry).
SHARD_STAGES: dict[str, type[registry.Stage]] = {s.name: s for s in registry.shard_stages()}


@dataclass
class RunSummary:
    run_id: str
    scan: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    release: Published | None


def start(env: StageEnv, params: RunParams) -> None:
    ensure_pipeline_run(env, params.model_dump(mode="json"))


def preflight(env: StageEnv, params: RunParams) -> PreflightReport | None:
    """Check the endpoints the selected stages need (lgt_ops.llm.preflight) and store the
    table with the run; raises on a problem, before any stage sends a request. A dry run
    calls no model, so it skips the preflight."""
    if params.dry_run:
        return None
    report = endpoint_preflight.check(env.settings, params.stages, env.store)
    endpoint_preflight.record(env.db, env.run.run_id, report)
    report.raise_if_failed()
    return report


def scan(env: StageEnv, params: RunParams) -> ingest.ScanResult:
    if not params.runs("ingest"):
        return ingest.ScanResult()
    return ingest.scan(env, params.source)


def plan(env: StageEnv, params: RunParams) -> list[Shard]:
    """Image shards for the per-shard stages: shard_size images each, at most max_shards
    (and never more than Airflow maps: max_map_length)."""
    spec, _ = resolve_source(env, params.source)
    refresh_statistics(env.db)  # ingest may have changed most of the corpus
    with env.db.connect() as conn:
        n = count_images(conn, spec, params.sample_size)
    count = image_shard_count(n, env.settings)
    return [Shard(i, count) for i in range(count)]


def image_shard_count(images: int, settings: Settings) -> int:
    cap = min(settings.max_shards, settings.max_map_length)
    return fan_out(images, settings.shard_size, cap, at_least_one=True).shards


def run_stage(env: StageEnv, stage: str, params: RunParams, shard: Shard) -> StageStats | None:
    if not params.runs(stage) or params.dry_run:
        return None
    spec, _ = resolve_source(env, params.source)
    # The stages before this one may have grown tables five-fold since their statistics
    refresh_statistics(env.db, share=GROWN_SHARE)
    return run_shard(SHARD_STAGES[stage], env, spec, shard, params.sample_size)


def source_uri(env: StageEnv, params: RunParams) -> str:
    spec, _ = resolve_source(env, params.source)
    return f"{spec.store_url}/{spec.prefix}"


def dry_run_report(env: StageEnv, params: RunParams) -> dict[str, Any]:
    """Pending work per stage, including what waits on earlier stages (see lgt_ops.dryrun)."""
    spec, store = resolve_source(env, params.source)
    report: dict[str, Any] = {"source": source_uri(env, params), "stages": {}}
    report["objects_listed"] = sum(1 for _ in store.list(spec.prefix))
    shards = plan(env, params)
    report["shards"] = len(shards)
    ready: dict[str, list[dryrun.Ready]] = {}
    for name, stage in SHARD_STAGES.items():
        if not params.runs(name):
            continue
        if not stage.has_plan():  # rule stages: computed from earlier outputs
            report["stages"][name] = {"model_calls": 0}
            continue
        ready[name] = [
            dryrun.Ready(item.image_id, len(item.requests))
            for shard in shards
            for item in stage.plan(env, spec, shard, params.sample_size).items
        ]
    report["stages"].update(dryrun.estimate(ready, dryrun.fan_outs(env.settings)))
    report["stages"] = {k: report["stages"][k] for k in SHARD_STAGES if k in report["stages"]}
    return report


def log_dry_run(env: StageEnv, params: RunParams) -> dict[str, Any]:
    report = dry_run_report(env, params)
    log.warning("DRY RUN (nothing is called or published): %s", report)
    return report


def finish(env: StageEnv, failed_tasks: Sequence[str] = ()) -> str:
    """Close the pipeline run (the DAG's last task, run whatever happened upstream).

    Stage rows still `running` are closed as abandoned (every task before this one has
    ended). The run is failed if an upstream task failed (`failed_tasks`, from the
    orchestrator) or a stage shard's last attempt did not succeed; then this raises
    `RunFailed`, so the orchestrator's run is failed too, with the reason in one line.
    """
    close_leftover_stages(env)
    with env.db.connect() as conn:
        failed = conn.execute(
            text(
                "SELECT r.stage, r.shard_index, r.status, r.error_detail FROM stage_runs r"
                " WHERE r.run_id = :run AND r.status <> 'success'"
                " AND r.attempt = (SELECT MAX(attempt) FROM stage_runs x WHERE x.run_id ="
                " r.run_id AND x.stage = r.stage AND x.shard_index = r.shard_index)"
                " ORDER BY r.stage, r.shard_index"
            ),
            {"run": env.run.run_id},
        ).all()
    if not failed and not failed_tasks:
        finish_pipeline_run(env, "success")
        return "success"
    parts = [f"failed tasks: {', '.join(failed_tasks)}"] if failed_tasks else []
    parts += [
        f"{r.stage} shard {r.shard_index} {r.status}: {_first_line(r.error_detail)}"
        for r in failed[:5]
    ]
    detail = "; ".join(parts)
    ensure_pipeline_run(env)  # a run whose start task failed has no row yet
    finish_pipeline_run(env, "failed", detail)
    raise RunFailed(f"pipeline run {env.run.run_id} failed: {detail}")


def _first_line(detail: str | None) -> str:
    return (detail or "no error recorded").strip().splitlines()[0][:300]


def release(env: StageEnv, params: RunParams) -> Published | None:
    if not params.runs("release") or params.dry_run:
        return None
    spec, _ = resolve_source(env, params.source)
    refresh_statistics(env.db)  # the stages may have added most of the rows it reads
    return publish(
        env,
        spec,
        name=params.release_name,
        version=params.release_version,
        sample_size=params.sample_size,
        allow_simulated=params.allow_simulated,
    )


def run_local(env: StageEnv, params: RunParams) -> RunSummary:
    """Everything in this process, shard after shard (the CLI and the demo)."""
    start(env, params)
    status, detail = "failed", None
    if params.dry_run:
        report = log_dry_run(env, params)
        finish_pipeline_run(env, "success")
        return RunSummary(env.run.run_id, {}, {"dry_run": report}, None)
    try:
        preflight(env, params)
        result = scan(env, params)
        for n, key in enumerate(result.shard_keys):
            ingest.ingest_shard(env, key, n, len(result.shard_keys))
        totals: dict[str, StageStats] = {}
        for shard in plan(env, params):
            for stage in SHARD_STAGES:
                stats = run_stage(env, stage, params, shard)
                if stats is not None:
                    _add(totals.setdefault(stage, StageStats()), stats)
        published = release(env, params)
        status = "success"
        return RunSummary(
            env.run.run_id,
            result.as_dict(),
            {k: v.as_dict() for k, v in totals.items()},
            published,
        )
    except BaseException as exc:
        detail = error_line(exc)
        raise
    finally:
        finish_pipeline_run(env, status, detail)


def _add(total: StageStats, s: StageStats) -> None:
    for f in (
        "items_in",
        "items_skipped",
        "items_out",
        "items_rejected",
        "requests_sent",
        "cache_hits",
        "prompt_tokens",
        "completion_tokens",
    ):
        setattr(total, f, getattr(total, f) + getattr(s, f))
    total.errors.update(s.errors)
    total.rejected_by_reason.update(s.rejected_by_reason)
