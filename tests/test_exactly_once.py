"""A stage killed with SIGKILL mid-run and restarted re-sends only what it had not committed;
a parse-only change re-derives outputs from the ledger without any request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from sqlalchemy import text

from lgt_ops.sources import resolve_source
from lgt_ops.stages import ingest, mcq
from lgt_ops.stages.base import Shard
from tests.conftest import ROOT
from tests.samples import jpeg

N_IMAGES = 60


def _synthetic_source(env, prefix="sources/many/") -> None:
    lines = []
    for i in range(N_IMAGES):
        key = f"img/{i:03d}.jpg"
        env.store.put(prefix + key, jpeg(64 + i, 48, (i * 4 % 256, 80, 160)))
        lines.append(
            json.dumps(
                {
                    "key": key,
                    "caption": f"A plain square number {i} with a red cup on the left "
                    "and a blue bowl on the right.",
                    "objects": [
                        {"id": "o1", "label": "cup", "box": [0, 0, 20, 20]},
                        {"id": "o2", "label": "bowl", "box": [40, 10, 60, 40]},
                    ],
                }
            )
        )
    env.store.put(prefix + "manifest.jsonl", ("\n".join(lines) + "\n").encode())
    ingest.ingest_all(env, prefix)


def _cli_env(env, sim) -> dict[str, str]:
    e = os.environ.copy()
    e.update(
        {
            "LGT_DATABASE_URL": env.settings.database_url,
            "LGT_STORE_URL": env.settings.store_url,
            "LGT_LLM_BASE_URL": sim.base_url,
            "LGT_VLM_BASE_URL": sim.base_url,
            "LGT_LLM_MAX_INFLIGHT": "4",
            "LGT_LLM_ADAPTIVE": "0",
        }
    )
    return e


def _done(env) -> int:
    with env.db.connect() as conn:
        return conn.execute(
            text("SELECT COUNT(*) FROM stage_items WHERE stage = 'mcq'")
        ).scalar_one()


def test_sigkill_mid_stage_then_restart_is_exactly_once(local_env, sim):
    env = local_env
    _synthetic_source(env)
    sim.sim.cfg.latency_ms = 150  # 4 in flight -> ~25 requests/s: time to kill mid-way
    cmd = [sys.executable, "-m", "lgt_ops.cli", "mcq", "--source", "sources/many/"]
    proc = subprocess.Popen(
        cmd, env=_cli_env(env, sim), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while _done(env) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed_before = _done(env)
    assert 20 <= committed_before < N_IMAGES, "kill landed mid-stage"
    with env.db.connect() as conn:
        recorded = {
            r[0][:32]
            for r in conn.execute(
                text("SELECT request_key FROM model_requests WHERE status = 'ok'")
            )
        }
    time.sleep(0.5)  # requests the dead client had in flight still finish on the server
    served_before = dict(sim.sim.served_by_key)

    sim.sim.cfg.latency_ms = 1
    subprocess.run(cmd, env=_cli_env(env, sim), cwd=ROOT, check=True, capture_output=True)

    served = sim.sim.served_by_key
    # Nothing that was committed before the kill was asked again ...
    assert all(served[k] == 1 for k in recorded)
    # ... only what was in flight or not yet committed was asked twice, a window's worth.
    twice = [k for k, n in served.items() if n > 1]
    assert set(twice) <= set(served_before) - recorded
    assert len(twice) <= 4 + 25  # in-flight window + one commit batch
    assert _done(env) == N_IMAGES and len(served) == N_IMAGES
    with env.db.connect() as conn:
        per_image = conn.execute(
            text("SELECT COUNT(DISTINCT request_key), COUNT(*) FROM model_requests")
        ).one()
        dup = conn.execute(
            text("SELECT COUNT(*) - COUNT(DISTINCT question_id) FROM questions")
        ).scalar_one()
    assert per_image == (N_IMAGES, N_IMAGES) and dup == 0


def test_parse_only_change_reruns_from_the_ledger(local_env, sim):
    env = local_env
    _synthetic_source(env)
    spec, _ = resolve_source(env, "sources/many/")
    first = mcq.run(env, spec, Shard())
    assert first.requests_sent == N_IMAGES
    served = sim.sim.served
    # A stricter near-duplicate threshold changes parsing, not the request: new fingerprint,
    # the stage runs again, every reply comes from the ledger.
    stricter = env.with_settings(env.settings.with_method(mcq_dedup_threshold=0.3))
    assert mcq.stage_fingerprint(stricter) != mcq.stage_fingerprint(env)
    again = mcq.run(stricter, spec, Shard())
    assert again.requests_sent == 0 and again.cache_hits == N_IMAGES
    assert again.items_out < first.items_out  # the new rule rejected more
    assert sim.sim.served == served
