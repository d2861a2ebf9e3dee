"""Nightly refresh over an unchanged corpus: zero model requests, time that tracks new work.

    python bench/refresh_unchanged.py                  # 100,000 images
    python bench/refresh_unchanged.py --images 10000   # a quicker look
    python bench/refresh_unchanged.py --images 10000 --tasks 2   # the DAG's shape on 2 cores

Builds a corpus of small, distinct JPEGs with a JSONL manifest (captions and boxes) in a
local-directory store, runs the whole pipeline once on Postgres (a database created for the
run on 127.0.0.1:5432, dropped at the end) with the simulator at cheap settings (one question
per image, k=1, one expansion), then runs it again and reports, per step, the wall time of
the second run and the model requests it sent. Then it adds 100 new images and runs a third
time, to show the cost of a refresh following the new work. The release step is reported
apart, with the Parquet parts it wrote and the ones it reused from the previous version
(an incremental publish: only the buckets whose lineage rows changed are rebuilt).

Each run prints one table: per step its seconds, items worked (considered minus skipped),
items/s, model requests, requests/s, the pipeline's CPU seconds (all threads), the
simulator's, the local PostgreSQL server's (its processes and the backends it reaped), and
the step's own peak RSS (the peak is reset before each step); under it the
end-to-end model requests/s of the stages (scan to the last stage, the release apart), the
traces/s of filter and pairs, and the run's peak RSS (the largest step's). The
simulator runs in its own process (`lgt sim serve`), as a model server would;
`--sim-in-process` runs it in a thread of this process instead (it then shares the GIL).

`--tasks 1` (the default) runs every step in this process, shard after shard. `--tasks N`
runs the ingest shards and each shard stage's shards as the DAG does when its mapped tasks
run side by side (LocalExecutor parallelism, Celery worker slots): one task per shard, N at
once in a pool of N worker processes (spawned and started before the first step; each opens
its own StageEnv on the same settings once and runs its tasks under the run's id, one after
another, as a Celery worker slot does); scan, plan and release, single tasks in the DAG,
stay in this process. On 2 cores `--tasks 2` is the deployed shape. A step's figures are
then its wall time, the CPU of this process plus each task's own (process_time in its
worker), and the largest peak RSS of this process and of any one task (reset at task start):
N tasks at once hold up to N times that.

Targets (2 cores): first run >= 600 model requests/s end to end at 10k images, ingest >= 1,000
small images/s, filter and pairs >= 10,000 traces/s, peak RSS flat from 10k to 100k images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ProcessPoolExecutor
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


class InProcessSim:
    """The simulator in a thread of this process."""

    def __init__(self) -> None:
        from lgt_ops.llm.simulator import BackgroundSimulator, SimConfig

        self.bg = BackgroundSimulator(SimConfig(latency_ms=0, slots=256, bad_question_rate=0.0))
        self.base_url = self.bg.start().base_url

    def cpu_seconds(self) -> float:
        return _cpu_seconds(f"/proc/self/task/{self.bg._thread.native_id}/stat")

    def reset(self) -> None:
        self.bg.sim.reset()

    def served(self) -> int:
        return self.bg.sim.served

    def stop(self) -> None:
        self.bg.stop()


class ProcessSim:
    """The simulator as its own process (`lgt sim serve`), as a model server runs."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "lgt_ops.cli", "sim", "serve", "--port", str(port),
               "--latency-ms", "0", "--slots", "256", "--bad-question-rate", "0"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.root = f"http://127.0.0.1:{port}"
        self.base_url = self.root + "/v1"
        for _ in range(200):
            try:
                urllib.request.urlopen(self.root + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the simulator did not start")

    def cpu_seconds(self) -> float:
        return _cpu_seconds(f"/proc/{self.proc.pid}/stat")

    def reset(self) -> None:
        req = urllib.request.Request(self.root + "/sim/reset", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()

    def served(self) -> int:
        with urllib.request.urlopen(self.root + "/sim/stats", timeout=60) as r:
            return json.loads(r.read())["served"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _cpu_seconds(stat_path: str) -> float:
    """utime + stime of a process or thread, from /proc."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """CPU of the local PostgreSQL server: its processes' own (utime, stime) and the exited
    backends' the postmaster reaped (cutime, cstime); 0 when none runs on this machine."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            head, _, tail = stat.read_text().rpartition(")")
            if head.endswith("(postgres"):
                total += sum(int(f) for f in tail.split()[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: clear_refs 5), so a run's peak is its own and
    not, say, the corpus generation's."""
    with contextlib.suppress(OSError):  # else the peak is the process's since it started
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak RSS since the last reset_peak_rss (VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ShardTasks:
    """Runs a step's shard tasks: in this process one after another (tasks=1), or, as the
    DAG's mapped tasks run (one task per shard, `tasks` at once, each in its own process),
    in a pool of `tasks` worker processes. Each pool task returns its StageStats, its own
    CPU seconds and its own peak RSS; `take` hands a step those totals."""

    def __init__(self, tasks: int, settings) -> None:  # noqa: ANN001
        self.tasks = tasks
        self.pool = None
        if tasks > 1:  # spawn, not fork: this process has threads (the engine's, the sim's)
            ctx = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(tasks, mp_context=ctx, initializer=_worker_init,
                                            initargs=(settings,))
            # Start every worker (imports, engine) before any step is timed: an Airflow
            # worker is up before the run too. Each warm-up waits, so each takes its own worker.
            # (A slow start can leave one worker taking two: warm up until all have answered.)
            pids: set[int] = set()
            for _ in range(20):
                pids |= {f.result() for f in [self.pool.submit(_warm_up) for _ in range(tasks)]}
                if len(pids) == tasks:
                    break
            assert len(pids) == tasks, f"{len(pids)} workers started, not {tasks}"
        self.cpu, self.peak_mb = 0.0, 0.0

    def run(self, env, params, stage: str, work: list) -> list:  # noqa: ANN001
        if self.pool is None:
            return [_run_task(env, params, stage, w) for w in work]
        futures = [self.pool.submit(_pool_task, env.run, params, stage, w) for w in work]
        out = []
        for f in futures:
            stats, cpu, peak = f.result()
            self.cpu += cpu
            self.peak_mb = max(self.peak_mb, peak)
            out.append(stats)
        return out

    def take(self) -> tuple[float, float]:
        """The pool tasks' CPU seconds and largest peak RSS since the last take."""
        taken, (self.cpu, self.peak_mb) = (self.cpu, self.peak_mb), (0.0, 0.0)
        return taken

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


_WORKER_ENV = None  # a pool worker's StageEnv, opened once, as a worker process holds one


def _worker_init(settings) -> None:  # noqa: ANN001
    global _WORKER_ENV
    from lgt_ops import pipeline  # noqa: F401 - imported before the first task, not in it
    from lgt_ops.runctx import RunContext
    from lgt_ops.stages.base import StageEnv

    _WORKER_ENV = StageEnv.open(settings, RunContext("bench-worker"), migrate=False)
    _WORKER_ENV.show_progress = False


def _warm_up() -> int:
    time.sleep(0.5)
    return os.getpid()


def _run_task(env, params, stage: str, work):  # noqa: ANN001, ANN202
    """One shard task: an ingest shard file (key, index, count) or a stage's image shard."""
    from lgt_ops import pipeline
    from lgt_ops.stages import ingest

    if stage == "ingest":
        return ingest.ingest_shard(env, *work)
    return pipeline.run_stage(env, stage, params, work)


def _pool_task(run, params, stage: str, work) -> tuple:  # noqa: ANN001
    """A shard task in a pool worker, under the run's id: its stats, CPU and own peak RSS."""
    reset_peak_rss()
    own = time.process_time()
    stats = _run_task(_WORKER_ENV.with_run(run), params, stage, work)
    return stats, time.process_time() - own, peak_rss_mb()


def timed_run(env, params, sim, tasks: ShardTasks) -> dict:  # noqa: ANN001
    """The pipeline step by step (as the DAG runs it): per step wall time, items worked,
    model requests, CPU (this process's and its shard tasks') and the simulator's CPU."""
    from lgt_ops import pipeline

    steps: dict[str, dict] = {}

    def step(name: str, fn) -> None:  # noqa: ANN001
        reset_peak_rss()  # each step's own peak: which one holds the most memory
        tasks.take()
        t, cpu, own = time.monotonic(), sim.cpu_seconds(), time.process_time()
        pg = postgres_cpu_seconds()
        stats = fn()
        shards = [s for s in stats if s is not None] if isinstance(stats, list) else []
        seconds, parent_cpu = time.monotonic() - t, time.process_time() - own
        task_cpu, task_peak = tasks.take()
        steps[name] = {
            "seconds": seconds,
            "requests": sum(s.requests_sent for s in shards),
            "items": sum(s.items_in - s.items_skipped for s in shards),
            "cpu": parent_cpu + task_cpu,
            "sim_cpu": sim.cpu_seconds() - cpu,
            "pg_cpu": postgres_cpu_seconds() - pg,
            "peak_mb": max(peak_rss_mb(), task_peak),
        }
        if getattr(stats, "manifest", None):  # the release: what it wrote and reused
            steps[name]["parts"] = stats.manifest.get("incremental", {})

    pipeline.start(env, params)
    scan: list = []
    step("scan", lambda: scan.append(pipeline.scan(env, params)))
    keys = scan[0].shard_keys
    work = [(k, i, len(keys)) for i, k in enumerate(keys)]
    step("ingest", lambda: tasks.run(env, params, "ingest", work))
    shards = pipeline.plan(env, params)
    for stage in pipeline.SHARD_STAGES:
        step(stage, lambda stage=stage: tasks.run(env, params, stage, shards))
    step("release", lambda: pipeline.release(env, params))
    pipeline.finish(env)
    for name in ("filter", "pairs"):  # their unit of work: the traces they judge or pair
        steps[name]["traces"] = _verdicts_made(env)
    steps["peak_rss_mb"] = max(s["peak_mb"] for s in steps.values())
    return steps


def _verdicts_made(env) -> int:  # noqa: ANN001
    from sqlalchemy import text

    with env.db.connect() as conn:
        return conn.execute(text("SELECT COUNT(*) FROM trace_verdicts WHERE run_id = :r"),
                            {"r": env.run.run_id}).scalar_one()


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if n and seconds > 0 else "-"


def report(title: str, steps: dict) -> None:
    rss = steps.pop("peak_rss_mb")
    stages = {k: v for k, v in steps.items() if k != "release"}
    seconds = sum(s["seconds"] for s in stages.values())
    requests = sum(s["requests"] for s in stages.values())
    sim_cpu = sum(s["sim_cpu"] for s in steps.values())
    cpu = sum(s["cpu"] for s in stages.values())
    pg_cpu = sum(s["pg_cpu"] for s in stages.values())
    print(f"\n{title}")
    print(f"  {'step':<9} {'seconds':>8} {'items':>9} {'items/s':>9} {'requests':>9} "
          f"{'requests/s':>10} {'CPU s':>6} {'sim CPU s':>9} {'pg CPU s':>8} {'peak MB':>7}")
    for name, s in steps.items():
        items_rate = _rate(s["items"], s["seconds"])
        print(f"  {name:<9} {s['seconds']:8.1f} {s['items']:9,} {items_rate:>9}"
              f" {s['requests']:9,} {_rate(s['requests'], s['seconds']):>10}"
              f" {s['cpu']:6.1f} {s['sim_cpu']:9.1f} {s['pg_cpu']:8.1f} {s['peak_mb']:7,.0f}")
    print(f"  end to end (stages, release apart): {requests:,} model requests in {seconds:.1f} s"
          f" = {_rate(requests, seconds)} requests/s; release {steps['release']['seconds']:.1f} s;"
          f" CPU of the stages {cpu:.1f} s, of the simulator {sim_cpu:.1f} s,"
          f" of PostgreSQL {pg_cpu:.1f} s;"
          f" peak RSS {rss:,.0f} MB")
    for name in ("filter", "pairs"):
        n, sec = steps[name]["traces"], steps[name]["seconds"]
        print(f"  {name}: {n:,} traces in {sec:.1f} s = {_rate(n, sec)} traces/s")
    parts = steps["release"].get("parts")
    if parts:
        print(f"  release parts: {parts['parts_written']} written, "
              f"{parts['parts_reused']} reused; buckets reused "
              f"{parts['buckets_reused']}/{parts['buckets']}")


def bench_settings(tmp: Path, db_name: str, sim):  # noqa: ANN001, ANN201
    """The run's settings (cheap method: one question per image, k=1, one expansion) and
    parameters, for the bench database and store and the simulator."""
    from lgt_ops.config import settings_from_env
    from lgt_ops.params import RunParams

    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://")
    settings = settings_from_env({
        "LGT_DATA_DIR": str(tmp), "LGT_DATABASE_URL": f"{base}/{db_name}",
        "LGT_STORE_URL": (tmp / "store").as_uri(), "LGT_SHARD_SIZE": "500",
    }).with_endpoint_urls({r: sim.base_url for r in ("vlm", "llm", "reasoner")})
    settings = settings.with_method(mcq_per_image=1, compose_per_image=0,
                                    expand_rollouts_per_question=1)
    params = RunParams(source="sources/bench/", k_rollouts=1, mcq_per_image=1,
                       release_name="bench", allow_simulated=True)
    return params.apply(settings), params


def three_runs(env, params, sim, tasks: ShardTasks, args) -> None:  # noqa: ANN001
    """First run, unchanged refresh (it must send no request), refresh after new images."""
    from lgt_ops.runctx import RunContext

    shape = "" if tasks.pool is None else f" ({tasks.tasks} shard tasks at once, own processes)"
    report(f"first run ({args.images:,} images){shape}", timed_run(env, params, sim, tasks))
    sim.reset()
    second = timed_run(env.with_run(RunContext("bench-2")), params, sim, tasks)
    served = sim.served()
    assert served == 0, f"the unchanged refresh sent {served} requests"
    report(f"refresh, corpus unchanged{shape}", second)
    make_corpus(env.store, "sources/bench/", args.images, args.new)
    report(f"refresh, {args.new} new images{shape}",
           timed_run(env.with_run(RunContext("bench-3")), params, sim, tasks))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--sim-in-process", action="store_true",
                        help="run the simulator in a thread of this process")
    parser.add_argument("--tasks", type=int, default=1,
                        help="shard tasks at once, each in its own process (1: all in this one)")
    parser.add_argument("--keep-db", action="store_true",
                        help="keep the database and corpus for a look afterwards (EXPLAIN)")
    args = parser.parse_args()

    from lgt_ops.runctx import RunContext
    from lgt_ops.stages.base import StageEnv

    tmp = Path(tempfile.mkdtemp(prefix="lgt-refresh-"))
    db_name = f"lgt_bench_{uuid.uuid4().hex[:8]}"
    _admin(f"CREATE DATABASE {db_name}")
    sim = InProcessSim() if args.sim_in_process else ProcessSim()
    tasks = None
    try:
        settings, params = bench_settings(tmp, db_name, sim)
        env = StageEnv.open(settings, RunContext("bench-1"))
        env.show_progress = False
        env.store.ensure_bucket()
        t = time.monotonic()
        make_corpus(env.store, "sources/bench/", 0, args.images)
        print(f"corpus of {args.images:,} images written in {time.monotonic() - t:.0f}s; "
              f"simulator {'in this process' if args.sim_in_process else 'in its own process'}",
              file=sys.stderr)
        tasks = ShardTasks(max(1, args.tasks), settings)
        three_runs(env, params, sim, tasks, args)
    finally:
        if tasks is not None:
            tasks.close()
        sim.stop()
        if args.keep_db:
            print(f"kept database {db_name} and corpus {tmp}", file=sys.stderr)
        else:
            _admin(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
