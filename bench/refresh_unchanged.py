"""Nightly refresh over an unchanged corpus: zero model requests, time that tracks new work.

    python bench/refresh_unchanged.py                  # 100,000 images
    python bench/refresh_unchanged.py --images 10000   # a quicker look

Builds a corpus of small, distinct JPEGs with a JSONL manifest (captions and boxes) in a
local-directory store, runs the whole pipeline once on Postgres (a database created for the
run on 127.0.0.1:5432, dropped at the end) with the simulator at cheap settings (one question
per image, k=1, one expansion), then runs it again and reports, per step, the wall time of
the second run and the model requests it sent. Then it adds 100 new images and runs a third
time, to show the cost of a refresh following the new work. The release step is reported
apart, with the Parquet parts it wrote and the ones it reused from the previous version
(an incremental publish: only the buckets whose lineage rows changed are rebuilt).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN = os.environ.get("LGT_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
LABELS = ("cup", "plate", "chair", "lamp", "book", "bottle", "dog", "cat", "tree", "car")


def _admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


def make_corpus(store, prefix: str, start: int, n: int) -> None:  # noqa: ANN001
    """n distinct 48x48 JPEGs and one manifest file for them."""
    from PIL import Image

    rng = random.Random(start)
    lines = []
    for i in range(start, start + n):
        im = Image.new("RGB", (48, 48), (i % 251, (i // 251) % 251, (i // 63001) % 251))
        im.putpixel((i % 48, (i // 48) % 48), (255, 255, 255))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        key = f"images/{i:07d}.jpg"
        store.put(prefix + key, buf.getvalue())
        a, b = rng.sample(LABELS, 2)
        lines.append(json.dumps({
            "key": key,
            "caption": f"A small synthetic picture with a {a} on the left and a {b} on the right.",
            "objects": [{"id": "o1", "label": a, "box": [2, 10, 20, 40]},
                        {"id": "o2", "label": b, "box": [26, 8, 46, 44]}],
        }))
        if (i - start + 1) % 10_000 == 0:
            print(f"  corpus: {i - start + 1:,}/{n:,} images", file=sys.stderr)
    store.put(f"{prefix}manifest-{start:07d}.jsonl", ("\n".join(lines) + "\n").encode())


def timed_run(env, params) -> dict:  # noqa: ANN001
    """The pipeline step by step (as the DAG runs it), wall time and requests per step."""
    from lgt_ops import pipeline
    from lgt_ops.stages import ingest

    steps: dict[str, dict] = {}

    def step(name: str, fn) -> None:  # noqa: ANN001
        t = time.monotonic()
        stats = fn()
        requests = sum(s.requests_sent for s in stats) if isinstance(stats, list) else 0
        steps[name] = {"seconds": time.monotonic() - t, "requests": requests}
        if getattr(stats, "manifest", None):  # the release: what it wrote and reused
            steps[name]["parts"] = stats.manifest.get("incremental", {})

    pipeline.start(env, params)
    scan: list = []
    step("scan", lambda: scan.append(pipeline.scan(env, params)))
    keys = scan[0].shard_keys
    step("ingest", lambda: [ingest.ingest_shard(env, k, i, len(keys)) for i, k in enumerate(keys)])
    shards = pipeline.plan(env, params)
    for stage in pipeline.SHARD_STAGES:
        step(stage, lambda stage=stage: [pipeline.run_stage(env, stage, params, s)
                                         for s in shards])
    step("release", lambda: pipeline.release(env, params))
    pipeline.finish(env)
    return steps


def report(title: str, steps: dict) -> None:
    total = sum(s["seconds"] for s in steps.values())
    no_release = total - steps["release"]["seconds"]
    requests = sum(s["requests"] for s in steps.values())
    detail = "  ".join(f"{k} {v['seconds']:.1f}s" for k, v in steps.items())
    print(f"{title:<28} requests={requests:>8,}  all stages {no_release:7.1f}s  "
          f"release {steps['release']['seconds']:6.1f}s  | {detail}")
    parts = steps["release"].get("parts")
    if parts:
        print(f"{'':<28} release parts: {parts['parts_written']} written, "
              f"{parts['parts_reused']} reused; buckets reused "
              f"{parts['buckets_reused']}/{parts['buckets']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=100)
    args = parser.parse_args()

    from lgt_ops.config import settings_from_env
    from lgt_ops.llm.simulator import BackgroundSimulator, SimConfig
    from lgt_ops.params import RunParams
    from lgt_ops.runctx import RunContext
    from lgt_ops.stages.base import StageEnv

    tmp = Path(tempfile.mkdtemp(prefix="lgt-refresh-"))
    db_name = f"lgt_bench_{uuid.uuid4().hex[:8]}"
    _admin(f"CREATE DATABASE {db_name}")
    sim = BackgroundSimulator(SimConfig(latency_ms=0, slots=256, bad_question_rate=0.0)).start()
    try:
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://")
        settings = settings_from_env({
            "LGT_DATA_DIR": str(tmp), "LGT_DATABASE_URL": f"{base}/{db_name}",
            "LGT_STORE_URL": (tmp / "store").as_uri(), "LGT_SHARD_SIZE": "500",
        }).with_endpoint_urls({r: sim.base_url for r in ("vlm", "llm", "reasoner")})
        settings = settings.with_method(mcq_per_image=1, compose_per_image=0,
                                        expand_rollouts_per_question=1)
        params = RunParams(source="sources/bench/", k_rollouts=1, mcq_per_image=1,
                           release_name="bench", allow_simulated=True)
        settings = params.apply(settings)
        env = StageEnv.open(settings, RunContext("bench-1"))
        env.show_progress = False
        env.store.ensure_bucket()
        t = time.monotonic()
        make_corpus(env.store, "sources/bench/", 0, args.images)
        print(f"corpus of {args.images:,} images written in {time.monotonic() - t:.0f}s",
              file=sys.stderr)
        report(f"first run ({args.images:,} images)", timed_run(env, params))
        sim.sim.reset()
        second = timed_run(env.with_run(RunContext("bench-2")), params)
        assert sim.sim.served == 0, f"the unchanged refresh sent {sim.sim.served} requests"
        report("refresh, corpus unchanged", second)
        make_corpus(env.store, "sources/bench/", args.images, args.new)
        report(f"refresh, {args.new} new images",
               timed_run(env.with_run(RunContext("bench-3")), params))
    finally:
        sim.stop()
        _admin(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
