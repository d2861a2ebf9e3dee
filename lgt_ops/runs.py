"""The pipeline run's row: opened `running` (recording the process of a run outside Airflow),
closed `success` or `failed` with a one-line error."""

from __future__ import annotations

import traceback
from typing import Any

from sqlalchemy import text

from lgt_ops import liveness
from lgt_ops.abandon import close_abandoned_runs
from lgt_ops.db.repo import dumps, insert_ignore, utcnow
from lgt_ops.env import StageEnv


def ensure_pipeline_run(env: StageEnv, params: dict[str, Any] | None = None) -> None:
    """The run's row, `running`. A run outside Airflow lives in this one process, so its row
    records the process (a later run closes it as abandoned if the process was killed)."""
    process = liveness.current().as_row() if env.run.dag_id is None else {}
    with env.db.begin() as conn:
        close_abandoned_runs(conn)
        insert_ignore(
            conn,
            "pipeline_runs",
            [
                {
                    "run_id": env.run.run_id,
                    "run_type": env.run.run_type,
                    "dag_id": env.run.dag_id,
                    "airflow_run_id": env.run.airflow_run_id,
                    "params": dumps(params or {}),
                    "status": "running",
                    **process,
                }
            ],
        )


def finish_pipeline_run(env: StageEnv, status: str, detail: str | None = None) -> None:
    _set_run_status(env, status, detail, "")


def close_pipeline_run(env: StageEnv, status: str, detail: str | None = None) -> None:
    """Close the run's row if it exists and is still `running` (a CLI command's run)."""
    _set_run_status(env, status, detail, " AND status = 'running'")


def _set_run_status(env: StageEnv, status: str, detail: str | None, guard: str) -> None:
    with env.db.begin() as conn:
        conn.execute(
            text(
                "UPDATE pipeline_runs SET status = :s, finished_at = :t, error_detail = :d"
                " WHERE run_id = :r" + guard
            ),
            {"s": status, "t": utcnow(), "d": _clip(detail), "r": env.run.run_id},
        )


def _clip(detail: str | None) -> str | None:
    return detail[:4000] if detail else None


def error_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:4000]
