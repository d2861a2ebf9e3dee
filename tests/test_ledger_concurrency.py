"""Two shard tasks may write some of the same request keys at once (a text-only request can
recur across shards). The ledger writes a batch in key order, so two such transactions wait
for each other instead of deadlocking, whatever order their answers came in."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from lgt_ops.db import make_engine, upgrade
from lgt_ops.llm.ledger import upsert_unless_terminal

pytestmark = pytest.mark.postgres

KEYS = [f"k{i:05d}" for i in range(3000)]


def _row(key: str, writer: str) -> dict:
    return {
        "request_key": key,
        "role": "llm",
        "model": "m",
        "template_id": "blind",
        "template_version": "1",
        "status": "failed",
        "error_detail": writer,
    }


def test_overlapping_batches_in_opposite_orders_do_not_deadlock(pg_url):
    engine = make_engine(pg_url)
    upgrade(engine)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def write(keys: list[str], writer: str) -> None:
        try:
            for _ in range(5):
                start.wait()
                with engine.begin() as conn:
                    upsert_unless_terminal(conn, [_row(k, writer) for k in keys])
        except BaseException as exc:  # a deadlock surfaces here as OperationalError
            errors.append(exc)
            start.abort()

    threads = [
        threading.Thread(target=write, args=(KEYS, "a")),
        threading.Thread(target=write, args=(KEYS[::-1], "b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    with engine.connect() as conn:
        n = conn.execute(text("SELECT COUNT(*) FROM model_requests")).scalar_one()
    assert n == len(KEYS)
    engine.dispose()
