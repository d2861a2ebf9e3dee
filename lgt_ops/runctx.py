"""Who is running: the pipeline run and, inside Airflow, the dag/run/task asking."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class RunContext:
    run_id: str
    run_type: str = "cli"  # scheduled | manual | cli | demo | test
    dag_id: str | None = None
    airflow_run_id: str | None = None
    task_id: str | None = None
    map_index: int | None = None
    try_number: int = 1


def new_cli_run(run_type: str = "cli") -> RunContext:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return RunContext(run_id=f"{run_type}-{stamp}-{uuid.uuid4().hex[:6]}", run_type=run_type)


def airflow_run_id(dag_id: str, run_id: str) -> str:
    """Our run id for an Airflow DAG run: stable across task retries."""
    return f"airflow:{dag_id}:{run_id}"
