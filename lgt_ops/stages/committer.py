"""Finished items' rows and done-markers, committed in batches (ItemCommitter), and the
committer of a rule stage, which writes a batch while the next one is worked on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from lgt_ops import chaos
from lgt_ops.stages.base import Rows, StageEnv, StageStats, commit, count_rejections, done_marker


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
        writer: Executor | None = None,
    ) -> None:
        self.env, self.stage, self.fingerprint = env, stage, fingerprint
        self.stats, self.ledger, self.writer = stats, ledger, writer
        self._buffer: dict[str, list[dict[str, Any]]] = {}
        self._items = 0
        self._last = time.monotonic()
        self._in_flight: tuple[Future[None], int] | None = None

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
        """Commit the buffered items. With a `writer` (one thread), the batch is committed
        there while the caller works on the next one; the previous batch is in first, so
        batches commit in order, one at a time, and a failed commit raises here."""
        batch, items = self._buffer, self._items
        self._buffer, self._items, self._last = {}, 0, time.monotonic()
        if self.writer is None:
            commit(self.env, batch, self.ledger)
            self._committed(items)
            return
        self.wait()
        self._in_flight = (self.writer.submit(commit, self.env, batch, self.ledger), items)

    def wait(self) -> None:
        """Until the batch handed to the writer (if any) is committed."""
        if self._in_flight is not None:
            done, items = self._in_flight
            self._in_flight = None
            done.result()
            self._committed(items)

    def _committed(self, items: int) -> None:
        if items and self.ledger is None:  # model stages count answers instead
            chaos.point(self.stage)  # test-only crash point (no-op otherwise)


@contextmanager
def rule_committer(
    env: StageEnv, stage: str, fingerprint: str, stats: StageStats
) -> Iterator[ItemCommitter]:
    """The ItemCommitter of a rule stage, flushed and waited for at the end. On PostgreSQL a
    batch is written by a thread while the next is worked on (the server works on the other
    core, the driver releases the GIL); SQLite writes in this process: nothing to overlap."""
    with ThreadPoolExecutor(1, thread_name_prefix=f"{stage}-commit") as pool:
        writer = pool if env.db.dialect.name == "postgresql" else None
        committer = ItemCommitter(env, stage, fingerprint, stats, writer=writer)
        yield committer
        committer.flush()
        committer.wait()
