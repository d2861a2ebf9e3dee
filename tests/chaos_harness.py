"""The chaos harness shared by tests/test_chaos.py and bench/chaos.py.

A *world* is one Postgres database + one local-directory store with the same small corpus.
`lgt run` runs in a subprocess against it and the simulator (in this process, so its served
counts are readable); a kill is the test-only crash point LGT_CHAOS_KILL='<point>:<n>' (see
lgt_ops/chaos.py), which SIGKILLs the process at the n-th event of <point> and first writes
what it knew (requests in flight, answers not yet journaled) to a report file.

A trial: an uninterrupted reference run in one world; in another world, a sequence of
killed runs (kill points in pipeline order), then the same command once more to finish;
then the two worlds are compared: the release's content sha256, every lineage table's row
count, no `staging` release, no orphan release member, and the paid requests repeated
after each kill against the in-flight window at that kill.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, inspect, text

from tests.pg import admin, database_url

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "sources/chaos/"

# Tables that log attempts by design: a crashed and resumed run has more of them than an
# uninterrupted one, so they are not compared. pipeline_runs: one row per run (each resumed
# `lgt run` is a run); stage_runs: one per stage attempt; endpoint_preflight: one per run and
# endpoint role (each run probes its endpoints before starting).
ATTEMPT_LOGS = frozenset({"stage_runs", "pipeline_runs", "endpoint_preflight"})
# Crash points in pipeline order; a kill sequence visits them in this order, so each resumed
# run gets past the previous kill before it reaches the next one.
POINTS = (
    "ingest", "annotate", "mcq", "blind", "cot", "compose", "cot2", "harden", "expand", "filter",
    "pairs", "release",
)
MODEL_POINTS = frozenset({"annotate", "mcq", "blind", "cot", "compose", "cot2", "expand"})
# A small corpus and cheap method settings: every stage has work, a run takes seconds.
RUN_ARGS = ("--mcq-per-image", "2", "--k-rollouts", "3", "--allow-simulated")


@dataclass
class World:
    """A lineage database and a store holding the corpus."""

    root: Path
    db_name: str = field(default_factory=lambda: f"lgt_chaos_{uuid.uuid4().hex[:10]}")

    @property
    def db_url(self) -> str:
        return database_url(self.db_name)

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    def create(self, images: int) -> World:
        admin(f"CREATE DATABASE {self.db_name}")
        write_corpus(self.store_dir, images)
        return self

    def drop(self) -> None:
        """Drop the database and delete the store (the next world reuses the path: image
        paths in a release name the store, so compared worlds must live at one path)."""
        admin(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")
        shutil.rmtree(self.root, ignore_errors=True)


def write_corpus(store_dir: Path, images: int) -> None:
    """Distinct small JPEGs with captions and boxes, and their manifest."""
    from tests.samples import jpeg

    labels = ("cup", "bowl", "lamp", "book", "chair", "bottle")
    lines = []
    for i in range(images):
        key = f"img/{i:03d}.jpg"
        path = store_dir / PREFIX / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(64 + 3 * i, 48 + i, (i * 37 % 256, 120, 200 - i)))
        a, b = labels[i % len(labels)], labels[(i + 2) % len(labels)]
        lines.append(
            json.dumps(
                {
                    "key": key,
                    "caption": f"Picture {i}: a {a} on the left and a {b} on the right.",
                    "objects": [
                        {"id": "o1", "label": a, "box": [2, 4, 24, 30]},
                        {"id": "o2", "label": b, "box": [34, 8, 60, 40]},
                    ],
                }
            )
        )
    (store_dir / PREFIX / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def cli_env(world: World, sim_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LGT_", "PYTEST"))}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "PYTHONFAULTHANDLER": "1",
            "LGT_DATA_DIR": str(world.root / "data"),
            "LGT_DATABASE_URL": world.db_url,
            "LGT_STORE_URL": world.store_dir.as_uri(),
            "LGT_SHARD_SIZE": "1000",
            **{f"LGT_{r}_BASE_URL": sim_url for r in ("VLM", "LLM", "REASONER")},
            **{f"LGT_{r}_MAX_INFLIGHT": "8" for r in ("VLM", "LLM", "REASONER")},
            **{f"LGT_{r}_ADAPTIVE": "0" for r in ("VLM", "LLM", "REASONER")},
        }
    )
    env.update(extra)
    return env


def lgt_run(env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """`lgt run` on the corpus; a hung run is aborted so its threads' stacks are shown."""
    cmd = [sys.executable, "-m", "lgt_ops.cli", "run", "--source", PREFIX, *RUN_ARGS]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate()
        raise RuntimeError(f"lgt run hung:\n{err.decode()[-8000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@dataclass
class Snapshot:
    """What a finished world holds, for comparison."""

    counts: dict[str, int]
    content_sha256: list[str]
    staging: int
    orphan_members: int


def snapshot(world: World) -> Snapshot:
    db = create_engine(world.db_url)
    try:
        names = sorted(set(inspect(db).get_table_names()) - ATTEMPT_LOGS)
        with db.connect() as conn:
            counts = {
                n: conn.execute(text(f'SELECT COUNT(*) FROM "{n}"')).scalar_one() for n in names
            }
            hashes = [
                r[0]
                for r in conn.execute(
                    text("SELECT content_sha256 FROM releases WHERE status = 'published'")
                )
            ]
            staging = conn.execute(
                text("SELECT COUNT(*) FROM releases WHERE status = 'staging'")
            ).scalar_one()
            orphans = conn.execute(
                text(
                    "SELECT COUNT(*) FROM release_members m LEFT JOIN releases r"
                    " ON r.release_id = m.release_id"
                    " WHERE r.release_id IS NULL OR r.status <> 'published'"
                )
            ).scalar_one()
            orphans += conn.execute(  # member rows of an attempt that never published
                text(
                    "SELECT COUNT(*) FROM member_rows m LEFT JOIN releases r"
                    " ON r.release_id = m.owner_release_id"
                    " WHERE r.release_id IS NULL OR r.status <> 'published'"
                )
            ).scalar_one()
    finally:
        db.dispose()
    return Snapshot(counts, hashes, staging, orphans)


@dataclass
class Kill:
    point: str
    n: int
    awaiting: int = 0  # requests on the wire, no reply yet, when the process died
    unjournaled: int = 0  # replies received, not yet durable in the journal
    repeated: int = 0  # answered requests sent again after this kill

    @property
    def in_flight(self) -> int:
        """Sent and not yet durable: what a kill may have to send again."""
        return self.awaiting + self.unjournaled

    def __str__(self) -> str:
        return f"{self.point}:{self.n}"


@dataclass
class Trial:
    kills: list[Kill]
    reference: Snapshot
    result: Snapshot
    seconds: float

    @property
    def same_hash(self) -> bool:
        return bool(self.reference.content_sha256) and (
            self.result.content_sha256 == self.reference.content_sha256
        )

    def table_diffs(self) -> dict[str, tuple[int, int]]:
        a, b = self.reference.counts, self.result.counts
        return {
            t: (a.get(t, 0), b.get(t, 0)) for t in sorted(set(a) | set(b)) if a.get(t) != b.get(t)
        }


def reference_run(
    world: World, sim: Any, tmp: Path
) -> tuple[Snapshot, Counter[str], dict[str, int]]:
    """An uninterrupted run: its snapshot, what it asked the simulator, its crash-point counts."""
    counts_file = tmp / f"points-{world.db_name}.json"
    sim.sim.reset()
    done = lgt_run(cli_env(world, sim.base_url, LGT_CHAOS_COUNT=str(counts_file)))
    if done.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{done.stderr.decode()[-4000:]}")
    return snapshot(world), Counter(sim.sim.served_by_key), json.loads(counts_file.read_text())


def draw_kills(rng: random.Random, events: dict[str, int], k: int) -> list[Kill]:
    """k kill points in k different stages, always one while publishing, in pipeline order;
    n drawn inside what an uninterrupted run reaches (the last release write excluded: after
    it the release is complete)."""
    usable = [p for p in POINTS if p != "release" and events.get(p, 0) >= 1]
    chosen = set(rng.sample(usable, min(k - 1, len(usable)))) | {"release"}
    kills = []
    for p in POINTS:
        if p in chosen:
            last = events[p] - 1 if p == "release" else events[p]
            kills.append(Kill(p, rng.randint(1, max(1, last))))
    return kills


def _drain(sim: Any, seconds: float = 30) -> None:
    """Requests the dead process had in flight still finish on the simulator: wait for them."""
    deadline = time.monotonic() + seconds
    while sim.sim.inflight > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)


