"""Chaos trials: `lgt run` SIGKILLed at random points and resumed, against an uninterrupted run.

    python bench/chaos.py                 # 10 trials, 5 kills each, 8 images
    python bench/chaos.py --trials 3 --kills 6 --images 12 --seed 7

Needs Postgres on 127.0.0.1:5432 (LGT_TEST_PG_ADMIN to change); each world is a database
created for it and dropped after, plus a local-directory store under a temporary directory.
The simulator (a test double) runs in this process with some latency, so kills land with
requests in flight. One uninterrupted reference run first; then per trial (seeded), kill
points in distinct stages, always one while publishing (see tests/chaos_harness.py), each
kill resumed by the same command, then compared with the reference. Per trial and per kill
it prints where it was killed, the requests in flight at that moment, the answered requests
paid again after it, whether the release's
content sha256 equals the reference's, and every lineage table whose row count differs
(stage_runs, pipeline_runs and endpoint_preflight log attempts or runs and are not
compared). Exit 1 if any trial has a different hash, a table difference, a `staging`
release, an orphan member, or a kill whose repeated requests exceed those in flight.

A request is in flight from the moment it is sent until its answer is durable in the journal
(which commits within `LGT_LEDGER_JOURNAL_SECONDS` or `LGT_LEDGER_JOURNAL_ANSWERS`): the table
shows both parts, the requests awaiting a reply and the answers received but not yet
journaled, and their sum, which is what a kill may cost again.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--kills", type=int, default=5, help="kills per trial (distinct stages)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--latency-ms", type=float, default=20.0, help="simulator latency")
    args = p.parse_args()

    from lgt_ops.llm.simulator import BackgroundSimulator, SimConfig
    from tests.chaos_harness import World, reference_run, trial

    sim = BackgroundSimulator(SimConfig(latency_ms=args.latency_ms)).start()
    tmp = Path(tempfile.mkdtemp(prefix="lgt-chaos-"))
    bad = 0
    try:
        world = World(tmp / "world").create(args.images)
        try:
            t0 = time.monotonic()
            reference = reference_run(world, sim, tmp)
        finally:
            world.drop()
        snap, served, events = reference
        print(
            f"reference: {args.images} images, {sum(served.values())} paid requests, "
            f"{time.monotonic() - t0:.1f}s; crash-point events {events}; "
            f"release {snap.content_sha256[0][:16]}"
        )
        print(
            f"{'trial':>5}  {'killed at':<12} {'awaiting':>8} {'unjournaled':>11} "
            f"{'in flight':>9} {'repeated':>8}  hash   tables"
        )
        for i in range(args.trials):
            t = trial(sim, tmp, args.images, args.seed + i, args.kills, reference=reference)
            diffs = t.table_diffs()
            ok = (
                t.same_hash
                and not diffs
                and t.result.staging == 0
                and t.result.orphan_members == 0
                and all(k.repeated <= k.in_flight for k in t.kills)
            )
            bad += not ok
            for j, k in enumerate(t.kills):
                tail = ""
                if j == len(t.kills) - 1:
                    tables = "equal" if not diffs else str(diffs)
                    extra = (
                        f" staging={t.result.staging} orphans={t.result.orphan_members}"
                        if t.result.staging or t.result.orphan_members
                        else ""
                    )
                    same = "same" if t.same_hash else "DIFF"
                    tail = f"  {same}   {tables}{extra}  ({t.seconds:.0f}s)"
                flag = "" if k.repeated <= k.in_flight else "  <-- repeated > in flight"
                print(
                    f"{i + 1:>5}  {str(k):<12} {k.awaiting:>8} {k.unjournaled:>11} "
                    f"{k.in_flight:>9} {k.repeated:>8}{tail}{flag}"
                )
        kills = args.trials * args.kills
        print(f"{args.trials - bad}/{args.trials} trials converged ({kills} kills)")
    finally:
        sim.stop()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
