"""Throughput of the filter's per-trace rules on simulated traces (no DB, no server).

    python bench/filter_rules.py                    # 5,000 questions = 20,000 traces
    python bench/filter_rules.py --questions 1000

Traces are built as the pipeline builds them from the simulator's replies (tests/sim_traces.py:
a rollout and three expansions per question, leaks planted at 30 %). Prints, in CPU time
(time.process_time: steadier than wall time on a shared machine), the traces/s of the whole
verdict (`stages.filter.judge`: format, length, leak, repetition, answer, near-duplicate and
behaviour counts) and of each rule alone, best of `--repeat` passes; "judge + scan" is the
stage's own path: `trace_scan.scan` of all the texts at once (Arrow's RE2 kernels), then
`judge` with those scans.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lgt_ops import trace_scan, traces  # noqa: E402
from lgt_ops.config import MethodParams  # noqa: E402
from lgt_ops.questions import tokens  # noqa: E402
from lgt_ops.stages.filter import judge  # noqa: E402
from tests.sim_traces import simulated  # noqa: E402


def best_rate(n: int, work: Callable[[], object], repeat: int) -> float:
    """Traces per CPU second of the fastest of `repeat` passes."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        work()
        best = min(best, time.process_time() - t0)
    return n / best if best else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    groups = simulated(args.questions)
    texts = [t.text for g in groups for t in g]
    n = len(texts)
    m = MethodParams()
    def judge_scanned() -> list[object]:
        scans = iter(trace_scan.scan(texts))
        return [judge(g, m, [next(scans) for _ in g]) for g in groups]

    rules: dict[str, Callable[[], object]] = {
        "judge (all rules)": lambda: [judge(g, m) for g in groups],
        "judge + scan (the stage)": judge_scanned,
        "scan alone": lambda: trace_scan.scan(texts),
        "leaks": lambda: [traces.leaks(t) for t in texts],
        "behaviours": lambda: [traces.behaviours(t) for t in texts],
        "degenerate": lambda: [traces.degenerate(t) for t in texts],
        "tokens (near-duplicate)": lambda: [tokens(t) for t in texts],
    }
    print(f"{n} simulated traces ({args.questions} questions), CPU time, best of {args.repeat}")
    for name, work in rules.items():
        rate = best_rate(n, work, args.repeat)
        print(f"  {name:<26} {rate:>10,.0f} traces/s  {1e3 / rate:.4f} ms/trace")


if __name__ == "__main__":
    main()
