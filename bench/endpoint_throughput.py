"""Endpoint engine throughput against the simulator at a known capacity.

    python bench/endpoint_throughput.py            # 20k requests: clean, 10% faults, 10x memory
    python bench/endpoint_throughput.py --quick    # 5k requests, no 10x run

The simulator runs in its own process with `--slots 64 --latency-ms 50` (capacity 1280 req/s);
each scenario's client runs in a fresh process (so peak RSS is that scenario's), sends unique
requests through `RequestEngine` with the ledger on SQLite (batched writes, as in a stage),
with a 1 s request timeout (20x the service latency), and reports one line: achieved req/s,
share of capacity, client CPU per request, peak RSS and latency percentiles. Targets: >= 90%
of capacity clean, >= 80% with 10% faults, peak RSS flat when the request count grows 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAULTS = {  # 10% of HTTP requests fail, across every failure class the engine handles
    "fault_429": 0.03,
    "fault_500": 0.03,
    "fault_timeout": 0.005,
    "fault_drop": 0.01,
    "fault_malformed": 0.01,
    "fault_truncated": 0.01,
    "fault_invalid_json": 0.005,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def client(base_url: str, n: int, window: int, adaptive: bool, seed: int) -> dict:
    """One scenario, in this process: n unique requests through the engine + ledger."""
    from lgt_ops.config import EndpointSettings
    from lgt_ops.db import make_engine, upgrade
    from lgt_ops.llm.engine import RequestEngine
    from lgt_ops.llm.ledger import Ledger
    from lgt_ops.llm.request import ChatRequest
    from lgt_ops.runctx import RunContext

    tmp = tempfile.mkdtemp(prefix="lgt-bench-")
    db = make_engine(f"sqlite:///{tmp}/ledger.db")
    upgrade(db)
    ledger = Ledger(db, RunContext("bench"), "bench")
    ep = EndpointSettings(
        role="llm",
        base_url=base_url,
        model="bench-model",
        max_inflight=window,
        adaptive=adaptive,
        timeout_s=1.0,
        max_attempts=8,
    )
    engine = RequestEngine(ep, ledger, seed=seed)

    def requests():  # generated lazily: memory must not grow with n
        for i in range(n):
            yield ChatRequest(
                "llm",
                "bench-model",
                "bench",
                "1",
                [{"role": "user", "content": f"request {seed}-{i}: say something"}],
                {"max_tokens": 64, "temperature": 0.0, "seed": i},
            )

    cpu0, t0 = time.process_time(), time.monotonic()
    ok = 0
    for outcome in engine.run(requests()):
        ok += outcome.status == "ok"
        if ledger.pending >= 500:
            ledger.flush_now()
    ledger.flush_now()
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    s = engine.summary()
    return {
        "requests": n,
        "ok": ok,
        "wall_s": wall,
        "req_per_s": n / wall,
        "cpu_ms_per_req": 1000 * cpu / n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "p50_ms": s["p50_ms"],
        "p99_ms": s["p99_ms"],
        "http_attempts": s["sent"],
        "errors": s["errors"],
        "final_window": s["window"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--window", type=int, default=256, help="upper bound of the window")
    parser.add_argument("--fixed", action="store_true", help="fixed window instead of adaptive")
    parser.add_argument("--quick", action="store_true", help="5k requests, skip the 10x run")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run one scenario
    args = parser.parse_args()

    if args.client:
        conf = json.loads(args.client)
        print(json.dumps(client(**conf)))
        return 0

    n = 5_000 if args.quick else args.requests
    port = _free_port()
    capacity = args.slots / (args.latency_ms / 1000)
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lgt_ops.cli",
            "sim",
            "serve",
            "--port",
            str(port),
            "--slots",
            str(args.slots),
            "--latency-ms",
            str(args.latency_ms),
            "--timeout-sleep-s",
            "5",
            "--completion-chars",
            "64",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        scenarios = [("clean", n, {}), ("faults-10%", n, FAULTS)]
        if not args.quick:
            scenarios.append(("clean-10x", 10 * n, {}))
        print(
            f"simulator: {args.slots} slots x {args.latency_ms:g} ms ="
            f" {capacity:,.0f} req/s capacity;"
            f" window {'fixed' if args.fixed else 'adaptive'} <= {args.window}"
        )
        results = {}
        for name, count, faults in scenarios:
            _post(base + "/sim/config", {k: 0.0 for k in FAULTS} | faults)
            _post(base + "/sim/reset", {})
            conf = {
                "base_url": base + "/v1",
                "n": count,
                "window": args.window,
                "adaptive": not args.fixed,
                "seed": len(results),
            }
            out = subprocess.run(
                [sys.executable, __file__, "--client", json.dumps(conf)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[name] = r
            print(
                f"{name:11s} n={r['requests']:>7,} ok={r['ok']:>7,} {r['req_per_s']:>7,.0f} req/s"
                f" = {100 * r['req_per_s'] / capacity:5.1f}% of capacity |"
                f" client CPU {r['cpu_ms_per_req']:.3f} ms/req |"
                f" peak RSS {r['peak_rss_mb']:.0f} MB |"
                f" p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms |"
                f" attempts {r['http_attempts']:,} window {r['final_window']} errors {r['errors']}"
            )
        if "clean-10x" in results:
            a, b = results["clean"]["peak_rss_mb"], results["clean-10x"]["peak_rss_mb"]
            print(
                f"memory: peak RSS {a:.0f} MB at {n:,} requests vs {b:.0f} MB at {10 * n:,}"
                f" ({100 * (b - a) / a:+.0f}%)"
            )
    finally:
        sim.terminate()
        sim.wait(timeout=10)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
