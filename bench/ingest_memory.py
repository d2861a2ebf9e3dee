"""Peak memory of ingest over large images, with and without the decoded-pixel budget.

    python bench/ingest_memory.py                     # 6 images of 62 Mpx, 3 budgets
    python bench/ingest_memory.py --images 4 --megapixels 30 --budgets 1e12,64e6

Large PNGs (a gradient with a noisy channel, so files are realistic in size) are generated
once in a temporary directory; then, for each budget, a fresh process ingests them from a
local store into SQLite (one shard, so all 8 download threads are busy) and reports its own
peak RSS (VmHWM from /proc/self/status) next to its peak before ingesting.
A budget of 1e12 pixels is no bound at all (the behaviour before the budget existed): up to
8 decodes at once. The default bound is `LGT_INGEST_PIXEL_BUDGET` = 64 Mpx.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# VmHWM: this process's own peak (ru_maxrss would also count the parent's RSS at fork).
from bench.refresh_unchanged import peak_rss_mb  # noqa: E402


def make_images(folder: Path, n: int, megapixels: float) -> int:
    """n square PNGs of about `megapixels` each; returns the pixels per image."""
    from PIL import Image

    side = int((megapixels * 1e6) ** 0.5)
    red = Image.linear_gradient("L").resize((side, side))
    green = red.rotate(90)
    for i in range(n):
        path = folder / f"img/large-{i:02d}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        blue = Image.effect_noise((side, side), 8 + i)  # different bytes per image
        Image.merge("RGB", (red, green, blue)).save(path, "PNG", compress_level=1)
    return side * side


def child(store_dir: str, budget: int) -> dict:
    """In a fresh process: ingest the images under one budget, report peak RSS."""
    from lgt_ops.config import settings_from_env
    from lgt_ops.runctx import new_cli_run
    from lgt_ops.stages import ingest
    from lgt_ops.stages.base import StageEnv

    work = Path(tempfile.mkdtemp(prefix="lgt-bench-mem-"))
    settings = settings_from_env(
        {
            "LGT_DATA_DIR": str(work),
            "LGT_STORE_URL": Path(store_dir).as_uri(),
            "LGT_INGEST_PIXEL_BUDGET": str(budget),
            "LGT_SHARD_SIZE": "1000",
        }
    )
    env = StageEnv.open(settings, new_cli_run("bench"))
    env.show_progress = False
    before = peak_rss_mb()
    t0 = time.perf_counter()
    scan, stats = ingest.ingest_all(env, "img/")
    return {
        "budget_pixels": budget,
        "images": stats.items_out,
        "rejected": dict(stats.rejected_by_reason),
        "rss_before_mb": round(before),
        "peak_rss_mb": round(peak_rss_mb()),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--megapixels", type=float, default=62.0)
    ap.add_argument("--budgets", default="1e12,128e6,64e6")
    ap.add_argument("--dir", help="keep the generated images here (default: a temp dir)")
    ap.add_argument("--child", nargs=2, metavar=("STORE_DIR", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(float(args.child[1])))))
        return
    folder = Path(args.dir or tempfile.mkdtemp(prefix="lgt-bench-images-"))
    t0 = time.perf_counter()
    pixels = make_images(folder, args.images, args.megapixels)
    size_mb = sum(p.stat().st_size for p in (folder / "img").glob("*.png")) / 2**20
    print(
        f"{args.images} PNGs of {pixels / 1e6:.1f} Mpx ({size_mb / args.images:.0f} MB each)"
        f" generated in {time.perf_counter() - t0:.0f} s under {folder}"
    )
    for raw in args.budgets.split(","):
        budget = int(float(raw))
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(folder), str(budget)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        label = "none (8 decodes at once)" if budget >= 10**12 else f"{budget / 1e6:.0f} Mpx"
        held = min(args.images * pixels, max(budget, pixels))  # a larger image runs alone
        per_px = (r["peak_rss_mb"] - r["rss_before_mb"]) * 2**20 / held
        rejected = f", rejected {r['rejected']}" if r["rejected"] else ""
        print(
            f"budget {label:>26}: peak RSS {r['peak_rss_mb']:>5} MB"
            f" (before ingest {r['rss_before_mb']} MB), {r['images']} images"
            f" in {r['seconds']} s; {per_px:.1f} B of RSS per pixel the budget lets decode"
            f" at once ({held / 1e6:.0f} Mpx){rejected}"
        )


if __name__ == "__main__":
    main()