def chaos_run(world: World, sim: Any, kills: list[Kill], tmp: Path) -> Snapshot:
    """Each kill in turn (each run resumes the previous), then a run to the end."""
    report = tmp / f"kills-{world.db_name}.jsonl"
    sim.sim.reset()
    for kill in kills:
        before = Counter(sim.sim.served_by_key)
        env = cli_env(world, sim.base_url, LGT_CHAOS_KILL=str(kill), LGT_CHAOS_REPORT=str(report))
        done = lgt_run(env)
        if done.returncode != -signal.SIGKILL:
            raise RuntimeError(
                f"run with kill {kill} ended with {done.returncode}, not SIGKILL:\n"
                f"{done.stderr.decode()[-4000:]}"
            )
        _drain(sim)
        line = json.loads(report.read_text().splitlines()[-1])
        kill.awaiting = int(line.get("in_flight", 0))
        kill.unjournaled = int(line.get("unjournaled", 0))
        kill.served_at_kill = Counter(sim.sim.served_by_key)  # type: ignore[attr-defined]
        kill.served_before = before  # type: ignore[attr-defined]
    done = lgt_run(cli_env(world, sim.base_url))
    if done.returncode != 0:
        raise RuntimeError(f"final run failed:\n{done.stderr.decode()[-4000:]}")
    _count_repeats(kills, Counter(sim.sim.served_by_key))
    return snapshot(world)


def _count_repeats(kills: list[Kill], final: Counter[str]) -> None:
    """Requests answered before kill i and sent again before the next kill (or the end)."""
    for i, kill in enumerate(kills):
        at_kill: Counter[str] = kill.served_at_kill  # type: ignore[attr-defined]
        after = kills[i + 1].served_at_kill if i + 1 < len(kills) else final  # type: ignore[attr-defined]
        kill.repeated = sum(1 for key, n in at_kill.items() if after[key] > n)


def trial(
    sim: Any,
    tmp: Path,
    images: int,
    seed: int,
    n_kills: int,
    reference: tuple[Snapshot, Counter[str], dict[str, int]] | None = None,
) -> Trial:
    """One reference (unless given) and one killed-and-resumed world, compared. Both worlds
    live at the same path, one after the other (a release names its images' store paths)."""
    rng = random.Random(seed)
    root = tmp / "world"
    if reference is None:
        ref_world = World(root).create(images)
        try:
            reference = reference_run(ref_world, sim, tmp)
        finally:
            ref_world.drop()
    ref_snap, _, events = reference
    kills = draw_kills(rng, events, n_kills)
    world = World(root).create(images)
    started = time.monotonic()
    try:
        result = chaos_run(world, sim, kills, tmp)
    finally:
        world.drop()
    return Trial(kills, ref_snap, result, time.monotonic() - started)
