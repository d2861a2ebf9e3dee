"""What every stage shares: its environment, shards, run records, skip lists and rejections.

A stage takes a shard and a run context and (1) reads its inputs, (2) skips items already
done under the same stage fingerprint, (3) calls endpoints only through the request engine
and its ledger, (4) records every rejection with a reason, and (5) commits outputs, ledger
rows and done-markers together with INSERT ... ON CONFLICT DO NOTHING. Killing it at any
point and running it again converges to the same rows without repeating a paid call.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, text

from lgt_ops import chaos, liveness
from lgt_ops.abandon import close_abandoned_stages
from lgt_ops.db.repo import insert_ignore, select_in, utcnow
from lgt_ops.env import HBUCKETS, Shard, StageEnv  # noqa: F401 - re-exported
from lgt_ops.ids import content_id
from lgt_ops.reasons import Rejected
from lgt_ops.runs import ensure_pipeline_run, error_line


@dataclass
class StageStats:
    items_in: int = 0
    items_skipped: int = 0
    items_out: int = 0
    items_rejected: int = 0
    requests_sent: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    rejected_by_reason: Counter = field(default_factory=Counter)

    def absorb(self, summary: dict[str, Any]) -> None:
        """Add a request engine's counters."""
        self.requests_sent += summary["sent"]
        self.cache_hits += summary["cache_hits"]
        self.prompt_tokens += summary["prompt_tokens"]
        self.completion_tokens += summary["completion_tokens"]
        self.errors.update(summary["errors"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "items_in": self.items_in,
            "items_skipped": self.items_skipped,
            "items_out": self.items_out,
            "items_rejected": self.items_rejected,
            "requests_sent": self.requests_sent,
            "cache_hits": self.cache_hits,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "errors": dict(self.errors),
            "rejected_by_reason": dict(self.rejected_by_reason),
        }


@contextmanager
def recorded(env: StageEnv, stage: str, shard: Shard, fingerprint: str) -> Iterator[StageStats]:
    """A stage_runs row for this attempt: running, then success or failed with counters."""
    ensure_pipeline_run(env)
    stats = StageStats()
    started = time.monotonic()
    attempt = _start_attempt(env, stage, shard, fingerprint)
    status, detail = "success", None
    try:
        yield stats
    except BaseException as exc:
        status = "failed"
        detail = error_line(exc)
        raise
    finally:
        ended = {"status": status, "detail": detail, "w": round(time.monotonic() - started, 3)}
        _end_attempt(env, stage, shard, attempt, stats, ended)


def _start_attempt(env: StageEnv, stage: str, shard: Shard, fingerprint: str) -> int:
    """Close this shard's abandoned attempts and insert the new one, `running`; its number."""
    with env.db.begin() as conn:
        close_abandoned_stages(conn, env.run.run_id, stage, shard.index)
        attempt = conn.execute(
            text(
                "SELECT COALESCE(MAX(attempt), 0) + 1 FROM stage_runs"
                " WHERE run_id = :r AND stage = :s AND shard_index = :i"
            ),
            {"r": env.run.run_id, "s": stage, "i": shard.index},
        ).scalar_one()
        row = {
            "run_id": env.run.run_id,
            "stage": stage,
            "shard_index": shard.index,
            "num_shards": shard.count,
            "attempt": attempt,
            "fingerprint": fingerprint,
            "dag_id": env.run.dag_id,
            "task_id": env.run.task_id,
            "map_index": env.run.map_index,
            "status": "running",
            **liveness.current().as_row(),
        }
        insert_ignore(conn, "stage_runs", [row])
    return int(attempt)


def _end_attempt(
    env: StageEnv,
    stage: str,
    shard: Shard,
    attempt: int,
    stats: StageStats,
    ended: dict[str, Any],
) -> None:
    with env.db.begin() as conn:
        conn.execute(
            text(
                "UPDATE stage_runs SET status = :status, finished_at = :t, wall_seconds = :w,"
                " items_in = :items_in, items_skipped = :items_skipped,"
                " items_out = :items_out, items_rejected = :items_rejected,"
                " requests_sent = :requests_sent, cache_hits = :cache_hits,"
                " prompt_tokens = :prompt_tokens, completion_tokens = :completion_tokens,"
                " errors = :errors, error_detail = :detail"
                " WHERE run_id = :r AND stage = :s AND shard_index = :i AND attempt = :a"
            ),
            {
                **{k: v for k, v in stats.as_dict().items() if k != "rejected_by_reason"},
                "errors": json.dumps(dict(stats.errors), sort_keys=True),
                **ended,
                "t": utcnow(),
                "r": env.run.run_id,
                "s": stage,
                "i": shard.index,
                "a": attempt,
            },
        )


def rejection(
    env: StageEnv,
    stage: str,
    fingerprint: str,
    item_kind: str,
    item_ref: str,
    reason: str,
    detail: str | None = None,
    *,
    image_id: str | None = None,
    request_key: str | None = None,
) -> dict[str, Any]:
    """A rejections row; its id is stable, so re-running records the same rejection once."""
    return {
        "rejection_id": content_id("rejection", stage, fingerprint, item_kind, item_ref, reason),
        "run_id": env.run.run_id,
        "stage": stage,
        "fingerprint": fingerprint,
        "item_kind": item_kind,
        "item_ref": item_ref,
        "image_id": image_id,
        "reason": reason,
        "detail": (detail or "")[:2000] or None,
        "request_key": request_key,
    }


@dataclass(frozen=True)
class Rejecter:
    """What every rejection row of one item shares, so a rejection is one line in a stage:
    `rows.add("rejections", reject("question", ref, exc))`."""

    env: StageEnv
    stage: str
    fingerprint: str
    image_id: str | None = None
    request_key: str | None = None

    def __call__(self, kind: str, ref: str, why: Rejected) -> dict[str, Any]:
        return rejection(
            self.env,
            self.stage,
            self.fingerprint,
            kind,
            ref,
            why.reason,
            why.detail,
            image_id=self.image_id,
            request_key=self.request_key,
        )


def done_marker(
    env: StageEnv, stage: str, fingerprint: str, item_id: str, status: str, outputs: int
) -> dict[str, Any]:
    return {
        "stage": stage,
        "fingerprint": fingerprint,
        "item_id": item_id,
        "status": status,
        "outputs": outputs,
        "run_id": env.run.run_id,
    }


def already_done(
    conn: Connection, stage: str, fingerprint: str, item_ids: Iterable[str]
) -> set[str]:
    rows = select_in(
        conn,
        "SELECT item_id FROM stage_items WHERE stage = :s AND fingerprint = :f AND item_id IN :ids",
        list(item_ids),
        s=stage,
        f=fingerprint,
    )
    return {r[0] for r in rows}


def commit(
    env: StageEnv,
    rows_by_table: dict[str, list[dict[str, Any]]],
    ledger: Any | None = None,
) -> None:
    """One transaction: ledger rows first (outputs reference them), then outputs in order."""
    with ledger.transaction() if ledger is not None else env.db.begin() as conn:
        for table_name, rows in rows_by_table.items():
            insert_ignore(conn, table_name, rows)


@dataclass
class Rows:
    """What handling one item produced: table -> rows, and how many outputs count."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    outputs: int = 0

    def add(self, table: str, *rows: dict[str, Any]) -> None:
        self.tables.setdefault(table, []).extend(rows)


def count_rejections(stats: StageStats, rejections: list[dict[str, Any]]) -> None:
    stats.items_rejected += len(rejections)
    for r in rejections:
        stats.rejected_by_reason[r["reason"]] += 1


class ItemCommitter:
    """Finished items' rows and done-markers, counted into the stage's stats and committed
    in small batches (after the ledger's rows, when the stage calls models)."""

    # Model stages' answers are durable through the ledger's journal meanwhile; a rule
    # stage's commit is also its crash point in the chaos tests. 25-item batches were a third
    # of filter's time at 10k images (a transaction and 3 statements each).
    EVERY_ITEMS = 200
    EVERY_SECONDS = 2.0

    def __init__(
        self,
        env: StageEnv,
        stage: str,
        fingerprint: str,
        stats: StageStats,
        ledger: Any | None = None,
    ) -> None:
        self.env, self.stage, self.fingerprint = env, stage, fingerprint
        self.stats, self.ledger = stats, ledger
        self._buffer: dict[str, list[dict[str, Any]]] = {}
        self._items = 0
        self._last = time.monotonic()

    def finish(self, item_id: str, rows: Rows) -> None:
        """Buffer one finished item: its rows, and a marker so a re-run skips it."""
        count_rejections(self.stats, rows.tables.get("rejections", []))
        self.stats.items_out += rows.outputs
        status = "done" if rows.outputs else "rejected"
        marker = done_marker(self.env, self.stage, self.fingerprint, item_id, status, rows.outputs)
        rows.add("stage_items", marker)
        for table, table_rows in rows.tables.items():
            self._buffer.setdefault(table, []).extend(table_rows)
        self._items += 1

    def flush_if_due(self) -> None:
        if self._items >= self.EVERY_ITEMS or time.monotonic() - self._last > self.EVERY_SECONDS:
            self.flush()

    def flush(self) -> None:
        committed = self._items
        commit(self.env, self._buffer, self.ledger)
        self._buffer, self._items, self._last = {}, 0, time.monotonic()
        if committed and self.ledger is None:  # model stages count answers instead
            chaos.point(self.stage)  # test-only crash point (no-op otherwise)
