"""Close rows left `running` by a process that is gone, as `abandoned` (the rules are in
lgt_ops.liveness). Called when a stage attempt or a run starts, and by the DAG's tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Connection, text

from lgt_ops import liveness
from lgt_ops.db.repo import utcnow

if TYPE_CHECKING:
    from lgt_ops.env import StageEnv

_ABANDON = (
    "UPDATE {table} SET status = 'abandoned', finished_at = :t,"
    " error_detail = COALESCE(error_detail, :why) WHERE status = 'running' AND {where}"
)


def close_abandoned_runs(conn: Connection) -> int:
    """Rows of pipeline runs on this host whose process is gone -> abandoned (lgt_ops.liveness).
    Only runs that live in one process record one (CLI, demo); Airflow's finish closes its own."""
    rows = conn.execute(
        text(
            "SELECT run_id, pid, pid_started FROM pipeline_runs"
            " WHERE status = 'running' AND host = :h AND pid IS NOT NULL"
        ),
        {"h": liveness.current().host},
    ).all()
    gone = [r for r in rows if liveness.is_gone(liveness.current().host, r.pid, r.pid_started)]
    for r in gone:
        conn.execute(
            text(_ABANDON.format(table="pipeline_runs", where="run_id = :r")),
            {
                "t": utcnow(),
                "why": f"process {liveness.current().host}/{r.pid} is gone",
                "r": r.run_id,
            },
        )
    return len(gone)


def close_abandoned_stages(conn: Connection, run_id: str, stage: str, shard_index: int) -> int:
    """Stage rows left `running` by a dead process -> abandoned: earlier attempts of this
    run/stage/shard (superseded, any host), and rows of this host whose process is gone."""
    closed = conn.execute(
        text(
            _ABANDON.format(
                table="stage_runs", where="run_id = :r AND stage = :s AND shard_index = :i"
            )
        ),
        {
            "t": utcnow(),
            "why": "superseded by a later attempt",
            "r": run_id,
            "s": stage,
            "i": shard_index,
        },
    ).rowcount
    host = liveness.current().host
    rows = conn.execute(
        text(
            "SELECT run_id, stage, shard_index, attempt, pid, pid_started FROM stage_runs"
            " WHERE status = 'running' AND host = :h AND pid IS NOT NULL"
        ),
        {"h": host},
    ).all()
    for r in rows:
        if liveness.is_gone(host, r.pid, r.pid_started):
            closed += conn.execute(
                text(
                    _ABANDON.format(
                        table="stage_runs",
                        where="run_id = :r AND stage = :s AND shard_index = :i AND attempt = :a",
                    )
                ),
                {
                    "t": utcnow(),
                    "why": f"process {host}/{r.pid} is gone",
                    "r": r.run_id,
                    "s": r.stage,
                    "i": r.shard_index,
                    "a": r.attempt,
                },
            ).rowcount
    return max(closed, 0)


def close_leftover_stages(env: StageEnv) -> int:
    """Every stage row of this run still `running` -> abandoned. Only for the DAG's last task:
    by then every task that could write one has ended."""
    with env.db.begin() as conn:
        return conn.execute(
            text(_ABANDON.format(table="stage_runs", where="run_id = :r")),
            {
                "t": utcnow(),
                "why": "its task ended without closing it (killed?)",
                "r": env.run.run_id,
            },
        ).rowcount


def running_runs(env: StageEnv) -> list[tuple[str, str]]:
    """(run_id, airflow_run_id) of this DAG's other pipeline runs still `running`."""
    with env.db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT run_id, airflow_run_id FROM pipeline_runs WHERE status = 'running'"
                " AND dag_id = :d AND run_id <> :r AND airflow_run_id IS NOT NULL"
            ),
            {"d": env.run.dag_id, "r": env.run.run_id},
        ).all()
    return [(r.run_id, r.airflow_run_id) for r in rows]


def abandon_run(env: StageEnv, run_id: str, why: str) -> None:
    """A run (and its stage rows) still `running` whose process or orchestrator run ended."""
    with env.db.begin() as conn:
        for table in ("stage_runs", "pipeline_runs"):
            conn.execute(
                text(_ABANDON.format(table=table, where="run_id = :r")),
                {"t": utcnow(), "why": why, "r": run_id},
            )
