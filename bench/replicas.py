"""Endpoint replicas: throughput of two simulator replicas, and a replica killed mid-run.

    python bench/replicas.py                 # 32 slots x 200 ms per replica, 3k/6k requests
    python bench/replicas.py --quick         # a third of the requests

Each replica is a simulator in its own process (`lgt sim serve`) with `--slots S --latency-ms L`,
so its capacity is C = S / L; each scenario's client runs in a fresh process and sends unique
requests through `RequestEngine` (one role, its base URL the comma-separated replicas) with
the ledger on SQLite, as a stage does. Scenarios:

- one replica: the engine against capacity C (the reference);
- two replicas: the same client against both, which should reach >= 1.8 C;
- two replicas, one SIGKILLed after a third of the answers and started again after two
  thirds: the run completes; prints the answered requests lost (no ok answer recorded) and
  repeated (answered by the killed replica before it died and served again by the other, or
  served twice by one), both of which must be 0, and whether the restarted replica was
  probed back in and used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_replica(port: int, slots: int, latency_ms: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lgt_ops.cli", "sim", "serve", "--port", str(port),
         "--slots", str(slots), "--latency-ms", str(latency_ms), "--completion-chars", "64",
         "--served-models", "bench-model"],  # a restarted replica is taken back by its model
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"simulator on port {port} did not start")


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/stats", timeout=10) as r:
        return json.loads(r.read())


def client(
    ports: list[int], n: int, window: int, adaptive: bool, kill: dict | None, seed: int
) -> dict:
    """One scenario, in this process: n unique requests through the engine and its ledger."""
    from lgt_ops.config import EndpointSettings
    from lgt_ops.db import make_engine, upgrade
    from lgt_ops.llm.engine import RequestEngine
    from lgt_ops.llm.ledger import Ledger
    from lgt_ops.llm.request import ChatRequest
    from lgt_ops.runctx import RunContext

    db = make_engine(f"sqlite:///{tempfile.mkdtemp(prefix='lgt-bench-')}/ledger.db")
    upgrade(db)
    ledger = Ledger(db, RunContext("bench"), "bench")
    urls = [f"http://127.0.0.1:{p}/v1" for p in ports]
    ep = EndpointSettings(role="llm", base_url=urls, model="bench-model", adaptive=adaptive,
                          max_inflight=window, timeout_s=5.0, down_after_s=30.0)  # fmt: skip
    engine = RequestEngine(ep, ledger, seed=seed)
    requests = (
        ChatRequest("llm", "bench-model", "bench", "1",
                    [{"role": "user", "content": f"request {seed}-{i}: say something"}],
                    {"max_tokens": 64, "temperature": 0.0, "seed": i})
        for i in range(n)
    )  # fmt: skip
    answered_by: dict[str, str] = {}
    emitted: Counter = Counter()
    restarted = None
    t0, cpu0 = time.monotonic(), time.process_time()
    for i, outcome in enumerate(engine.run(requests), 1):
        emitted[outcome.request.key] += 1
        if outcome.ok:
            answered_by[outcome.request.key[:32]] = outcome.replica or ""
        if ledger.pending >= 500:
            ledger.flush_now()
        if kill and i == n // 3:
            os.kill(kill["pid"], signal.SIGKILL)
        if kill and i == 2 * n // 3:
            restarted = start_replica(ports[0], kill["slots"], kill["latency_ms"]).pid
    ledger.flush_now()
    wall = time.monotonic() - t0
    cpu_ms = 1000 * (time.process_time() - cpu0) / n
    result = {"requests": n, "ok": len(answered_by), "wall_s": wall, "req_per_s": n / wall,
              "cpu_ms_per_req": cpu_ms,
              "duplicates_emitted": sum(c - 1 for c in emitted.values()),
              "answered_by": answered_by, "restarted_pid": restarted,
              "replicas": engine.pool.summary(), "summary": engine.summary()}  # fmt: skip
    return result


def run_client(conf: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--client", json.dumps(conf)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def kill_check(result: dict, ports: list[int], restarted_port: int) -> tuple[int, int, dict]:
    """(lost, repeated, the restarted replica's stats) of the kill scenario."""
    dead_url = f"http://127.0.0.1:{ports[0]}/v1"
    survivor = Counter(stats(ports[1])["served_by_key"])
    back = stats(restarted_port)
    lost = result["requests"] - result["ok"]
    by_dead_before = {k for k, url in result["answered_by"].items() if url == dead_url}
    repeated = (
        len(by_dead_before & set(survivor))
        + sum(c - 1 for c in survivor.values() if c > 1)
        + sum(c - 1 for c in Counter(back["served_by_key"]).values() if c > 1)
        + result["duplicates_emitted"]
    )
    return lost, repeated, back


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3_000, help="one-replica run")
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--window", type=int, default=256, help="upper bound per replica")
    parser.add_argument("--fixed", action="store_true", help="fixed window instead of adaptive")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run one scenario
    args = parser.parse_args()
    if args.client:
        print(json.dumps(client(**json.loads(args.client))))
        return 0

    n = args.requests // 3 if args.quick else args.requests
    capacity = args.slots / (args.latency_ms / 1000)
    ports = [_free_port(), _free_port()]
    procs = [start_replica(p, args.slots, args.latency_ms) for p in ports]
    print(f"replica: {args.slots} slots x {args.latency_ms:g} ms = C = {capacity:,.0f} req/s;"
          f" window {'fixed at' if args.fixed else 'adaptive, <='} {args.window} per replica;"
          f" a process per replica")  # fmt: skip
    try:
        base = {"window": args.window, "adaptive": not args.fixed, "kill": None}
        one = run_client({**base, "ports": ports[:1], "n": n, "seed": 0})
        print(f"one replica   n={n:>6,} {one['req_per_s']:>6,.0f} req/s"
              f" = {one['req_per_s'] / capacity:.2f} C; final window"
              f" {one['replicas'][0]['window']}, p50"
              f" {one['summary']['p50_ms']:.0f} ms")  # fmt: skip
        two = run_client({**base, "ports": ports, "n": 2 * n, "seed": 1})
        ratio = two["req_per_s"] / capacity
        split = [r["answered"] for r in two["replicas"]]
        windows = [r["window"] for r in two["replicas"]]
        print(f"two replicas  n={2 * n:>6,} {two['req_per_s']:>6,.0f} req/s = {ratio:.2f} C"
              f" (target >= 1.8 C: {'met' if ratio >= 1.8 else 'NOT met'};"
              f" {two['req_per_s'] / one['req_per_s']:.2f}x one replica); answers per replica"
              f" {split}, final windows {windows}, p50 {two['summary']['p50_ms']:.0f} ms,"
              f" client CPU {two['cpu_ms_per_req']:.2f} ms/req")  # fmt: skip
        kill = {"pid": procs[0].pid, "slots": args.slots, "latency_ms": args.latency_ms}
        k = run_client({**base, "ports": ports, "n": 2 * n, "seed": 2, "kill": kill})
        lost, repeated, back = kill_check(k, ports, ports[0])
        dead = k["replicas"][0]
        print(f"one killed    n={2 * n:>6,} {k['req_per_s']:>6,.0f} req/s; replica 1 SIGKILLed"
              f" after {2 * n // 3:,} answers, restarted after {4 * n // 3:,}: ejected"
              f" {dead['ejections']}x, probed back {dead['readmissions']}x, served"
              f" {back['served']:,} after its restart; answered requests lost {lost},"
              f" repeated {repeated} (must be 0 and 0)")  # fmt: skip
        if k["restarted_pid"]:
            os.kill(k["restarted_pid"], signal.SIGTERM)
        return 0 if ratio >= 1.8 and lost == 0 and repeated == 0 else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
