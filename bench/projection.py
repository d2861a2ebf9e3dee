"""Project the requests, tokens and GPU-hours of 1M stage-1 questions from a measured run.

    python bench/projection.py                    # the bundled sample, k=10, simulator
    python bench/projection.py --images 1000      # + a synthetic corpus of 1,000 images
    python bench/projection.py --db URL --run ID  # an existing run's v_run_goodput

Measures a run (or reads one) through the goodput view (sql/migrations/0008), scales every
model stage's requests and tokens to `--questions` accepted stage-1 questions (mcq's
accepted rows) at `--k` rollouts, and prints a Markdown table (README "Goodput").

What the figures are: request counts per stage-1 question come from the pipeline's own
fan-out (mcq per image, compositions, one cot request of n=k per question, one expansion per
expanded rollout); prompt tokens are the simulator's count of the prompts the pipeline really
sends (characters / 4, plus 256 per image); completion tokens are given twice: as the
simulator's replies (a test double: short, far below a real reasoner's) and at the method's
max_tokens budgets (every reply runs to its budget: an upper bound). GPU-hours use an
ASSUMED per-GPU throughput for each model size (--prefill / --decode; defaults below), with
prefill and decode counted one after the other (no overlap: conservative).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Assumed throughput of one GPU (80 GB A100/H100 class) serving a 7-8B model with vLLM at high
# concurrency: tokens/s. Third-party vLLM benchmarks report a few thousand output tokens/s
# for 7-8B models on one such GPU; prefill runs roughly an order of magnitude faster.
PREFILL_TPS = {"7B": 20_000, "32B": 4_000}
DECODE_TPS = {"7B": 2_500, "32B": 600}
ROLE_SIZE = {"vlm": "7B", "llm": "7B", "reasoner": "7B"}  # the default models (config.py)
STAGE_ROLE = {
    "annotate": "vlm",
    "mcq": "llm",
    "compose": "llm",
    "cot": "vlm",
    "expand": "reasoner",
    "tag": "llm",
}


@dataclass
class Measured:
    stage: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    accepted: int


def budgets(method) -> dict[str, int]:  # noqa: ANN001 - MethodParams
    """Completion-token budget of one request per stage (max_tokens x completions)."""
    return {
        "annotate": 2048,
        "mcq": method.mcq_max_tokens,
        "compose": 1024,
        "expand": method.expand_max_tokens,
        "tag": 128,
    }


def measure(images: int, k: int) -> tuple[list[Measured], int]:
    """Run the pipeline on the sample (+ a synthetic corpus) at k; figures and the run's k."""
    from lgt_ops.config import settings_from_env
    from lgt_ops.demo import upload_sample
    from lgt_ops.llm.simulator import BackgroundSimulator, SimConfig
    from lgt_ops.params import RunParams
    from lgt_ops.pipeline import run_local
    from lgt_ops.runctx import RunContext
    from lgt_ops.stages.base import StageEnv

    tmp = Path(tempfile.mkdtemp(prefix="lgt-projection-"))
    sim = BackgroundSimulator(SimConfig(latency_ms=0, slots=256)).start()
    try:
        settings = settings_from_env(
            {
                "LGT_DATA_DIR": str(tmp),
                "LGT_DATABASE_URL": f"sqlite:///{tmp / 'lineage.db'}",
                "LGT_STORE_URL": (tmp / "store").as_uri(),
            }
        ).with_endpoint_urls({r: sim.base_url for r in ("vlm", "llm", "reasoner")})
        params = RunParams(
            source="sources/", k_rollouts=k, release_name="projection", allow_simulated=True
        )
        env = StageEnv.open(params.apply(settings), RunContext("projection"))
        env.show_progress = False
        env.store.ensure_bucket()
        upload_sample(env.store, "sources/sample/")
        if images:
            from bench.refresh_unchanged import make_corpus

            make_corpus(env.store, "sources/synthetic/", 0, images)
        run_local(env, params)
        figures = read(env.db, "projection")
        env.db.dispose()
        return figures, k
    finally:
        sim.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def read(db, run_id: str) -> list[Measured]:  # noqa: ANN001 - Engine
    from sqlalchemy import text

    with db.connect() as conn:
        rows = (
            conn.execute(text("SELECT * FROM v_run_goodput WHERE run_id = :r"), {"r": run_id})
            .mappings()
            .all()
        )
    return [
        Measured(
            r["stage"],
            int(r["requests"]),
            int(r["prompt_tokens"]),
            int(r["completion_tokens"]),
            int(r["accepted"]),
        )
        for r in rows
    ]


def run_k(db, run_id: str) -> int:  # noqa: ANN001 - Engine
    from sqlalchemy import text

    with db.connect() as conn:
        params = conn.execute(
            text("SELECT params FROM pipeline_runs WHERE run_id = :r"), {"r": run_id}
        ).scalar_one()
    return int(json.loads(params or "{}").get("k_rollouts", 10))


