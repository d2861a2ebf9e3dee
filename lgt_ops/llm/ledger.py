"""The request ledger: one row per request key, so no successful call is ever paid twice.

Lookups are batched (one query per chunk of keys). Answers are buffered and written in
batches, two ways:
- the stage's own commit (`transaction()` / `flush(conn)`) writes whatever is buffered in the
  same transaction as the outputs that reference it;
- with a `JournalPolicy`, a writer thread also commits the buffer on its own, at most
  `seconds` after an answer arrived or as soon as `answers` are waiting, whichever is first.
  So an answer is durable within a bounded delay whatever the stage is doing, and a kill
  re-sends only the requests in flight plus those last few unjournaled answers.
Both writers take one lock, so outputs are never committed before the rows they reference.
A terminal row is final: a later write for the same key never overwrites it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, text

from lgt_ops.db.repo import chunked, execute_rows, insert_for, table, utcnow
from lgt_ops.llm.outcome import Outcome
from lgt_ops.llm.request import ChatRequest
from lgt_ops.runctx import RunContext
from lgt_ops.storage import ObjectStore

# Outcomes a re-run reuses. `failed` (endpoint trouble) is retried by the next run.
TERMINAL = ("ok", "invalid_output", "rejected")
INLINE_RESPONSE_LIMIT = 256 * 1024


@dataclass(frozen=True)
class JournalPolicy:
    """How soon an answer must be durable: after `seconds`, or once `answers` are waiting."""

    seconds: float = 0.1
    answers: int = 16


class Ledger:
    def __init__(
        self,
        engine: Engine,
        run: RunContext,
        stage: str,
        store: ObjectStore | None = None,
        *,
        journal: JournalPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.run = run
        self.stage = stage
        self.store = store
        self.policy = journal
        self.journal_error: BaseException | None = None
        self.journaled = 0  # rows the writer thread committed
        self._pending: list[tuple[Outcome, datetime]] = []
        self._oldest = 0.0  # monotonic time of the oldest pending answer
        self._cond = threading.Condition()  # guards _pending, _oldest, _closing
        self._write = threading.Lock()  # one writer at a time: journal or stage commit
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_batch = 0
        self._writing = 0  # answers taken by a write that has not committed yet
        # Called after every write (journal or stage commit) and on a journal failure, from
        # the writing thread: the engine waits on it while the journal is behind.
        self.on_journal: Callable[[], None] | None = None

    # -- reads ---------------------------------------------------------------------------
    def lookup(self, requests: Iterable[ChatRequest]) -> dict[str, Outcome]:
        """Terminal outcomes already in the ledger for these requests."""
        by_key = {r.key: r for r in requests}
        found: dict[str, Outcome] = {}
        stmt = text(
            "SELECT request_key, status, response, response_uri, error_class, http_status,"
            " attempts, overloads, transient_errors, regenerations, latency_ms, error_detail"
            " FROM model_requests WHERE request_key IN :keys AND status IN :terminal"
        ).bindparams(bindparam("keys", expanding=True), bindparam("terminal", expanding=True))
        with self.engine.connect() as conn:
            for keys in chunked(list(by_key), 500):
                for row in conn.execute(stmt, {"keys": list(keys), "terminal": list(TERMINAL)}):
                    found[row.request_key] = Outcome(
                        request=by_key[row.request_key],
                        status=row.status,
                        response=self._load_response(row.response, row.response_uri),
                        error_class=row.error_class,
                        http_status=row.http_status,
                        attempts=row.attempts,
                        overloads=row.overloads,
                        transient_errors=row.transient_errors,
                        regenerations=row.regenerations,
                        latency_ms=row.latency_ms,
                        error_detail=row.error_detail,
                        cached=True,
                    )
        return found

    def _load_response(self, inline: str | None, uri_key: str | None) -> dict[str, Any] | None:
        if inline is not None:
            return json.loads(inline)
        if uri_key and self.store is not None:
            return json.loads(self.store.get(uri_key))
        return None

    # -- writes --------------------------------------------------------------------------
    def record(self, outcome: Outcome) -> None:
        """Buffer a fresh outcome (any thread); the journal or the next commit writes it."""
        if outcome.cached:
            return
        with self._cond:
            first = not self._pending
            if first:
                self._oldest = time.monotonic()
            self._pending.append((outcome, utcnow()))
            if self.policy is not None:
                self._start_journal()
                # The writer sleeps without a deadline while nothing is pending: the first
                # answer starts its clock, the answers-th one makes it write now.
                if first or len(self._pending) >= self.policy.answers:
                    self._cond.notify()

    @property
    def pending(self) -> int:
        """Answers received and not yet durable (buffered, or in a write not yet committed)."""
        with self._cond:
            return len(self._pending) + self._writing

    def backlogged(self) -> bool:
        """The journal is behind (`answers` or more waiting): send nothing new until it has
        caught up, so sent-but-not-durable requests stay under window + answers."""
        return self.policy is not None and self.pending >= self.policy.answers

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A transaction that first writes the buffered answers; the caller adds the outputs
        that reference them. The write lock is taken before the transaction begins (SQLite
        takes its write lock at BEGIN), so the two writers cannot wait on each other."""
        with self._write:
            batch = self._take()
            self._last_batch = len(batch)
            try:
                with self.engine.begin() as conn:
                    self._write_rows(conn, batch)
                    yield conn
            except BaseException:
                self._restore(batch)  # not committed: still pending
                raise
            finally:
                with self._cond:
                    self._writing = 0
                self._notify()  # whoever wrote, an engine waiting on the backlog may go on

    def flush(self, conn: Connection) -> int:
        """Write buffered outcomes in the caller's transaction (callers without a journal)."""
        batch = self._take()
        self._write_rows(conn, batch)
        with self._cond:
            self._writing = 0
        return len(batch)

    def flush_now(self) -> int:
        """Commit what is buffered now, in a transaction of its own; how many answers."""
        with self.transaction():
            pass
        return self._last_batch

    def close(self) -> None:
        """Stop the journal after it has written what is pending (best effort)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    # -- the journal ---------------------------------------------------------------------
    def _start_journal(self) -> None:
        if self._thread is None and not self._closing and self.journal_error is None:
            self._thread = threading.Thread(
                target=self._journal_loop, name=f"lgt-journal-{self.stage}", daemon=True
            )
            self._thread.start()

    def _journal_due(self) -> float | None:
        """0 when the buffer must be written now, else seconds to wait (None: no deadline)."""
        assert self.policy is not None
        if not self._pending:
            return None
        if self._closing or len(self._pending) >= self.policy.answers:
            return 0.0
        return max(0.0, self.policy.seconds - (time.monotonic() - self._oldest))

    def _journal_loop(self) -> None:
        while True:
            with self._cond:
                wait = self._journal_due()
                while wait is None or wait > 0:
                    if self._closing and not self._pending:
                        return
                    self._cond.wait(wait)
                    wait = self._journal_due()
            try:
                with self.transaction():
                    pass
            except Exception as exc:  # noqa: BLE001 - the engine stops on it, the stage raises it
                # Left pending: the stage's own commit writes them if the database is back.
                self.journal_error = exc
                self._notify()
                return

    def _notify(self) -> None:
        listener = self.on_journal
        if listener is not None:
            with contextlib.suppress(RuntimeError):  # the engine's loop has just closed
                listener()

    def _take(self) -> list[tuple[Outcome, datetime]]:
        with self._cond:
            batch, self._pending = self._pending, []
            self._writing = len(batch)
            return batch

    def _restore(self, batch: list[tuple[Outcome, datetime]]) -> None:
        with self._cond:
            self._pending[:0] = batch
            self._writing = 0
            self._oldest = time.monotonic()

    def _write_rows(self, conn: Connection, batch: list[tuple[Outcome, datetime]]) -> None:
        if not batch:
            return
        # Last write wins within a batch; a key appears once per write.
        rows = {r["request_key"]: r for r in (self._row(o, at) for o, at in batch)}
        upsert_unless_terminal(conn, list(rows.values()))
        if threading.current_thread() is self._thread:
            self.journaled += len(rows)

    def _row(self, outcome: Outcome, completed_at: datetime) -> dict[str, Any]:
        req = outcome.request
        resp = outcome.response or {}
        usage = resp.get("usage") or {}
        choices = resp.get("choices") or [{}]
        body = json.dumps(resp, ensure_ascii=False) if outcome.response is not None else None
        uri = None
        if body is not None and len(body) > INLINE_RESPONSE_LIMIT and self.store is not None:
            uri = f"ledger/{req.key[:2]}/{req.key}.json"
            self.store.put(uri, body.encode("utf-8"))
            body = None
        return {
            "request_key": req.key,
            "role": req.role,
            "model": req.model,
            "served_model": resp.get("model"),
            "template_id": req.template_id,
            "template_version": req.template_version,
            "status": outcome.status,
            "error_class": outcome.error_class,
            "http_status": outcome.http_status,
            "attempts": outcome.attempts,
            "overloads": outcome.overloads,
            "transient_errors": outcome.transient_errors,
            "regenerations": outcome.regenerations,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "latency_ms": outcome.latency_ms,
            "finish_reason": choices[0].get("finish_reason") if choices else None,
            "system_fingerprint": resp.get("system_fingerprint"),
            "response": body,
            "response_uri": uri,
            "error_detail": (outcome.error_detail or "")[:2000] or None,
            "stage": self.stage,
            "run_id": self.run.run_id,
            "dag_id": self.run.dag_id,
            "task_id": self.run.task_id,
            "map_index": self.run.map_index,
            "completed_at": completed_at,
        }


def upsert_unless_terminal(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert ledger rows; an existing row is updated only while it is not terminal (a
    `failed` row is retried and replaced; `ok`, `invalid_output`, `rejected` are final)."""
    tbl = table(conn, "model_requests")
    stmt = insert_for(conn, tbl)
    updatable = [c for c in rows[0] if c not in ("request_key", "created_at")]
    stmt = stmt.on_conflict_do_update(
        index_elements=["request_key"],
        set_={c: stmt.excluded[c] for c in updatable},
        # Inlined constants: an expanding IN cannot be used with executemany.
        where=text(f"model_requests.status NOT IN ({', '.join(repr(t) for t in TERMINAL)})"),
    )
    # In key order: two shard tasks that write some of the same keys (a text-only request can
    # recur across shards) then lock them in one order, so they wait rather than deadlock.
    rows = sorted(rows, key=lambda r: r["request_key"])
    execute_rows(conn, stmt, rows)  # one statement per page: the keys are distinct
