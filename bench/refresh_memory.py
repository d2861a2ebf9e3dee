"""Peak RSS of scan + ingest (first run) and of an unchanged refresh, at two corpus sizes.

    python bench/refresh_memory.py                       # 5,000 and 20,000 images
    python bench/refresh_memory.py --sizes 10000,30000
    python bench/refresh_memory.py --release             # the release step instead

For each size this process writes a corpus of small JPEGs with one JSONL manifest (as
bench/refresh_unchanged.py does) into a local-directory store; then a fresh process, on a
Postgres database made for it (127.0.0.1:5432, dropped at the end), measures its own peak
RSS (VmHWM, reset with /proc/self/clear_refs before each step) over: the first run's scan
and ingest, then an unchanged refresh's scan and ingest (nothing pending) and the image-shard
plan. No model
stage runs, so no simulator is needed. Memory bounded by the in-flight window shows as the
same numbers at both sizes; what grows with the corpus shows as a difference.

`--release` measures the release step: one process runs the whole pipeline but the release
(the simulator in its own process, at refresh_unchanged's cheap settings: one question per
image, k=1, one expansion), then a fresh process measures the first release (every bucket
built, the validator run), and another one the release of a second run with nothing changed
(every bucket reused). A fresh process per release, so its peak is not hidden under heap
the stages left behind. LGT_BENCH_TRACEMALLOC=1 adds each release's tracemalloc peak (Python
objects only; slower, so its RSS figures are not comparable).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from refresh_unchanged import (  # noqa: E402
    PG_ADMIN,
    ProcessSim,
    _admin,
    make_corpus,
    peak_rss_mb,
    reset_peak_rss,
)


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(images: int, tmp: Path) -> dict:
    """In a fresh process, on the corpus under tmp: each step's peak RSS."""
    from lgt_ops import pipeline
    from lgt_ops.config import settings_from_env
    from lgt_ops.params import RunParams
    from lgt_ops.runctx import RunContext
    from lgt_ops.stages import ingest
    from lgt_ops.stages.base import StageEnv

    db_name = f"lgt_bench_{uuid.uuid4().hex[:8]}"
    _admin(f"CREATE DATABASE {db_name}")
    out: dict = {"images": images}
    try:
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://")
        settings = settings_from_env({
            "LGT_DATA_DIR": str(tmp), "LGT_DATABASE_URL": f"{base}/{db_name}",
            "LGT_STORE_URL": (tmp / "store").as_uri(), "LGT_SHARD_SIZE": "500",
        })
        params = RunParams(source="sources/bench/", release_name="bench")
        env = StageEnv.open(settings, RunContext("mem-1"))
        env.show_progress = False

        def measure(name: str, fn) -> object:  # noqa: ANN001
            reset_peak_rss()
            base_mb = _current_rss_mb()
            value = fn()
            out[name] = {"before_mb": round(base_mb), "peak_mb": round(peak_rss_mb())}
            return value

        for run_id, label in (("mem-1", "first"), ("mem-2", "refresh")):
            run_env = env.with_run(RunContext(run_id))
            pipeline.start(run_env, params)
            scan = measure(f"{label} scan", lambda e=run_env: pipeline.scan(e, params))
            keys = scan.shard_keys
            measure(f"{label} ingest", lambda e=run_env, k=keys: [
                ingest.ingest_shard(e, key, i, len(k)) for i, key in enumerate(k)])
            measure(f"{label} plan", lambda e=run_env: pipeline.plan(e, params))
            out[f"{label} pending"] = scan.pending
            pipeline.finish(run_env)
    finally:
        _admin(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
    return out


def _release_env(tmp: Path, db_name: str, sim_url: str, run_id: str):  # noqa: ANN202
    """The settings of refresh_unchanged (cheap model stages) and a StageEnv for a run."""
    from lgt_ops.config import settings_from_env
    from lgt_ops.params import RunParams
    from lgt_ops.runctx import RunContext
    from lgt_ops.stages.base import StageEnv

    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://")
    settings = settings_from_env({
        "LGT_DATA_DIR": str(tmp), "LGT_DATABASE_URL": f"{base}/{db_name}",
        "LGT_STORE_URL": (tmp / "store").as_uri(), "LGT_SHARD_SIZE": "500",
    }).with_endpoint_urls({r: sim_url for r in ("vlm", "llm", "reasoner")})
    settings = settings.with_method(mcq_per_image=1, compose_per_image=0,
                                    expand_rollouts_per_question=1)
    params = RunParams(source="sources/bench/", k_rollouts=1, mcq_per_image=1,
                       release_name="bench", allow_simulated=True)
    env = StageEnv.open(params.apply(settings), RunContext(run_id))
    env.show_progress = False
    return env, params


def release_child(step: str, tmp: Path, db_name: str, sim_url: str) -> dict:
    """`stages`: the pipeline of run mem-1 but its release; `first`: mem-1's release (every
    bucket built); `unchanged`: a new run's release with nothing changed (every bucket
    reused). The release's peak RSS in this fresh process."""
    from lgt_ops import pipeline
    from lgt_ops.stages import ingest

    env, params = _release_env(tmp, db_name, sim_url, "mem-2" if step == "unchanged" else "mem-1")
    if step == "stages":
        pipeline.start(env, params)
        keys = pipeline.scan(env, params).shard_keys
        for i, key in enumerate(keys):
            ingest.ingest_shard(env, key, i, len(keys))
        for shard in pipeline.plan(env, params):
            for stage in pipeline.SHARD_STAGES:
                pipeline.run_stage(env, stage, params, shard)
        return {}
    if step == "unchanged":
        pipeline.start(env, params)
    traced = bool(os.environ.get("LGT_BENCH_TRACEMALLOC"))
    if traced:  # Python objects only, and slower: apart from the RSS figures
        import tracemalloc

        tracemalloc.start()
    reset_peak_rss()
    base_mb = _current_rss_mb()
    published = pipeline.release(env, params)
    out = {"before_mb": round(base_mb), "peak_mb": round(peak_rss_mb()),
           "rows": sum(published.counts.values()),
           "reused": published.manifest["incremental"]["buckets_reused"]}
    if traced:
        out["traced_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    pipeline.finish(env)
    return out


def release_main(sizes: list[int]) -> int:
    """Per size: the stages in one process, then each release in a fresh one."""
    from lgt_ops.storage import open_store

    rows = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="lgt-release-mem-"))
        store = open_store((tmp / "store").as_uri())
        store.ensure_bucket()
        make_corpus(store, "sources/bench/", 0, n)
        db_name = f"lgt_bench_{uuid.uuid4().hex[:8]}"
        _admin(f"CREATE DATABASE {db_name}")
        sim = ProcessSim()
        row: dict = {"images": n}
        try:
            for step in ("stages", "first", "unchanged"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--release-child", step, str(tmp), db_name,
                     sim.base_url],
                    capture_output=True, text=True, check=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)})
                row[step] = json.loads(proc.stdout.strip().splitlines()[-1])
        finally:
            sim.stop()
            _admin(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append(row)
    print(f"{'release':<16}" + "".join(f"{r['images']:>12,} img" for r in rows)
          + "   (peak RSS MB; RSS before the step in brackets)")
    for step in ("first", "unchanged"):
        cells = "".join(f"{r[step]['peak_mb']:>9} ({r[step]['before_mb']:>3})" for r in rows)
        print(f"{step:<16}{cells}")
    if "traced_peak_mb" in rows[0]["first"]:
        for step in ("first", "unchanged"):
            print(f"{step + ' (traced)':<16}"
                  + "".join(f"{r[step]['traced_peak_mb']:>15}" for r in rows)
                  + "   (tracemalloc peak MB, Python objects)")
    print("rows: " + ", ".join(f"{r['first']['rows']:,}" for r in rows)
          + "; buckets reused by the unchanged release: "
          + ", ".join(str(r["unchanged"]["reused"]) for r in rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument("--release", action="store_true",
                        help="measure the release step (runs the model stages on a simulator)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--release-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.release_child:
        step, tmp, db_name, sim_url = args.release_child
        print(json.dumps(release_child(step, Path(tmp), db_name, sim_url)))
        return 0
    if args.release:
        return release_main([int(s) for s in args.sizes.split(",")])
    if args.child:
        print(json.dumps(child(int(args.child[0]), Path(args.child[1]))))
        return 0
    from lgt_ops.storage import open_store

    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="lgt-refresh-mem-"))
        store = open_store((tmp / "store").as_uri())
        store.ensure_bucket()
        make_corpus(store, "sources/bench/", 0, n)  # here, so each child starts alike
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), str(tmp)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        shutil.rmtree(tmp, ignore_errors=True)
    steps = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    print(f"{'step':<16}" + "".join(f"{r['images']:>12,} img" for r in rows)
          + "   (peak RSS MB; RSS before the step in brackets)")
    for step in steps:
        cells = "".join(f"{r[step]['peak_mb']:>9} ({r[step]['before_mb']:>3})" for r in rows)
        print(f"{step:<16}{cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