def project(figures: list[Measured], k_run: int, k: int, questions: int) -> list[dict]:
    from lgt_ops.config import MethodParams

    method = MethodParams()
    by_stage = {f.stage: f for f in figures}
    q1 = by_stage["mcq"].accepted
    if not q1:
        raise SystemExit("the run accepted no stage-1 question: nothing to scale from")
    scale = questions / q1
    expanded = min(method.expand_rollouts_per_question, k)
    expanded_run = min(method.expand_rollouts_per_question, k_run)
    budget = budgets(method) | {"cot": method.cot_max_tokens * k}
    rows = []
    for stage, role in STAGE_ROLE.items():
        f = by_stage.get(stage)
        if f is None or not f.requests:
            continue
        requests = f.requests * scale
        completion = f.completion_tokens * scale
        if stage == "cot":  # one request per question, n=k completions
            completion *= k / k_run
        if stage == "expand":  # one request per expanded rollout
            requests *= expanded / expanded_run
            completion *= expanded / expanded_run
        prompt = f.prompt_tokens / f.requests * requests
        size = ROLE_SIZE[role]
        rows.append(
            {
                "stage": stage,
                "role": role,
                "size": size,
                "requests": requests,
                "prompt": prompt,
                "completion_sim": completion,
                "completion_budget": requests * budget[stage],
                "gpu_h_sim": _gpu_hours(prompt, completion, size),
                "gpu_h_budget": _gpu_hours(prompt, requests * budget[stage], size),
            }
        )
    return rows


def _gpu_hours(prompt: float, completion: float, size: str) -> float:
    return (prompt / PREFILL_TPS[size] + completion / DECODE_TPS[size]) / 3600


def markdown(rows: list[dict], questions: int, k: int) -> str:
    def m(x: float) -> str:
        if x >= 1e9:
            return f"{x / 1e9:,.2f}B"
        return f"{x / 1e6:,.1f}M" if x >= 1e6 else f"{x:,.0f}"

    out = [
        f"Projection for {questions:,} stage-1 questions, k={k}:",
        "",
        "| stage | role (size) | requests | tokens in | tokens out (simulator) |"
        " tokens out (max_tokens budget) | GPU-h (simulator) | GPU-h (budget) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    total = {
        k: 0.0
        for k in (
            "requests",
            "prompt",
            "completion_sim",
            "completion_budget",
            "gpu_h_sim",
            "gpu_h_budget",
        )
    }
    for r in rows:
        for key in total:
            total[key] += r[key]
        out.append(
            f"| {r['stage']} | {r['role']} ({r['size']}) | {m(r['requests'])} |"
            f" {m(r['prompt'])} | {m(r['completion_sim'])} |"
            f" {m(r['completion_budget'])} | {r['gpu_h_sim']:,.0f} |"
            f" {r['gpu_h_budget']:,.0f} |"
        )
    out.append(
        f"| **total** | | {m(total['requests'])} | {m(total['prompt'])} |"
        f" {m(total['completion_sim'])} | {m(total['completion_budget'])} |"
        f" {total['gpu_h_sim']:,.0f} | {total['gpu_h_budget']:,.0f} |"
    )
    sizes = sorted({r["size"] for r in rows})
    out += [
        "",
        "Assumed per-GPU throughput: "
        + "; ".join(
            f"{s}: {PREFILL_TPS[s]:,} prompt tokens/s, {DECODE_TPS[s]:,} completion tokens/s"
            for s in sizes
        )
        + ".",
    ]
    return "\n".join(out)


def measured_table(figures: list[Measured], k_run: int) -> str:
    out = [
        f"Measured (simulator, k={k_run}):",
        "",
        "| stage | requests | tokens in | tokens out | accepted | per 1k requests |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in figures:
        if f.requests:
            out.append(
                f"| {f.stage} | {f.requests:,} | {f.prompt_tokens:,} |"
                f" {f.completion_tokens:,} | {f.accepted:,} |"
                f" {1000 * f.accepted / f.requests:,.0f} |"
            )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=0, help="synthetic images to add")
    parser.add_argument("--db", help="lineage database URL of an existing run")
    parser.add_argument("--run", help="its run id (with --db)")
    parser.add_argument("--k", type=int, default=10, help="rollouts per question")
    parser.add_argument("--questions", type=int, default=1_000_000)
    parser.add_argument("--reasoner-size", choices=sorted(PREFILL_TPS), default="7B")
    args = parser.parse_args()
    ROLE_SIZE["reasoner"] = args.reasoner_size
    if args.db:
        from sqlalchemy import create_engine

        db = create_engine(args.db)
        figures, k_run = read(db, args.run), run_k(db, args.run)
    else:
        figures, k_run = measure(args.images, args.k)
    print(measured_table(figures, k_run))
    print()
    print(markdown(project(figures, k_run, args.k, args.questions), args.questions, args.k))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
