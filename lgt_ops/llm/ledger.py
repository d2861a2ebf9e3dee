"""The request ledger: one row per request key, so no successful call is ever paid twice.

Lookups are batched (one query per chunk of keys). Records are buffered and written by
`flush(conn)` inside the caller's transaction, so a stage commits its outputs and the
requests that produced them atomically; nothing is committed per request on the hot path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, text

from lgt_ops.db.repo import chunked, upsert, utcnow
from lgt_ops.llm.request import ChatRequest
from lgt_ops.runctx import RunContext
from lgt_ops.storage import ObjectStore

# Outcomes a re-run reuses. `failed` (endpoint trouble) is retried by the next run.
TERMINAL = ("ok", "invalid_output", "rejected")
INLINE_RESPONSE_LIMIT = 256 * 1024

_COUNTERS = ("attempts", "overloads", "transient_errors", "regenerations")


@dataclass
class Outcome:
    """What happened to one request (fresh from the endpoint or replayed from the ledger)."""

    request: ChatRequest
    status: str
    response: dict[str, Any] | None = None
    error_class: str | None = None
    http_status: int | None = None
    attempts: int = 0
    overloads: int = 0
    transient_errors: int = 0
    regenerations: int = 0
    latency_ms: float | None = None
    error_detail: str | None = None
    cached: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def usage(self) -> dict[str, int]:
        return (self.response or {}).get("usage") or {}

    @property
    def choices(self) -> list[dict[str, Any]]:
        return (self.response or {}).get("choices") or []

    def contents(self) -> list[str]:
        return [(c.get("message") or {}).get("content") or "" for c in self.choices]


class Ledger:
    def __init__(
        self,
        engine: Engine,
        run: RunContext,
        stage: str,
        store: ObjectStore | None = None,
    ) -> None:
        self.engine = engine
        self.run = run
        self.stage = stage
        self.store = store
        self._pending: list[dict[str, Any]] = []

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
        """Buffer a fresh outcome; it is written by the next `flush`."""
        if outcome.cached:
            return
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
        self._pending.append(
            {
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
                "completed_at": utcnow(),
            }
        )

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self, conn: Connection) -> int:
        """Write buffered outcomes in the caller's transaction. A terminal row is final."""
        rows, self._pending = self._pending, []
        if not rows:
            return 0
        # Last write wins within a batch; a key appears once per flush.
        dedup = {r["request_key"]: r for r in rows}
        updatable = [c for c in rows[0] if c not in ("request_key", "created_at")]
        upsert(conn, "model_requests", list(dedup.values()), ["request_key"], updatable)
        return len(dedup)

    def flush_now(self) -> int:
        with self.engine.begin() as conn:
            return self.flush(conn)


def usage_totals(outcomes: Iterable[Outcome]) -> tuple[int, int]:
    p = c = 0
    for o in outcomes:
        p += int(o.usage.get("prompt_tokens") or 0)
        c += int(o.usage.get("completion_tokens") or 0)
    return p, c
